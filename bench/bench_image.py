"""Benchmark of the image workload on this machine: stock diffusers, paragen's modes and DistriFusion, one run.

Every configuration runs in fresh processes, in rounds (the order repeats, so slow drifts of the machine hit all
configurations alike); step times are pooled over rounds, medians and spreads (10th-90th percentile) reported.
One rank is one core here, as on a cluster one rank is one GPU: speedups are against 1 process x 1 thread (the
one-device baseline) and 1 process x 2 threads (the best a user gets on this machine without parallelism).

Parts of the report:
- `latents`: at each `--sizes` (pixels; latent = size/8), the same random-weight UNet (`--unet-config`) in the
  embedded tiny-sd pipeline, the same prompt embeddings and initial latent, `output_type="latent"`; stock,
  paragen sync/displaced/partial and DistriFusion (`distrifusion_peer.py`) in its default (stale, corrected
  GroupNorm) and full-sync modes, all with the same count of exact warm-up steps. Step times over the steps
  after the warm-up (every configuration alike); PSNR of the final latent against 1 process x 1 thread (peak:
  the reference's range). At the largest size, displaced also runs with other stale-gather bucket sizes.
- `whole_call`: the shipped tiny-sd pipeline, prompt to image (text encoder, UNet, VAE decode), at
  `--call-size`: seconds per request.
- `traffic_4_ranks`: bytes per step at 4 ranks (4 ranks oversubscribe 2 cores: bytes only, no timing).

    python bench/bench_image.py [--sizes 512,1024] [--rounds 3]   → bench/results/image_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, psnr, report_header, run_worker, spread
from distrifusion_peer import unavailable

WORKER = ROOT / "bench" / "image_worker.py"
UNET = ROOT / "bench" / "models" / "unet_low_attention.json"
MODES = ("sync", "displaced", "partial")
PEER = {"distrifusion": "corrected_async_gn", "distrifusion_sync": "full_sync"}
SYNC_OF = {"displaced": "sync", "partial": "sync", "distrifusion": "distrifusion_sync"}


def latent_psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of a latent against the reference, the peak being the reference's range."""
    return psnr(x, reference, peak=(reference.max() - reference.min()).item())


def comm_per_step(result: dict, first: int, prefix: str = "unet.") -> dict[str, float]:
    """Mean over ranks and steps from `first` on: bytes received and seconds blocked, per label and in total."""
    rows: dict[str, list[float]] = {}
    for rank_steps in result["comm_per_step_by_rank"]:
        for step in rank_steps[first:]:
            ours = {label: row for label, row in step.items() if label.startswith(prefix)}
            for label, row in ours.items():
                rows.setdefault(f"{label}.bytes_recv", []).append(row["bytes_recv"])
                rows.setdefault(f"{label}.wait_s", []).append(row["wait_s"])
            rows.setdefault("bytes_recv", []).append(sum(r["bytes_recv"] for r in ours.values()))
            rows.setdefault("wait_s", []).append(sum(r["wait_s"] for r in ours.values()))
    return {k: statistics.fmean(v) for k, v in rows.items()}


def latent_configs(exact: int, peer: bool) -> dict[str, tuple[list[str], int, int]]:
    """name → (worker arguments, ranks, threads per rank) of the latent part."""
    configs = {"stock_1x1": (["--stock"], 1, 1), "stock_1x2": (["--stock"], 1, 2)}
    configs.update({f"{mode}_2x1": (["--mode", mode], 2, 1) for mode in MODES})
    if peer:
        configs.update({f"{name}_2x1": (["--peer-mode", mode], 2, 1) for name, mode in PEER.items()})
    return {name: ([*args, "--exact-steps", str(exact)], ranks, threads) for name, (args, ranks, threads) in configs.items()}


def summarise(runs: dict[str, list[dict]], first: int, measure) -> dict[str, dict]:
    """Per configuration: steady step times, request times, fidelity against stock_1x1 (`measure`), traffic."""
    reference = runs["stock_1x1"][0]["image"]
    summary = {}
    for name, results in runs.items():
        db = measure(results[0]["image"], reference)
        summary[name] = {
            "step_s_steady": spread([s for r in results for s in r["step_s"][first:]]),
            "request_s": spread([r["request_s"] for r in results]),
            "psnr_vs_stock_1x1_db": None if db == float("inf") else db,  # None: identical (strict JSON)
            "max_abs_diff_vs_stock_1x1": (results[0]["image"] - reference).abs().max().item(),
        }
        if not results[0]["stock"]:
            comm = [comm_per_step(r, first) for r in results]
            summary[name]["comm_per_step_per_rank"] = {k: statistics.fmean(c[k] for c in comm) for k in comm[0]}
    one, two = (summary[n]["step_s_steady"]["median"] for n in ("stock_1x1", "stock_1x2"))
    one_call, two_call = (summary[n]["request_s"]["median"] for n in ("stock_1x1", "stock_1x2"))
    for name, row in summary.items():
        row["speedup_vs_1x1"] = one / row["step_s_steady"]["median"]
        row["speedup_vs_1x2"] = two / row["step_s_steady"]["median"]
        row["request_speedup_vs_1x1"] = one_call / row["request_s"]["median"]
        row["request_speedup_vs_1x2"] = two_call / row["request_s"]["median"]
        sync = SYNC_OF.get(name.rsplit("_", 1)[0])
        if sync and f"{sync}_2x1" in summary and name.endswith("_2x1"):
            blocked = summary[f"{sync}_2x1"]["comm_per_step_per_rank"]["wait_s"]
            row["comm_hidden_share_vs_sync"] = 1 - row["comm_per_step_per_rank"]["wait_s"] / blocked
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024", help="image sizes in pixels of the latent part (latent = size/8)")
    p.add_argument("--unet-config", default=str(UNET))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--exact-steps", type=int, default=5, help="exact warm-up steps (DistriFusion's default 4 runs 5)")
    p.add_argument("--buckets-mib", default="1,16,64", help="other stale-gather bucket sizes for displaced (default 4)")
    p.add_argument("--call-size", type=int, default=256, help="image size of the whole-call part")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "image_cpu.json"))
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    peer_missing = unavailable()
    if peer_missing:
        print(f"DistriFusion is left out: {peer_missing}", file=sys.stderr)

    plans: dict[str, dict[str, tuple[list[str], int, int]]] = {}
    latent_common = ["--unet-config", args.unet_config, "--steps", str(args.steps)]
    for size in sizes:
        plans[f"latent_{size}"] = {name: ([*latent_common, "--size", str(size), *extra], ranks, threads)
                                   for name, (extra, ranks, threads) in latent_configs(args.exact_steps, not peer_missing).items()}
    largest = plans[f"latent_{max(sizes)}"]
    for mib in args.buckets_mib.split(",") if args.buckets_mib else []:
        extra, ranks, threads = largest["displaced_2x1"]
        largest[f"displaced_bucket{mib}_2x1"] = ([*extra, "--bucket-mib", mib], ranks, threads)
    call = ["--whole-call", "--size", str(args.call_size), "--steps", str(args.steps), "--exact-steps", str(args.exact_steps)]
    plans["whole_call"] = {"stock_1x1": ([*call, "--stock"], 1, 1), "stock_1x2": ([*call, "--stock"], 1, 2),
                           "displaced_2x1": ([*call, "--mode", "displaced"], 2, 1)}
    traffic = {f"{mode}_4x1": ([*latent_common, "--size", str(min(sizes)), "--steps", "8", "--mode", mode,
                                "--exact-steps", "2"], 4, 1) for mode in ("displaced", "partial")}
    if not peer_missing:
        traffic["distrifusion_4x1"] = ([*latent_common, "--size", str(min(sizes)), "--steps", "8", "--peer-mode",
                                        PEER["distrifusion"], "--exact-steps", "2"], 4, 1)

    runs = {part: {name: [] for name in configs} for part, configs in plans.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
            for part, configs in plans.items():
                for name, (extra, ranks, threads) in configs.items():
                    out = Path(tmp) / f"{part}_{name}_{round_index}.json"
                    runs[part][name].append(run_worker(WORKER, f"{part} {name}", extra, ranks, threads, out))
        traffic_runs = {name: run_worker(WORKER, name, extra, ranks, 1, Path(tmp) / f"{name}.json")
                        for name, (extra, ranks, _) in traffic.items()}

    parts = {part: summarise(part_runs, args.exact_steps, psnr if part == "whole_call" else latent_psnr)
             for part, part_runs in runs.items()}
    report = {
        **report_header("image patch parallelism"),
        "workload": {"unet_config": Path(args.unet_config).name, "pipeline": "tiny-sd", "sizes": sizes,
                     "steps": args.steps, "exact_steps": args.exact_steps, "call_size": args.call_size,
                     "guidance": "CFG batch of 2 on each rank (cfg=1)", "rounds": args.rounds,
                     "steady_steps": f"{args.exact_steps}-{args.steps - 1}",
                     "distrifusion": peer_missing or "distrifuser 0.0.1b1, split_batch=False, no CUDA graphs"},
        "parts": parts,
        "traffic_4_ranks": {name: comm_per_step(r, 2) for name, r in traffic_runs.items()},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for part, summary in parts.items():
        for name, s in summary.items():
            db = s["psnr_vs_stock_1x1_db"]
            print(f"{part:12s} {name:26s} step {s['step_s_steady']['median']:.3f} s  request {s['request_s']['median']:.2f} s"
                  f"  x{s['speedup_vs_1x1']:.2f} vs 1x1  x{s['speedup_vs_1x2']:.2f} vs 1x2  "
                  f"PSNR {'exact' if db is None else f'{db:.2f} dB'}")


if __name__ == "__main__":
    main()
