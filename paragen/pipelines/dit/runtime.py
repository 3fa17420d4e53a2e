"""DiT sequence parallelism for diffusion-transformer pipelines: PixArt-α/Σ, SD3, Flux, in place.

The image tokens are sharded along the sequence over the `seq` group (`ulysses × ring` ranks), in
contiguous shards whose sizes differ by at most one token, so any image size works:
- PixArt, SD3: the patch embedding's call is intercepted to keep the rank's shard of the tokens (the
  whole patch embedding, a strided conv, is cheap next to the blocks), and `proj_out`'s to all-gather
  the shards before the transformer un-patchifies them.
- Flux: the transformer's call is intercepted to cut the packed latent tokens and their position ids,
  so the rotary embedding is computed for the rank's own tokens only; the output tokens are all-gathered.
Text: in SD3 and Flux the text tokens run through every block (joint attention), so they are sharded
like the image tokens — every rank carries its shard of both streams, and attention sees all shards'
text and image keys. PixArt only cross-attends to the text, so its text stays whole on every rank.
With `cfg=2` each half of the ranks runs one classifier-free-guidance branch.
Attention runs through `parallel/sequence` (Ulysses, Ring, both, or displaced); every other layer is
per token and runs on the shard unchanged. The VAE decode is the banded one of the UNet pipelines.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.config import ExchangeConfig
from paragen.parallel.intercept import intercept
from paragen.parallel.sequence import SequenceContext
from paragen.parallel.sequence.processors import (
    CROSS_PROCESSORS, FLUX_PROCESSORS, JOINT_PROCESSORS, SELF_PROCESSORS,
    SeqFluxAttnProcessor, SeqJointAttnProcessor, SeqSelfAttnProcessor,
)
from paragen.pipelines.batch_split import split_batch
from paragen.pipelines.request_args import check_steps, request_arg, share_generator
from paragen.pipelines.runtime import PipelineRuntime
from paragen.pipelines.vae_decode import ParallelVaeDecoder

# pipeline class name -> model family
FAMILIES = {
    "PixArtAlphaPipeline": "pixart", "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
}


def _slice(value, dim: int, bounds: tuple[int, int]):
    return value.narrow(dim, bounds[0], bounds[1] - bounds[0])


@dataclass
class DiTRuntime(PipelineRuntime):
    """What `parallelize` attaches to a DiT pipeline as `pipe.paragen` (`plan` is its `SequenceContext`)."""

    family: str = ""

    @property
    def seq(self) -> SequenceContext:
        return self.plan  # type: ignore[return-value]

    def _shard(self, tokens_sizes: list[int]) -> tuple[int, int]:
        rank = self.seq.comm.rank
        start = sum(tokens_sizes[:rank])
        return start, start + tokens_sizes[rank]

    # ---- the transformer call ----------------------------------------------------------------
    def transformer_call(self, pipe, forward, *args, **kwargs) -> Any:
        """The transformer on this rank's CFG branch and token shards (Flux: its output tokens gathered)."""
        args, kwargs = self._cut(pipe, pipe.transformer, args, kwargs)
        return self._end(forward(*args, **kwargs))

    def _cut(self, pipe, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Cut the transformer's input to this rank's CFG branch and token shards."""
        args, kwargs = list(args), dict(kwargs)
        if args:  # every DiT forward's first argument is `hidden_states`
            kwargs["hidden_states"] = args.pop(0)
        if self.config.cfg == 2:
            args, kwargs = split_batch(args, kwargs, kwargs["hidden_states"].shape[0], self.mesh.group("cfg").rank, 2)
        seq, text = self.seq, kwargs.get("encoder_hidden_states")
        if self.family == "flux":
            seq.set_tokens(kwargs["hidden_states"].shape[1], text.shape[1])
            image, words = self._shard(seq.image_sizes), self._shard(seq.text_sizes)
            kwargs["hidden_states"] = _slice(kwargs["hidden_states"], 1, image)
            kwargs["encoder_hidden_states"] = _slice(text, 1, words)
            for name, bounds in (("img_ids", image), ("txt_ids", words)):
                ids = kwargs[name]
                kwargs[name] = _slice(ids, ids.ndim - 2, bounds)
        else:
            patch = module.config.patch_size
            rows, cols = kwargs["hidden_states"].shape[-2:]
            if self.family == "sd3":
                seq.set_tokens((rows // patch) * (cols // patch), text.shape[1])
                kwargs["encoder_hidden_states"] = _slice(text, 1, self._shard(seq.text_sizes))
            else:
                seq.set_tokens((rows // patch) * (cols // patch))
        self.start_step(pipe)
        seq.begin_step()
        return tuple(args), kwargs

    def embed_call(self, forward, *args, **kwargs):
        """Keep this rank's shard of the patch-embedded image tokens (PixArt, SD3)."""
        return _slice(forward(*args, **kwargs), 1, self._shard(self.seq.image_sizes))

    def gather_tokens(self, tokens):
        """All-gather the image-token shards of both CFG branches into `[cfg·B, N, C]`."""
        cfg = self.config.cfg
        full = self.mesh.group("world").all_gather_varlen(tokens, 1, self.seq.image_sizes * cfg, "dit.output")
        if cfg == 1:
            return full
        batch, _, channels = full.shape
        return full.view(batch, cfg, -1, channels).transpose(0, 1).reshape(cfg * batch, -1, channels)

    def proj_out_call(self, forward, *args, **kwargs):
        """PixArt, SD3: the last per-token layer's output, gathered before un-patchifying."""
        return self.gather_tokens(forward(*args, **kwargs))

    def _end(self, output: Any) -> Any:
        """End of a transformer forward: Flux's output tokens are gathered here; record the step."""
        if self.family == "flux":
            if isinstance(output, tuple):
                output = (self.gather_tokens(output[0]),) + tuple(output[1:])
            else:
                output.sample = self.gather_tokens(output.sample)
        self.record_step()
        return output

    # ---- the request's arguments ------------------------------------------------------------------
    def prepare_call(self, pipe, bound: inspect.BoundArguments) -> None:
        """Check the request on every rank before any collective; share the generator."""
        check_steps(bound)
        factor = pipe.vae_scale_factor * (2 if self.family == "flux" else pipe.transformer.config.patch_size)
        default = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size
        sides = []
        for name in ("height", "width"):
            value = request_arg(bound, name) or default * pipe.vae_scale_factor
            if value <= 0 or value % factor:
                raise ValueError(f"{name} {value} must be a positive multiple of {factor} (VAE factor × patch size)")
            sides.append(value // factor)
        if sides[0] * sides[1] < self.seq.comm.size:
            raise ValueError(f"more ranks than image tokens: {self.seq.comm.size} sequence shards for "
                             f"{sides[0] * sides[1]} tokens ({sides[0]}×{sides[1]})")
        if self.config.cfg == 2 and not request_arg(bound, "guidance_scale") > 1:
            raise ValueError("cfg=2 runs the two classifier-free-guidance branches on different ranks; it needs guidance_scale > 1")
        share_generator(bound, self.mesh.group("world"))


def _attention_modules(transformer) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in transformer.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]


def _plan_processors(family: str, transformer, config: ParallelConfig) -> list[tuple[Any, type]]:
    """Which processor each attention module gets; refuses unknown processors and unsplittable heads."""
    plan = []
    for name, attn in _attention_modules(transformer):
        kind = type(attn.processor).__name__
        cross = getattr(attn, "is_cross_attention", False)
        if family == "flux" and kind in FLUX_PROCESSORS:
            replacement = SeqFluxAttnProcessor
        elif family == "sd3" and kind in JOINT_PROCESSORS:
            replacement = SeqJointAttnProcessor
        elif cross and kind in CROSS_PROCESSORS:
            continue  # keys are the whole text on every rank: nothing to exchange
        elif not cross and kind in SELF_PROCESSORS:
            replacement = SeqSelfAttnProcessor
        else:
            known = {"flux": FLUX_PROCESSORS, "sd3": JOINT_PROCESSORS + SELF_PROCESSORS, "pixart": SELF_PROCESSORS}[family]
            raise ValueError(
                f"attention processor {kind} on {name} is not supported by sequence parallelism (supported here: "
                f"{', '.join(known)}); reset it with `set_default_attn_processor()` or remove the adapter first"
            )
        if attn.heads % config.ulysses:
            raise ValueError(f"ulysses={config.ulysses} does not divide the {attn.heads} attention heads of {name}; "
                             "use a Ulysses degree that divides the head count and ring for the rest")
        plan.append((attn, replacement))
    return plan


def check(pipe, config: ParallelConfig, options: ExchangeConfig) -> None:
    """Refuse what sequence parallelism cannot run: partial mode, Flux with cfg=2, unknown attention
    processors, a Ulysses degree that does not divide the heads."""
    if options.mode == "partial":
        raise ValueError("mode 'partial' (PCPP) is for UNet pipelines; diffusion transformers take sync or displaced")
    if FAMILIES[type(pipe).__name__] == "flux" and config.cfg == 2:
        raise ValueError("cfg=2 needs a pipeline that batches its guidance branches; FluxPipeline uses a guidance "
                         "embedding (and runs true CFG as two separate calls), so cfg must be 1")
    _plan_processors(FAMILIES[type(pipe).__name__], pipe.transformer, config)


def install(pipe, config: ParallelConfig, options: ExchangeConfig):
    """Make a checked PixArt, SD3 or Flux pipeline run each request across the ranks of the resolved `config`."""
    family = FAMILIES[type(pipe).__name__]
    processors = _plan_processors(family, pipe.transformer, config)
    mesh = ParallelMesh(config, pipe.device)
    seq = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"), options.mode,
                          options.warmup_steps, "dit.")
    runtime = DiTRuntime(config, mesh, seq, ParallelVaeDecoder(pipe.vae, mesh.group("world")), family=family)
    for attn, replacement in processors:
        attn.set_processor(replacement(seq))
    transformer = pipe.transformer
    intercept(transformer, "forward", lambda forward, *a, **k: runtime.transformer_call(pipe, forward, *a, **k))
    if family != "flux":
        intercept(transformer.pos_embed, "forward", runtime.embed_call)
        intercept(transformer.proj_out, "forward", runtime.proj_out_call)
    runtime.install(pipe)
    return pipe
