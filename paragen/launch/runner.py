"""`paragen.JobRunner`: one job kept up in a Python program — the model loaded and parallelised once, then any
number of requests.

    runner = paragen.JobRunner("image", model="/models/sdxl", cfg=2, mode="displaced")   # after paragen.init()
    report = runner(prompt="a lighthouse", seed=3, height=1024, width=1024)            # every rank, same call

Every rank creates it with the same options and makes the same calls. The options are the command line's
(`paragen image --help`), spelt as keywords; a call's keywords are the request fields a request-file line may set
(and `name`). Outputs go to `out` (default `out/`), named by the call's `name` (default: the layout, as on the
command line). A call is checked on every rank and the verdicts gathered before it starts, so a request one rank
refuses (its memory, its folder) raises the same ValueError on every rank. `paragen serve` keeps one of these up
behind HTTP.
"""
from __future__ import annotations

import argparse
import importlib
import time
from typing import Any

from paragen.comms import is_initialized, world_comm, world_size
from paragen.launch.env import discover
from paragen.parallel.interrupt import Watch
from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.agree import agreed, attempt
from paragen.pipelines.jobs.batch import agree_prepared, checked
from paragen.pipelines.registry import JOBS


class JobRunner:
    """A prepared, loaded job (`image`, `video` or `llm`) that takes one request per call."""

    def __init__(self, command: str, **options: Any) -> None:
        """Check the options as the command line would, then load and parallelise the model (call `paragen.init()`
        first when there are several ranks)."""
        if command not in JOBS:
            raise ValueError(f"no job {command!r}; the jobs are {', '.join(JOBS)}")
        if world_size() > 1 and not is_initialized():
            raise RuntimeError("call paragen.init() before making a JobRunner")
        module = importlib.import_module(JOBS[command][0])
        parser = argparse.ArgumentParser(prog=f"paragen {command}")
        module.add_arguments(parser)
        args = parser.parse_args([])
        args.device = "auto"
        unknown = sorted(set(options) - set(vars(args)) - {"requests"})
        if unknown:
            raise TypeError(f"JobRunner({command!r}) got unknown options {', '.join(unknown)}; "
                            f"see `paragen {command} --help`")
        vars(args).update(options, requests=None)
        job, verdict = attempt(lambda _: module.prepare(args, discover()), None)
        agree_prepared(world_comm(), job, verdict)
        self.command, self.module, self.job = command, module, job
        self.load()

    @classmethod
    def prepared(cls, command: str, module: Any, job: Any) -> "JobRunner":
        """A runner for a job the command line has prepared (`module.prepare`); `load` it before `generate`."""
        runner = cls.__new__(cls)
        runner.command, runner.module, runner.job = command, module, job
        return runner

    def load(self) -> None:
        """Load and parallelise the job's model on every rank (a collective)."""
        start = time.perf_counter()
        self.state = self.module.load(self.job)
        self.load_s = time.perf_counter() - start

    def request(self, **fields: Any) -> Any:
        """The launch's request with `fields` changed (its declared types and bounds checked; no model check yet)."""
        launch_wide = sorted(set(fields) & set(schema.fields_of(type(self.job.request), (schema.LAUNCH,))) - {"name"})
        if launch_wide:
            raise TypeError(f"{', '.join(launch_wide)}: launch-wide, set when making the JobRunner")
        return schema.replace(self.job.request, **fields)

    def check(self, request: Any) -> Any:
        """The job's checks of one request on this rank (no collective); what `generate` takes."""
        return self.job.check(request)

    def checked(self, request: Any) -> Any:
        """The job's checks of one request on every rank, agreed (a collective); what `generate` takes."""
        return checked(world_comm(), self.job, request)

    def generate(self, item: Any, watch: Watch | None = None) -> dict | None:
        """Make one checked request on every rank; the report on the output rank, None on the others. The `watch`
        may stop it between steps (RequestCancelled on every rank) and receives an LLM's tokens as they come."""
        return self.module.generate(self.job, self.state, item, self.load_s, watch)

    def batch_key(self, item: Any) -> Any:
        """Checked requests with equal keys can be made together (`generate_batch`); None: this one is made alone."""
        key = getattr(self.module, "batch_key", None)
        return None if key is None else key(self.job, item)

    def generate_batch(self, items: list[Any], watch: Watch | None = None) -> list[dict] | None:
        """Make checked requests of equal `batch_key` in one call on every rank, each output the bytes it would be
        alone when the job was prepared batch-invariant; their reports on the output rank, None on the others."""
        if len(items) == 1:
            report = self.generate(items[0], watch)
            return None if report is None else [report]
        return self.module.generate_batch(self.job, self.state, items, self.load_s, watch)

    def __call__(self, **fields: Any) -> dict | None:
        """Make one request (the launch's request with `fields` changed); the report on the output rank, None on
        the others. Every rank must make the same call."""
        return agreed(world_comm(), self.generate, self.checked(self.request(**fields)))
