"""Workload `hires`: SD / SDXL beyond the training size — training-size windows over the ranks, steered by a
low-resolution view (asynchronous structure guidance), checkpointed every K steps."""
from paragen.pipelines.hires.runtime import HiresRuntime, check, install

__all__ = ["HiresRuntime", "check", "install"]
