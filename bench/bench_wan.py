"""Benchmark of the Wan workload on this machine: paragen's exact sequence parallelism and its clips for a Wan
video transformer against the stock pipeline and diffusers' own context parallelism.

One run, side by side, for the embedded tiny-wan (Wan2.1 architecture) at 161 frames — twice the 81 frames Wan2.1
generates — and 256², seed 0, guidance 5 (two transformer calls per step): the stock pipeline on 1 process ×
1 thread and 1 process × 2 threads, diffusers' Ulysses (`enable_parallelism`) on 2 ranks, and paragen's Ulysses,
Ring and CFG-parallel layouts on 2 ranks; paragen's clips on 2 ranks (one clip each: full scope, exact; dual
scope with a halo of 2 latent frames and 4 global latent frames, overlapped and blocking) and on 4 ranks (two
clips, each over a ring of two ranks: 4 processes on the 2 cores here, so that row shows the layout runs and what
it sends, not a speed-up). Every configuration runs in fresh processes, in rounds; step times
(both guidance calls, the scheduler step) are pooled over rounds, the first step of each request left out. One
rank is one core, as on a cluster one rank is one GPU. The steps are compared, not the VAE decode (the latent is
returned). Bytes per step and rank are checked against the formulas: Ulysses 4(N-1)/N²·S·C per attention layer
and call, Ring (N-1)·2·(S/N)·C, clips: each rank receives K and V of the frames its clip sees outside itself
(halo ∪ global frames), 2·seen·(tokens per frame)·C, fp32.

    python bench/bench_wan.py [--frames 161] [--size 256] [--steps 6] [--rounds 2]   → bench/results/wan_cpu.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, add_speedups, comm_per_step, report_header, run_rounds, spread

WORKER = ROOT / "bench" / "wan_worker.py"
CONFIGS = {  # name -> (variant, ranks, threads)
    "stock_1x1": ("stock", 1, 1),
    "stock_1x2": ("stock", 1, 2),
    "diffusers_ulysses_2x1": ("diffusers_ulysses", 2, 1),
    "ulysses_2x1": ("ulysses", 2, 1),
    "ring_2x1": ("ring", 2, 1),
    "cfg_2x1": ("cfg", 2, 1),
    "clip_full_2x1": ("clip_full", 2, 1),
    "clip_dual_2x1": ("clip_dual", 2, 1),
    "clip_dual_blocking_2x1": ("clip_dual_blocking", 2, 1),
    "clip_ring_dual_4x1": ("clip_ring_dual", 4, 1),
}
LOCAL, GLOBAL = 2, 4  # dual scope: halo and global latent frames
CALLS_PER_STEP = 2  # guidance: the conditional and the unconditional transformer call


def _after_first(result: dict) -> range:
    """The steps after the first of a request (the first pays one-off costs)."""
    return range(1, len(result["step_s"]))


def _dual_seen_frames(latent: int) -> list[int]:
    """Frames each of two clips sees outside itself with dual scope (halo ∪ global frames), written apart from
    paragen: clips of ⌈F/2⌉ and ⌊F/2⌋ latent frames, global frames evenly spaced, rounded."""
    cut = (latent + 1) // 2
    spaced = {round(i * (latent - 1) / (GLOBAL - 1)) for i in range(GLOBAL)}
    first = ({*range(cut, cut + LOCAL)} | spaced) - set(range(cut))
    second = ({*range(cut - LOCAL, cut)} | spaced) - set(range(cut, latent))
    return [len(first), len(second)]


def _formula_bytes(result: dict, ranks: int) -> dict[str, float]:
    """Attention traffic per step and rank from the formulas (fp32)."""
    t, tokens = result["transformer"], result["video_tokens"]
    width = t["num_attention_heads"] * t["attention_head_dim"]
    per_call = t["num_layers"] * tokens * width * 4
    latent = (result["frames"] - 1) // 4 + 1
    seen = sum(_dual_seen_frames(latent)) / 2  # the mean over clips, and so over ranks
    return {"wan.ulysses_qkv+ulysses_out": CALLS_PER_STEP * per_call * 4 * (ranks - 1) / ranks**2,
            "wan.ring_kv": CALLS_PER_STEP * per_call * (ranks - 1) * 2 / ranks,
            "wan.clip_kv (dual)": CALLS_PER_STEP * per_call * 2 * seen / latent}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=161)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "wan_cpu.json"))
    args = p.parse_args()
    common = ["--frames", str(args.frames), "--size", str(args.size), "--steps", str(args.steps)]
    common += ["--halo", str(LOCAL), "--global-frames", str(GLOBAL)]
    plan = {name: ([*common, "--variant", variant], ranks, threads) for name, (variant, ranks, threads) in CONFIGS.items()}
    runs = run_rounds(WORKER, plan, args.rounds)

    reference = runs["stock_1x1"][0]["image"]
    summary: dict[str, dict] = {}
    for name, results in runs.items():
        steps = [r["step_s"][i] for r in results for i in _after_first(r)]
        summary[name] = {
            "step_s_steady": spread(steps),
            "request_s": spread([r["request_s"] for r in results]),
            "max_abs_diff_vs_stock_1x1": (results[0]["image"] - reference).abs().max().item(),
            "peak_rss_mib_by_rank": [b / 2**20 for b in results[0]["peak_rss_bytes_by_rank"]],
        }
        if results[0]["comm_per_step_by_rank"]:
            summary[name]["comm_per_step_per_rank"] = comm_per_step(results, _after_first, "wan.")
    one, two = add_speedups(summary)
    for row in summary.values():
        row["frames_per_s"] = args.frames / (row["step_s_steady"]["median"] * args.steps)
    formula = _formula_bytes(runs["ulysses_2x1"][0], 2)
    measured = {
        "wan.ulysses_qkv+ulysses_out": sum(summary["ulysses_2x1"]["comm_per_step_per_rank"].get(f"wan.{k}.bytes_sent", 0)
                                           for k in ("ulysses_qkv", "ulysses_out")),
        "wan.ring_kv": summary["ring_2x1"]["comm_per_step_per_rank"].get("wan.ring_kv.bytes_sent", 0),
        "wan.clip_kv (dual)": summary["clip_dual_2x1"]["comm_per_step_per_rank"].get("wan.clip_kv.bytes_sent", 0),
        "wan.clip_kv (dual, 4 ranks)": summary["clip_ring_dual_4x1"]["comm_per_step_per_rank"].get(
            "wan.clip_kv.bytes_sent", 0),
    }
    overlapped, blocking = (summary[name]["comm_per_step_per_rank"].get("wan.clip_kv.wait_s", 0.0)
                            for name in ("clip_dual_2x1", "clip_dual_blocking_2x1"))
    first = runs["ulysses_2x1"][0]
    report = {
        **report_header("Wan sequence parallelism and clips vs diffusers context parallelism"),
        "workload": {"model": "tiny-wan", "frames": args.frames, "size": args.size, "dual_local": LOCAL,
                     "dual_global_frames": GLOBAL,
                     "video_tokens": first["video_tokens"], "steps": args.steps, "guidance_scale": 5.0,
                     "rounds": args.rounds, "transformer": first["transformer"]},
        "diffusers_shim": "torch.accelerator.device_count() returns 1 during enable_parallelism (0 on a CPU build)",
        "threading_gain_1x2_over_1x1": one / two,
        "attention_bytes_per_step_per_rank": {"formula": formula, "measured": measured},
        "clip_kv_wait_s_per_step_per_rank": {"overlapped": overlapped, "blocking": blocking,
                                             "hidden_share": 1 - overlapped / blocking if blocking else None},
        "configs": summary,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "configs"}, indent=2))
    for name in CONFIGS:
        s = summary[name]
        print(f"{name:22s} step {s['step_s_steady']['median']:.3f} s ({s['step_s_steady']['p10']:.3f}-{s['step_s_steady']['p90']:.3f})  "
              f"x{s['speedup_vs_1x1']:.2f} vs 1x1  x{s['speedup_vs_1x2']:.2f} vs 1x2  "
              f"max|Δ| {s['max_abs_diff_vs_stock_1x1']:.1e}  peak RSS {max(s['peak_rss_mib_by_rank']):.0f} MiB")


if __name__ == "__main__":
    main()
