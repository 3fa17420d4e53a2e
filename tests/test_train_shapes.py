"""tools/train_shapes.py, run for a few steps: its folder loads in the stock `StableDiffusionPipeline` as a
v-prediction model, and a run given an earlier run's VAE (`--vae-from`) trains the very same denoiser."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--vae-steps", "2", "--vae-batch", "2", "--steps", "3", "--batch", "2", "--eval-every", "1000",
        "--eval-prompts", "1", "--threads", "1", "--unet-levels", "2"]


def _train(out: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, str(ROOT / "tools/train_shapes.py"), "--out", str(out), *TINY, *extra],
                   check=True, capture_output=True, timeout=600)
    return json.loads((out / "training_log.json").read_text())


def _weights(folder: Path, part: str) -> dict:
    (file,) = (folder / part).glob("*.safetensors")
    return load_file(file)


def test_a_run_given_an_earlier_vae_trains_the_same_denoiser(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    full = _train(tmp_path / "full")
    again = _train(tmp_path / "again", "--vae-from", str(tmp_path / "full"))
    assert again["vae_from"] == str(tmp_path / "full") and "vae_from" not in full
    assert [line for line in again["log"] if line["part"] == "vae"] == [l for l in full["log"] if l["part"] == "vae"]
    for part in ("vae", "unet", "text_encoder"):
        first, second = _weights(tmp_path / "full", part), _weights(tmp_path / "again", part)
        assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first), part
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "again", local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(pipe.unet.config.block_out_channels) == 2
