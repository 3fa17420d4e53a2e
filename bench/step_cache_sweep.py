"""Choosing the step cache's settings for `bench_step_cache.py` on calibration captions (not the ones it scores).

One process, the shapes models at their training size, 20 steps: for each method and setting, the share of denoiser
forwards computed and the caption accuracy (`tools/shapes_scorer.py`) against the uncached run, on captions drawn from
`EVAL_SEED + 7` (the benchmark draws from `EVAL_SEED + 1`).

    .venv/bin/python bench/step_cache_sweep.py [--model tiny-shapes-dit] [--prompts 16]
        → bench/results/step_cache_sweep_<model>_cpu.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from common import ROOT, report_header

sys.path.insert(0, str(ROOT))
import paragen  # noqa: E402
from paragen.pipelines.loading import load_pipeline  # noqa: E402
from tools.shapes_scorer import score  # noqa: E402
from tools.shapes_world import caption, sample_scene  # noqa: E402
from tools.train_shapes import EVAL_SEED, SIDE  # noqa: E402

STEPS, GUIDANCE = 20, 4.0
SETTINGS = {"none": [{}], "fbcache": [{"threshold": t} for t in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)],
            "teacache": [{"threshold": t} for t in (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)],
            "taylorseer": [{"interval": i, "order": o} for i in (2, 3) for o in (1, 2)]}


def run(model: str, method: str, setting: dict, requests: list[tuple[str, int]]) -> dict:
    pipe = paragen.parallelize(load_pipeline(model), paragen.ParallelConfig())
    pipe.set_progress_bar_config(disable=True)
    cache = paragen.enable_step_cache(pipe, paragen.StepCacheConfig(method=method, **setting)) \
        if method != "none" else None
    extra = {"use_resolution_binning": False} if model == "tiny-shapes-dit" else {}
    correct, computed, total = 0, 0, 0
    for prompt, seed in requests:
        image = pipe(prompt, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     generator=torch.Generator().manual_seed(seed), **extra).images[0]
        correct += score(image, prompt)["correct"]
        forwards = cache.last["forwards"] if cache else {"computed": STEPS, "served": 0}
        computed, total = computed + forwards["computed"], total + forwards["computed"] + forwards["served"]
    return {"method": method, **setting, "caption_accuracy": correct / len(requests),
            "computed_share": computed / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny-shapes", "tiny-shapes-dit"), default="tiny-shapes")
    p.add_argument("--prompts", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(EVAL_SEED + 7)
    requests = [(caption(sample_scene(rng)), 5000 + i) for i in range(args.prompts)]
    rows = []
    for method, settings in SETTINGS.items():
        for setting in settings:
            rows.append(run(args.model, method, setting, requests))
            print(json.dumps(rows[-1]), flush=True)
    out = ROOT / "bench" / "results" / f"step_cache_sweep_{args.model}_cpu.json"
    out.write_text(json.dumps({**report_header("step_cache_sweep"), "model": args.model, "steps": STEPS,
                               "prompts": args.prompts, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
