"""Sequence parallelism for diffusion transformers: token shards, Ulysses, Ring and displaced attention."""
from paragen.parallel.sequence.attention import SequenceAttention
from paragen.parallel.sequence.context import SequenceContext

__all__ = ["SequenceAttention", "SequenceContext"]
