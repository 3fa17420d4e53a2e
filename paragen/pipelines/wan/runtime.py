"""Wan2.1/2.2 video transformers with the video tokens sharded along the sequence (Ulysses, Ring, both), exact.

A Wan transformer patchifies the latent video (frames × rows × columns, patch (1, 2, 2)) into one token
sequence; every block's self-attention sees all of it, with 3D RoPE (frame, row, column angles), and
cross-attends to the text. Here the sequence is cut into contiguous shards over the `sequence` group (sizes
differing by at most one token, so any frame count and size works):
- the patch embedding's call is intercepted to keep the rank's tokens (its output is returned as
  `[B, C, tokens, 1, 1]`, which the transformer's own flatten turns into the rank's `[B, tokens, C]`);
- the rotary embedding's call, to keep the angles of the rank's tokens;
- self-attention runs through `SeqWanAttnProcessor` (q/k norms and RoPE on the rank's tokens, then Ulysses
  and/or Ring); cross-attention to the text is per token and keeps its processor;
- `proj_out`'s call, to all-gather the shards before the transformer un-patchifies them.
Classifier-free guidance: the pipeline calls the transformer twice per step (conditional, then unconditional).
With `cfg=2` the second half of the ranks makes the unconditional call during the first, with the negative
prompt embeddings taken from `encode_prompt`; the two results are exchanged, and the second call returns the
one already made. The VAE decode runs over all ranks by time chunks (`vae_decode.ChunkedWanDecode`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.config import ExchangeConfig
from paragen.parallel.intercept import intercept
from paragen.parallel.sequence import SequenceContext
from paragen.parallel.sequence.processors import WAN_PROCESSORS, SeqWanAttnProcessor
from paragen.pipelines.dit.runtime import DiTRuntime
from paragen.pipelines.request_args import check_steps, request_arg, share_generator
from paragen.pipelines.wan.vae_decode import ChunkedWanDecode


def _sample(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return type(output)(sample=sample)


@dataclass
class WanRuntime(DiTRuntime):
    """What `parallelize` attaches to a Wan pipeline as `pipe.paragen`."""

    calls_per_step: int = 1  # transformer calls the pipeline makes per denoising step (2 with guidance)
    calls: int = 0  # calls made in the current step
    negative: torch.Tensor | None = None  # cfg=2: this request's negative prompt embeddings
    stash: Any = None  # cfg=2: the unconditional output, made beside the conditional call

    def transformer_call(self, pipe, module, forward, *args, **kwargs) -> Any:
        """One transformer call on this rank's token shard (cfg=2: this rank's guidance branch)."""
        cfg = self.config.cfg
        if cfg == 2 and self.stash is not None:  # the unconditional call: made already, beside the conditional
            output, self.stash = self.stash, None
            return self._count(output)
        if args:
            kwargs["hidden_states"], args = args[0], args[1:]
        if cfg == 2 and self.mesh.group("cfg").rank == 1:
            cond = kwargs["encoder_hidden_states"]
            kwargs["encoder_hidden_states"] = self.negative.to(cond.device, cond.dtype)
        if self.calls == 0:
            frames, rows, cols = kwargs["hidden_states"].shape[-3:]
            patch_t, patch_h, patch_w = module.config.patch_size
            self.seq.set_tokens((frames // patch_t) * (rows // patch_h) * (cols // patch_w))
            self.start_step(pipe)
        self.seq.begin_step()
        output = forward(*args, **kwargs)
        if cfg == 2:
            both = self.mesh.group("cfg").all_gather(_sample(output).contiguous(), "wan.cfg")
            self.stash = _with_sample(output, both[1])
            output = _with_sample(output, both[0])
        return self._count(output)

    def _count(self, output: Any) -> Any:
        self.calls += 1
        if self.calls == self.calls_per_step:
            self.calls = 0
            self.record_step()
        return output

    def embed_call(self, forward, *args, **kwargs) -> torch.Tensor:
        """This rank's patch-embedded tokens, as `[B, C, tokens, 1, 1]` (the transformer flattens them)."""
        start, end = self._shard(self.seq.image_sizes)
        return forward(*args, **kwargs).flatten(2)[:, :, start:end, None, None]

    def rope_call(self, forward, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary angles of this rank's tokens."""
        start, end = self._shard(self.seq.image_sizes)
        return tuple(angles[:, start:end] for angles in forward(*args, **kwargs))

    def proj_out_call(self, forward, *args, **kwargs) -> torch.Tensor:
        """Every shard's output tokens of this guidance branch, in order."""
        return self.mesh.group("sequence").all_gather_varlen(forward(*args, **kwargs), 1, self.seq.image_sizes,
                                                             "wan.output")

    def encode_prompt_call(self, forward, *args, **kwargs):
        """Keep the negative prompt embeddings for the unconditional half of the ranks (cfg=2)."""
        prompt_embeds, self.negative = forward(*args, **kwargs)
        return prompt_embeds, self.negative

    def end_request(self) -> None:
        super().end_request()
        self.calls, self.stash, self.negative = 0, None, None

    def take_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Refuse paragen's per-segment prompts: they belong to clips, which Wan runs do not have yet."""
        given = [name for name in ("segment_prompts", "segment_frames") if name in kwargs]
        if given:
            raise ValueError(f"{', '.join(given)}: one prompt per segment needs clips, which Wan runs do not have "
                             "yet; give one prompt")
        return {}

    def prepare_call(self, pipe, bound: inspect.BoundArguments) -> None:
        """Check the request on every rank before any collective; share the generator."""
        check_steps(bound)
        temporal = pipe.vae_scale_factor_temporal
        frames = request_arg(bound, "num_frames")
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(f"num_frames {frames}: the Wan VAE takes {temporal}k+1 frames (e.g. "
                             f"{max(1, (frames - 1) // temporal * temporal + 1)} or {(frames - 1) // temporal * temporal + temporal + 1})")
        patch_t, patch_h, patch_w = pipe.transformer.config.patch_size
        sides = []
        for name, patch in (("height", patch_h), ("width", patch_w)):
            value, factor = request_arg(bound, name), pipe.vae_scale_factor_spatial * patch
            if value <= 0 or value % factor:
                raise ValueError(f"{name} {value} must be a positive multiple of {factor} (VAE factor × patch size)")
            sides.append(value // factor)
        tokens = ((frames - 1) // temporal + 1) // patch_t * sides[0] * sides[1]
        if tokens < self.seq.comm.size:
            raise ValueError(f"more ranks than video tokens: {self.seq.comm.size} sequence shards for {tokens} tokens")
        guided = request_arg(bound, "guidance_scale") > 1
        if self.config.cfg == 2 and not guided:
            raise ValueError("cfg=2 runs the two classifier-free-guidance branches on different ranks; it needs "
                             "guidance_scale > 1")
        self.calls_per_step = 2 if guided else 1
        share_generator(bound, self.mesh.group("world"))


def _transformers(pipe) -> list[Any]:
    """The pipeline's transformers (Wan2.2 has a second one for the low-noise steps)."""
    return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]


def _self_attentions(transformer, config: ParallelConfig) -> list[Any]:
    """The self-attention modules, checked: a known processor, heads divisible by the Ulysses degree."""
    found = []
    for name, attn in transformer.named_modules():
        if not (hasattr(attn, "processor") and hasattr(attn, "set_processor")) or attn.is_cross_attention:
            continue
        kind = type(attn.processor).__name__
        if kind not in WAN_PROCESSORS:
            raise ValueError(f"attention processor {kind} on {name} is not supported by sequence parallelism "
                             f"(supported: {', '.join(WAN_PROCESSORS)}); reset it with `set_default_attn_processor()`")
        if attn.heads % config.ulysses:
            raise ValueError(f"ulysses={config.ulysses} does not divide the {attn.heads} attention heads of {name}; "
                             "use a Ulysses degree that divides the head count and ring for the rest")
        found.append(attn)
    return found


def check(pipe, config: ParallelConfig, options: ExchangeConfig) -> None:
    """Refuse what this workload cannot run: stale modes, per-token timesteps (Wan2.2 TI2V), unknown attention
    processors, a Ulysses degree that does not divide the heads."""
    if options.mode != "sync":
        raise ValueError(f"mode {options.mode!r}: Wan runs exact sequence parallelism (sync); its guidance branches "
                         "are separate transformer calls, whose stale keys and values would mix")
    if getattr(pipe.config, "expand_timesteps", False):
        raise ValueError("per-token timesteps (Wan2.2 TI2V, expand_timesteps) are not supported yet")
    for transformer in _transformers(pipe):
        _self_attentions(transformer, config)


def install(pipe, config: ParallelConfig, options: ExchangeConfig):
    """Make a checked Wan pipeline run each request across the ranks of the resolved `config`."""
    mesh = ParallelMesh(config, pipe.device)
    seq = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"), label_prefix="wan.")
    runtime = WanRuntime(config, mesh, seq, None, family="wan")
    for transformer in _transformers(pipe):
        for attn in _self_attentions(transformer, config):
            attn.set_processor(SeqWanAttnProcessor(seq))
        call = functools.partial(runtime.transformer_call, pipe, transformer)
        intercept(transformer, "forward", call)
        intercept(transformer.patch_embedding, "forward", runtime.embed_call)
        intercept(transformer.rope, "forward", runtime.rope_call)
        intercept(transformer.proj_out, "forward", runtime.proj_out_call)
    if config.cfg == 2:
        intercept(pipe, "encode_prompt", runtime.encode_prompt_call)
    intercept(pipe.vae, "decode", ChunkedWanDecode(pipe.vae, mesh.group("world")))
    runtime.install(pipe)
    return pipe
