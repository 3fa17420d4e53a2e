"""Sequence parallelism for every diffusion-transformer pipeline with a sharding plan, in place.

One runtime for every family: the transformer's plan (`plans.plan_for`: diffusers' `_cp_plan` or paragen's own,
same form) cuts its token streams over the `seq` group (`ulysses × ring` ranks, contiguous shards whose sizes
differ by at most one token, so any size works) and gathers its output; every attention module whose keys are the
split tokens attends through the seam (`paragen.parallel.sequence.seam`: Ulysses, Ring, both, displaced), every
linear attention with one all-reduce (`paragen.parallel.sequence.linear`); a model that folds its tokens back into
their grid (`plans.ROW_GRIDS`) is cut by whole rows, its grid convs exchanging edge rows with the neighbouring
shards (`PatchConv2d`); every other layer is per token and runs on the shard unchanged. With `cfg=2` each half of
the ranks runs one guidance branch of a pipeline that batches them (`plans.CFG_BATCH`). The VAE decode is the
banded one of the UNet pipelines.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.intercept import intercept
from paragen.parallel.sequence import SequenceContext
from paragen.parallel.sequence.apply import PlannedSharding, planned_modules
from paragen.parallel.clip import TemporalAttention, plan_clips
from paragen.parallel.clip.keys import ClipKeyExchange
from paragen.parallel.clip.tokens import ClipTokens
from paragen.parallel.patch.context import PatchContext
from paragen.parallel.patch.conv import PatchConv2d
from paragen.parallel.sequence.layout import ClipShards, EvenShards, RowShards, TokenLayout
from paragen.parallel.sequence.linear import LinearAttentionSite, check_linear
from paragen.parallel.sequence.plan import Rows, ShardingPlan, matches, resolve
from paragen.parallel.sequence.seam import AttentionSite, open_seam
from paragen.pipelines.batch_split import split_batch
from paragen.pipelines.dit.plans import CFG_BATCH, PACKED, ROW_GRIDS, VIDEO_GRIDS, plan_for, takes_clips
from paragen.pipelines.request_args import check_steps, request_arg, share_generator
from paragen.pipelines.runtime import PipelineRuntime
from paragen.pipelines.vae_decode import ParallelVaeDecoder


def output_sample(output: Any) -> torch.Tensor:
    """The sample of a transformer output (a tuple or a `Transformer2DModelOutput`)."""
    return output[0] if isinstance(output, tuple) else output.sample


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` with its sample replaced."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


@dataclass
class DiTRuntime(PipelineRuntime):
    """What `parallelize` attaches to a DiT pipeline as `pipe.paragen` (`plan` is its `SequenceContext`)."""

    sharding: list[PlannedSharding] | None = None  # one per transformer of the pipeline
    layout: TokenLayout | None = None  # how this forward's token streams are cut
    temporal: TemporalAttention | None = None  # with clips: what a clip sees of the others
    keys: ClipKeyExchange | None = None  # with clips: the seen-frame K/V exchange of the video self-attentions
    tokens: ClipTokens | None = None  # with clips: this forward's video tokens over clips and shards

    @property
    def seq(self) -> SequenceContext:
        return self.plan  # type: ignore[return-value]

    def current_layout(self) -> TokenLayout:
        return self.layout

    def clip_video(self, transformer) -> tuple[list[int], str] | None:
        """With clips: the video tokens of each sequence shard of this rank's clip, and where `transformer`'s joint
        self-attention puts the text among its keys (`VideoGrid.text`); None without clips."""
        if self.tokens is None:
            return None
        return self.tokens.clip_sizes(self.mesh.group("clip").rank), VIDEO_GRIDS[type(transformer).__name__].text

    def lay_out_video(self, transformer, arguments: dict[str, Any]) -> None:
        """This forward's video tokens over clips × shards, from the call's latent grid (`plans.VIDEO_GRIDS`)."""
        frames, per_frame = VIDEO_GRIDS[type(transformer).__name__].tokens(transformer, arguments)
        clips = plan_clips(frames, self.config.clip, self.temporal, conv_halo=0)
        self.tokens = ClipTokens(clips, per_frame, self.seq.comm.size, self.temporal.scope, self.temporal.local)
        self.layout = ClipShards(self.tokens, self.mesh.group("branch"), self.seq.comm)
        if self.keys is not None:
            self.keys.set_layout(self.tokens)

    def begin_forward(self) -> None:
        """Before a transformer forward on its shards: the plans learn their streams again."""
        for planned in self.sharding:
            planned.begin_forward()

    # ---- the transformer call ----------------------------------------------------------------
    def transformer_call(self, pipe, transformer, forward, *args, **kwargs) -> Any:
        """The transformer on this rank's CFG branch and token shards; both branches gathered after it."""
        cfg = self.config.cfg
        if cfg == 2:  # by name, however the pipeline passed them (HunyuanDiT gives its timestep by position)
            bound = inspect.signature(forward).bind(*args, **kwargs)
            args, kwargs = split_batch(list(bound.args), bound.kwargs, bound.arguments["hidden_states"].shape[0],
                                       self.mesh.group("cfg").rank, 2)
        self.start_step(pipe)
        self.seq.begin_step()
        self.begin_forward()
        grid = ROW_GRIDS.get(type(transformer).__name__)
        if self.keys is not None or grid is not None:
            arguments = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
            if self.keys is not None:
                self.lay_out_video(transformer, arguments)
            else:
                self.layout = RowShards(self.seq.comm, *grid.shape(transformer, arguments))
        output = forward(*args, **kwargs)
        if cfg == 2:
            both = self.mesh.group("cfg").all_gather(output_sample(output).contiguous(), "dit.cfg")
            output = with_sample(output, both.flatten(0, 1))
        self.record_step()
        return output

    # ---- the request's arguments ------------------------------------------------------------------
    def prepare_call(self, pipe, bound: inspect.BoundArguments) -> None:
        """Check the request on every rank before any collective; share the generator."""
        check_steps(bound)
        if self.config.cfg == 2 and not request_arg(bound, "guidance_scale") > 1:
            raise ValueError("cfg=2 runs the two classifier-free-guidance branches on different ranks; it needs guidance_scale > 1")
        if hasattr(pipe, "vae_scale_factor"):  # an image pipeline: its sides in whole tokens, enough tokens
            self._check_sides(pipe, bound)
        share_generator(bound, self.mesh.group("world"))

    def _check_sides(self, pipe, bound: inspect.BoundArguments) -> None:
        patch = 2 if type(pipe).__name__ in PACKED else pipe.transformer.config.patch_size
        factor = pipe.vae_scale_factor * (patch if isinstance(patch, int) else patch[-1])
        default = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.get("sample_size")
        sides = []
        for name in ("height", "width"):
            value = request_arg(bound, name) or (default or 0) * pipe.vae_scale_factor
            if not value:
                return  # no size asked and none the runtime can read: the pipeline's own default
            if value <= 0 or value % factor:
                raise ValueError(f"{name} {value} must be a positive multiple of {factor} (VAE factor × patch size)")
            sides.append(value // factor)
        if type(pipe.transformer).__name__ in ROW_GRIDS and sides[0] < self.seq.comm.size:
            raise ValueError(f"more ranks than token rows: {self.seq.comm.size} sequence shards for {sides[0]} rows "
                             f"of tokens ({type(pipe.transformer).__name__}'s shards hold whole rows)")
        if sides[0] * sides[1] < self.seq.comm.size:
            raise ValueError(f"more ranks than image tokens: {self.seq.comm.size} sequence shards for "
                             f"{sides[0] * sides[1]} tokens ({sides[0]}×{sides[1]})")


def attention_modules(transformer) -> list[tuple[str, Any]]:
    """The transformer's attention modules (diffusers' attention classes carry a processor)."""
    return [(n, m) for n, m in transformer.named_modules() if getattr(m, "processor", None) is not None]


def sharded_attentions(transformer, plan: ShardingPlan, config: ParallelConfig) -> list[tuple[str, Any]]:
    """The softmax attention modules whose keys are the split tokens, checked: heads divisible by the Ulysses degree."""
    found = []
    for name, attn in attention_modules(transformer):
        if matches(name, plan.replicated + plan.linear):
            continue
        heads = getattr(attn, "heads", None)
        if heads is not None and heads % config.ulysses:
            raise ValueError(f"ulysses={config.ulysses} does not divide the {heads} attention heads of {name}; "
                             "use a Ulysses degree that divides the head count and ring for the rest")
        found.append((name, attn))
    if not found and not plan.linear:
        raise ValueError(f"{type(transformer).__name__} has no attention module over its split tokens")
    return found


def grid_modules(transformer, plan: ShardingPlan) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The plan's linear-attention modules and grid convs; ValueError for a path the transformer lacks, a linear
    attention module whose processor paragen does not run, or grid-folding entries on a class without a row grid
    (`plans.ROW_GRIDS`)."""
    what = f"{type(transformer).__name__} ({plan.source})"
    linear = [found for path in plan.linear for found in resolve(transformer, path, what)]
    for name, attn in linear:
        check_linear(attn, f"{type(transformer).__name__}.{name}")
    convs = [found for path in plan.row_convs for found in resolve(transformer, path, what)]
    folds = plan.row_convs or any(isinstance(split, Rows) for _, _, split in plan.splits())
    if folds and type(transformer).__name__ not in ROW_GRIDS:
        raise ValueError(f"the plan of {what} folds tokens back into their grid, but the class has no row grid "
                         "(paragen/pipelines/dit/plans.py ROW_GRIDS: where its call gives the latent rows)")
    return linear, convs


def transformers(pipe) -> list[Any]:
    """The pipeline's transformers (Wan2.2 has a second one for the low-noise steps)."""
    return [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]


def install_plan(transformer, config: ParallelConfig, seq: SequenceContext, runtime: DiTRuntime, label: str,
                 outside=None) -> PlannedSharding:
    """Install `transformer`'s plan and attention sites; the runtime gives the layout of each forward. `outside`
    (clips): the seen-frame K/V of the other clips, for the sites whose keys are the clip's video tokens alone."""
    plan = plan_for(transformer)
    planned = PlannedSharding(plan, runtime.current_layout, label)
    planned.install(transformer)
    open_seam()
    cls = type(transformer).__name__
    grid = VIDEO_GRIDS.get(cls)
    for name, attn in sharded_attentions(transformer, plan, config):
        clips = runtime.mesh.group("clip") if grid is not None and matches(name, grid.whole_queries) else None
        site = AttentionSite(seq, f"{cls}.{name}", planned.shape, outside,
                             functools.partial(runtime.clip_video, transformer), clips)
        site.install(attn)
    linear, convs = grid_modules(transformer, plan)
    for name, attn in linear:
        LinearAttentionSite(seq, f"{cls}.{name}").install(attn)
    if convs:
        halos = PatchContext(seq.comm, "sync", label_prefix=label)  # edge rows exchanged fresh in every step
        for _, conv in convs:
            PatchConv2d.convert(conv, halos)
    return planned


def check(pipe, config: ParallelConfig, options: Any) -> None:
    """Refuse what sequence parallelism cannot run: partial mode, cfg=2 on a pipeline that does not batch its
    guidance branches, clips on a transformer without a video grid or with a local/global bias, a transformer
    without a plan, a Ulysses degree that does not divide the heads. `options`: an `ExchangeConfig` (images) or a
    video job's `TemporalAttention` (what a clip sees of the others)."""
    if config.clip > 1:
        for transformer in transformers(pipe):
            if not takes_clips(type(transformer)):
                raise ValueError(f"clips need a video grid (where its call gives the latent frames: "
                                 f"paragen/pipelines/dit/plans.py); {type(transformer).__name__} has none: use clip=1 "
                                 "with ulysses and ring")
        if options.bias not in (None, 0.0):
            raise ValueError(f"bias {options.bias}: a video transformer's clip sees its halo and global frames as "
                             "ordinary keys beside the whole clip; a local/global bias is not supported")
    if getattr(options, "mode", "sync") == "partial":
        raise ValueError("mode 'partial' (PCPP) is for UNet pipelines; diffusion transformers take sync or displaced")
    if config.cfg == 2 and type(pipe).__name__ not in CFG_BATCH:
        raise ValueError(f"cfg=2 needs a pipeline that batches its guidance branches; {type(pipe).__name__} does not "
                         "(a guidance embedding, or true CFG as two separate calls), so cfg must be 1")
    for transformer in transformers(pipe):
        check_plan(transformer, config)


def check_plan(transformer, config: ParallelConfig) -> None:
    """Refuse a transformer without a plan, a plan or video grid naming a module it lacks, heads the Ulysses degree
    does not divide."""
    plan = plan_for(transformer)
    planned_modules(plan, transformer)
    sharded_attentions(transformer, plan, config)
    grid_modules(transformer, plan)
    video = VIDEO_GRIDS.get(type(transformer).__name__)
    for path in video.whole_queries if video is not None else ():
        resolve(transformer, path, f"{type(transformer).__name__}'s video grid")


def install(pipe, config: ParallelConfig, options: Any):
    """Make a checked DiT pipeline run each request across the ranks of the resolved `config`."""
    mesh = ParallelMesh(config, pipe.device)
    seq = SequenceContext(mesh.group("sequence"), mesh.group("ulysses"), mesh.group("ring"),
                          getattr(options, "mode", "sync"), getattr(options, "warmup_steps", 0), "dit.")
    vae = ParallelVaeDecoder(pipe.vae, mesh.group("world")) if ParallelVaeDecoder.supports(pipe.vae) else None
    runtime = DiTRuntime(config, mesh, seq, vae, layout=EvenShards(mesh.group("sequence")))
    if config.clip > 1:
        runtime.temporal = options
        runtime.keys = ClipKeyExchange(mesh.group("branch"), config.ulysses, "dit.clip_kv", options.overlap)
    outside = None if runtime.keys is None else runtime.keys.start
    runtime.sharding = [install_plan(t, config, seq, runtime, "dit.", outside) for t in transformers(pipe)]
    for transformer in transformers(pipe):
        intercept(transformer, "forward", functools.partial(runtime.transformer_call, pipe, transformer),
                  tag="dit.transformer")
    runtime.install(pipe)
    return pipe
