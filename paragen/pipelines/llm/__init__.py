"""Workload `llm`: Llama, Qwen2 and Mistral with the prompt cut into sequence shards (ring-attention prefill,
decode merged by log-sum-exp), each shard's KV cache dense or offloaded (ShadowKV), weights split by `tp`."""
from paragen.pipelines.llm.runtime import LLMRuntime, check, install, parallelize_llm

__all__ = ["LLMRuntime", "check", "install", "parallelize_llm"]
