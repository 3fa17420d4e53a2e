"""Workload `dit`: every diffusion-transformer pipeline whose transformer has a sharding plan (diffusers'
`_cp_plan` or paragen's own, `plans.py`), its token streams sharded along the sequence (Ulysses, Ring, displaced),
CFG branches over rank halves, the VAE decode in bands."""
from paragen.pipelines.dit.runtime import DiTRuntime, check, install

__all__ = ["DiTRuntime", "check", "install"]
