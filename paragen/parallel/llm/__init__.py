"""Causal LMs across ranks: sequence-sharded prefill (ring attention), decode merged by log-sum-exp,
and each shard's KV cache dense or offloaded ShadowKV-style (`KVConfig`), or decoded by lossless speculative
decoding over the dense cache (`SpeculativeConfig`, `speculative.py`)."""
from typing import Any

from paragen.parallel.llm.config import KV_MODES, KVConfig, SpeculativeConfig

__all__ = ["KV_MODES", "KVConfig", "ShardedKVCache", "SpeculativeConfig", "cache_argument"]


def __getattr__(name: str) -> Any:
    # The cache imports transformers (seconds): load it on first use, so reading KVConfig stays light.
    if name in ("ShardedKVCache", "cache_argument"):
        from paragen.parallel.llm import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'paragen.parallel.llm' has no attribute {name!r}")
