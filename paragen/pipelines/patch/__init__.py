"""Workload `patch`: SD / SDXL split into row bands (DistriFusion-style patch parallelism, exact,
displaced or partial), CFG branches over rank halves, the VAE decode in bands."""
from paragen.pipelines.patch.runtime import ImageRuntime, check, check_request, install

__all__ = ["ImageRuntime", "check", "check_request", "install"]
