"""Requests per minute for a batch of small requests on 2 ranks: one launch per request (`torchrun … paragen image`
N times) against one launch with a request file (`--requests`), which loads and parallelises the model once.

Each round runs both ways on the same N requests (distinct prompts and seeds, tiny-sd, small images) and checks
that the two ways write byte-identical PNGs. Wall time includes everything a user waits for: interpreter and
library start, model build, parallelisation, generation, writing. One warm-up round first (not kept), then
`--rounds` kept rounds; median and p10–p90 over rounds. Writes `bench/results/requests_cpu.json`.

    .venv/bin/python bench/bench_requests.py [--requests 8] [--rounds 3] [--size 128] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, report_header, spread

RANKS = 2


def _launch(args: list[str], out: Path) -> float:
    """One 2-rank launch of `paragen image`; its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS), "-m", "paragen", "image",
           *args, "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - started


def _round(requests: list[dict], common: list[str], folder: Path) -> dict[str, float]:
    single, batch = folder / "single", folder / "batch"
    each = sum(_launch([*common, "--prompt", r["prompt"], "--seed", str(r["seed"]), "--name", r["id"]], single)
               for r in requests)
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    whole = _launch([*common, "--requests", str(path)], batch)
    for r in requests:
        if (single / f"{r['id']}.png").read_bytes() != (batch / f"{r['id']}.png").read_bytes():
            raise RuntimeError(f"request {r['id']}: the request file's PNG differs from its own launch's")
    return {"one_launch_per_request_s": each, "request_file_s": whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "requests_cpu.json"))
    args = parser.parse_args()
    requests = [{"id": f"r{i}", "prompt": f"a lighthouse, study {i}", "seed": i} for i in range(args.requests)]
    common = ["--height", str(args.size), "--width", str(args.size), "--steps", str(args.steps), "--threads", "1"]
    rounds = []
    for number in range(args.rounds + 1):
        folder = Path(tempfile.mkdtemp(prefix="bench_requests_"))
        try:
            times = _round(requests, common, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"round {number}{' (warm-up)' * (number == 0)}: {times}", file=sys.stderr)
        if number:
            rounds.append(times)
    summary = {}
    for way in ("one_launch_per_request_s", "request_file_s"):
        seconds = [r[way] for r in rounds]
        summary[way] = {"wall_s": spread(seconds),
                        "requests_per_min": spread([60 * args.requests / s for s in seconds])}
    report = {**report_header("requests"), "workload": {"requests": args.requests, "ranks": RANKS, "size": args.size,
                                                        "steps": args.steps, "model": "tiny-sd", "rounds": args.rounds},
              "rounds": rounds, "summary": summary,
              "speedup": summary["one_launch_per_request_s"]["wall_s"]["median"]
              / summary["request_file_s"]["wall_s"]["median"],
              "identical_pngs": True}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for way, s in summary.items():
        print(f"{way}: {s['wall_s']['median']:.1f} s ({s['wall_s']['p10']:.1f}–{s['wall_s']['p90']:.1f}), "
              f"{s['requests_per_min']['median']:.1f} requests/min")
    print(f"request file: {report['speedup']:.2f}x faster; wrote {args.out}")


if __name__ == "__main__":
    main()
