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
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, psnr, report_header, run_worker, spread


WORKER = ROOT / "bench" / "image_worker.py"
MODES = ("sync", "displaced", "partial")


def _run(name: str, args: list[str], ranks: int, threads: int, out: Path) -> dict:
    return run_worker(WORKER, name, args, ranks, threads, out)


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
            "step_s_steady": spread(steady),
            "step_s_all": spread(everything),
            "request_s": spread([r["request_s"] for r in results]),
            "psnr_vs_stock_1x1_db": psnr(results[0]["image"], reference),
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
        **report_header("image patch parallelism"),
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


if __name__ == "__main__":
    main()
