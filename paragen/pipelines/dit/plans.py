"""Which diffusion transformers paragen shards, and how: one sharding plan per transformer class, as data.

A class that declares a diffusers context-parallel plan (`_cp_plan`) is sharded by that plan, read as it is
(`paragen.parallel.sequence.plan.from_diffusers`); `OWN_PLANS` holds paragen's plans, in the same form, for
classes diffusers gives none. A pipeline is what the tables below say of it: how many latent pixels one token
covers beyond the transformer's patch (`PACKED`: 2×2 latent pixels packed into a token before the transformer),
and whether its two guidance branches run as one batch (`CFG_BATCH`: `cfg=2` splits that batch) — nothing else
about a family is written anywhere else.
"""
from __future__ import annotations

from typing import Any

from paragen.parallel.sequence.plan import Gather, ShardingPlan, Split, from_diffusers

TOKENS = Split(1, 3)  # a [B, L, C] token sequence cut along L
_PATCH_EMBEDDING_OUTPUT = {0: Split(1, 3, output=True)}

OWN_PLANS: dict[str, ShardingPlan] = {
    # PixArt-α/Σ: image tokens cut after the patch embedding; the text stays whole (only cross-attended).
    "PixArtTransformer2DModel": ShardingPlan(
        {"pos_embed": _PATCH_EMBEDDING_OUTPUT, "proj_out": Gather(1, 3)}, replicated=("transformer_blocks.*.attn2",)),
    # SD3/3.5: joint attention, so the text stream is cut like the image tokens.
    "SD3Transformer2DModel": ShardingPlan(
        {"pos_embed": _PATCH_EMBEDDING_OUTPUT, "": {"encoder_hidden_states": TOKENS}, "proj_out": Gather(1, 3)}),
}

# Pipelines whose transformer sees 2×2 latent pixels per token on top of its patch size (packed latents).
PACKED = ("FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline", "QwenImagePipeline", "ChromaPipeline")
# Pipelines that run the unconditional and conditional branches as one batch (cfg=2 splits it over two rank halves).
CFG_BATCH = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline", "SanaPipeline",
             "CogVideoXPipeline", "LTXPipeline", "MochiPipeline")


def plan_for(transformer: Any) -> ShardingPlan:
    """The sharding plan of `transformer`'s class: paragen's own, else the class's diffusers `_cp_plan`."""
    name = type(transformer).__name__
    if name in OWN_PLANS:
        return OWN_PLANS[name]
    cp_plan = getattr(type(transformer), "_cp_plan", None)
    if not cp_plan:
        raise ValueError(f"{name} has no sharding plan: neither diffusers (`_cp_plan`) nor paragen "
                         "(`paragen/pipelines/dit/plans.py`) says where to split its sequence")
    splits_text = any("encoder_hidden_states" in entry for entry in cp_plan.values() if isinstance(entry, dict))
    replicated = () if splits_text else tuple(
        n for n, m in transformer.named_modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "processor"))
    return from_diffusers(cp_plan, replicated)


def has_plan(transformer_class: type) -> bool:
    """Whether paragen can shard this transformer class."""
    return transformer_class.__name__ in OWN_PLANS or bool(getattr(transformer_class, "_cp_plan", None))
