"""Causal LMs across ranks: sequence-sharded prefill (ring attention), decode merged by log-sum-exp,
and each shard's KV cache dense or offloaded ShadowKV-style (`KVConfig`)."""
from paragen.parallel.llm.cache import ShardedKVCache, cache_argument
from paragen.parallel.llm.config import KV_MODES, KVConfig

__all__ = ["KV_MODES", "KVConfig", "ShardedKVCache", "cache_argument"]
