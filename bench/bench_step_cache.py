"""Step caching in every parallel mode (issue 37): denoiser evaluations saved, time per request and what the
pictures show, against the uncached run of the same mode, beside diffusers' own caches in one process.

Models: `tiny-shapes` (UNet) and `tiny-shapes-dit` (PixArt-Σ) at their training size (64², 20 steps, guidance 4),
scored by `tools/shapes_scorer.py` on held-out captions (`bench_shapes.prompts`); `tiny-wan` (33 frames = 9 latent
frames, 64², 20 steps, 4 prompts; clips see ±2 latent frames and 3 global ones), compared by PSNR with its uncached
video in the same mode. Modes at 2 ranks: UNet sync bands, displaced,
partial, CFG over the two ranks, hires windows (2× area, taylorseer only: fbcache and teacache decide from a call
every rank makes); PixArt Ring, Ulysses, displaced, CFG; Wan clips, Ulysses, CFG; and one process. Each mode runs
uncached and with each method at the settings `SETTINGS` fixes (chosen on other captions by
`step_cache_sweep.py`); beside them, the stock pipeline in one process (mode `diffusers`, not parallelised) runs
uncached and with diffusers' own FirstBlockCache (transformers only) and TaylorSeerCache at the same settings.

Every configuration is one launch (`step_cache_worker.py`): a warm-up request, then every request timed, whole
(`seconds`: prompt encoding, denoising, VAE decode) and its denoising loop alone (`loop_seconds`: from the first
scheduler step's end to the last's, so every step but the first); 2 ranks run 1 thread each, one process 2. Run
alone on a quiet machine.

    .venv/bin/python bench/bench_step_cache.py [--model tiny-shapes|tiny-shapes-dit|tiny-wan] [--prompts 32]
        [--only NAME,...] → bench/results/step_cache_<model>_cpu.json
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

import torch

from bench_shapes import prompts as shape_prompts, summarise
from common import ROOT, psnr, report_header

WORKER = ROOT / "bench" / "step_cache_worker.py"
SIDE = 64
MODES = {  # model -> mode -> (ranks, worker arguments)
    "tiny-shapes": {"one": (1, []), "sync_2r": (2, ["--degrees", '{"patch": 2}']),
                    "displaced_2r": (2, ["--degrees", '{"patch": 2}', "--mode", "displaced"]),
                    "partial_2r": (2, ["--degrees", '{"patch": 2}', "--mode", "partial"]),
                    "cfg_2r": (2, ["--degrees", '{"cfg": 2}']),
                    "hires_2r": (2, ["--degrees", '{"patch": 2}', "--hires"])},
    "tiny-shapes-dit": {"one": (1, []), "ring_2r": (2, ["--degrees", '{"ring": 2}']),
                        "ulysses_2r": (2, ["--degrees", '{"ulysses": 2}']),
                        "displaced_2r": (2, ["--degrees", '{"ring": 2}', "--mode", "displaced"]),
                        "cfg_2r": (2, ["--degrees", '{"cfg": 2}'])},
    "tiny-wan": {"one": (1, []), "clip_2r": (2, ["--degrees", '{"clip": 2}']),
                 "ulysses_2r": (2, ["--degrees", '{"ulysses": 2}']), "cfg_2r": (2, ["--degrees", '{"cfg": 2}'])},
}
SETTINGS = {  # model -> method -> StepCacheConfig fields (from step_cache_sweep.py's calibration captions)
    "tiny-shapes": {"fbcache": {"threshold": 0.12}, "teacache": {"threshold": 0.12},
                    "taylorseer": {"interval": 3, "order": 1}},
    "tiny-shapes-dit": {"fbcache": {"threshold": 0.15}, "teacache": {"threshold": 0.3},
                        "taylorseer": {"interval": 2, "order": 1}},
    "tiny-wan": {"fbcache": {"threshold": 0.15}, "teacache": {"threshold": 0.3}, "taylorseer": {"interval": 3}},
}
PEERS = {"tiny-shapes": ("taylorseer",), "tiny-shapes-dit": ("fbcache", "taylorseer"),
         "tiny-wan": ("fbcache", "taylorseer")}  # diffusers' FirstBlockCache needs transformer blocks
HIRES_METHODS = ("none", "taylorseer")


def configurations(model: str) -> dict[str, tuple[str, int, list[str]]]:
    """name -> (mode, ranks, worker arguments), every mode uncached and cached, then diffusers' caches."""
    out = {}
    for mode, (ranks, args) in MODES[model].items():
        for method in ("none", *SETTINGS[model]):
            if mode.startswith("hires") and method not in HIRES_METHODS:
                continue
            cache = [] if method == "none" else ["--cache", json.dumps({"method": method, **SETTINGS[model][method]})]
            out[f"{mode}/{method}"] = (mode, ranks, args + cache)
    out["diffusers/none"] = ("diffusers", 1, ["--peer", "none"])  # the stock pipeline, uncached: its caches' baseline
    for peer in PEERS[model]:
        out[f"diffusers/{peer}"] = ("diffusers", 1, ["--peer", peer, "--peer-setting",
                                                     json.dumps(SETTINGS[model][peer])])
    return out


def requests_for(model: str, count: int, hires: bool) -> list[dict]:
    if model == "tiny-wan":
        return [{"id": f"v{i}", "prompt": p, "seed": 100 + i, "height": SIDE, "width": SIDE, "frames": 33}
                for i, p in enumerate(["a red fox running through snow", "waves breaking on a rocky shore",
                                       "a paper boat on a river", "a city street at night in the rain"][:count])]
    return [{**r, "height": SIDE, "width": 2 * SIDE if hires else SIDE} for r in shape_prompts(count)]


def run(model: str, name: str, ranks: int, args: list[str], requests: list[dict], folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "requests.json").write_text(json.dumps(requests))
    threads = 2 // ranks
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc-per-node", str(ranks)]
    cmd = [*launcher, str(WORKER), "--model", model, "--requests", str(folder / "requests.json"), *args,
           "--threads", str(threads), "--out", str(folder / "result.json")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT / "bench", env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads((folder / "result.json").read_text())


def quality(model: str, requests: list[dict], folder: Path, uncached: Path | None) -> dict:
    """Caption scores of the pictures (shapes), or the PSNR of each video against the uncached one (Wan)."""
    if model != "tiny-wan":
        pictures = {r["id"]: folder / f"{r['id']}.png" for r in requests}
        reference = None if uncached is None else {r["id"]: uncached / f"{r['id']}.png" for r in requests}
        summary = summarise(requests, pictures, reference)
        summary.pop("per_prompt")
        return summary
    if uncached is None:
        return {}
    videos = torch.load(folder / "result.pt")
    reference = torch.load(uncached / "result.pt")
    values = [psnr(videos[r["id"]].float(), reference[r["id"]].float()) for r in requests]
    return {"psnr_vs_uncached_db": {"median": sorted(values)[len(values) // 2], "min": min(values)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(MODES), default="tiny-shapes")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--only", help="comma-separated configuration names")
    p.add_argument("--keep", help="folder for the outputs (default: a temporary one)")
    args = p.parse_args()
    known = configurations(args.model)
    names = args.only.split(",") if args.only else list(known)
    root = Path(args.keep or tempfile.mkdtemp(prefix="step-cache-"))
    out = ROOT / "bench" / "results" / f"step_cache_{args.model}_cpu.json"
    previous = json.loads(out.read_text())["configs"] if args.only and out.exists() else {}
    configs = dict(previous)
    for name in names:
        mode, ranks, worker_args = known[name]
        requests = requests_for(args.model, args.prompts, mode.startswith("hires"))
        folder = root / name.replace("/", "__")
        result = run(args.model, name, ranks, worker_args, requests, folder)
        uncached = root / f"{mode}__none"
        baseline = uncached if name != f"{mode}/none" and (uncached / "result.json").exists() else None
        configs[name] = {"mode": mode, "ranks": ranks, "args": worker_args, "prompts": len(requests), **result,
                         **quality(args.model, requests, folder, baseline)}
    for name, c in configs.items():
        base = configs.get(f"{c['mode']}/none")
        if base and name != f"{c['mode']}/none":
            c["speedup_vs_uncached"] = base["seconds"]["median"] / c["seconds"]["median"]
            c["loop_speedup_vs_uncached"] = base["loop_seconds"]["median"] / c["loop_seconds"]["median"]
            c["evaluations_saved"] = base["evaluations_per_request"] / max(c["evaluations_per_request"], 1e-9)
            if "caption_accuracy" in c:
                c["accuracy_change_pts"] = 100 * (c["caption_accuracy"] - base["caption_accuracy"])
        shown = {k: round(v, 3) for k, v in c.items() if k in ("speedup_vs_uncached", "loop_speedup_vs_uncached",
                                                                 "evaluations_saved",
                                                                 "caption_accuracy", "accuracy_change_pts")}
        print(f"{name:>28}: {c['seconds']['median']:.3f} s  {shown}")
    report = {**report_header("step_cache"), "workload": {"model": args.model, "prompts": args.prompts, "steps": 20,
                                                           "settings": SETTINGS[args.model]},
              "configs": configs}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
