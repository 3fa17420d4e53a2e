"""Which diffusion transformers paragen shards, and how: one sharding plan per transformer class, as data.

A class that declares a diffusers context-parallel plan (`_cp_plan`) is sharded by that plan, read as it is
(`paragen.parallel.sequence.plan.from_diffusers`); `OWN_PLANS` holds paragen's plans, in the same form, for
classes diffusers gives none. A pipeline is what the tables below say of it: how many latent pixels one token
covers (`PACKED`: 2×2, else the transformer's patch),
and whether its two guidance branches run as one batch (`CFG_BATCH`: `cfg=2` splits that batch) — nothing else
about a family is written anywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paragen.parallel.sequence.plan import Gather, Length, Rows, ShardingPlan, Split, from_diffusers

TOKENS = Split(1, 3)  # a [B, L, C] token sequence cut along L
_PATCH_EMBEDDING_OUTPUT = {0: Split(1, 3, output=True)}
_BOTH_STREAMS = {"hidden_states": TOKENS, "encoder_hidden_states": TOKENS}  # image/video and text, cut alike
_ROTARY_TABLES = {0: Split(0, 2, output=True), 1: Split(0, 2, output=True)}  # (cos, sin) of every token, [L, D]
# a [B, 1, 1, video + text] key mask over both streams, each part cut like its stream
_JOINT_MASK = Split(3, 4, joins=("hidden_states", "encoder_hidden_states"))

# (cos, sin) of every video token: [B, L, D] (interleaved) or [B, H, L, D/2] (split), whichever the model gives
_LTX2_ROTARY = {0: (Split(1, 3, output=True), Split(2, 4, output=True)),
                1: (Split(1, 3, output=True), Split(2, 4, output=True))}

# Helios' sequence: its history tokens (their count learnt as the rest), then the newest frames' (counted by an input)
_HELIOS_PARTS = ("history", "newest")
_HELIOS_TOKENS = Split(1, 3, joins=_HELIOS_PARTS)

OWN_PLANS: dict[str, ShardingPlan] = {
    # PixArt-α/Σ: image tokens cut after the patch embedding; the text stays whole (only cross-attended).
    "PixArtTransformer2DModel": ShardingPlan(
        {"pos_embed": _PATCH_EMBEDDING_OUTPUT, "proj_out": Gather(1, 3)}, replicated=("transformer_blocks.*.attn2",)),
    # SD3/3.5: joint attention, so the text stream is cut like the image tokens.
    "SD3Transformer2DModel": ShardingPlan(
        {"pos_embed": _PATCH_EMBEDDING_OUTPUT, "": {"encoder_hidden_states": TOKENS}, "proj_out": Gather(1, 3)}),
    # CogVideoX: text and video tokens leave the patch embedding as one sequence and are split before the blocks;
    # the rotary tables come with the call; both streams are gathered after the last block (the model joins and
    # cuts them again by the whole text's length).
    "CogVideoXTransformer3DModel": ShardingPlan({
        "transformer_blocks.0": _BOTH_STREAMS, "": {"image_rotary_emb": Split(0, 2)},
        "transformer_blocks.-1": (Gather(1, 3), Gather(1, 3, stream="encoder_hidden_states"))}),
    # HunyuanVideo: the text is refined whole (its refiner's attention sees whole keys), then both streams are cut
    # at the first block; the key mask over [video, text] that the model builds from the whole lengths is cut with
    # them at every block.
    "HunyuanVideoTransformer3DModel": ShardingPlan({
        "transformer_blocks.0": _BOTH_STREAMS, "rope": _ROTARY_TABLES,
        "transformer_blocks.*": {"attention_mask": _JOINT_MASK},
        "single_transformer_blocks.*": {"attention_mask": _JOINT_MASK}, "proj_out": Gather(1, 3)},
        replicated=("context_embedder.token_refiner.refiner_blocks.*.attn",)),
    # Z-Image: image and caption are refined apart, then joined per sample into one padded sequence; that sequence is
    # cut at the first main layer (its mask and rotary table at every layer) and gathered after the last. The image
    # tokens are cut for their refiner too (stream "image") and gathered before they join; the caption is refined
    # whole.
    "ZImageTransformer2DModel": ShardingPlan({
        "layers.0": {"x": TOKENS}, "layers.*": {"attn_mask": Split(1, 2), "freqs_cis": Split(1, 3)},
        "layers.-1": Gather(1, 3), "noise_refiner.0": {"x": Split(1, 3, stream="image")},
        "noise_refiner.*": {"attn_mask": Split(1, 2), "freqs_cis": Split(1, 3)},
        "noise_refiner.-1": Gather(1, 3, stream="image")}, replicated=("context_refiner.*.attention",)),
    # HunyuanDiT: image tokens cut after the patch embedding, with the 2D rotary table that comes with the call; the
    # long skips pair each block with an earlier one token by token; the text (BERT + T5) stays whole (cross-attended).
    "HunyuanDiT2DModel": ShardingPlan({
        "pos_embed": _PATCH_EMBEDDING_OUTPUT, "": {"image_rotary_emb": Split(0, 2)}, "proj_out": Gather(1, 3)},
        replicated=("blocks.*.attn2",)),
    # AuraFlow: joint attention, no mask and no rotary embedding (positions are added at the patch embedding): image
    # tokens cut after the patch embedding, the text (its 8 register tokens before it) at the first joint block; the
    # single blocks join each rank's shards of both streams and cut them apart again by the rank's text length.
    "AuraFlowTransformer2DModel": ShardingPlan({
        "pos_embed": _PATCH_EMBEDDING_OUTPUT, "joint_transformer_blocks.0": {"encoder_hidden_states": TOKENS},
        "proj_out": Gather(1, 3)}),
    # Lumina 2: caption and image are refined apart, then joined per sample into one padded sequence (valid caption,
    # then image); that sequence is cut at the first main layer (its key mask, given when the samples' captions
    # differ in length, and its rotary table at every layer) and gathered after the last; the image tokens are cut
    # for their refiner too and gathered before they join (as Z-Image).
    "Lumina2Transformer2DModel": ShardingPlan({
        "layers.0": {"hidden_states": TOKENS},
        "layers.*": {"attention_mask": Split(1, 2), "image_rotary_emb": Split(1, 3)}, "layers.-1": Gather(1, 3),
        "noise_refiner.0": {"hidden_states": Split(1, 3, stream="image")},
        "noise_refiner.*": {"image_rotary_emb": Split(1, 3)}, "noise_refiner.-1": Gather(1, 3, stream="image")},
        replicated=("context_refiner.*.attn",)),
    # Allegro: video tokens (patch-embedded frame by frame, then joined) cut at the first block, with the token
    # positions of the 3D rotary embedding that comes with the call ((tables, positions): only the positions are
    # per token); the text stays whole (cross-attended, under its key mask).
    "AllegroTransformer3DModel": ShardingPlan({
        "transformer_blocks.0": {"hidden_states": TOKENS}, "": {"image_rotary_emb.1": Split(1, 2)},
        "proj_out": Gather(1, 3)}, replicated=("transformer_blocks.*.attn2",)),
    # SANA: image tokens cut after the patch embedding by whole rows of the token grid, since every block folds them
    # back into it for the 3×3 depthwise conv of its Mix-FFN (which gets its neighbours' edge rows); the blocks are
    # given the shard's rows; self-attention is linear; the text stays whole (cross-attended, under its key mask).
    "SanaTransformer2DModel": ShardingPlan({
        "patch_embed": _PATCH_EMBEDDING_OUTPUT, "transformer_blocks.*": {"height": Rows()}, "proj_out": Gather(1, 3)},
        replicated=("transformer_blocks.*.attn2",), linear=("transformer_blocks.*.attn1",),
        row_convs=("transformer_blocks.*.ff.conv_depth",)),
    # LTX-2: one transformer over a video and an audio stream. The video stream, its text and the text's key mask are
    # cut at the transformer (as diffusers' plan does), with the video's rotary tables for its self-attention and for
    # its cross-modal attention ([B, L, D] tables, or [B, H, L, D/2] ones where the config's rope_type is "split");
    # the audio attends whole on every rank (its self-attention, its text, and the video's queries to it).
    "LTX2VideoTransformer3DModel": ShardingPlan({
        "": {"hidden_states": TOKENS, "encoder_hidden_states": TOKENS, "encoder_attention_mask": Split(1, 2)},
        "rope": _LTX2_ROTARY, "cross_attn_rope": _LTX2_ROTARY, "proj_out": Gather(1, 3)},
        replicated=("transformer_blocks.*.audio_attn1", "transformer_blocks.*.audio_attn2",
                    "transformer_blocks.*.audio_to_video_attn")),
    # Helios: every block gets one sequence of [history, newest frames] (the history compressed), the per-token
    # modulation and rotary table of that sequence, and the newest frames' count. Each rank keeps its shard of each
    # part, its count of the newest frames replacing the whole one, so the blocks split history from newest frames
    # by the rank's own counts and the tokens stay cut from the first block to the output projection, which collects
    # the newest frames (diffusers' plan instead cuts and gathers around every attention and feed-forward). The text
    # stays whole (cross-attended).
    "HeliosTransformer3DModel": ShardingPlan({
        "blocks.0": {"hidden_states": _HELIOS_TOKENS},
        "blocks.*": {"original_context_length": Length("newest"), "temb": Split(1, 4, joins=_HELIOS_PARTS),
                     "rotary_emb": _HELIOS_TOKENS},
        "norm_out": {"original_context_length": Length("newest")}, "proj_out": Gather(1, 3, stream="newest")},
        replicated=("blocks.*.attn2",)),
    # Mochi: both streams cut at the first block, the text's mask with them (each rank keeps its valid text tokens).
    "MochiTransformer3DModel": ShardingPlan({
        "transformer_blocks.0": _BOTH_STREAMS, "transformer_blocks.*": {"encoder_attention_mask": Split(1, 2)},
        "rope": {0: Split(0, 3, output=True), 1: Split(0, 3, output=True)}, "proj_out": Gather(1, 3)}),
}

# Pipelines whose tokens cover 2×2 latent pixels whatever the transformer's `patch_size` says (latents packed by
# the pipeline, or patchified inside the transformer by a size given per call).
PACKED = ("FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline", "QwenImagePipeline", "ZImagePipeline")
# Pipelines that run the unconditional and conditional branches as one batch (cfg=2 splits it over two rank halves).
CFG_BATCH = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline", "StableDiffusion3Pipeline",
             "AuraFlowPipeline", "HunyuanDiTPipeline", "CogVideoXPipeline", "LTXPipeline", "MochiPipeline",
             "AllegroPipeline")


Where = tuple[str, int | None]  # (call argument, dim): the size of that dim of it, or (dim None) the number itself


def _read(arguments: dict[str, Any], where: Where) -> int:
    value = arguments[where[0]]
    return int(value if where[1] is None else value.shape[where[1]])


def _patch(transformer: Any, where: Where) -> int:
    """A patch size from the transformer's config: (attribute, index in it or None); 1 where there is none."""
    value = getattr(transformer.config, where[0], None)
    return (value if where[1] is None else value[where[1]]) or 1


@dataclass(frozen=True)
class RowGrid:
    """Where an image transformer's call gives its latent rows and columns, and the config attribute of its patch:
    a model whose tokens must be cut by whole rows of their grid (`plan.row_convs`) needs it."""

    rows: Where
    cols: Where
    patch: Where

    def shape(self, transformer: Any, arguments: dict[str, Any]) -> tuple[int, int]:
        """(rows, columns) of the token grid of a call with these `arguments`."""
        return _read(arguments, self.rows) // _patch(transformer, self.patch), \
            _read(arguments, self.cols) // _patch(transformer, self.patch)


ROW_GRIDS: dict[str, RowGrid] = {
    # SANA: a [B, C, H, W] latent, square patches
    "SanaTransformer2DModel": RowGrid(("hidden_states", 2), ("hidden_states", 3), ("patch_size", None)),
}


@dataclass(frozen=True)
class VideoGrid:
    """Where a video transformer's call gives its latent frames, rows and columns: (argument, dim) — dim None: the
    argument is the number itself — and the config attributes of its temporal and spatial patch (None: 1). Clips
    need it (the layout cuts the video's tokens frame by frame; a clip's seen-frame K/V are picked from the video
    tokens of its self-attention's keys), with `text`: where a joint self-attention puts the rank's text tokens
    among its keys ("before" or "after" the video tokens; "": the keys are the video tokens alone), and
    `whole_queries`: the attention modules whose queries are a stream whole on every rank and whose keys are the
    video tokens (LTX-2's audio attending to the video): with clips, each clip attends to its own video and the
    clips' partial attentions are merged, so every clip gets the attention over the whole video."""

    frames: Where
    rows: Where
    cols: Where
    patch: tuple[Where, ...]  # (config attribute, index in it or None) for frames, rows, columns
    text: str = ""
    whole_queries: tuple[str, ...] = ()

    def tokens(self, transformer: Any, arguments: dict[str, Any]) -> tuple[int, int]:
        """(latent frames, tokens per frame) of a call with these `arguments`."""
        frames, rows, cols = (_read(arguments, axis) // _patch(transformer, p)
                              for axis, p in zip((self.frames, self.rows, self.cols), self.patch))
        return frames, rows * cols


VIDEO_GRIDS: dict[str, VideoGrid] = {
    # Wan2.1/2.2: a [B, C, F, H, W] latent, patch (1, 2, 2)
    "WanTransformer3DModel": VideoGrid(("hidden_states", 2), ("hidden_states", 3), ("hidden_states", 4),
                                       (("patch_size", 0), ("patch_size", 1), ("patch_size", 2))),
    # LTX-Video: packed tokens; the latent grid comes with the call (its self-attention sees video tokens only)
    "LTXVideoTransformer3DModel": VideoGrid(("num_frames", None), ("height", None), ("width", None),
                                            (("patch_size_t", None), ("patch_size", None), ("patch_size", None))),
    # CogVideoX: a [B, F, C, H, W] latent; its joint attention puts the text before the video
    "CogVideoXTransformer3DModel": VideoGrid(("hidden_states", 1), ("hidden_states", 3), ("hidden_states", 4),
                                             (("patch_size_t", None), ("patch_size", None), ("patch_size", None)),
                                             text="before"),
    # HunyuanVideo: a [B, C, F, H, W] latent; its joint attention puts the text after the video
    "HunyuanVideoTransformer3DModel": VideoGrid(("hidden_states", 2), ("hidden_states", 3), ("hidden_states", 4),
                                                (("patch_size_t", None), ("patch_size", None), ("patch_size", None)),
                                                text="after"),
    # Allegro: a [B, C, F, H, W] latent, patch-embedded frame by frame; its self-attention sees video tokens only
    "AllegroTransformer3DModel": VideoGrid(("hidden_states", 2), ("hidden_states", 3), ("hidden_states", 4),
                                           (("patch_size_t", None), ("patch_size", None), ("patch_size", None))),
    # LTX-2: packed video tokens, the latent grid with the call (its video self-attention sees video tokens only);
    # the audio, whole on every rank, attends to the whole video
    "LTX2VideoTransformer3DModel": VideoGrid(("num_frames", None), ("height", None), ("width", None),
                                             (("patch_size_t", None), ("patch_size", None), ("patch_size", None)),
                                             whole_queries=("transformer_blocks.*.video_to_audio_attn",)),
    # Mochi: a [B, C, F, H, W] latent; its joint attention puts each sample's valid text after the video
    "MochiTransformer3DModel": VideoGrid(("hidden_states", 2), ("hidden_states", 3), ("hidden_states", 4),
                                         (("patch_size_t", None), ("patch_size", None), ("patch_size", None)),
                                         text="after"),
}


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


def takes_clips(transformer_class: type) -> bool:
    """Whether a video transformer class can be cut into clips (it has a video grid)."""
    return transformer_class.__name__ in VIDEO_GRIDS


def plan_source(transformer_class: type) -> str | None:
    """Where the plan of a transformer class comes from: "paragen" (`OWN_PLANS`), "diffusers" (its `_cp_plan`) or
    None (paragen cannot shard it)."""
    if transformer_class.__name__ in OWN_PLANS:
        return "paragen"
    return "diffusers" if getattr(transformer_class, "_cp_plan", None) else None
