"""Benchmark of `--shard-weights` on this machine: a 1.13B-parameter Wan-shaped transformer (Wan2.1-1.3B's width and
heads, 24 of its 30 blocks: `bench/models/wan_1b_transformer.json`, random weights drawn from a fixed seed) behind
the embedded tiny-wan's text encoder and VAE, saved once as a local diffusers checkpoint (fp32 safetensors, 4.5 GB)
and run by the command line, as a user runs a checkpoint:

    paragen video --model <checkpoint> --frames 1 --height 256 --width 512 --steps 4 --guidance-scale 1 [--shard-weights]

at 1, 2 and 4 ranks (Ring over 512 tokens; one thread a rank), each in fresh processes (`--height`, `--width`: more
tokens, so more compute for the same gathers; `--only`: some layouts). From each run's report: load
time per rank (the weights read whole by `from_pretrained`, or by slices with `--shard-weights`), the denoiser's
parameter bytes per rank, the process's peak resident memory per rank (which also counts the interpreter, the
libraries and, unsharded, the checkpoint read whole), and the step time (median of the steps after the first). Four
ranks on two cores share cores, so their step times say what runs, not how fast. Guidance 1: one transformer call a
step.

    python bench/bench_weight_shards.py [--rounds 1] [--steps 4]   → bench/results/weight_shards_cpu.json
    python bench/bench_weight_shards.py --only whole_2 sharded_2 --height 512 --width 1024 \
        --out bench/results/weight_shards_2048_tokens_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, report_header, spread

CONFIG = ROOT / "bench" / "models" / "wan_1b_transformer.json"
CHECKPOINT = Path(tempfile.gettempdir()) / "paragen-bench" / "wan-1b"
LAYOUTS = {  # name -> (ranks, shard)
    "whole_1": (1, False), "whole_2": (2, False), "sharded_2": (2, True), "whole_4": (4, False),
    "sharded_4": (4, True),
}
REQUEST = ["--frames", "1", "--guidance-scale", "1", "--format", "gif"]


def make_checkpoint() -> Path:
    """tiny-wan with the 1.13B transformer, saved once (fp32 safetensors)."""
    if (CHECKPOINT / "model_index.json").exists():
        return CHECKPOINT
    import torch
    from diffusers import WanTransformer3DModel

    from paragen.pipelines.loading import load_pipeline

    pipe = load_pipeline("tiny-wan")
    config = {k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.transformer = WanTransformer3DModel(**config).eval()
    pipe.save_pretrained(CHECKPOINT)
    return CHECKPOINT


def run(name: str, ranks: int, shard: bool, steps: int, size: list[str], out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    launch = ([sys.executable, "-m", "paragen"] if ranks == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "paragen"])
    cmd = [*launch, "video", "--model", str(CHECKPOINT), *REQUEST, *size, "--steps", str(steps), "--threads", "1",
           "--out", str(out), "--name", name, *(["--shard-weights"] if shard else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    print(f"  {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return json.loads((out / f"{name}.json").read_text())


def summarise(reports: list[dict]) -> dict:
    ranks = [memory for report in reports for memory in report["memory_per_rank"].values()]
    steps = [s for report in reports for s in report["timings"]["step_s"][1:]]
    return {
        "ranks": reports[0]["world_size"],
        "step_s_steady": spread(steps),
        "load_s": spread([m["load_s"] for m in ranks]),
        "transformer_bytes_per_rank": max(m["resident_param_bytes_by_component"]["transformer"] for m in ranks),
        "peak_rss_bytes_per_rank": spread([m["peak_bytes"] for m in ranks]),
        "runs": [{"timings": r["timings"], "memory_per_rank": r["memory_per_rank"]} for r in reports],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512, help="512 tokens at 256×512 (a token: 16×16 pixels)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_shards_cpu.json"))
    args = parser.parse_args()
    make_checkpoint()
    reports: dict[str, list[dict]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
            for name in args.only:
                ranks, shard = LAYOUTS[name]
                size = ["--height", str(args.height), "--width", str(args.width)]
                reports[name].append(run(name, ranks, shard, args.steps, size, Path(tmp)))
    configs = {name: {"shard_weights": LAYOUTS[name][1], **summarise(runs)} for name, runs in reports.items()}
    whole = configs.get("whole_1")
    for row in configs.values():
        if whole:
            row["transformer_bytes_vs_1_rank"] = row["transformer_bytes_per_rank"] / whole["transformer_bytes_per_rank"]
    if "whole_2" in configs and "sharded_2" in configs:
        configs["sharded_2"]["step_vs_whole_2"] = (configs["sharded_2"]["step_s_steady"]["median"]
                                                   / configs["whole_2"]["step_s_steady"]["median"])
    report = {**report_header("weight_shards"), "workload": {
        "transformer": json.loads(CONFIG.read_text()), "request": REQUEST, "height": args.height,
        "width": args.width, "tokens": args.height * args.width // 256, "steps": args.steps, "rounds": args.rounds,
        "transformer_parameters": _parameters()}, "configs": configs}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def _parameters() -> int:
    """The transformer's parameters, counted on the meta device."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**{k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
