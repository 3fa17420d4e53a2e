"""Workload `dit`: PixArt, SD3 and Flux with their image tokens sharded along the sequence (Ulysses, Ring,
displaced), CFG branches over rank halves, the VAE decode in bands."""
from paragen.pipelines.dit.runtime import FAMILIES, DiTRuntime, check, install

__all__ = ["DiTRuntime", "FAMILIES", "check", "install"]
