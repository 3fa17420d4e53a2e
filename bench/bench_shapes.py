"""Pictures judged by what they show (issue 18): paragen's image modes on `tiny-shapes` (UNet) and `tiny-shapes-dit`
(PixArt-Σ), scored by the shapes scorer.

The prompts are captions of held-out scenes (drawn from `EVAL_SEED + 1` up; training draws below `EVAL_SEED`),
each generated with its own seed. Every configuration makes the same requests through the CLI, in one launch
(`--requests`), and `tools/shapes_scorer.py` scores each PNG against its caption: caption accuracy (every named
object found at its place, nothing else), object recall, and the duplicated-object rate (a named colour and shape
found more often than named); and, softer, the share of named objects whose colour is found in their cell.
- At the training size (64²): `single` (1 rank), and sync, displaced and partial at 2 and 4 ranks (their
  default warm-up), each also compared with `single` by PSNR on the same request.
- Beyond it, at 2x area (64 × 128) and 4x area (128²): `direct` (1 rank, the whole latent at once, the stock
  algorithm), `windows` (hires windows without guidance and without the low-resolution seeding: MultiDiffusion),
  `hires_sync` and `hires_async` (ASGDiffusion's structure guidance) on 2 ranks.
- `--model tiny-shapes-dit`: the sequence-parallel modes instead — Ring, Ulysses and displaced (stale K/V of the
  other shards, default warm-up) at 2 and 4 ranks — and `direct` beyond the training size (hires is UNet-only).
Nothing is timed (4 ranks oversubscribe this machine's cores): this is the quality side of each mode. The
training curve is read from the shipped `training_log.json`.

    .venv/bin/python bench/bench_shapes.py [--model tiny-shapes-dit] [--prompts 32] [--prompts-beyond 16]
        [--only single,sync_2r] [--keep DIR] → bench/results/shapes_cpu.json (shapes_dit_cpu.json for the DiT;
        with --keep, a rerun makes only the pictures DIR lacks)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import ROOT, psnr, report_header

sys.path.insert(0, str(ROOT))
from paragen.pipelines.jobs.journal import journal_path, read_journal  # noqa: E402
from paragen.pipelines.loading import model_folder  # noqa: E402
from tools.shapes_scorer import score  # noqa: E402
from tools.shapes_world import caption, sample_scene  # noqa: E402
from tools.train_shapes import EVAL_SEED, SIDE  # noqa: E402

STEPS, GUIDANCE = 20, 4.0
SIZES = {"1x": (SIDE, SIDE), "2x": (SIDE, 2 * SIDE), "4x": (2 * SIDE, 2 * SIDE)}
WINDOWS = ["--hires", "--guidance-weight", "0", "--structure-fraction", "0"]
MODELS = {  # model -> configuration name -> (area, ranks, CLI arguments)
    "tiny-shapes": {
        "single": ("1x", 1, []),
        **{f"{mode}_{n}r": ("1x", n, ["--mode", mode]) for n in (2, 4) for mode in ("sync", "displaced", "partial")},
        **{f"{kind}_{area}": (area, ranks, args) for area in ("2x", "4x") for kind, ranks, args in (
            ("direct", 1, []), ("windows", 2, WINDOWS),
            ("hires_sync", 2, ["--hires", "--guidance", "sync"]), ("hires_async", 2, ["--hires", "--guidance", "async"]))},
    },
    "tiny-shapes-dit": {
        "single": ("1x", 1, []),
        **{f"{mode}_{n}r": ("1x", n, args) for n in (2, 4) for mode, args in (
            ("ring", ["--ring", str(n)]), ("ulysses", ["--ulysses", str(n)]),
            ("displaced", ["--ring", str(n), "--mode", "displaced"]))},
        **{f"direct_{area}": (area, 1, []) for area in ("2x", "4x")},
    },
}
RESULTS = {"tiny-shapes": "shapes_cpu.json", "tiny-shapes-dit": "shapes_dit_cpu.json"}
REFERENCE = "single"  # what the training-size modes are compared with, picture by picture
EXAMPLES = ("single", "displaced_2r", "partial_2r", "displaced_4r", "direct_4x", "windows_4x", "hires_async_4x")  # columns


def prompts(count: int) -> list[dict]:
    """`count` held-out captions, each with its own generation seed."""
    rng = random.Random(EVAL_SEED + 1)
    return [{"id": f"p{i:03d}", "prompt": caption(sample_scene(rng)), "seed": 1000 + i} for i in range(count)]


def generate(model: str, name: str, requests: list[dict], out: Path) -> dict[str, Path]:
    """Run `model`'s configuration `name` on every request in one launch; id -> its PNG."""
    area, ranks, args = MODELS[model][name]
    height, width = SIZES[area]
    lines = [json.dumps({**r, "height": height, "width": width}) for r in requests]
    (out / "requests.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "paragen", "image",
           "--model", model, "--steps", str(STEPS), "--guidance-scale", str(GUIDANCE), *args, "--strict",
           "--requests", str(out / "requests.jsonl"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    done = read_journal(journal_path(str(out), (0, 1)))
    return {r["id"]: next(out / p for p in done[r["id"]]["outputs"] if p.endswith(".png")) for r in requests}


def _pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255)


def summarise(requests: list[dict], pictures: dict[str, Path], reference: dict[str, Path] | None) -> dict:
    """The scores of one configuration's pictures (and their PSNR against `reference`'s)."""
    scores = [score(Image.open(pictures[r["id"]]), r["prompt"]) for r in requests]
    summary = {
        "caption_accuracy": sum(s["correct"] for s in scores) / len(scores),
        "object_recall": sum(s["matched"] for s in scores) / sum(s["named"] for s in scores),
        "colour_place_recall": sum(s["placed"] for s in scores) / sum(s["named"] for s in scores),
        "duplicated_rate": sum(s["duplicated"] for s in scores) / len(scores),
        "extra_per_picture": sum(s["extra"] for s in scores) / len(scores),
        "per_prompt": [{"id": r["id"], "correct": s["correct"], "matched": s["matched"], "named": s["named"],
                        "extra": s["extra"], "duplicated": s["duplicated"]} for r, s in zip(requests, scores)],
    }
    if reference is not None:
        values = [psnr(_pixels(pictures[r["id"]]), _pixels(reference[r["id"]])) for r in requests]
        finite = [v for v in values if v != float("inf")]
        summary["psnr_vs_single_db"] = {"median": statistics.median(values), "min": min(values),
                                        "identical": len(values) - len(finite)}
    return summary


def example_sheet(requests: list[dict], pictures: dict[str, dict[str, Path]], out: Path, rows: int = 4) -> None:
    """The first `rows` requests (rows) in the configurations of `EXAMPLES` that ran (columns), at 128 px a side
    per cell, captions beside; written to `out`."""
    from PIL import ImageDraw

    columns, rows = [n for n in EXAMPLES if n in pictures], min(rows, len(requests))
    cell, text = 128, 300
    sheet = Image.new("RGB", (text + cell * len(columns), 16 + cell * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((text + j * cell + 4, 2), name, fill="black")
    for i, request in enumerate(requests[:rows]):
        top = 16 + i * cell
        words = request["prompt"].split(" and ")
        for k, part in enumerate(words):
            draw.text((4, top + 8 + 14 * k), ("and " if k else "") + part, fill="black")
        for j, name in enumerate(columns):
            picture = Image.open(pictures[name][request["id"]])
            scale = cell / max(picture.size)
            picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.NEAREST)
            sheet.paste(picture, (text + j * cell, top))
    sheet.save(out)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="tiny-shapes")
    p.add_argument("--prompts", type=int, default=32, help="captions at the training size")
    p.add_argument("--prompts-beyond", type=int, default=16, help="captions beyond it (the first of the same list)")
    p.add_argument("--only", help="comma-separated configurations (default: all of the model's)")
    p.add_argument("--keep", help="folder to keep the pictures in (default: a temporary one)")
    p.add_argument("--out", help="default: bench/results/shapes_cpu.json, or shapes_dit_cpu.json for the DiT")
    args = p.parse_args()
    known = MODELS[args.model]
    names = args.only.split(",") if args.only else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known for {args.model}: {', '.join(known)}")
    if any(known[n][0] == "1x" for n in names) and REFERENCE not in names:
        names.insert(0, REFERENCE)  # the training-size modes are compared with it
    requests = prompts(max(args.prompts, args.prompts_beyond))
    root = Path(args.keep or tempfile.mkdtemp(prefix="shapes-"))
    pictures: dict[str, dict[str, Path]] = {}
    configs: dict[str, dict] = {}
    for name in names:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        area, ranks, cli = known[name]
        asked = requests[: args.prompts if area == "1x" else args.prompts_beyond]
        pictures[name] = generate(args.model, name, asked, folder)
        reference = pictures[REFERENCE] if area == "1x" and name != REFERENCE else None
        configs[name] = {"area": area, "size": SIZES[area], "ranks": ranks, "args": cli, "prompts": len(asked),
                         **summarise(asked, pictures[name], reference)}
        c = configs[name]
        print(f"{name:>16}: accuracy {c['caption_accuracy']:.2f}  recall {c['object_recall']:.2f}  "
              f"colour+place {c['colour_place_recall']:.2f}  "
              f"duplicated {c['duplicated_rate']:.2f}" + (f"  PSNR {c['psnr_vs_single_db']['median']:.1f} dB"
                                                             if "psnr_vs_single_db" in c else ""), flush=True)
    training = json.loads((model_folder(args.model) / "training_log.json").read_text())
    report = {**report_header("shapes"), "workload": {"model": args.model, "steps": STEPS, "guidance_scale": GUIDANCE,
                                                      "prompts": args.prompts, "prompts_beyond": args.prompts_beyond,
                                                      "first_scene_seed": EVAL_SEED + 1},
              "pictures": str(root) if args.keep else None, "configs": configs,
              "training_curve": [line for line in training["log"] if "caption_accuracy" in line]}
    out = Path(args.out or ROOT / "bench" / "results" / RESULTS[args.model])
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    example_sheet(requests[: min(args.prompts, args.prompts_beyond)], pictures, out.with_name(out.stem + "_examples.png"))


if __name__ == "__main__":
    main()
