"""Wan2.1/2.2 video transformers over clips of latent frames and, in each clip, sequence shards of its tokens.

A Wan transformer patchifies the latent video (frames × rows × columns, patch (1, 2, 2)) into one token
sequence; every block's self-attention sees all of it, with 3D RoPE (frame, row, column angles), and
cross-attends to the text. Here the latent frames are cut into `clip` contiguous clips, and each clip's tokens
into contiguous shards over its `sequence` group (Ulysses × Ring; sizes differing by at most one token, so any
frame count and size works); `ClipTokens` is the layout:
- the transformer's sharding plan (diffusers' `_cp_plan` for the class, applied by the DiT runtime's
  mechanism) keeps the rank's tokens at the first block and the rank's rotary angles (every frame keeps its
  index in the whole video, see below), and all-gathers every shard of the guidance branch at `proj_out`, before
  the transformer un-patchifies them; the layout (`ClipShards`) puts the video's tokens by clips and shards;
- self-attention runs through the attention seam (Ulysses and/or Ring within the clip); with clips, the K/V of
  the frames the clip sees in the other clips (`scope` dual: the neighbours' `local` edge frames and the global
  frames; full: all) are sent as soon as they exist (`ClipKeyExchange`) and merged by log-sum-exp behind the
  attention within the clip. Cross-attention to the text is per token and has no site.
Positions: RoPE is relative, so a frame's angle only matters through its distance to the frames it sees. Every
frame keeps its index in the whole video (the model's own table: up to `rope_max_seq_len` latent frames), so
within a clip and its halo every distance is one the model was trained on, and only the global frames are seen
from further away than the training length (extrapolation). Interpolating the positions instead would shrink
every distance, the short ones that carry motion too. `--scope full` on clips is exactly the one-device video.
Segment prompts (`segment_prompts=[...]`, `segment_frames=[...]` in video frames): latent frame l belongs to the
segment of video frame 4l (the last of the frames it encodes; frame 0 for the first), and its tokens cross-attend
to that segment's prompt in the conditional call (`segment_text`). Checkpoints (`enable_checkpoints`, through the
step hook) save every rank's whole latent, the scheduler and the generator every K steps; a resumed run skips
the finished steps without computing and restores the last.
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
from paragen.parallel.clip import TemporalAttention, plan_clips
from paragen.parallel.clip.keys import ClipKeyExchange
from paragen.parallel.intercept import intercept
from paragen.parallel.sequence import SequenceContext
from paragen.pipelines.checkpoint import StepCheckpoints
from paragen.pipelines.dit.runtime import (
    DiTRuntime, check_plan, install_plan, output_sample, transformers, with_sample,
)
from paragen.pipelines.request_args import check_steps, request_arg, share_generator
from paragen.pipelines.segments import check_segment_request, take_segment_options
from paragen.pipelines.step_hook import install_step_hook
from paragen.pipelines.wan.segment_text import SegmentCrossAttention, token_runs
from paragen.pipelines.wan.vae_decode import ChunkedWanDecode


@dataclass
class WanRuntime(DiTRuntime):
    """What `parallelize` attaches to a Wan pipeline as `pipe.paragen`."""

    calls_per_step: int = 1  # transformer calls the pipeline makes per denoising step (2 with guidance)
    calls: int = 0  # calls made in the current step
    negative: torch.Tensor | None = None  # cfg=2: this request's negative prompt embeddings
    stash: Any = None  # cfg=2: the unconditional output, made beside the conditional call
    checkpoints: StepCheckpoints | None = None
    generator: Any = None  # the request's, for checkpoints
    segment_of_latent: list[int] | None = None  # segment prompts: the segment of every latent frame ...
    segment_text: torch.Tensor | None = None  # ... every segment's prompt embeddings [S, T, C]
    runs: list[tuple[int, int, int]] = None  # type: ignore[assignment]  # ... this rank's token runs, and in a
    run_texts: list[tuple[int, int, torch.Tensor]] | None = None  # conditional call, each with its projected text
    conditional: bool = False  # the current transformer call is the conditional one

    def enable_checkpoints(self, checkpoints: StepCheckpoints) -> None:
        """Save every rank's state as `checkpoints` says, and continue from its resume step (checked, with
        the folder, before any collective: `StepCheckpoints.open`)."""
        self.checkpoints = checkpoints

    def transformer_call(self, pipe, module, forward, *args, **kwargs) -> Any:
        """One transformer call on this rank's token shard (cfg=2: this rank's guidance branch)."""
        cfg = self.config.cfg
        if cfg == 2 and self.stash is not None:  # the unconditional call: made already, beside the conditional
            output, self.stash = self.stash, None
            return self._count(output)
        if args:
            kwargs["hidden_states"], args = args[0], args[1:]
        if self.calls == 0:
            self._lay_out(module, kwargs)
            self.start_step(pipe)
            self.seq.begin_step()
        if self.checkpoints is not None and self.checkpoints.skipped(self.seq.step):
            return self._count(_zeros(module, kwargs))  # done before the interruption; restored at its last step
        unconditional = self.calls == 1 or (cfg == 2 and self.mesh.group("cfg").rank == 1)
        if cfg == 2 and unconditional:
            cond = kwargs["encoder_hidden_states"]
            kwargs["encoder_hidden_states"] = self.negative.to(cond.device, cond.dtype)
        self.run_texts = None
        self.conditional = not unconditional
        if self.step_cache is not None:  # a step's cache decision is the conditional call's, as in one process
            self.step_cache.counts = self.conditional
        self.begin_forward()
        output = forward(*args, **kwargs)
        if cfg == 2:
            both = self.mesh.group("cfg").all_gather(output_sample(output).contiguous(), "wan.cfg")
            self.stash = with_sample(output, both[1])
            output = with_sample(output, both[0])
        return self._count(output)

    def _lay_out(self, module, kwargs: dict[str, Any]) -> None:
        """This step's token layout over clips and sequence shards (and, with segment prompts, this rank's runs)."""
        self.lay_out_video(module, kwargs)
        if self.segment_of_latent is not None:
            bounds = self.tokens.bounds(self.mesh.group("branch").rank)
            self.runs = token_runs(bounds, self.tokens.per_frame, self.segment_of_latent)

    # ---- segment prompts ---------------------------------------------------------------------------
    def text_embed_call(self, forward, text: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The transformer's text projection; in a conditional call with segment prompts, every segment's too."""
        if self.segment_text is not None and self.conditional:
            projected = forward(self.segment_text.to(text), *args, **kwargs)
            self.run_texts = [(start, stop, projected[segment]) for start, stop, segment in self.runs]
        return forward(text, *args, **kwargs)

    def text_runs(self) -> list[tuple[int, int, torch.Tensor]] | None:
        """This rank's runs of tokens with their segment's projected text, in a conditional call with segment
        prompts (None otherwise: the call's own text)."""
        return self.run_texts

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_step_end(self, scheduler, latents: torch.Tensor) -> torch.Tensor | None:
        """After a scheduler step: restore a resumed run, or save a checkpoint (every rank its whole latent)."""
        i, saved = self.seq.step, self.checkpoints
        if saved.restores_after(i):
            return saved.restore(scheduler, self.generator)["latents"].to(latents)
        if saved.saves_after(i, self.seq.total_steps):
            saved.save(i, scheduler, self.generator, latents)
        return None

    def _count(self, output: Any) -> Any:
        self.calls += 1
        if self.calls == self.calls_per_step:
            self.calls = 0
            self.record_step()
        return output

    def encode_prompt_call(self, forward, *args, **kwargs):
        """Keep the negative prompt embeddings for the unconditional half of the ranks (cfg=2)."""
        prompt_embeds, self.negative = forward(*args, **kwargs)
        return prompt_embeds, self.negative

    def end_request(self) -> None:
        super().end_request()
        self.calls, self.stash, self.negative = 0, None, None
        self.segment_of_latent = self.segment_text = self.run_texts = None

    def take_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return take_segment_options(kwargs)

    def prepare_call(self, pipe, bound: inspect.BoundArguments, segment_prompts: list[str] | None = None,
                     segment_frames: list[int] | None = None) -> None:
        """Check the request on every rank before any collective; encode the segment prompts; share the generator."""
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
        latent_frames = ((frames - 1) // temporal + 1) // patch_t
        positions = pipe.transformer.config.rope_max_seq_len
        if latent_frames > positions:
            raise ValueError(f"num_frames {frames} makes {latent_frames} latent frames; the model's rotary table "
                             f"holds {positions} (at most {(positions - 1) * temporal + 1} frames)")
        clips = plan_clips(latent_frames, self.config.clip, self.temporal, conv_halo=0)
        tokens = min(clips.sizes) * sides[0] * sides[1]
        if tokens < self.seq.comm.size:
            raise ValueError(f"more ranks than video tokens: {self.seq.comm.size} sequence shards for a clip of "
                             f"{tokens} tokens")
        guided = request_arg(bound, "guidance_scale") > 1
        if self.config.cfg == 2 and not guided:
            raise ValueError("cfg=2 runs the two classifier-free-guidance branches on different ranks; it needs "
                             "guidance_scale > 1")
        self.calls_per_step = 2 if guided else 1
        of_frame = check_segment_request(bound, frames, segment_prompts, segment_frames)
        self.segment_of_latent = self.segment_text = None
        if of_frame is not None:
            self.segment_of_latent = [of_frame[frame * patch_t * temporal] for frame in range(latent_frames)]
            length = request_arg(bound, "max_sequence_length")
            with torch.no_grad():
                self.segment_text = torch.cat([pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                                                  max_sequence_length=length, device=pipe.device)[0]
                                               for prompt in segment_prompts])
        if self.checkpoints is not None:
            install_step_hook(pipe.scheduler, lambda latents: self.on_step_end(pipe.scheduler, latents))
        share_generator(bound, self.mesh.group("world"))
        self.generator = request_arg(bound, "generator")


def _zeros(module, kwargs: dict[str, Any]) -> Any:
    """A transformer output of zeros for the call `kwargs` (a step skipped on resume)."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    states = kwargs["hidden_states"]
    sample = states.new_zeros(states.shape[0], module.config.out_channels, *states.shape[2:])
    return Transformer2DModelOutput(sample=sample) if kwargs.get("return_dict", True) else (sample,)


def check(pipe, config: ParallelConfig, options: TemporalAttention) -> None:
    """Refuse what this workload cannot run: a local/global bias, per-token timesteps (Wan2.2 TI2V), unknown
    attention processors, a Ulysses degree that does not divide the heads."""
    if options.bias not in (None, 0.0):
        raise ValueError(f"bias {options.bias}: a Wan clip's 3D attention sees its halo and global frames as "
                         "ordinary keys beside the whole clip; a local/global bias is not supported")
    if getattr(pipe.config, "expand_timesteps", False):
        raise ValueError("per-token timesteps (Wan2.2 TI2V, expand_timesteps) are not supported yet")
    for transformer in transformers(pipe):
        check_plan(transformer, config)


def install(pipe, config: ParallelConfig, options: TemporalAttention):
    """Make a checked Wan pipeline run each request across the ranks of the resolved `config`."""
    mesh = ParallelMesh(config, pipe.device)
    seq = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"), label_prefix="wan.")
    keys = None
    if config.clip > 1:
        keys = ClipKeyExchange(mesh.group("branch"), config.ulysses, "wan.clip_kv", options.overlap)
    runtime = WanRuntime(config, mesh, seq, None, temporal=options, keys=keys)
    runtime.sharding = [install_plan(t, config, seq, runtime, "wan.", None if keys is None else keys.start)
                        for t in transformers(pipe)]
    for transformer in transformers(pipe):
        for block in transformer.blocks:
            block.attn2.set_processor(SegmentCrossAttention(block.attn2.processor, runtime.text_runs))
        intercept(transformer.condition_embedder.text_embedder, "forward", runtime.text_embed_call, tag="wan.segment_text")
        intercept(transformer, "forward", functools.partial(runtime.transformer_call, pipe, transformer), tag="wan.transformer")
    if config.cfg == 2:
        intercept(pipe, "encode_prompt", runtime.encode_prompt_call, tag="wan.negative_prompt")
    intercept(pipe.vae, "decode", ChunkedWanDecode(pipe.vae, mesh.group("world"), runtime.emit_clip),
              tag="wan.vae_decode")
    runtime.install(pipe)
    return pipe
