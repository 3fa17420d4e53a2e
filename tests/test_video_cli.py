"""`paragen video` end to end on real ranks: the MP4/GIF and report, bad input, and checkpoints (a killed run
resumes to the same frames; a checkpoint folder is never overwritten by a bad start)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image, ImageSequence

from tests.multiproc import check_all_ok, expect_bad_input, folder_snapshot, kill_after_checkpoint, run_ranks, start_ranks

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)

VIDEO = ["-m", "paragen", "video", "--height", "64", "--width", "64", "--seed", "3", "--timeout", "30"]


def _gif_frames(folder: Path) -> np.ndarray:
    (gif,) = folder.glob("*.gif")
    return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(Image.open(gif))])


def test_writes_an_mp4_and_a_report(tmp_path):
    check_all_ok(run_ranks([*VIDEO, "--frames", "20", "--steps", "2", "--prompt", "a fox", "--prompt", "a forest",
                            "--local", "4", "--out", str(tmp_path)], 2))
    (mp4,) = tmp_path.glob("*.mp4")
    frames = iio.imread(mp4)
    assert frames.shape == (20, 64, 64, 3) and frames.std() > 5
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    assert data["world_size"] == 2 and data["config"]["clip"] == 2 and data["request"]["prompts"] == ["a fox", "a forest"]
    assert data["comm_per_rank"]["1"]["clip.halo_kv"]["bytes_sent"] > 0


def test_a_wan_model_runs_sharded_over_the_video_tokens_and_over_clips(tmp_path):
    frames, out = {}, tmp_path / "wan"  # one folder: the file names carry the whole layout (they once collided)
    layouts = {"--ring": ["--ring", "2"], "--ulysses": ["--ulysses", "2"], "--clip": ["--clip", "2", "--scope", "full"]}
    names = {"--ring": "clip1_ring2_dual", "--ulysses": "clip1_ulysses2_dual", "--clip": "clip2_full"}
    for flag, layout in layouts.items():
        check_all_ok(run_ranks([*VIDEO, "--model", "tiny-wan", "--frames", "17", "--steps", "2", "--format", "gif",
                                *layout, "--out", str(out)], 2))
        stem = f"tiny-wan_17f_64x64_{names[flag]}_seed3"
        frames[flag] = np.stack([np.asarray(frame.convert("RGB"))
                                 for frame in ImageSequence.Iterator(Image.open(out / f"{stem}.gif"))])
        data = json.loads((out / f"{stem}.json").read_text())
        assert data["workload"] == "wan" and data["config"][flag.strip("-")] == 2
    assert len(list(out.glob("*.gif"))) == 3
    assert frames["--ring"].shape == (17, 64, 64, 3) and frames["--ring"].std() > 5
    # the same video (exact in float: tests/test_wan_parallel.py); here only the 8-bit GIF's rounding may differ
    for other in ("--ulysses", "--clip"):
        assert np.abs(frames["--ring"].astype(int) - frames[other].astype(int)).mean() < 0.5


BAD_INPUTS = {
    "more ranks than frames": (4, ["--frames", "3"], "more ranks than frames"),
    "clips shorter than the attention halo": (2, ["--frames", "12"], "clips shorter than the halo"),
    "clips shorter than the conv halo": (2, ["--frames", "6", "--scope", "full"], "clips shorter than the halo"),
    "non-positive frames": (2, ["--frames", "0"], "frames must be positive"),
    "absurd size": (2, ["--height", "100000"], "height must be at most 16384, got 100000"),
    "prompts do not match the segments": (2, ["--prompt", "a", "--prompt", "b", "--segment-frames", "10,10,12"],
                                          "2 segment prompts but 3 segment lengths"),
    "segments do not add up": (2, ["--prompt", "a", "--prompt", "b", "--segment-frames", "10,10"], "add up to"),
    "image model": (2, ["--model", "tiny-sd"], "paragen video runs"),
    "clip not the world size": (2, ["--clip", "4"], "clip (4) = 4, but the world size is 2"),
    "bad bias switch": (2, ["--bias-switch", "2000"], "bias_switch"),
    "wan: clips shorter than the halo": (2, ["--model", "tiny-wan", "--frames", "17", "--clip", "2"],
                                         "clips shorter than the halo"),
    "wan: a local/global bias": (2, ["--model", "tiny-wan", "--frames", "17", "--clip", "2", "--bias", "5"],
                                 "bias is not supported"),
    "wan: frames the VAE cannot take": (2, ["--model", "tiny-wan", "--frames", "16"], "4k+1 frames"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_fast_on_every_rank(tmp_path, case):
    world, args, message = BAD_INPUTS[case]
    start = time.monotonic()
    procs = start_ranks([*VIDEO, "--frames", "32", "--steps", "2", *args, "--out", str(tmp_path / "out")], world)
    expect_bad_input(procs, message)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists(), "a failed run must leave no output file"


RUN = [*VIDEO, "--format", "gif", "--checkpoint-every", "3"]
# Wan: 17 latent frames of 8 × 8 tokens in 2 clips with 2 segment prompts, slow enough to be killed mid-run
MODELS = {"unet": ["--frames", "32"],
          "wan": ["--model", "tiny-wan", "--frames", "65", "--height", "128", "--width", "128", "--clip", "2",
                  "--local", "2", "--global-frames", "3", "--prompt", "a fox", "--prompt", "a forest"]}


@pytest.mark.parametrize("model", list(MODELS))
def test_killed_run_resumes_to_the_same_frames(tmp_path, model):
    steps = ["--steps", "12", *MODELS[model]]
    check_all_ok(run_ranks([*RUN, *steps, "--out", str(tmp_path / "whole")], 2))

    killed_out, ck = tmp_path / "killed", tmp_path / "ck"
    procs = start_ranks([*RUN, *steps, "--out", str(killed_out), "--checkpoint", str(ck)], 2)
    saved = kill_after_checkpoint(procs, ck, 3)
    assert not killed_out.exists() or not any(killed_out.glob("*.gif")), "a killed run must not write a video"
    assert 3 <= saved < 12

    check_all_ok(run_ranks([*RUN, *steps, "--out", str(killed_out), "--resume", str(ck)], 2))
    assert np.array_equal(_gif_frames(killed_out), _gif_frames(tmp_path / "whole"))


@pytest.fixture(scope="module")
def used_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("used")
    check_all_ok(run_ranks([*RUN, *MODELS["unet"], "--steps", "4", "--out", str(folder / "out"), "--checkpoint",
                            str(folder / "ck")], 2))
    return folder / "ck"


@pytest.mark.parametrize("args,message", [
    (["--steps", "4", "--checkpoint"], "already holds"),
    (["--steps", "5", "--resume"], "request.steps"),
    (["--steps", "4", "--scope", "full", "--resume"], "config.temporal"),
])
def test_a_checkpoint_is_never_overwritten_by_a_bad_start(tmp_path, used_folder, args, message):
    before = folder_snapshot(used_folder)
    procs = start_ranks([*RUN, *MODELS["unet"], *args, str(used_folder), "--out", str(tmp_path / "out")], 2)
    expect_bad_input(procs, message)
    assert folder_snapshot(used_folder) == before
    assert not (tmp_path / "out").exists()
