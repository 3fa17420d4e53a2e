"""Benchmark of the image workload on this machine: stock diffusers vs paragen's modes.

Every configuration runs in fresh processes, in rounds (the order repeats, so slow drifts of the
machine hit all configurations alike). Step times are pooled over rounds; medians and spreads
(10th-90th percentile) are reported. One rank is one core here, as on a cluster one rank is one GPU:
speedups are against 1 process x 1 thread (the one-device baseline) and against 1 process x 2 threads
(the best a user gets on this machine without paragen).

    python bench/bench_image.py [--size 512] [--steps 12] [--rounds 2]   → bench/results/image_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from paragen.pipelines.image_job import git_revision

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "bench" / "image_worker.py"
MODES = ("sync", "displaced", "partial")


def _run(name: str, args: list[str], ranks: int, threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if ranks == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), str(WORKER)]
    cmd += [*args, "--threads", str(threads), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["image"] = torch.load(out.with_suffix(".pt"))
    print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return result


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9), "n": len(ordered)}


def _steady(result: dict) -> list[int]:
    """Indices of the steps that run the mode itself (after the sync warm-up steps)."""
    first = 0 if result["stock"] or result["mode"] == "sync" else result["warmup_steps"]
    return list(range(first, len(result["step_s"])))


def _comm_per_step(result: dict, prefix: str = "unet.") -> dict[str, float]:
    """Mean over ranks and steady steps: bytes received and seconds blocked, per label and in total."""
    rows: dict[str, list[float]] = {}
    for rank_steps in result["comm_per_step_by_rank"]:
        for i in _steady(result):
            if i >= len(rank_steps):
                continue
            step = rank_steps[i]
            for label, row in step.items():
                if label.startswith(prefix):
                    rows.setdefault(f"{label}.bytes_recv", []).append(row["bytes_recv"])
                    rows.setdefault(f"{label}.wait_s", []).append(row["wait_s"])
            rows.setdefault("bytes_recv", []).append(sum(r["bytes_recv"] for k, r in step.items() if k.startswith(prefix)))
            rows.setdefault("wait_s", []).append(sum(r["wait_s"] for k, r in step.items() if k.startswith(prefix)))
    return {k: statistics.fmean(v) for k, v in rows.items()}


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "image_cpu.json"))
    args = p.parse_args()
    common = ["--model", args.model, "--size", str(args.size), "--steps", str(args.steps),
              "--warmup-steps", str(args.warmup_steps)]
    configs = {
        "stock_1x1": (["--stock"], 1, 1),
        "stock_1x2": (["--stock"], 1, 2),
        **{f"{mode}_2x1": (["--mode", mode], 2, 1) for mode in MODES},
    }
    traffic = {f"{mode}_4x1": (["--mode", mode, "--steps", "6"], 4, 1) for mode in ("displaced", "partial")}
    runs: dict[str, list[dict]] = {name: [] for name in [*configs, *traffic]}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
            for name, (extra, ranks, threads) in configs.items():
                out = Path(tmp) / f"{name}_{round_index}.json"
                runs[name].append(_run(name, [*common, *extra], ranks, threads, out))
        for name, (extra, ranks, threads) in traffic.items():  # bytes only: 4 ranks oversubscribe 2 cores
            out = Path(tmp) / f"{name}.json"
            runs[name].append(_run(name, [*common, *extra], ranks, threads, out))

    reference = runs["stock_1x1"][0]["image"]
    summary: dict[str, dict] = {}
    for name, results in runs.items():
        steady = [r["step_s"][i] for r in results for i in _steady(r)]
        everything = [s for r in results for s in r["step_s"]]
        summary[name] = {
            "step_s_steady": _spread(steady),
            "step_s_all": _spread(everything),
            "request_s": _spread([r["request_s"] for r in results]),
            "psnr_vs_stock_1x1_db": _psnr(results[0]["image"], reference),
            "max_abs_diff_vs_stock_1x1": (results[0]["image"] - reference).abs().max().item(),
        }
        if not results[0]["stock"]:
            comm = [_comm_per_step(r) for r in results]
            summary[name]["comm_per_step_per_rank"] = {k: statistics.fmean(c[k] for c in comm) for k in comm[0]}
    one, two = (summary[n]["step_s_steady"]["median"] for n in ("stock_1x1", "stock_1x2"))
    threading_gain = one / two
    for name in configs:
        t = summary[name]["step_s_steady"]["median"]
        summary[name]["speedup_vs_1x1"] = one / t
        summary[name]["speedup_vs_1x2"] = two / t
    sync_wait = summary["sync_2x1"]["comm_per_step_per_rank"]["wait_s"]
    for mode in ("displaced", "partial"):
        exposed = summary[f"{mode}_2x1"]["comm_per_step_per_rank"]["wait_s"]
        summary[f"{mode}_2x1"]["comm_hidden_share_vs_sync"] = 1 - exposed / sync_wait if sync_wait else None
    attn = {m: summary[f"{m}_4x1"]["comm_per_step_per_rank"]["unet.attn_kv.bytes_recv"] for m in ("displaced", "partial")}
    report = {
        "benchmark": "image patch parallelism",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "git_revision": git_revision(),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": "cpu", "backend": "gloo"},
        "workload": {"model": args.model, "size": args.size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                     "guidance": "CFG batch of 2 on each rank (cfg=1)", "rounds": args.rounds},
        "threading_gain_1x2_over_1x1": threading_gain,
        "limit_vs_1x2_for_full_work": 2 / threading_gain,
        "partial_over_displaced_attention_bytes_4_ranks": attn["partial"] / attn["displaced"],
        "configs": summary,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "configs"}, indent=2))
    for name in configs:
        s = summary[name]
        print(f"{name:14s} step {s['step_s_steady']['median']:.3f} s  x{s['speedup_vs_1x1']:.2f} vs 1x1  "
              f"x{s['speedup_vs_1x2']:.2f} vs 1x2  PSNR {s['psnr_vs_stock_1x1_db']:.1f} dB")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
