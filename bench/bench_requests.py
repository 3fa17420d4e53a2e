"""Requests per minute for a batch of small requests on 2 ranks: one launch per request (`torchrun … paragen image`
N times), one launch with a request file (`--requests`), which loads and parallelises the model once, and
`paragen serve` under load.

Each round runs every way on the same N requests (distinct prompts and seeds, tiny-sd, small images) and checks
that all ways write byte-identical PNGs. Wall time includes everything a user waits for: interpreter and
library start, model build, parallelisation, generation, writing. The server is started once per round (its
start-up is reported apart), then takes the N requests from 1 client at a time (each request's latency is its
service time) and from 4 clients at once (a saturated queue: throughput, and latency with waiting); latency is
from sending the request to the last byte of the response, base64 PNG included. One warm-up round first (not
kept), then `--rounds` kept rounds; median and p10–p90 over rounds (latency quantiles over every request of the
kept rounds). Writes `bench/results/requests_cpu.json`.

`--part batching` and `--part clips` measure the server under load (`serving_load.py`): throughput and latency at 1, 4
and 8 clients with dynamic batching off and on (`requests_batching_cpu.json`; `--job-options '--cfg 2'` serves another
layout), and the time to the first streamed clip of a clip-parallel video against the whole video's
(`requests_clips_cpu.json`).

    .venv/bin/python bench/bench_requests.py [--part launches|batching|clips] [--requests 8] [--rounds 3]
        [--size 128] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, report_header, spread
from serving_load import CLIENTS as LOAD_CLIENTS, batching_round, batching_summary, clips_round, clips_summary

sys.path.insert(0, str(ROOT))
from tests.serve_client import Server, call  # noqa: E402 — the tests' server driver and plain HTTP client

RANKS = 2
CLIENTS = (1, 4)


def _launch(args: list[str], out: Path) -> float:
    """One 2-rank launch of `paragen image`; its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "-m", "paragen", "image",
           *args, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return time.perf_counter() - started


def _round(requests: list[dict], common: list[str], folder: Path) -> dict[str, float]:
    single, batch = folder / "single", folder / "batch"
    each = sum(_launch([*common, "--prompt", r["prompt"], "--seed", str(r["seed"]), "--name", r["id"]], single)
               for r in requests)
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    whole = _launch([*common, "--requests", str(path)], batch)
    times = {"one_launch_per_request_s": each, "request_file_s": whole, **_serve(requests, common, folder / "served")}
    for r in requests:
        expected = (single / f"{r['id']}.png").read_bytes()
        made = [batch / f"{r['id']}.png", *(folder / "served" / f"c{clients}-{r['id']}.png" for clients in CLIENTS)]
        if any(path.read_bytes() != expected for path in made):
            raise RuntimeError(f"request {r['id']}: a request file's or the server's PNG differs from its own launch's")
    return times


def _serve(requests: list[dict], common: list[str], out: Path) -> dict:
    """Start `paragen serve image` on 2 ranks; send the requests from each number of clients; stop it."""
    started = time.perf_counter()
    server = Server(["image", *common, "--out", str(out)], RANKS).start()
    times: dict = {"server_start_s": time.perf_counter() - started}
    try:
        for clients in CLIENTS:
            def one(r: dict, clients: int = clients) -> float:
                sent = time.perf_counter()
                reply = call(server.url, "/v1/images/generations",
                             {"prompt": r["prompt"], "seed": r["seed"], "id": f"c{clients}-{r['id']}"})
                if reply.status != 200:
                    raise RuntimeError(f"the server answered {reply.status}: {reply.body}")
                return time.perf_counter() - sent
            first = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                latencies = list(pool.map(one, requests))
            times[f"server_{clients}_clients"] = {"wall_s": time.perf_counter() - first, "latency_s": latencies}
        server.signal()
        if server.wait() != [0] * RANKS:
            raise RuntimeError(f"the server did not exit cleanly:\n{server.log(0)[-3000:]}")
    finally:
        server.stop()
    return times


RESULTS = {"launches": "requests_cpu.json", "batching": "requests_batching_cpu.json",
           "clips": "requests_clips_cpu.json"}
WAN = ["--model", "tiny-wan", "--clip", "2", "--local", "1", "--global-frames", "2"]


def _rounds(rounds: int, one_round) -> list:
    """A warm-up round (not kept), then `rounds` kept ones, each in a fresh folder."""
    kept = []
    for number in range(rounds + 1):
        folder = Path(tempfile.mkdtemp(prefix="bench_requests_"))
        try:
            times = one_round(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"round {number}{' (warm-up)' * (number == 0)}: {times}", file=sys.stderr)
        if number:
            kept.append(times)
    return kept


def _load(args: argparse.Namespace) -> None:
    """`--part batching` or `--part clips`."""
    threads = ["--threads", "1", "--timeout", "120"]
    if args.part == "batching":
        common = ["--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps), *threads,
                  *args.job_options.split()]
        rounds = _rounds(args.rounds, lambda folder: batching_round(args.requests, common, folder))
        summary = batching_summary(rounds, args.requests)
        workload = {"requests": args.requests, "ranks": 2, "size": args.size, "steps": args.steps, "model": "tiny-sd",
                    "job_options": args.job_options, "clients": list(LOAD_CLIENTS), "rounds": args.rounds}
    else:
        common = [*WAN, "--frames", str(args.frames), "--height", "96", "--width", "160", "--steps", str(args.steps),
                  *threads]
        rounds = _rounds(args.rounds, lambda folder: clips_round(common, folder))
        summary = clips_summary(rounds)
        workload = {"model": "tiny-wan", "ranks": 2, "clips": 2, "frames": args.frames, "size": "96x160",
                    "steps": args.steps, "rounds": args.rounds}
    report = {**report_header(f"requests_{args.part}"), "workload": workload, "rounds": rounds, "summary": summary}
    out = args.out or str(ROOT / "bench" / "results" / RESULTS[args.part])
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=tuple(RESULTS), default="launches")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=65, help="clips: the video's frames")
    parser.add_argument("--job-options", default="", help="batching: more options of the served job, e.g. '--cfg 2'")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.part != "launches":
        _load(args)
        return
    args.out = args.out or str(ROOT / "bench" / "results" / RESULTS["launches"])
    requests = [{"id": f"r{i}", "prompt": f"a lighthouse, study {i}", "seed": i} for i in range(args.requests)]
    common = ["--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps), "--threads", "1"]
    rounds = _rounds(args.rounds, lambda folder: _round(requests, common, folder))
    summary = {}
    for way in ("one_launch_per_request_s", "request_file_s", "server_start_s"):
        seconds = [r[way] for r in rounds]
        summary[way] = {"wall_s": spread(seconds),
                        "requests_per_min": spread([60 * args.requests / s for s in seconds])}
    summary["server_start_s"].pop("requests_per_min")
    for clients in CLIENTS:
        way = f"server_{clients}_clients"
        seconds = [r[way]["wall_s"] for r in rounds]
        latency = sorted(t for r in rounds for t in r[way]["latency_s"])
        summary[way] = {"wall_s": spread(seconds), "requests_per_min": spread([60 * args.requests / s for s in seconds]),
                        "latency_s": {"p50": statistics.median(latency),
                                      "p95": latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))],
                                      "n": len(latency)}}
    report = {**report_header("requests"), "workload": {"requests": args.requests, "ranks": RANKS, "size": args.size,
                                                        "steps": args.steps, "model": "tiny-sd", "rounds": args.rounds},
              "rounds": rounds, "summary": summary,
              "speedup": summary["one_launch_per_request_s"]["wall_s"]["median"]
              / summary["request_file_s"]["wall_s"]["median"],
              "clients": list(CLIENTS), "identical_pngs": True}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for way, s in summary.items():
        rate = f", {s['requests_per_min']['median']:.1f} requests/min" if "requests_per_min" in s else ""
        latency = f", latency p50 {s['latency_s']['p50']:.2f} s, p95 {s['latency_s']['p95']:.2f} s" \
            if "latency_s" in s else ""
        print(f"{way}: {s['wall_s']['median']:.1f} s ({s['wall_s']['p10']:.1f}–{s['wall_s']['p90']:.1f}){rate}{latency}")
    print(f"request file: {report['speedup']:.2f}x faster; wrote {args.out}")


if __name__ == "__main__":
    main()
