"""Every legal layout of an image or video request on N ranks, each with its predicted step time, memory per rank
and bytes per step, ranked (`paragen plan`, `--layout auto`).

Legal means what the registry accepts: the workload's degrees resolved for the world size, the workload's own
checks run on the model (built from its configs on the `meta` device) and its checks of the request.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from paragen.parallel import ParallelConfig
from paragen.parallel.config import MODES, ExchangeConfig
from paragen.pipelines import memory_estimate, registry
from paragen.pipelines.cost import exchange
from paragen.pipelines.cost.devices import DeviceProfile
from paragen.pipelines.cost.inputs import CALLS, GUIDANCE, Latent, text_tokens
from paragen.pipelines.cost.model import Placement, StepCost, compute_time, step_cost
from paragen.pipelines.cost.trace import Trace, trace_call
from paragen.pipelines.loading import build_empty, model_folder, read_index
from paragen.pipelines.model_facts import model_facts

TIE = 0.02  # predicted times this close are a tie (`ranked`)


@dataclass(frozen=True)
class Exchanges:
    """What the cost model knows of a workload's traffic: its run report's label prefix, how its layers exchange
    (`patch`: row bands; `sequence`: token shards and clips) and how its output is gathered
    (`exchange.output_messages`)."""

    prefix: str
    layers: str
    output: str


# The workloads whose traffic is modelled (UNet video clips are not yet).
EXCHANGES = {"patch": Exchanges("unet.", "patch", "world"), "dit": Exchanges("dit.", "sequence", "sequence"),
             "dit-video": Exchanges("dit.", "sequence", "sequence"), "wan": Exchanges("wan.", "sequence", "sequence")}


@dataclass(frozen=True)
class Layout:
    """A workload, its degrees and its options (the exchange mode, or a video's temporal attention)."""

    workload: str
    degrees: tuple[tuple[str, int], ...]
    options: Any

    @property
    def mode(self) -> str:
        return getattr(self.options, "mode", "sync")

    def config(self) -> ParallelConfig:
        return ParallelConfig(**dict(self.degrees))

    def describe(self) -> str:
        """E.g. `ulysses 2 × ring 2, sync`."""
        parts = [f"{name} {value}" for name, value in self.degrees if value > 1] or ["one rank"]
        return " × ".join(parts) + (f", {self.mode}" if isinstance(self.options, ExchangeConfig) else "")

    def arguments(self) -> list[str]:
        """The command-line options that run this layout."""
        args = [f"--{name}={value}" for name, value in self.degrees]
        return args + ([f"--mode={self.mode}"] if isinstance(self.options, ExchangeConfig) else [])


@dataclass
class Plan:
    """One layout's prediction for one rank (the slowest)."""

    layout: Layout
    fresh: StepCost  # a step whose exchanges are all fresh (sync, and the warm-up steps)
    stale: StepCost | None  # a step after the warm-up (displaced, partial)
    steps: int
    fresh_steps: int
    decode_s: float
    memory_bytes: int
    fits: bool  # the memory estimate (a lower bound) within what a rank has

    @property
    def step_s(self) -> float:
        """The request's mean step."""
        stale = self.stale.step_s if self.stale is not None else self.fresh.step_s
        return (self.fresh_steps * self.fresh.step_s + (self.steps - self.fresh_steps) * stale) / self.steps

    @property
    def request_s(self) -> float:
        """Denoising and decoding (text encoding left out)."""
        return self.steps * self.step_s + self.decode_s

    @property
    def steady(self) -> StepCost:
        return self.stale if self.stale is not None else self.fresh

    def as_dict(self) -> dict:
        s = self.steady
        return {"layout": self.layout.describe(), "arguments": self.layout.arguments(), "step_s": self.step_s,
                "request_s": self.request_s, "fits": self.fits, "compute_s": s.compute_s, "exposed_comm_s": s.exposed_s,
                "comm_s": s.comm_s, "decode_s": self.decode_s, "memory_bytes": self.memory_bytes,
                "bytes_per_step_intra": s.bytes_intra, "bytes_per_step_inter": s.bytes_inter,
                "bytes_per_step": s.labels}


class ModelCost:
    """A model's denoiser and VAE decoder built on the `meta` device, traced per call size (cached)."""

    def __init__(self, model: str, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self.facts = model_facts(model)
        if self.facts is None:
            raise ValueError(f"{model}: its configs do not say its denoiser's and VAE's shapes; no cost model")
        root = model_folder(model)
        index = read_index(root)
        self.pipeline = index["_class_name"]
        library, self.denoiser_class = index[self.facts.denoiser]
        if self.denoiser_class not in CALLS:
            raise ValueError(f"no cost model for {self.denoiser_class} yet (paragen/pipelines/cost/inputs.py lists "
                             f"the denoisers it can trace: {', '.join(CALLS)})")
        # torch's own `to`: diffusers' would warn about modules it keeps in float32, which a trace does not load
        self.denoiser = torch.nn.Module.to(build_empty(library, self.denoiser_class, root / self.facts.denoiser,
                                                       buffers=True), dtype)
        self.vae = torch.nn.Module.to(build_empty(*index["vae"], root / "vae", buffers=True), dtype)
        self.index = index
        self.text = text_tokens(self.pipeline)

    @functools.lru_cache(maxsize=64)
    def call(self, batch: int, frames: int, rows: int, columns: int) -> Trace:
        """One denoiser call on a latent of `frames × rows × columns`."""
        latent = Latent(batch, frames, rows, columns, self.text)
        return trace_call(self.denoiser, CALLS[self.denoiser_class](self.denoiser.config, latent, self.dtype))

    @functools.lru_cache(maxsize=8)
    def decode(self, frames: int, rows: int, columns: int) -> Trace:
        """The VAE's decode of one latent."""
        channels = self.facts.vae.latent_channels
        shape = (1, channels, frames, rows, columns) if self.facts.frames is not None or frames > 1 else (
            1, channels, rows, columns)
        z = torch.empty(shape, device="meta", dtype=self.dtype)
        return trace_call(_Decoder(self.vae), {"z": z})

    def sketch(self) -> Any:
        """The pipeline as the workloads' checks see it: its class, its denoiser(s) and config, no weights."""
        import diffusers
        from diffusers.configuration_utils import FrozenDict

        cls = getattr(diffusers, self.pipeline)
        pipe = cls.__new__(cls)
        object.__setattr__(pipe, "_internal_dict", FrozenDict(self.index))
        for name in (self.facts.denoiser, "transformer_2"):  # Wan2.2's second expert has the first's architecture
            if (self.index.get(name) or [None])[0]:
                object.__setattr__(pipe, name, self.denoiser)
        return pipe


class _Decoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> Any:
        return self.vae.decode(z)


def guidance_calls(cost: ModelCost, request: Any, cfg: int) -> tuple[int, int]:
    """(Batch of one denoiser call on a rank, calls per step on a rank)."""
    kind = GUIDANCE.get(cost.pipeline, "batched")
    distilled = cost.denoiser.config.get("time_cond_proj_dim") is not None  # a consistency-distilled UNet
    scale = request.guidance_scale
    guided = kind != "embedded" and not distilled and (scale is None or scale > 1)
    if not guided:
        return 1, 1
    if kind == "separate":  # one call per branch; cfg=2 puts them on different ranks
        return 1, 2 // cfg
    return 2 // cfg, 1


def _assignments(degrees: tuple[str, ...], world: int):
    """Every assignment of `degrees` whose product is `world` (cfg 1 or 2)."""
    choices = [registry.DEGREE_CHOICES.get(d, [v for v in range(1, world + 1) if world % v == 0]) for d in degrees]
    for values in itertools.product(*choices):
        if math.prod(values) == world:
            yield tuple(zip(degrees, values))


def _options(workload: registry.Workload, request: Any) -> list[Any]:
    """The option sets worth planning: each exchange mode, or the default temporal attention."""
    if workload.options is ExchangeConfig:
        return [ExchangeConfig(mode=mode) for mode in MODES]
    return [workload.options()]


def layouts(cost: ModelCost, request: Any, job: str, world: int) -> tuple[list[Layout], list[str]]:
    """The layouts the registry accepts for `request` on `world` ranks, and why the others were refused."""
    accepted, refused = [], []
    sketch = cost.sketch()
    for workload in registry.job_workloads(job):
        if cost.pipeline not in workload.accepts or not workload.planned:
            continue
        if workload.name not in EXCHANGES:
            refused.append(f"{workload.name}: no cost model for its exchanges yet")
            continue
        for degrees in _assignments(workload.degrees, world):
            exchanging = any(value > 1 for name, value in degrees if name != "cfg")
            for options in _options(workload, request)[: None if exchanging else 1]:  # no exchange: no mode
                layout = Layout(workload.name, degrees, options)
                try:
                    config = workload.resolve(layout.config(), world)
                    workload.check(sketch, config, options)
                    workload.check_request(request, config, options)
                except (ValueError, TypeError) as error:
                    refused.append(f"{layout.describe()}: {error}")
                    continue
                accepted.append(layout)
    return accepted, refused


def _latent(cost: ModelCost, request: Any) -> tuple[int, int, int]:
    frames = getattr(request, "frames", None)
    latent_frames = 1 if frames is None else (frames - 1) // cost.facts.vae.temporal + 1
    return latent_frames, request.height // cost.facts.vae.factor, request.width // cost.facts.vae.factor


def _split(layout: Layout, rank: int, frames: int = 1, aspect: float = 1.0) -> exchange.Split:
    """How `layout` cuts a call on `frames` latent frames of `aspect` rows per column, for band `rank`."""
    degrees = dict(layout.degrees)
    clip = degrees.get("clip", 1)
    seen = 0.0
    if clip > 1:  # a middle clip: its halo on both sides and the global frames it does not hold
        outside = frames - frames // clip
        scope = getattr(layout.options, "scope", "dual")
        count = outside if scope == "full" else 2 * layout.options.local + layout.options.global_frames
        seen = min(outside, count) / frames
    return exchange.Split(cfg=degrees.get("cfg", 1), patch=degrees.get("patch", 1), ulysses=degrees.get("ulysses", 1),
                          ring=degrees.get("ring", 1), clip=clip, mode=layout.mode,
                          fraction=getattr(layout.options, "partial_fraction", 0.3), rank=rank, seen=seen,
                          aspect=aspect)


def step_messages(cost: ModelCost, request: Any, layout: Layout, world: int, stale: bool,
                  rank: int) -> list[exchange.Message]:
    """What band `rank` (patch layouts; the others' ranks are alike) exchanges in one step's layers: fresh, or in a
    stale step of displaced and partial modes."""
    latent = _latent(cost, request)
    split = _split(layout, rank, latent[0], latent[1] / latent[2])
    batch, calls = guidance_calls(cost, request, split.cfg)
    trace = cost.call(batch, *latent)
    known = EXCHANGES[layout.workload]
    if known.layers == "patch":  # conv_in reads the latent every rank holds, unless it is centred first
        local = () if cost.denoiser.config.get("center_input_sample") else ("conv_in",)
        found = exchange.patch_messages(trace, split, stale, known.prefix, local)
    else:
        found = exchange.sequence_messages(trace, split, stale, known.prefix)
    return [dataclasses.replace(m, bytes=calls * m.bytes, calls=calls * m.calls) for m in found]


def output_messages(cost: ModelCost, request: Any, layout: Layout, world: int) -> list[exchange.Message]:
    """The step's output gathered on every rank (`exchange.output_messages`)."""
    latent = _latent(cost, request)
    split = _split(layout, 0, latent[0])
    batch, calls = guidance_calls(cost, request, split.cfg)
    known = EXCHANGES[layout.workload]
    call_bytes = calls * cost.call(batch, *latent).output_bytes
    return exchange.output_messages(call_bytes, split, world, known.prefix, known.output)


def request_steps(layout: Layout, steps: int) -> tuple[int, int]:
    """(Steps exchanging fresh, steps publishing stale data) of a request under `layout`."""
    if layout.mode == "sync":
        return steps, 0
    return exchange.request_exchanges(steps, layout.options.warmup_steps, layout.workload == "patch")


def request_bytes(cost: ModelCost, request: Any, layout: Layout, world: int, rank: int) -> dict[str, int]:
    """Bytes `rank` receives over the whole request, by the run report's labels (its `comm_per_rank`)."""
    fresh, stale = request_steps(layout, request.steps)
    total: dict[str, int] = {}
    parts = ((fresh, step_messages(cost, request, layout, world, False, rank)),
             (stale, step_messages(cost, request, layout, world, True, rank) if stale else []),
             (request.steps, output_messages(cost, request, layout, world)))
    for count, messages in parts:
        for message in messages:
            total[message.label] = total.get(message.label, 0) + count * message.bytes
    return total


def predict(cost: ModelCost, request: Any, layout: Layout, placement: Placement, device: DeviceProfile) -> Plan:
    """The cost of `request` under `layout` (module docstring of `cost.model`), for the busiest rank (a middle
    band)."""
    split = _split(layout, 0)
    rank = 1 if split.patch > 2 else 0
    batch, calls = guidance_calls(cost, request, split.cfg)
    frames, rows, columns = _latent(cost, request)
    trace = cost.call(batch, frames, rows, columns)
    compute_s, attention_s = compute_time(trace, 1.0 / (split.shards * split.clip), device, placement, ring=split.ring)
    compute_s, attention_s = calls * compute_s, calls * attention_s
    world, degrees = placement.world, dict(layout.degrees)

    output = output_messages(cost, request, layout, world)

    def cost_of(stale: bool) -> StepCost:
        messages = step_messages(cost, request, layout, world, stale, rank) + output
        return step_cost(compute_s, attention_s, messages, degrees, placement, device)

    fresh_steps = min(request_steps(layout, request.steps)[0], request.steps)
    stale = cost_of(True) if layout.mode != "sync" else None
    decode = cost.decode(frames, rows, columns)
    decode_share = 1.0 / world if getattr(request, "frames", None) is None else 1.0
    decode_s = compute_time(decode, decode_share, device, placement)[0]
    config = registry.find(cost.pipeline, layout.options).resolve(layout.config(), world)
    shape = memory_estimate.model_shape(cost.model)
    memory = 0
    if shape is not None:
        job = memory_estimate.plan_job(shape, request, config, world, _element(cost.dtype), layout.options)
        memory = memory_estimate.need(job).bytes
    room = device.room(min(world, placement.gpus_per_node))
    return Plan(layout, cost_of(False), stale, request.steps, fresh_steps, decode_s, memory, memory <= room)


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rank_plans(request: Any, job: str, placement: Placement, device: DeviceProfile,
               dtype: torch.dtype) -> tuple[list[Plan], list[str]]:
    """Every legal layout of `request` on `placement.world` ranks, those that fit the device's memory first, each
    group fastest first (`ranked`), and the refused ones with why."""
    cost = model_cost(request.model, dtype)
    found, refused = layouts(cost, request, job, placement.world)
    return ranked([predict(cost, request, layout, placement, device) for layout in found]), refused


def ranked(plans: list[Plan]) -> list[Plan]:
    """`plans` that fit first, each group by predicted request time; a layout predicted within `TIE` of a faster
    one that computes stale data goes before it when it is exact (sync): exactness is not traded for noise."""
    order = sorted(plans, key=lambda plan: (not plan.fits, plan.request_s))
    for i, plan in enumerate(order):
        exact = next((p for p in order[i:] if p.fits == plan.fits and _exact(p)
                      and p.request_s <= plan.request_s * (1 + TIE)), None)
        if not _exact(plan) and exact is not None:
            order.remove(exact)
            order.insert(i, exact)
    return order


def _exact(plan: Plan) -> bool:
    return plan.layout.mode == "sync"


@functools.lru_cache(maxsize=4)
def model_cost(model: str, dtype: torch.dtype) -> ModelCost:
    """The model's traced parts (built once per model and dtype)."""
    return ModelCost(model, dtype)
