"""Sequence parallelism for diffusion transformers: token shards, Ulysses, Ring and displaced attention."""
from paragen.parallel.sequence.attention import SequenceAttention
from paragen.parallel.sequence.context import SequenceContext
from paragen.parallel.sequence.layout import shard_bounds, shard_sizes

__all__ = ["SequenceAttention", "SequenceContext", "shard_bounds", "shard_sizes"]
