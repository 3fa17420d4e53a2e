"""Workload `wan`: Wan2.1/2.2 text-to-video transformers with the video tokens sharded along the sequence
(Ulysses, Ring, both; exact), CFG branches over rank halves, the VAE decode in time chunks over the ranks."""
from paragen.pipelines.wan.runtime import WanRuntime, check, install

__all__ = ["WanRuntime", "check", "install"]
