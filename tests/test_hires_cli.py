"""`paragen image --hires` checkpoints: a killed run resumes to the same image; a checkpoint folder is
never overwritten by a fresh start or by a resume of a different request."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.multiproc import check_all_ok, expect_bad_input, folder_snapshot, kill_after_checkpoint, run_ranks, start_ranks

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)

HIRES = ["-m", "paragen", "image", "--hires", "--window", "16", "--height", "192", "--width", "256", "--seed", "3",
         "--timeout", "20"]


def _pixels(folder: Path) -> np.ndarray:
    (png,) = folder.glob("*.png")
    return np.asarray(Image.open(png), dtype=np.int16)


def test_killed_run_resumes_to_the_same_image(tmp_path):
    steps = ["--steps", "12", "--checkpoint-every", "3"]
    check_all_ok(run_ranks([*HIRES, *steps, "--out", str(tmp_path / "whole"), "--checkpoint", str(tmp_path / "ck_whole")], 2))

    killed_out, ck = tmp_path / "killed", tmp_path / "ck"
    procs = start_ranks([*HIRES, *steps, "--out", str(killed_out), "--checkpoint", str(ck)], 2)
    saved = kill_after_checkpoint(procs, ck, 3)
    assert not killed_out.exists() or not any(killed_out.glob("*.png")), "a killed run must not write an image"
    assert 3 <= saved < 12

    check_all_ok(run_ranks([*HIRES, *steps, "--out", str(killed_out), "--resume", str(ck)], 2))
    assert np.array_equal(_pixels(killed_out), _pixels(tmp_path / "whole"))


@pytest.fixture(scope="module")
def used_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("used")
    check_all_ok(run_ranks([*HIRES, "--steps", "4", "--checkpoint-every", "2", "--out", str(folder / "out"),
                            "--checkpoint", str(folder / "ck")], 2))
    return folder / "ck"


@pytest.mark.parametrize("args,message", [
    (["--steps", "4", "--checkpoint"], "already holds"),
    (["--steps", "5", "--resume"], "request.steps"),
    (["--steps", "4", "--guidance", "sync", "--resume"], "config.hires"),
])
def test_a_checkpoint_is_never_overwritten_by_a_bad_start(tmp_path, used_folder, args, message):
    before = folder_snapshot(used_folder)
    procs = start_ranks([*HIRES, *args, str(used_folder), "--out", str(tmp_path / "out")], 2)
    expect_bad_input(procs, message)
    assert folder_snapshot(used_folder) == before
    assert not (tmp_path / "out").exists()
