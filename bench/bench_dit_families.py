"""Benchmark of the DiT families that run through sharding plans: paragen against one process and against
diffusers' own context parallelism, each family at a size where the split pays.

Per family, in fresh processes and the same run: the stock pipeline on 1 process × 1 thread and × 2 threads,
paragen's Ulysses and Ring on 2 ranks × 1 thread, and diffusers' Ulysses (`enable_parallelism`) on 2 ranks where
the transformer class declares a `_cp_plan` (a run that fails is recorded with its error, not dropped). Step times
are the median over rounds × steps after a warm-up request. One rank is one core, as on a cluster one rank is one GPU.

    python bench/bench_dit_families.py [--steps 4] [--rounds 2]   → bench/results/dit_families_cpu.json
    python bench/bench_dit_families.py --models tiny-zimage --merge   (measure again the families named, keep the
                                                                      others; each family records its revision)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from common import ROOT, add_speedups, psnr, report_header, run_worker, spread
from dit_family_worker import CALLS

WORKER = ROOT / "bench" / "dit_family_worker.py"
CONFIGS = {  # name -> (variant, ranks, threads)
    "stock_1x1": ("stock", 1, 1),
    "stock_1x2": ("stock", 1, 2),
    "ulysses_2x1": ("ulysses", 2, 1),
    "ring_2x1": ("ring", 2, 1),
    "diffusers_ulysses_2x1": ("diffusers_ulysses", 2, 1),
}


def _has_diffusers_plan(model: str) -> bool:
    """Whether the model's transformer class declares diffusers' own context-parallel plan (even where paragen runs
    a plan of its own for it, as for LTX-2)."""
    import diffusers

    from paragen.pipelines.loading import CONFIG_DIR, read_index

    return bool(getattr(getattr(diffusers, read_index(CONFIG_DIR / model)["transformer"][1]), "_cp_plan", None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(CALLS), choices=list(CALLS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dit_families_cpu.json"))
    p.add_argument("--merge", action="store_true", help="replace the families measured in --out, keep the others")
    args = p.parse_args()
    header = report_header("DiT families through sharding plans vs one process and diffusers' context parallelism")
    families: dict[str, dict] = {}
    if args.merge:
        families = json.loads(Path(args.out).read_text())["families"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            configs = {n: c for n, c in CONFIGS.items() if n != "diffusers_ulysses_2x1" or _has_diffusers_plan(model)}
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            failed: dict[str, str] = {}
            for round_index in range(args.rounds):
                print(f"{model}: round {round_index + 1}/{args.rounds}", file=sys.stderr)
                for name, (variant, ranks, threads) in configs.items():
                    if name in failed:
                        continue
                    # a warm-up request of 2 steps: Mochi's schedule divides by the steps less one
                    worker_args = ["--model", model, "--variant", variant, "--steps", str(args.steps),
                                   "--warmup-request-steps", "2"]
                    try:
                        runs[name].append(run_worker(WORKER, name, worker_args, ranks, threads,
                                                     Path(tmp) / f"{model}_{name}_{round_index}.json"))
                    except RuntimeError as error:  # the first rank's exception line, not the launcher's
                        lines = [line.split("]: ")[-1] for line in str(error).splitlines()
                                 if re.match(r"\[rank\d+\]: \w+(Error|Exception): ", line)]
                        failed[name] = lines[0] if lines else str(error)[-300:]
            reference = runs["stock_1x1"][0]["image"]
            summary = {}
            for name, results in runs.items():
                if name in failed:
                    continue
                output = results[0]["image"]
                summary[name] = {
                    "step_s_steady": spread([s for r in results for s in r["step_s"]]),
                    "request_s": spread([r["request_s"] for r in results]),
                    "max_abs_diff_vs_stock_1x1": (output - reference).abs().max().item(),
                    "psnr_vs_stock_1x1_db": psnr(output, reference),
                }
            add_speedups(summary)
            families[model] = {"tokens": runs["stock_1x1"][0]["tokens"], "git_revision": header["git_revision"],
                               "date": header["date"], "configs": summary, "failed": failed}
    report = {**header, "steps": args.steps, "rounds": args.rounds,
              "diffusers_shim": "torch.accelerator.device_count() returns 1 during enable_parallelism (0 on a CPU build)",
              "families": families}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for model in args.models:
        family = families[model]
        for name, s in family["configs"].items():
            print(f"{model:18s} {name:22s} step {s['step_s_steady']['median']:.3f} s  x{s['speedup_vs_1x1']:.2f} vs 1x1  "
                  f"x{s['speedup_vs_1x2']:.2f} vs 1x2  max|Δ| {s['max_abs_diff_vs_stock_1x1']:.1e}")
        for name, why in family["failed"].items():
            print(f"{model:18s} {name:22s} FAILED: {why}")


if __name__ == "__main__":
    main()
