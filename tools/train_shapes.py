"""Train `tiny-shapes` and its DiT twin `tiny-shapes-dit` (issue 18): text-to-image models of the shapes world.

Deterministic from `--seed` on the CPU at a given `--threads` (steps are counted, not timed). Scenes are drawn
from the world (`tools/shapes_world.py`, 64 × 64 pictures), so nothing is stored but the model. Three parts,
trained in turn:
1. the tokenizer, written, not learned: the offline T5 stand-in (`tools/make_t5_tokenizer.py`) with the world's
   words as whole pieces (for `--arch sd` its default length is the 32 tokens trained on, which
   StableDiffusionPipeline pads to); `--text clip`: a CLIP BPE whose merges make every word of the world one token;
2. the VAE (AutoencoderKL, 16 × 16 × 4 latents), on reconstruction with a small KL term, for `--vae-steps`
   of `--vae-batch` pictures; its posterior starts nearly deterministic (log-variance bias -10), so
   reconstruction trains on the mean from the first step; its latent scale is then measured
   (`scaling_factor` = 1 / std). `--vae-from FOLDER` takes an earlier run's VAE instead;
3. the denoiser and its text encoder together, the caption dropped for 10% of the pictures so that
   classifier-free guidance works, for `--steps`; an exponential moving average of the weights (decay up to
   0.999) is what gets evaluated and saved.
   - `--arch sd` (tiny-shapes, a `StableDiffusionPipeline`): UNet2DConditionModel with cross-attention at each of
     `--unet-levels` resolutions.
   - `--arch pixart` (tiny-shapes-dit, a `PixArtSigmaPipeline`): PixArtTransformer2DModel (2 × 2 patches with
     absolute 2-D position embeddings); its pipeline masks the caption's padding out of cross-attention too.
   - `--text`: the text encoder. T5 (2 layers, width 64) has its padding masked out: its config says
     `use_attention_mask`, so StableDiffusionPipeline passes the mask to it. CLIP (causal, nothing masked) left
     the UNet attending to up to 23 paddings that had each read the whole caption, and the UNet never tied the
     cell words to places (tools/shapes_layout_probe.py); with T5 it does.
   - `--prediction` sets the target (v by default). The layout is decided at the noisiest steps, where the
     ε-loss (and Min-SNR weighting of either loss) weighs an error in the clean latent by the signal-to-noise
     ratio (0.008 at t = 951, the first of 20 DDIM steps); the v-loss weighs it about 1, so it is kept whole
     there and only its less noisy steps are capped (Min-SNR-5's cap). ε gets Min-SNR-5 weighting.
   - `--noisy-share S` draws that share of each batch from the 200 noisiest timesteps. Drawn uniformly, about a
     tenth of a batch falls there, and the transformer did not tie the cell words to places within a CPU
     budget; with S = 0.5 it does.
   - `--scenes N` trains on the latents of N scenes encoded once (the VAE's encoder was most of a transformer
     step's time); `--scenes 0` draws and encodes every batch fresh.
Every `--eval-every` steps the pipeline draws `--eval-prompts` captions of held-out seeds (20 DDIM steps,
guidance 4), `tools/shapes_scorer.py` scores them, and the folder is written: the accuracy curve goes into
`training_log.json` beside the weights, and a run stopped early leaves its last evaluated model. The output
folder is a diffusers pipeline folder (safetensors, fp16 weights) that the stock pipeline class's
`from_pretrained` loads.

The shipped models share one VAE, that of the first tiny-shapes (CLIP, ε, fresh batches; the first command
with `--steps 3000` is that run, bit for bit; `--steps 0` stops after the VAE):

    python tools/train_shapes.py --text clip --prediction epsilon --noisy-share 0 --scenes 0 --steps 0 --out VAE
    python tools/train_shapes.py --vae-from VAE [--out paragen/pipelines/configs/tiny-shapes] [--steps 3000]
    python tools/train_shapes.py --arch pixart --out paragen/pipelines/configs/tiny-shapes-dit --vae-from VAE \\
        --steps 4000
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
UNET_CHANNELS = (64, 128, 128)  # per resolution of the UNet, from 16² down


def unet_config(levels: int) -> dict:
    """The UNet with cross-attention at each of `levels` resolutions (16², 8², and 4² for 3)."""
    return {"sample_size": SIDE // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": list(UNET_CHANNELS[:levels]), "down_block_types": ["CrossAttnDownBlock2D"] * levels,
            "up_block_types": ["CrossAttnUpBlock2D"] * levels, "attention_head_dim": 8, "cross_attention_dim": 64,
            "norm_num_groups": 32}


PIXART_CONFIG = {"sample_size": SIDE // 4, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 6,
                 "num_attention_heads": 4, "attention_head_dim": 32, "cross_attention_dim": 128, "caption_channels": 64,
                 "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000, "use_additional_conditions": False,
                 "norm_elementwise_affine": False, "norm_eps": 1e-6, "activation_fn": "gelu-approximate",
                 "attention_bias": True}
T5_CONFIG = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4, "num_layers": 2, "feed_forward_proj": "gated-gelu",
             "dropout_rate": 0.0, "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1}
TEXT_TOKENS = 32  # caption tokens the text encoders see (the longest caption is 17 words)
SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                    "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
                    "timestep_spacing": "leading"}
MIN_SNR = 5.0  # steps less noisy than this signal-to-noise ratio weigh as much as one at it (Min-SNR-5)
LAYOUT_STEPS = 200  # the noisiest timesteps (t >= 800 of 1000), where a picture's layout is decided


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
            "tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_TOKENS, "bos_token": SPECIAL[0],
            "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1], "do_lower_case": True}, indent=2))
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


def write_t5_tokenizer(folder: Path, max_length: int | None = None):
    """The offline T5 tokenizer with every word of the world as one piece; `max_length`: what a pipeline that
    does not pass its own length pads to (StableDiffusionPipeline), else T5's 512."""
    from transformers import AutoTokenizer

    from tools.make_t5_tokenizer import MODEL_MAX_LENGTH, WORDS, write

    write(folder, (*WORDS, *(w for w in world_words() if w not in WORDS)), max_length or MODEL_MAX_LENGTH)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    split = [w for w in world_words() if len(tokenizer(w).input_ids) != 2]  # the word and </s>
    if split:
        raise RuntimeError(f"words split into several tokens: {split}")
    return tokenizer


def build_vae():
    """The VAE, randomly initialised from the current torch seed."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def load_vae(folder: Path):
    """The VAE of an earlier run's output folder (fp32), and that run's training log."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).float()
    return vae, json.loads((folder / "training_log.json").read_text())


def build_denoiser(arch: str, levels: int):
    """The denoiser (a UNet of `levels` resolutions, or the PixArt transformer), randomly initialised from the
    torch seed."""
    if arch == "pixart":
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel(**PIXART_CONFIG)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(levels))


def build_text_encoder(text: str, tokenizer):
    """The text encoder (64 wide, 2 layers), randomly initialised from the torch seed: CLIP (causal, its padding
    attended), or T5 whose configuration asks StableDiffusionPipeline to mask the padding (`use_attention_mask`;
    PixArt's pipeline masks it anyway)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if text == "t5":
        return T5EncoderModel(T5Config(vocab_size=len(tokenizer), **T5_CONFIG, use_attention_mask=True))
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_TOKENS, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


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


def predict(parts: dict, noisy: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The denoiser's output for `noisy` latents at timesteps `t`, conditioned on `captions` as its pipeline
    conditions it: the text encoder's padding masked where the pipeline masks it (PixArt: always, and out of
    cross-attention too; StableDiffusionPipeline: in the encoder, where its config says `use_attention_mask`)."""
    tokens = parts["tokenizer"](captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                                return_tensors="pt")
    encoder = parts["text_encoder"]
    masked = "transformer" in parts or getattr(encoder.config, "use_attention_mask", False)
    states = encoder(tokens.input_ids, attention_mask=tokens.attention_mask if masked else None)[0]
    if "transformer" in parts:
        return parts["transformer"](noisy, encoder_hidden_states=states, encoder_attention_mask=tokens.attention_mask,
                                    timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return parts["unet"](noisy, t, states).sample


def encoded_scenes(vae, rng: random.Random, count: int, chunk: int = 256) -> tuple[torch.Tensor, list[str]]:
    """The scaled latents (the posterior's mean) and captions of `count` fresh scenes."""
    latents, captions = [], []
    with torch.no_grad():
        for size in [chunk] * (count // chunk) + [count % chunk] * bool(count % chunk):
            pictures, texts = draw_batch(rng, size)
            latents.append(vae.encode(pictures).latent_dist.mode() * vae.config.scaling_factor)
            captions += texts
    return torch.cat(latents), captions


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


def train_denoiser(parts: dict, batches, steps: int, log: list, evaluate, save) -> None:
    """The denoiser and the text encoder on `parts["prediction"]`'s loss for `steps` batches of `batches()`
    ((latents, captions)); every `eval_every` steps and at the end, `evaluate(averaged parts)` is logged, then
    `save(averaged parts)` is called."""
    from diffusers import DDPMScheduler

    name = "transformer" if "transformer" in parts else "unet"
    modules = [parts[name], parts["text_encoder"]]
    parameters = [p for module in modules for p in module.parameters()]
    noise_schedule = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)},
                                   prediction_type=parts["prediction"])
    optimiser = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=1e-2)
    average = Average(modules)
    alphas = noise_schedule.alphas_cumprod
    start, step = time.monotonic(), 0
    while True:
        if step % parts["eval_every"] == 0 or step == steps:
            averaged = {**parts, name: average.averaged[0], "text_encoder": average.averaged[1]}
            record(log, "denoiser", step, start, **evaluate(averaged))
            save(averaged)
        if step == steps:
            return
        latents, captions = batches()
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(latents),))
        if noisy_count := round(parts["noisy_share"] * len(latents)):
            t[:noisy_count] = torch.randint(noise_schedule.config.num_train_timesteps - LAYOUT_STEPS,
                                            noise_schedule.config.num_train_timesteps, (noisy_count,))
        noisy = noise_schedule.add_noise(latents, noise, t)
        predicted = predict(parts, noisy, t, captions)
        snr = alphas[t] / (1 - alphas[t])
        if parts["prediction"] == "epsilon":
            target, weight = noise, snr.clamp(max=MIN_SNR) / snr  # Min-SNR-5 for ε-prediction
        else:  # the v-loss whole at the noisy steps, its less noisy ones capped as Min-SNR's
            target, weight = noise_schedule.get_velocity(latents, noise, t), ((MIN_SNR + 1) / (snr + 1)).clamp(max=1.0)
        loss = (weight * (predicted - target).pow(2).mean(dim=(1, 2, 3))).mean()
        step += 1
        update(optimiser, loss, parameters)
        average.update()
        if step % 50 == 0:
            record(log, "denoiser", step, start, loss=round(loss.item(), 5))


def pipeline(parts: dict):
    """The stock StableDiffusionPipeline or PixArtSigmaPipeline over the parts (DDIM for sampling)."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG, prediction_type=parts["prediction"])
    common = {"vae": parts["vae"], "text_encoder": parts["text_encoder"], "tokenizer": parts["tokenizer"],
              "scheduler": scheduler}
    if "transformer" in parts:
        pipe = PixArtSigmaPipeline(transformer=parts["transformer"], **common)
    else:
        pipe = StableDiffusionPipeline(unet=parts["unet"], safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def caption_accuracy(pipe, count: int, steps: int = 20, guidance: float = 4.0) -> dict:
    """Scores of `count` held-out captions drawn by `pipe` (one picture each, seed = scene index)."""
    rng = random.Random(EVAL_SEED)
    captions = [caption(sample_scene(rng)) for _ in range(count)]
    extra = {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": TEXT_TOKENS} \
        if hasattr(pipe, "transformer") else {}
    images = pipe(captions, height=SIDE, width=SIDE, num_inference_steps=steps, guidance_scale=guidance,
                  generator=[torch.Generator().manual_seed(EVAL_SEED + i) for i in range(count)], **extra).images
    scores = [score(image, text) for image, text in zip(images, captions)]
    return {"caption_accuracy": sum(s["correct"] for s in scores) / count,
            "object_recall": sum(s["matched"] for s in scores) / sum(s["named"] for s in scores),
            "duplicated_rate": sum(s["duplicated"] for s in scores) / count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("sd", "pixart"), default="sd",
                   help="sd: UNet (tiny-shapes); pixart: PixArt transformer (tiny-shapes-dit)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "paragen/pipelines/configs/tiny-shapes"))
    p.add_argument("--steps", type=int, default=3000, help="denoiser (and text encoder) steps")
    p.add_argument("--text", choices=("t5", "clip"), default="t5",
                   help="the text encoder (--arch pixart: t5 only)")
    p.add_argument("--unet-levels", type=int, default=2, choices=(2, 3),
                   help="--arch sd: the UNet's resolutions (16² and 8², and 4²)")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-from", metavar="FOLDER", help="take the VAE (and its log lines) from an earlier run's folder")
    p.add_argument("--batch", type=int, default=32, help="denoiser batch")
    p.add_argument("--scenes", type=int, default=12800,
                   help="scenes encoded once and trained on; 0: every batch drawn and encoded fresh")
    p.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction",
                   help="the denoiser's target")
    p.add_argument("--noisy-share", type=float, default=0.5,
                   help=f"share of each batch drawn from the {LAYOUT_STEPS} noisiest timesteps (the rest: all of them)")
    p.add_argument("--eval-every", type=int, default=500, help="denoiser steps between accuracy measurements")
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    if args.arch == "pixart" and args.text != "t5":
        p.error("--arch pixart takes --text t5")
    out = Path(args.out)
    tokenizer = write_tokenizer(out / "tokenizer") if args.text == "clip" else \
        write_t5_tokenizer(out / "tokenizer", TEXT_TOKENS if args.arch == "sd" else None)
    log: list[dict] = []
    settings = {k: getattr(args, k) for k in ("arch", "seed", "steps", "vae_steps", "vae_batch", "batch", "threads",
                                              "noisy_share", "scenes", "prediction")}
    if args.arch == "sd":
        settings.update(unet_levels=args.unet_levels, text=args.text)
    started = time.monotonic()
    if args.vae_from:
        vae, earlier = load_vae(Path(args.vae_from))
        log += [line for line in earlier["log"] if line["part"] == "vae"]
        settings.update(vae_steps=earlier["vae_steps"], vae_batch=earlier["vae_batch"], vae_from=Path(args.vae_from).name)
    else:
        vae = build_vae()
    denoiser = build_denoiser(args.arch, args.unet_levels)
    text = build_text_encoder(args.text, tokenizer)
    if not args.vae_from:
        train_vae(vae, rng, args.vae_steps, args.vae_batch, log)
        vae.register_to_config(scaling_factor=latent_scale(vae, rng))
    vae.requires_grad_(False).eval()
    parts = {"vae": vae, "unet" if args.arch == "sd" else "transformer": denoiser, "text_encoder": text,
             "tokenizer": tokenizer, "eval_every": args.eval_every, "prediction": args.prediction,
             "noisy_share": args.noisy_share}
    if not args.scenes:  # every batch drawn and encoded fresh (the recipe of the first tiny-shapes)
        def batches() -> tuple[torch.Tensor, list[str]]:
            pictures, captions = draw_batch(rng, args.batch)
            with torch.no_grad():
                latents = vae.encode(pictures).latent_dist.sample() * vae.config.scaling_factor
            return latents, ["" if rng.random() < 0.1 else c for c in captions]
    else:  # batches drawn from scenes encoded once
        scenes, scene_captions = encoded_scenes(vae, rng, args.scenes)
        record(log, "scenes", args.scenes, started)

        def batches() -> tuple[torch.Tensor, list[str]]:
            picked = [rng.randrange(args.scenes) for _ in range(args.batch)]
            return scenes[picked], ["" if rng.random() < 0.1 else scene_captions[i] for i in picked]

    def save(averaged: dict) -> None:
        half = copy.deepcopy(pipeline(averaged))  # fp16 on disk: half the size in the package
        for module in half.components.values():
            if isinstance(module, torch.nn.Module):
                module.half()
        half.save_pretrained(out, safe_serialization=True)
        (out / "training_log.json").write_text(json.dumps({
            **settings, "wall_s": round(time.monotonic() - started, 1), "latest": log[-1], "log": log}, indent=1) + "\n")

    train_denoiser(parts, batches, args.steps, log, lambda averaged: caption_accuracy(pipeline(averaged), args.eval_prompts),
                   save)
    final = log[-1]  # the measurement at the end
    print(f"wrote {out}: caption accuracy {final['caption_accuracy']:.2f} on {args.eval_prompts} held-out captions")


if __name__ == "__main__":
    main()
