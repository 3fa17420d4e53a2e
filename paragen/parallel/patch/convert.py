"""Swap a diffusers model's spatial layers for their patch-parallel versions, in place (imports diffusers).

Convs with a kernel taller than one row need halos, every GroupNorm needs whole-image statistics,
and every `Attention` gets a patch processor; everything else (linear layers, 1x1 convs, LayerNorm,
activations) is per-token and runs on the band unchanged. Parameters and state-dict keys stay as
they were, so a parallelised model still loads and saves checkpoints.
"""
from __future__ import annotations

import torch.nn as nn
from diffusers.models.attention_processor import Attention

from paragen.parallel.patch import (
    PatchConv2d,
    PatchContext,
    PatchCrossAttnProcessor,
    PatchGroupNorm,
    PatchSelfAttnProcessor,
    check_processor,
)


def check_processors(model: nn.Module) -> None:
    """Refuse attention processors the patch processors cannot stand in for (named, with the module)."""
    for name, attn in model.named_modules():
        if isinstance(attn, Attention):
            check_processor(name, attn.processor)


def patch_modules(model: nn.Module, ctx: PatchContext) -> None:
    """Convert `model`'s convs, group norms and attention processors to use `ctx`'s band group."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    for module in list(model.modules()):
        if isinstance(module, nn.Conv2d) and not isinstance(module, PatchConv2d) and module.kernel_size[0] > 1:
            PatchConv2d.convert(module, ctx)
        elif isinstance(module, nn.GroupNorm) and not isinstance(module, PatchGroupNorm):
            PatchGroupNorm.convert(module, ctx)
    for attn in attentions:
        processor = PatchCrossAttnProcessor(ctx) if attn.is_cross_attention else PatchSelfAttnProcessor(ctx)
        attn.set_processor(processor)
