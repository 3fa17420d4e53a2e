"""What paragen reads of a diffusers model before loading it — the pipeline's default size and frames, the VAE's
factors and widths, the scheduler's training timesteps — from the JSON configs of an embedded or local model.

Each family's difference is a table entry, not a branch: `VAES` says how a VAE class's config gives its factors,
`DEFAULT_SAMPLE_SIZE` the pipelines whose default size diffusers sets in code rather than in a config. The default
size is the one the pipeline itself takes when called without one: its `__call__`'s own default (Wan: 480 × 832,
81 frames), else its table entry, else the denoiser's `sample_size` × the VAE factor (SD, SDXL, SD3, PixArt, the
UNet video models).
"""
from __future__ import annotations

import functools
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from paragen.pipelines.loading import model_folder, read_index


@dataclass(frozen=True)
class VaeFacts:
    """A VAE's shape: image pixels per latent pixel along a side, video frames per latent frame, its decoder's
    full-resolution channels and its latent channels."""

    factor: int
    temporal: int
    channels: int
    latent_channels: int


def _levels(c: dict) -> VaeFacts:
    """A VAE that halves the sides once per level after the first; video ones compress time by
    `temporal_compression_ratio`."""
    return VaeFacts(2 ** (len(c["block_out_channels"]) - 1), c.get("temporal_compression_ratio", 1),
                    (c.get("decoder_block_out_channels") or c["block_out_channels"])[0], c["latent_channels"])


def _wan(c: dict) -> VaeFacts:
    """Wan's causal 3D VAE (and Qwen-Image's, its image form): a spatial halving per stage, a temporal one where
    `temperal_downsample` (sic) says."""
    return VaeFacts(2 ** len(c["temperal_downsample"]), 2 ** sum(c["temperal_downsample"]),
                    c["base_dim"] * c["dim_mult"][0], c["z_dim"])


def _ltx(c: dict) -> VaeFacts:
    """LTX-Video's and LTX-2's VAEs: pixels patchified by `patch_size` (`patch_size_t` frames), then halved per
    scaling level, unless the config gives the ratios."""
    levels = 2 ** sum(c["spatio_temporal_scaling"])
    return VaeFacts(c.get("spatial_compression_ratio") or c["patch_size"] * levels,
                    c.get("temporal_compression_ratio") or c["patch_size_t"] * levels,
                    c["decoder_block_out_channels"][0], c["latent_channels"])


VAES: dict[str, Callable[[dict], VaeFacts]] = {
    "AutoencoderKL": _levels,
    "AutoencoderKLFlux2": _levels,
    "AutoencoderKLCogVideoX": _levels,
    "AutoencoderKLAllegro": _levels,
    "AutoencoderKLQwenImage": _wan,
    "AutoencoderKLWan": _wan,
    "AutoencoderKLLTXVideo": _ltx,
    "AutoencoderKLLTX2Video": _ltx,
    "AutoencoderKLHunyuanVideo": lambda c: VaeFacts(c["spatial_compression_ratio"], c["temporal_compression_ratio"],
                                                    c["block_out_channels"][0], c["latent_channels"]),
    "AutoencoderKLMochi": lambda c: VaeFacts(math.prod(c["spatial_expansions"]), math.prod(c["temporal_expansions"]),
                                             c["decoder_block_out_channels"][0], c["latent_channels"]),
    # SANA's deep-compression autoencoder: a spatial halving per stage after the first
    "AutoencoderDC": lambda c: VaeFacts(2 ** (len(c["encoder_block_out_channels"]) - 1), 1,
                                        c["decoder_block_out_channels"][0], c["latent_channels"]),
}
# Pipelines whose default size diffusers sets in code (latent pixels a side): FluxPipeline.default_sample_size.
DEFAULT_SAMPLE_SIZE = {"FluxPipeline": 128}


@dataclass(frozen=True)
class ModelFacts:
    """One diffusers model as its configs describe it."""

    pipeline: str  # the pipeline class
    denoiser: str  # its folder: "unet" or "transformer"
    denoiser_config: dict
    vae: VaeFacts
    height: int | None  # the pipeline's default size in pixels (None: set in its code, which paragen does not read) ...
    width: int | None
    frames: int | None  # ... and frames (None: an image pipeline, or set in its code)
    train_timesteps: int | None  # the scheduler's num_train_timesteps: the most denoising steps it can take


def config(folder: Path) -> dict:
    """A component folder's `config.json` (a scheduler's `scheduler_config.json`)."""
    name = "scheduler_config.json" if (folder / "scheduler_config.json").exists() else "config.json"
    return json.loads((folder / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=32)
def model_facts(model: str) -> ModelFacts | None:
    """The facts of an embedded or local diffusers model; None where its configs do not say them (an unknown VAE
    class, a missing entry)."""
    root = model_folder(model)
    try:
        index = read_index(root)
        denoiser = "transformer" if "transformer" in index else "unet"
        net, vae_config = config(root / denoiser), config(root / "vae")
        vae = VAES[vae_config["_class_name"]](vae_config)
        scheduler = config(root / "scheduler") if (root / "scheduler").is_dir() else {}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    pipeline = index["_class_name"]
    defaults = _call_defaults(pipeline)
    side = DEFAULT_SAMPLE_SIZE.get(pipeline, net.get("sample_size"))
    sides = side if isinstance(side, (list, tuple)) else (side, side)
    height = defaults.get("height") or (sides[0] and sides[0] * vae.factor) or None
    width = defaults.get("width") or (sides[1] and sides[1] * vae.factor) or None
    return ModelFacts(pipeline, denoiser, net, vae, height, width, defaults.get("num_frames"),
                      scheduler.get("num_train_timesteps"))


def _call_defaults(pipeline: str) -> dict[str, int]:
    """The whole-number defaults of a diffusers pipeline's call for height, width and num_frames."""
    import diffusers

    call = getattr(getattr(diffusers, pipeline, None), "__call__", None)
    if call is None:
        return {}
    parameters = inspect.signature(call).parameters
    return {name: parameters[name].default for name in ("height", "width", "num_frames")
            if name in parameters and type(parameters[name].default) is int}


__all__ = ["DEFAULT_SAMPLE_SIZE", "ModelFacts", "VAES", "VaeFacts", "config", "model_facts"]
