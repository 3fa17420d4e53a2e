"""The trained embedded model `tiny-shapes` (issue 18): it loads from the package offline, through paragen and
through the stock `StableDiffusionPipeline`, and draws what held-out captions say (scored by
tools/shapes_scorer.py); on real ranks, sync patch parallelism and hires still equal the single-process
picture, and displaced and partial draw the objects the single process draws."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paragen.pipelines.loading import load_pipeline, model_folder
from tests.multiproc import check_all_ok, run_ranks
from tools.shapes_scorer import score
from tools.shapes_world import caption, sample_scene
from tools.train_shapes import EVAL_SEED, SIDE

# The share of named objects whose colour the model puts in their cell, on 16 held-out captions: the shipped
# model (stopped far from the goal, see training_log.json) measures 0.22 (5 of 23) on its own captions
# and 0.0 on another picture's; the floor sits between, with room for another CPU's rounding.
PLACED_FLOOR = 0.1
STEPS, GUIDANCE = 20, 4.0


def _captions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [caption(sample_scene(rng)) for _ in range(count)]


def _placed(images: list[Image.Image], captions: list[str]) -> float:
    scores = [score(image, text) for image, text in zip(images, captions)]
    return sum(s["placed"] for s in scores) / sum(s["named"] for s in scores)


def test_tiny_shapes_loads_offline_and_draws_held_out_captions(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline("tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    captions = _captions(16, EVAL_SEED + 2)
    images = pipe(captions, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(captions))]).images
    assert _placed(images, captions) >= PLACED_FLOOR
    # The caption steers the picture: scored against the next picture's caption, far fewer objects are in place.
    assert _placed(images, captions[1:] + captions[:1]) < PLACED_FLOOR / 2


def test_the_stock_pipeline_class_loads_the_shipped_folder() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_folder("tiny-shapes"), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == SIDE
    log = json.loads((model_folder("tiny-shapes") / "training_log.json").read_text())
    assert log["latest"] == log["log"][-1] and log["latest"]["step"] == log["steps"]  # the weights are the last step's


def _cli(tmp_path: Path, name: str, ranks: int, args: list[str], prompt: str, size: int = SIDE) -> np.ndarray:
    out = tmp_path / name
    results = run_ranks(["-m", "paragen", "image", "--model", "tiny-shapes", "--prompt", prompt, "--seed", "0",
                         "--height", str(size), "--width", str(size), "--steps", "12",
                         "--guidance-scale", str(GUIDANCE), *args, "--out", str(out)], ranks)
    check_all_ok(results)
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png), dtype=np.int16)


PROMPT = "a large red circle at the top left"  # one the shipped model draws right at seed 0


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> np.ndarray:
    return _cli(tmp_path_factory.mktemp("single"), "single", 1, [], PROMPT)


@pytest.mark.slow
def test_sync_patches_on_two_ranks_equal_the_single_process_picture(tmp_path, single) -> None:
    assert np.abs(_cli(tmp_path, "sync", 2, ["--mode", "sync"], PROMPT) - single).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--mode", "displaced"], ["--mode", "partial"]], ids=["displaced", "partial"])
def test_stale_modes_on_two_ranks_draw_what_the_single_process_draws(tmp_path, single, args) -> None:
    image = _cli(tmp_path, args[1], 2, args, PROMPT)

    def drawn(pixels: np.ndarray) -> list[tuple[str, str, str]]:
        return sorted((f["colour"], f["shape"], f["cell"]) for f in score(Image.fromarray(pixels.astype(np.uint8)),
                                                                           PROMPT)["found"])

    assert drawn(single), "the single process draws nothing to compare with"
    assert drawn(image) == drawn(single)


@pytest.mark.slow
def test_hires_on_two_ranks_equals_one_process_at_four_times_the_area(tmp_path) -> None:
    hires = ["--hires", "--guidance", "async"]
    image = _cli(tmp_path, "hires2", 2, hires, PROMPT, size=2 * SIDE)
    assert image.shape == (2 * SIDE, 2 * SIDE, 3)
    assert np.abs(image - _cli(tmp_path, "hires1", 1, hires, PROMPT, size=2 * SIDE)).max() <= 1
    # What it draws there is bench/bench_shapes.py's question; here: the caption's colour, not texture.
    assert "red" in {f["colour"] for f in score(Image.fromarray(image.astype(np.uint8)), PROMPT)["found"]}
