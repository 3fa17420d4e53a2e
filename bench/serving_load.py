"""`paragen serve` under load, for `bench/bench_requests.py --part batching|clips`.

batching: tiny-sd on 2 ranks, the same requests (distinct prompts and seeds) from 1, 4 and 8 concurrent clients, to a
server that makes one request at a time (`--max-batch 1`) and to one that batches (`--max-batch 8 --batch-wait-ms 0`:
what waits while a batch runs forms the next batch, so a lone client never waits for company), in the same round.
Throughput is requests over the wall time from the first request sent to the last response read; latency is each
request's, sent to last byte read. The batching server's PNGs from 4 and 8 clients (made in batches) must be the bytes
of its 1-client PNGs (made alone). One warm-up round first (not kept).

clips: a clip-parallel tiny-wan video on 2 ranks (2 clips) as an asynchronous job (`POST /v1/videos`), polled every
10 ms: the time from submitting to the first clip's file being ready, and to the whole video.
"""
from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, spread

sys.path.insert(0, str(ROOT))
from tests.serve_client import Server, call, fetch  # noqa: E402 — the tests' server driver and plain HTTP client

RANKS = 2
CLIENTS = (1, 4, 8)
SETTINGS = {"off": ["--max-batch", "1"], "on": ["--max-batch", "8", "--batch-wait-ms", "0"]}


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def batching_round(count: int, common: list[str], folder: Path) -> dict:
    """One round: each setting's server, the requests from each number of clients; wall, latencies, batch sizes."""
    times: dict = {}
    for setting, flags in SETTINGS.items():
        out = folder / setting
        server = Server(["image", *common, *flags, "--out", str(out)], RANKS).start()
        try:
            for clients in CLIENTS:
                def one(i: int, clients: int = clients) -> tuple[float, int]:
                    sent = time.perf_counter()
                    reply = call(server.url, "/v1/images/generations",
                                 {"prompt": f"a lighthouse, study {i}", "seed": i, "id": f"c{clients}-r{i}"})
                    if reply.status != 200:
                        raise RuntimeError(f"the server answered {reply.status}: {reply.body}")
                    batch = reply.body["paragen"]["reports"][0].get("batch", {"size": 1})["size"]
                    return time.perf_counter() - sent, batch
                first = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    made = list(pool.map(one, range(count)))
                times[f"{setting}_{clients}"] = {"wall_s": time.perf_counter() - first,
                                                 "latency_s": [seconds for seconds, _ in made],
                                                 "batch_sizes": [size for _, size in made]}
            server.signal()
            if server.wait() != [0] * RANKS:
                raise RuntimeError(f"the server did not exit cleanly:\n{server.log(0)[-3000:]}")
        finally:
            server.stop()
    for clients in CLIENTS[1:]:
        for i in range(count):
            alone, batched = (folder / "on" / f"c{n}-r{i}.png" for n in (1, clients))
            if alone.read_bytes() != batched.read_bytes():
                raise RuntimeError(f"request {i}: its PNG from a batch ({clients} clients) differs from it alone")
    return times


def batching_summary(rounds: list[dict], count: int) -> dict:
    """Per setting and number of clients: requests/min over rounds, latency quantiles over every request kept."""
    summary = {}
    for setting in SETTINGS:
        for clients in CLIENTS:
            way = f"{setting}_{clients}"
            latency = sorted(t for r in rounds for t in r[way]["latency_s"])
            sizes = [s for r in rounds for s in r[way]["batch_sizes"]]
            summary[way] = {"requests_per_min": spread([60 * count / r[way]["wall_s"] for r in rounds]),
                            "latency_s": {"p50": statistics.median(latency), "p95": _quantile(latency, 0.95),
                                          "n": len(latency)},
                            "mean_batch": statistics.mean(sizes)}
    rate = lambda way: summary[way]["requests_per_min"]["median"]  # noqa: E731
    summary["throughput_gain"] = {str(c): rate(f"on_{c}") / rate(f"off_{c}") for c in CLIENTS}
    summary["p95_at_1_client_on_over_off"] = summary["on_1"]["latency_s"]["p95"] / summary["off_1"]["latency_s"]["p95"]
    return summary


def clips_round(common: list[str], folder: Path) -> dict:
    """One video job on a fresh server: seconds from submitting to each clip, and to the whole video."""
    server = Server(["video", *common, "--out", str(folder)], RANKS).start()
    try:
        sent = time.perf_counter()
        reply = call(server.url, "/v1/videos", {"prompt": "a paper boat on a river", "id": "long", "format": "gif"})
        if reply.status != 202:
            raise RuntimeError(f"the server answered {reply.status}: {reply.body}")
        clips: dict[int, float] = {}
        while (job := call(server.url, "/v1/videos/long").body)["status"] in ("queued", "in_progress"):
            for k in job["paragen"]["clips_ready"]:
                clips.setdefault(k, time.perf_counter() - sent)
            time.sleep(0.01)
        whole = time.perf_counter() - sent
        if job["status"] != "completed" or fetch(server.url, "/v1/videos/long/clips/0").status != 200:
            raise RuntimeError(f"the job did not complete with its clips: {job}")
        for k in range(job["paragen"]["clips"]):
            clips.setdefault(k, whole)
        server.signal()
        server.wait()
    finally:
        server.stop()
    return {"clip_s": [clips[k] for k in sorted(clips)], "whole_s": whole, "clips": len(clips),
            "steps_s": job["paragen"]["report"]["timings"]["step_s"]}


def clips_summary(rounds: list[dict]) -> dict:
    first = [r["clip_s"][0] for r in rounds]
    whole = [r["whole_s"] for r in rounds]
    return {"first_clip_s": spread(first), "whole_s": spread(whole), "clips": rounds[0]["clips"],
            "first_over_whole": spread([f / w for f, w in zip(first, whole)]),
            "goal_first_over_whole": 1 / rounds[0]["clips"]}


__all__ = ["CLIENTS", "RANKS", "SETTINGS", "batching_round", "batching_summary", "clips_round", "clips_summary"]
