"""What every parallelised pipeline carries as `pipe.paragen`: config, mesh, step plan, VAE, timings,
and the request protocol its `pipe(...)` runs."""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

from paragen.comms import CommStats
from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.intercept import intercept
from paragen.parallel.steps import StepPlan
from paragen.parallel.interrupt import Watch, check_interrupt
from paragen.parallel.step_cache import StepCache, StepCacheConfig
from paragen.pipelines.vae_decode import ParallelVaeDecoder

WATCH_OPTION = "paragen_watch"  # a call option: follow the request (stop it between steps, its progress, its clips:
# `paragen.parallel.interrupt.Watch`)


@dataclass
class PipelineRuntime:
    """The request protocol of every parallelised pipeline: `install` intercepts `pipe(...)` with `call`."""

    config: ParallelConfig
    mesh: ParallelMesh
    plan: StepPlan  # the denoiser's step plan (bands of a UNet, token shards of a DiT)
    vae: ParallelVaeDecoder | None  # None: the runtime decodes its own way (video: per clip)
    step_seconds: list[float] = field(default_factory=list)
    in_request: bool = False
    watch: Watch | None = None  # the request's: its interrupt asked and its progress told before every step
    step_cache: StepCache | None = None  # the step cache its denoisers run through (`pipelines.step_cache`)
    _step_start: float = 0.0

    @property
    def stats(self) -> CommStats:
        """The `CommStats` of every group of this pipeline."""
        return self.mesh.stats

    def install(self, pipe: Any) -> None:
        """Attach the runtime as `pipe.paragen` and route `pipe(...)` through `call`."""
        pipe.paragen = self
        intercept(pipe, "__call__", lambda original, *args, **kwargs: self.call(pipe, original, *args, **kwargs), tag="request")

    def call(self, pipe: Any, original, *args, **kwargs):
        """One request: take paragen's options, check it on every rank before any collective
        (`prepare_call`), then run the pipeline's own call between `begin_request` and `end_request`.
        `paragen_watch=` (a `Watch`) may stop it between steps (RequestCancelled on every rank), is told each step
        and receives a video's clips as they are decoded."""
        watch = kwargs.pop(WATCH_OPTION, None)
        options = self.take_options(kwargs)
        bound = inspect.signature(original).bind(*args, **kwargs)
        self.prepare_call(pipe, bound, **options)
        self.begin_request()
        self.watch = watch
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            self.watch = None
            self.end_request()

    def prepare_call(self, pipe: Any, bound: inspect.BoundArguments) -> None:
        """Check the request and complete its arguments (every runtime has its own)."""
        raise NotImplementedError

    def take_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Remove and return the call options that are paragen's, not the pipeline's (none by default)."""
        return {}

    def check_step_cache(self, config: StepCacheConfig) -> None:
        """Refuse a step cache this runtime cannot run with every rank deciding alike (every method runs by default)."""

    def cache_site(self, key: Any) -> contextlib.AbstractContextManager:
        """The denoiser calls made inside are the step cache's site `key` (where calls vary in order between steps)."""
        return contextlib.nullcontext() if self.step_cache is None else self.step_cache.keyed(key)

    def begin_request(self) -> None:
        self.plan.begin_request(None)
        if self.step_cache is not None:
            self.step_cache.begin_request()
        if self.vae is not None:
            self.vae.begin_request()
        self.step_seconds = []
        self.in_request = True

    def end_request(self) -> None:
        self.in_request = False
        self.plan.end_request()
        if self.vae is not None:
            self.vae.end_request()
        if self.step_cache is not None:
            self.step_cache.end_request()

    def start_step(self, pipe: Any) -> None:
        """Before a step's denoiser forward, on every rank: stop here if the request's interrupt says so, learn the
        request's length on its first step, tell the watch which step this is, start the clock."""
        watch = self.watch
        check_interrupt(None if watch is None else watch.interrupt, "after %d denoising steps", len(self.step_seconds))
        if self.in_request and self.plan.step == -1:
            self.plan.total_steps = len(pipe.scheduler.timesteps)
        if watch is not None and watch.on_step is not None:
            watch.on_step(len(self.step_seconds), len(pipe.scheduler.timesteps))
        self._step_start = time.perf_counter()

    def emit_clip(self, index: int, count: int, frames) -> None:
        """Hand clip `index` of `count` (its decoded frames) to the request's watch, if it streams clips."""
        if self.watch is not None and self.watch.on_frames is not None:
            self.watch.on_frames(index, count, frames)

    def record_step(self) -> None:
        """After a denoiser forward and its output gather: record the step time."""
        self.step_seconds.append(time.perf_counter() - self._step_start)
