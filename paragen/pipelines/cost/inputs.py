"""How a pipeline calls its denoiser, as data: for each denoiser class, the keyword arguments of one call for a
batch, a latent of `frames × rows × columns` and `text` prompt tokens, built from the denoiser's config (on the
`meta` device: shapes only). The cost model traces one such call (`trace.trace_call`).

A class not listed here has no cost model yet; `paragen plan` says so and lists nothing for it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

DEFAULT_TEXT_TOKENS = 77  # CLIP's context: the pipelines that give no `max_sequence_length`
# How a pipeline guides, where not by batching both classifier-free-guidance branches into one call: `embedded`
# (guidance-distilled: one branch, the scale an input), `separate` (one call per branch, one after the other).
GUIDANCE = {"FluxPipeline": "embedded", "HunyuanVideoPipeline": "embedded", "WanPipeline": "separate"}


@dataclass(frozen=True)
class Latent:
    """One denoiser call's sizes: batch, latent frames (1 for an image), latent rows and columns, prompt tokens."""

    batch: int
    frames: int
    rows: int
    columns: int
    text: int


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _unet(c: Any, x: Latent, dtype: torch.dtype) -> dict:
    kwargs = dict(sample=_t(x.batch, c.in_channels, x.rows, x.columns, dtype=dtype), timestep=_t(x.batch, dtype=dtype),
                  encoder_hidden_states=_t(x.batch, x.text, c.cross_attention_dim, dtype=dtype))
    if c.addition_embed_type == "text_time":  # SDXL: pooled text and the six size conditions
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": _t(x.batch, pooled, dtype=dtype),
                                       "time_ids": _t(x.batch, 6, dtype=dtype)}
    return kwargs


def _unet3d(c: Any, x: Latent, dtype: torch.dtype) -> dict:
    return dict(sample=_t(x.batch, c.in_channels, x.frames, x.rows, x.columns, dtype=dtype),
                timestep=_t(x.batch, dtype=dtype), encoder_hidden_states=_t(x.batch, x.text, c.cross_attention_dim,
                                                                             dtype=dtype))


def _pixart(c: Any, x: Latent, dtype: torch.dtype) -> dict:
    return dict(hidden_states=_t(x.batch, c.in_channels, x.rows, x.columns, dtype=dtype),
                encoder_hidden_states=_t(x.batch, x.text, c.caption_channels, dtype=dtype),
                timestep=_t(x.batch, dtype=dtype), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _flux(c: Any, x: Latent, dtype: torch.dtype) -> dict:
    tokens = (x.rows // 2) * (x.columns // 2)  # 2 × 2 latent pixels packed per token
    return dict(hidden_states=_t(x.batch, tokens, c.in_channels, dtype=dtype),
                encoder_hidden_states=_t(x.batch, x.text, c.joint_attention_dim, dtype=dtype),
                pooled_projections=_t(x.batch, c.pooled_projection_dim, dtype=dtype), timestep=_t(x.batch, dtype=dtype),
                img_ids=_t(tokens, 3, dtype=dtype), txt_ids=_t(x.text, 3, dtype=dtype),
                guidance=_t(x.batch, dtype=dtype) if c.guidance_embeds else None)


def _wan(c: Any, x: Latent, dtype: torch.dtype) -> dict:
    return dict(hidden_states=_t(x.batch, c.in_channels, x.frames, x.rows, x.columns, dtype=dtype),
                timestep=_t(x.batch, dtype=dtype), encoder_hidden_states=_t(x.batch, x.text, c.text_dim, dtype=dtype))


def _hunyuan_video(c: Any, x: Latent, dtype: torch.dtype) -> dict:
    return dict(hidden_states=_t(x.batch, c.in_channels, x.frames, x.rows, x.columns, dtype=dtype),
                timestep=_t(x.batch, dtype=dtype), encoder_hidden_states=_t(x.batch, x.text, c.text_embed_dim, dtype=dtype),
                encoder_attention_mask=torch.ones(x.batch, x.text, device="meta", dtype=torch.bool),
                pooled_projections=_t(x.batch, c.pooled_projection_dim, dtype=dtype),
                guidance=_t(x.batch, dtype=dtype) if c.guidance_embeds else None)


CALLS: dict[str, Callable[[Any, Latent, torch.dtype], dict]] = {
    "UNet2DConditionModel": _unet,
    "UNet3DConditionModel": _unet3d,
    "PixArtTransformer2DModel": _pixart,
    "FluxTransformer2DModel": _flux,
    "WanTransformer3DModel": _wan,
    "HunyuanVideoTransformer3DModel": _hunyuan_video,
}


def text_tokens(pipeline: str) -> int:
    """The prompt tokens a pipeline gives its denoiser: its call's `max_sequence_length` default, else CLIP's 77."""
    import diffusers

    call = getattr(getattr(diffusers, pipeline, None), "__call__", None)
    parameter = inspect.signature(call).parameters.get("max_sequence_length") if call is not None else None
    return parameter.default if parameter is not None and type(parameter.default) is int else DEFAULT_TEXT_TOKENS
