"""tools/train_shapes.py for a few steps: the DiT twin's folder loads in the stock PixArtSigmaPipeline with
tiny-shapes' VAE, and the same seed trains the same weights; the UNet's options reach the folder the stock
StableDiffusionPipeline loads, and it trains on the conditioning the pipeline gives (CLIP or T5)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from paragen.pipelines.loading import model_folder

ROOT = Path(__file__).resolve().parents[1]


def _train(out: Path, *options: str) -> None:
    subprocess.run([sys.executable, "tools/train_shapes.py", "--out", str(out), "--vae-from",
                    str(model_folder("tiny-shapes")), "--steps", "2", "--eval-every", "2", "--scenes", "40",
                    "--batch", "4", "--eval-prompts", "1", "--noisy-share", "0.5", "--threads", "1", *options],
                   cwd=ROOT, check=True, capture_output=True, env={"PATH": "", "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_a_short_pixart_run_writes_a_stock_folder_deterministically(tmp_path) -> None:
    from diffusers import PixArtSigmaPipeline

    _train(tmp_path / "a", "--arch", "pixart")
    _train(tmp_path / "b", "--arch", "pixart")
    pipe = PixArtSigmaPipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    shipped = load_file(model_folder("tiny-shapes") / "vae" / "diffusion_pytorch_model.safetensors")
    assert all((pipe.vae.state_dict()[k] == v.float()).all() for k, v in shipped.items())  # tiny-shapes' VAE
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert log["steps"] == 2 and log["noisy_share"] == 0.5 and log["latest"]["step"] == 2
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("text", ["clip", "t5"])
def test_a_short_unet_run_takes_its_options_and_trains_on_the_pipelines_conditioning(tmp_path, text) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from tools.train_shapes import TEXT_TOKENS, predict

    _train(tmp_path, "--arch", "sd", "--unet-levels", "3", "--prediction", "v_prediction", "--text", text)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert len(pipe.unet.config.block_out_channels) == 3
    assert json.loads((tmp_path / "training_log.json").read_text())["unet_levels"] == 3
    assert pipe.tokenizer.model_max_length == TEXT_TOKENS  # what the pipeline pads to
    # Training conditions the UNet on what the stock pipeline's prompt encoding gives it.
    prompt, x, t = "a small red circle at the top left", torch.randn(1, 4, 16, 16), torch.tensor([900])
    states, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    with torch.no_grad():
        assert torch.allclose(predict(pipe.components, x, t, [prompt]), pipe.unet(x, t, states).sample, atol=1e-6)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=TEXT_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        unmasked = pipe.text_encoder(ids)[0]
    assert torch.allclose(states, unmasked) == (text == "clip")  # T5's padding is masked out of its encoder
