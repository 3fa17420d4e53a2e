"""Train `tiny-shapes` (issue 18): a Stable-Diffusion-architecture text-to-image model of the shapes world.

Deterministic from `--seed` on the CPU at a given `--threads` (steps are counted, not timed). Every batch is drawn
fresh from the world (`tools/shapes_world.py`, 64 × 64 pictures), so nothing is stored but the model. Three
parts, trained in turn:
1. the tokenizer: a CLIP BPE whose merges make every word of the world one token (written, not learned);
2. the VAE (AutoencoderKL, 16 × 16 × 4 latents), on reconstruction with a small KL term, for `--vae-steps`
   of `--vae-batch` pictures; its posterior starts nearly deterministic (log-variance bias -10), so
   reconstruction trains on the mean from the first step; its latent scale is then measured
   (`scaling_factor` = 1 / std);
3. the UNet (UNet2DConditionModel with cross-attention) and the CLIP text encoder together, on the denoising
   loss (ε-prediction, DDPM's scaled-linear betas, Min-SNR-5 weighting), the caption dropped for 10% of the
   pictures so that classifier-free guidance works, for `--steps`; an exponential moving average of the
   weights (decay up to 0.999) is what gets evaluated and saved.
Every `--eval-every` steps the pipeline draws `--eval-prompts` captions of held-out seeds (20 DDIM steps,
guidance 4), `tools/shapes_scorer.py` scores them, and the folder is written: the accuracy curve goes into
`training_log.json` beside the weights, and a run stopped early leaves its last evaluated model. The output
folder is a diffusers `StableDiffusionPipeline` folder (safetensors, fp16 weights) that the stock
`StableDiffusionPipeline.from_pretrained` loads.

    python tools/train_shapes.py [--out paragen/pipelines/configs/tiny-shapes] [--steps 3000] [--seed 0]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root
from tools.shapes_scorer import score  # noqa: E402
from tools.shapes_world import CELLS, COLOURS, SHAPES, SIZES, caption, render, sample_scene  # noqa: E402

SIDE = 64
EVAL_SEED = 1_000_000  # held-out scenes: training draws from seeds below this
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 16,
              "block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
              "up_block_types": ["UpDecoderBlock2D"] * 3, "sample_size": SIDE}
UNET_CONFIG = {"sample_size": SIDE // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
               "block_out_channels": [64, 128], "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8,
               "cross_attention_dim": 64, "norm_num_groups": 32}
SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                    "steps_offset": 1, "timestep_spacing": "leading"}


def world_words() -> list[str]:
    """Every word a caption can hold."""
    return sorted({"a", "at", "the", "and", *COLOURS, *SHAPES, *SIZES, *(w for cell in CELLS for w in cell.split())})


def write_tokenizer(folder: Path):
    """A CLIP tokenizer whose BPE merges turn each word of the world into one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def chain(symbols: list[str]) -> None:  # merges joining `symbols` left to right, their products in the vocab
        for symbol in symbols:
            vocab.setdefault(symbol, len(vocab))
        while len(symbols) > 1:
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))

    def save() -> CLIPTokenizer:
        (folder / "vocab.json").write_text(json.dumps({**vocab, **{t: len(vocab) + i for i, t in enumerate(SPECIAL)}}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 32, "bos_token": SPECIAL[0], "eos_token": SPECIAL[1],
            "unk_token": SPECIAL[1], "pad_token": SPECIAL[1], "do_lower_case": True}, indent=2))
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)

    for word in world_words():
        chain([*word[:-1], word[-1] + "</w>"])
    tokenizer = save()
    for _ in range(10):  # an earlier word's merge can cut a later word differently: join its pieces as they come
        split = [w for w in world_words() if len(tokenizer(w).input_ids) != 3]
        if not split:
            return tokenizer
        for word in split:
            chain(tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids)[1:-1])
        tokenizer = save()
    raise RuntimeError(f"words still split into several tokens: {split}")


def build_models(tokenizer):
    """The VAE, UNet and text encoder, randomly initialised from the current torch seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return vae, unet, text


def draw_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    """`size` fresh scenes: pictures in [-1, 1] as `[B, 3, SIDE, SIDE]`, and their captions."""
    scenes = [sample_scene(rng) for _ in range(size)]
    pixels = np.stack([np.asarray(render(s, SIDE), dtype=np.float32) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1, [caption(s) for s in scenes]


def update(optimiser: torch.optim.Optimizer, loss: torch.Tensor, parameters) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(parameters), 1.0)
    optimiser.step()


def record(log: list, part: str, step: int, start: float, **values) -> None:
    """Append a line to the training log and print it."""
    log.append({"part": part, "step": step, "seconds": round(time.monotonic() - start, 1), **values})
    print(log[-1], flush=True)


def train_vae(vae, rng: random.Random, steps: int, batch: int, log: list) -> None:
    """Reconstruction (L1 + MSE) with a small KL term, for `steps`."""
    with torch.no_grad():  # log-variance channels of the encoder's output: start at std e^-5
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -10.0
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    start, step = time.monotonic(), 0
    while step < steps:
        pictures, _ = draw_batch(rng, batch)
        posterior = vae.encode(pictures).latent_dist
        out = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(out, pictures) + F.mse_loss(out, pictures)
        step += 1
        update(optimiser, rec + 1e-6 * posterior.kl().mean(), vae.parameters())
        if step % 50 == 0:
            record(log, "vae", step, start, reconstruction=round(rec.item(), 5))


@torch.no_grad()
def latent_scale(vae, rng: random.Random) -> float:
    """1 / the standard deviation of the VAE's latents over fresh pictures (SD's `scaling_factor` rule)."""
    pictures, _ = draw_batch(rng, 64)
    return 1.0 / vae.encode(pictures).latent_dist.mode().std().item()


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


class Average:
    """An exponential moving average of some modules' weights (decay (1 + step) / (10 + step), at most `decay`)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float = 0.999):
        self.modules, self.decay, self.updates = modules, decay, 0
        self.averaged = [copy.deepcopy(m).requires_grad_(False).eval() for m in modules]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for module, average in zip(self.modules, self.averaged):
            for p, a in zip(module.parameters(), average.parameters()):
                a.lerp_(p, weight)


def train_denoiser(parts: dict, rng: random.Random, steps: int, batch: int, log: list, evaluate, save) -> None:
    """The UNet and the text encoder on the ε-prediction loss for `steps`; every `eval_every` steps and at the
    end, `evaluate(averaged parts)` is logged, then `save(averaged parts)` is called."""
    from diffusers import DDPMScheduler

    vae, unet, text, tokenizer = parts["vae"], parts["unet"], parts["text_encoder"], parts["tokenizer"]
    noise_schedule = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    optimiser = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=5e-4, weight_decay=1e-2)
    average = Average([unet, text])
    alphas = noise_schedule.alphas_cumprod
    scale = vae.config.scaling_factor
    start, step = time.monotonic(), 0
    while True:
        if step % parts["eval_every"] == 0 or step == steps:
            averaged = {**parts, "unet": average.averaged[0], "text_encoder": average.averaged[1]}
            record(log, "denoiser", step, start, **evaluate(averaged))
            save(averaged)
        if step == steps:
            return
        pictures, captions = draw_batch(rng, batch)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(pictures).latent_dist.sample() * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,))
        noisy = noise_schedule.add_noise(latents, noise, t)
        predicted = unet(noisy, t, encode_text(tokenizer, text, captions)).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=5.0) / snr  # Min-SNR-5 for ε-prediction
        loss = (weight * (predicted - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        step += 1
        update(optimiser, loss, [*unet.parameters(), *text.parameters()])
        average.update()
        if step % 50 == 0:
            record(log, "denoiser", step, start, loss=round(loss.item(), 5))


def pipeline(parts: dict):
    """The stock StableDiffusionPipeline over the parts (DDIM for sampling)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def caption_accuracy(pipe, count: int, steps: int = 20, guidance: float = 4.0) -> dict:
    """Scores of `count` held-out captions drawn by `pipe` (one picture each, seed = scene index)."""
    rng = random.Random(EVAL_SEED)
    captions = [caption(sample_scene(rng)) for _ in range(count)]
    images = pipe(captions, height=SIDE, width=SIDE, num_inference_steps=steps, guidance_scale=guidance,
                  generator=[torch.Generator().manual_seed(EVAL_SEED + i) for i in range(count)]).images
    scores = [score(image, text) for image, text in zip(images, captions)]
    return {"caption_accuracy": sum(s["correct"] for s in scores) / count,
            "object_recall": sum(s["matched"] for s in scores) / sum(s["named"] for s in scores),
            "duplicated_rate": sum(s["duplicated"] for s in scores) / count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "paragen/pipelines/configs/tiny-shapes"))
    p.add_argument("--steps", type=int, default=3000, help="denoiser (UNet + text encoder) steps")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="denoiser batch")
    p.add_argument("--eval-every", type=int, default=500, help="denoiser steps between accuracy measurements")
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    out = Path(args.out)
    tokenizer = write_tokenizer(out / "tokenizer")
    vae, unet, text = build_models(tokenizer)
    log: list[dict] = []
    started = time.monotonic()
    train_vae(vae, rng, args.vae_steps, args.vae_batch, log)
    vae.register_to_config(scaling_factor=latent_scale(vae, rng))
    vae.requires_grad_(False).eval()
    parts = {"vae": vae, "unet": unet, "text_encoder": text, "tokenizer": tokenizer, "eval_every": args.eval_every}
    settings = {k: getattr(args, k) for k in ("seed", "steps", "vae_steps", "vae_batch", "batch", "threads")}

    def save(averaged: dict) -> None:
        half = copy.deepcopy(pipeline(averaged))  # fp16 on disk: half the size in the package
        for module in half.components.values():
            if isinstance(module, torch.nn.Module):
                module.half()
        half.save_pretrained(out, safe_serialization=True)
        (out / "training_log.json").write_text(json.dumps({
            **settings, "wall_s": round(time.monotonic() - started, 1), "latest": log[-1], "log": log}, indent=1) + "\n")

    train_denoiser(parts, rng, args.steps, args.batch, log,
                   lambda averaged: caption_accuracy(pipeline(averaged), args.eval_prompts), save)
    final = log[-1]  # the measurement at the end
    print(f"wrote {out}: caption accuracy {final['caption_accuracy']:.2f} on {args.eval_prompts} held-out captions")


if __name__ == "__main__":
    main()
