"""Benchmark of the DiT workload on this machine: diffusers' own context parallelism vs paragen.

One run, side by side, for the same tiny Flux pipeline and seed: the stock pipeline on 1 process ×
1 thread and 1 process × 2 threads, diffusers' Ulysses (`enable_parallelism`) on 2 ranks, and
paragen's Ulysses, Ring and displaced modes on 2 ranks. Every configuration runs in fresh processes,
in rounds (slow drifts of the machine hit all alike); step times are pooled over rounds. One rank is
one core, as on a cluster one rank is one GPU.

    python bench/bench_dit.py [--size 1024] [--steps 8] [--rounds 2]   → bench/results/dit_cpu.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, add_speedups, comm_per_step, psnr, report_header, run_rounds, spread


WORKER = ROOT / "bench" / "dit_worker.py"
CONFIGS = {  # name -> (variant, ranks, threads)
    "stock_1x1": ("stock", 1, 1),
    "stock_1x2": ("stock", 1, 2),
    "diffusers_ulysses_2x1": ("diffusers_ulysses", 2, 1),
    "ulysses_2x1": ("ulysses", 2, 1),
    "ring_2x1": ("ring", 2, 1),
    "displaced_2x1": ("displaced", 2, 1),
}


def _steady(result: dict) -> list[int]:
    """Steps that run the variant itself (displaced: after its exact warm-up steps)."""
    first = result["warmup_steps"] if result["variant"] == "displaced" else 0
    return list(range(first, len(result["step_s"])))


def _ulysses_formula_bytes(result: dict, ranks: int) -> float:
    """DESIGN.md's Ulysses traffic per step and rank, 4(N-1)/N²·S·C per attention layer (fp32)."""
    t = result["transformer"]
    tokens = (result["size"] // 16) ** 2 + result["text_tokens"]
    layers = t["num_layers"] + t["num_single_layers"]
    return layers * 4 * (ranks - 1) / ranks**2 * tokens * t["num_attention_heads"] * t["attention_head_dim"] * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-flux")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dit_cpu.json"))
    args = p.parse_args()
    common = ["--model", args.model, "--size", str(args.size), "--steps", str(args.steps),
              "--text-tokens", str(args.text_tokens), "--warmup-steps", str(args.warmup_steps)]
    plan = {name: ([*common, "--variant", variant], ranks, threads) for name, (variant, ranks, threads) in CONFIGS.items()}
    runs = run_rounds(WORKER, plan, args.rounds)

    reference = runs["stock_1x1"][0]["image"]
    diffusers_image = runs["diffusers_ulysses_2x1"][0]["image"]
    summary: dict[str, dict] = {}
    for name, results in runs.items():
        image = results[0]["image"]
        summary[name] = {
            "step_s_steady": spread([r["step_s"][i] for r in results for i in _steady(r)]),
            "step_s_all": spread([s for r in results for s in r["step_s"]]),
            "request_s": spread([r["request_s"] for r in results]),
            "max_abs_diff_vs_stock_1x1": (image - reference).abs().max().item(),
            "max_abs_diff_vs_diffusers_ulysses": (image - diffusers_image).abs().max().item(),
            "psnr_vs_stock_1x1_db": psnr(image, reference),
        }
        if results[0]["comm_per_step_by_rank"]:
            summary[name]["comm_per_step_per_rank"] = comm_per_step(results, _steady, "dit.")
    summary["diffusers_ulysses_2x1"]["formula_bytes_sent_per_step_per_rank"] = _ulysses_formula_bytes(runs["ulysses_2x1"][0], 2)
    one, two = add_speedups(summary)
    exact_wait = summary["ulysses_2x1"]["comm_per_step_per_rank"]["wait_s"]
    displaced_wait = summary["displaced_2x1"]["comm_per_step_per_rank"]["wait_s"]
    first = runs["ulysses_2x1"][0]
    report = {
        **report_header("DiT sequence parallelism vs diffusers context parallelism"),
        "workload": {"model": args.model, "size": args.size, "image_tokens": (args.size // 16) ** 2,
                     "text_tokens": args.text_tokens, "steps": args.steps, "warmup_steps": args.warmup_steps,
                     "rounds": args.rounds, "transformer": first["transformer"]},
        "diffusers_shim": "torch.accelerator.device_count() returns 1 during enable_parallelism (0 on a CPU build)",
        "threading_gain_1x2_over_1x1": one / two,
        "displaced_comm_hidden_share_vs_ulysses": 1 - displaced_wait / exact_wait if exact_wait else None,
        "configs": summary,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "configs"}, indent=2))
    for name in CONFIGS:
        s = summary[name]
        print(f"{name:22s} step {s['step_s_steady']['median']:.3f} s  x{s['speedup_vs_1x1']:.2f} vs 1x1  "
              f"x{s['speedup_vs_1x2']:.2f} vs 1x2  max|Δ| vs diffusers {s['max_abs_diff_vs_diffusers_ulysses']:.1e}  "
              f"PSNR {s['psnr_vs_stock_1x1_db']:.1f} dB")


if __name__ == "__main__":
    main()
