"""The step cache of one pipeline: which steps compute the denoiser, what it keeps of the others, on every rank alike.

Decisions are per denoising step and the same on every rank by construction:
- `fbcache` and `teacache` read the first block's output of the step's first denoiser call. Each rank sums
  |probe − reference| and |reference| over its own shard (its band, token shard, clip, guidance branch), and one
  all-reduce of three numbers (the two sums and "a rank has no reference") over every rank gives each the relative
  L1 change of the whole batch, as one process computes it. A call whose probe does not count (`counts`: Wan's
  unconditional branch on the ranks of `cfg=2`, where one process decides on the conditional call) adds zeros.
- `taylorseer` follows a schedule of the step index.
Every later call of the step (the unconditional call, the other windows) follows the step's decision.

What is kept is per call of the step (`Site`: the first call, the second, or a key the runtime gives, such as a
window) and per rank: the residual the rest of the denoiser added to the first block's output on this rank's
shard (DiTs), or the deep features a UNet's last skipped block gave (UNets). It is never sent, so it is never mixed
with another rank's layout; a site whose shard changed shape computes.

In the displaced and partial modes (a stale `plan`), a served step publishes nothing: the layers that run in it (the
UNet's last up block and output layers; TaylorSeer's head) read what the last computed step published and keep it,
and the next computed step reads it too — data k steps old after k − 1 served steps, from the step whose residual
or features the served steps reused — then publishes again. The first block of fbcache and teacache runs before
anyone knows whether its step will be served, so it runs exact (fresh exchanges, nothing published) in every step.
The cache serves no step before the mode's first stale step, so that the last warm-up step has published.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from paragen.comms import GroupComm
from paragen.parallel.step_cache.config import StepCacheConfig
from paragen.parallel.steps import StepPlan

Value = tuple[torch.Tensor | None, ...]


@dataclass
class Site:
    """One denoiser call of each step, on this rank: its probe reference, TeaCache's sum, the head output of the
    call being computed, and the kept value with its Taylor factors (value, first difference, …)."""

    reference: torch.Tensor | None = None
    accumulated: float = 0.0
    anchor: Value | None = None
    factors: list[Value] = field(default_factory=list)
    last_step: int = -1
    shape: tuple[int, ...] | None = None  # the probe's shape when last computed (the shard it keeps values for)
    extra: dict[str, Any] = field(default_factory=dict)  # what a family's hooks remember of a computed call

    @property
    def kept(self) -> bool:
        return bool(self.factors)


class StepCache:
    """One pipeline's step cache over the ranks of `comm` (all of them); `plan`: the denoiser's step plan, told which
    steps are served and where the probe runs exact."""

    def __init__(self, config: StepCacheConfig, comm: GroupComm, plan: StepPlan | None = None) -> None:
        self.config, self.comm, self.plan = config, comm, plan
        self.counts = True  # whether the current call's probe counts in the step's decision
        self.sites: dict[Any, Site] = {}
        self.step = 0
        self.calls = 0
        self.decisions: dict[int, bool] = {}  # step → computed
        self.changes: dict[int, float] = {}  # step → the probe's relative change it was decided on
        self.forwards = {"computed": 0, "served": 0}
        self.current: Site | None = None
        self.computing = True
        self.last: dict[str, Any] | None = None  # the finished request's record
        self._key: Any = None

    # ---- request and step boundaries -----------------------------------------------------------
    def begin_request(self) -> None:
        self.sites, self.step, self.calls, self.decisions, self.changes = {}, 0, 0, {}, {}
        self.forwards = {"computed": 0, "served": 0}
        self.current, self.computing, self.counts = None, True, True

    def end_request(self) -> None:
        """Keep the request's record (`last`) and drop every kept tensor."""
        self.last = self.record()
        self.sites, self.current = {}, None

    def end_step(self) -> None:
        """After the scheduler's step: the next call is the next step's first. A step this rank made no call in (a
        hires rank while the low-resolution view alone runs) is recorded as its schedule says."""
        self._follow_schedule()
        if self.plan is not None:
            self.plan.serving = False
        self.step += 1
        self.calls = 0

    @contextlib.contextmanager
    def keyed(self, key: Any) -> Iterator[None]:
        """The calls made inside are the site `key` (a runtime whose calls vary in order from step to step)."""
        self._key = key
        try:
            yield
        finally:
            self._key = None

    # ---- one call --------------------------------------------------------------------------------
    def open_call(self, denoiser: str) -> Site:
        """At the head of a call of the pipeline's `denoiser` (its name): the call's site."""
        key = (denoiser, self.calls if self._key is None else self._key)
        self.calls += 1
        self.current = self.sites.setdefault(key, Site())
        return self.current

    @property
    def start(self) -> int:
        """The first step the cache may serve: the configured start, and never before the mode's first stale step."""
        first_stale = None if self.plan is None else self.plan.first_stale_step
        return max(self.config.start, first_stale or 0)

    def head_scope(self) -> contextlib.AbstractContextManager:
        """Where the head runs: a schedule decides its step now (a served step publishes nothing, from its head on);
        a probed cache that may serve runs its head exact in every step (it cannot know yet, and the layers that
        publish must be the same in every step that publishes)."""
        self._follow_schedule()
        if not self.config.probed or self.plan is None or self.config.threshold == 0.0:
            return contextlib.nullcontext()
        return self.plan.exact()

    def decide(self, site: Site, probe: torch.Tensor) -> bool:
        """Whether this call computes the rest of the denoiser (the step's decision; a site with nothing kept, or kept
        for another shape, computes)."""
        self._follow_schedule()
        if self.step not in self.decisions:
            self._record(self._agree(site, probe))
        self.computing = self.decisions[self.step] or not site.kept or site.shape != tuple(probe.shape)
        if self.computing:
            site.shape = tuple(probe.shape)
        self.forwards["computed" if self.computing else "served"] += 1
        return self.computing

    def store(self, site: Site, value: Value) -> None:
        """At the end of a computed call: keep what the rest of the denoiser gave (with its Taylor differences)."""
        value = tuple(None if v is None else v.detach() for v in value)
        factors = [value]
        if self.config.method == "taylorseer" and site.kept:
            gap = self.step - site.last_step
            for order in range(min(self.config.order, len(site.factors))):
                factors.append(tuple(None if a is None else (a - b) / gap
                                     for a, b in zip(factors[order], site.factors[order])))
        site.factors, site.last_step = factors, self.step

    def served(self, site: Site) -> Value:
        """What a served call uses in place of the rest of the denoiser: the kept value, or its Taylor forecast."""
        gap = self.step - site.last_step
        total: list[torch.Tensor | None] = list(site.factors[0])
        for order, term in enumerate(site.factors[1:], start=1):
            scale = gap ** order / math.factorial(order)
            total = [None if t is None else t + scale * d for t, d in zip(total, term)]
        return tuple(total)

    # ---- the decision ----------------------------------------------------------------------------
    def _record(self, computed: bool) -> None:
        """The step's decision, on every rank alike; a served step publishes nothing."""
        self.decisions[self.step] = computed
        if not computed and self.plan is not None:
            self.plan.serving = True

    def _follow_schedule(self) -> None:
        """taylorseer: this step's decision by its index alone (once, whichever of its calls comes first)."""
        if not self.config.probed and self.step not in self.decisions:
            self._record(self.step < self.start or (self.step - self.start) % self.config.interval == 0)

    def _agree(self, site: Site, probe: torch.Tensor) -> bool:
        """fbcache and teacache: this step's decision from the probe of its first call, agreed over the ranks."""
        config, step, start = self.config, self.step, self.start
        previous = site.reference
        if config.method == "teacache" or step < start or previous is None:
            site.reference = probe.detach()
        if step < start:
            return True
        change = self._change(previous, probe)
        if change is not None:
            self.changes[step] = change
        if config.method == "teacache":
            site.accumulated += 0.0 if change is None else change
            computed = change is None or site.accumulated >= config.threshold
            if computed:
                site.accumulated = 0.0
            return computed
        computed = change is None or change >= config.threshold
        if computed:
            site.reference = probe.detach()
        return computed

    def _change(self, previous: torch.Tensor | None, probe: torch.Tensor) -> float | None:
        """The relative L1 change of the probe over every rank's shard; None where a rank has no reference."""
        missing = previous is None or previous.shape != probe.shape
        sums = torch.zeros(3, dtype=torch.float64, device=probe.device)
        sums[2] = float(missing)
        if self.counts and not missing:
            sums[0] = (probe - previous).abs().sum(dtype=torch.float64)
            sums[1] = previous.abs().sum(dtype=torch.float64)
        if self.comm.size > 1:
            self.comm.all_reduce(sums, "cache.decide")
        changed, scale, lacking = sums.tolist()
        if lacking or scale == 0.0:
            return None
        return changed / scale

    # ---- the report ------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """This rank's account of the request: which steps computed the denoiser and which were served."""
        config = self.config
        settings = ({"threshold": config.threshold} if config.probed else
                    {"interval": config.interval, "order": config.order})
        return {"method": config.method, **settings, "start": self.start,
                "computed_steps": [s for s, c in sorted(self.decisions.items()) if c],
                "cached_steps": [s for s, c in sorted(self.decisions.items()) if not c],
                "forwards": dict(self.forwards), **({"changes": dict(self.changes)} if config.probed else {})}
