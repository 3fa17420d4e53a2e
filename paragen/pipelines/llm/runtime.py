"""Causal LMs: one request across ranks, in place (`parallelize_llm(model, config, kv)`).

Every rank builds the same model and calls `model.generate(input_ids, **cache_argument(cache), ...)`
with the same arguments and a cache from `runtime.new_cache()` (`cache=` on transformers ≥ 5.24,
`past_key_values=` before). The model's forward is intercepted: with a `ShardedKVCache` it runs the decoder on this rank's shard of the prompt (prefill)
or on the new token (decode), with every attention module routed through the cache (see
`paragen.parallel.llm.cache`); the next-token logits of the prompt come from the last shard and are
broadcast, so every rank holds the same logits and `generate` picks the same token everywhere (greedy,
or sampled with the same seed). With any other cache the model runs as before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from paragen.comms import CommStats
from paragen.parallel import ParallelConfig, ParallelMesh
from paragen.parallel.intercept import intercept
from paragen.parallel.llm.attention import shard_attention
from paragen.parallel.llm.cache import AttendingCache, ShardedKVCache, cache_argument, cache_in
from paragen.parallel.llm.config import KVConfig
from paragen.parallel.llm.tensor_parallel import check_tensor_parallel, shard_weights
from paragen.pipelines.registry import parallelize

LOGITS_LABEL = "llm_prefill_logits"


def check_prompt_length(length: int, new_tokens: int, positions: int, shards: int) -> None:
    """Refuse a prompt whose tokens plus `new_tokens` outrun the model's positions, or that the sequence
    shards cannot cut (the same answer on every rank, before any collective)."""
    if length + new_tokens > positions:
        raise ValueError(f"the prompt ({length} tokens) plus {new_tokens} new tokens exceeds the model's "
                         f"{positions} positions")
    if length < shards:
        raise ValueError(f"a prompt of {length} tokens cannot be cut into {shards} sequence shards")


@dataclass
class LLMRuntime:
    """What a parallelised causal LM carries as `model.paragen`."""

    model: nn.Module
    config: ParallelConfig
    kv: KVConfig
    mesh: ParallelMesh
    prefill_s: float = 0.0  # the last request's prompt forward
    step_seconds: list[float] = field(default_factory=list)  # its decode forwards, one per token

    @property
    def stats(self) -> CommStats:
        """Bytes, calls and waits of every group, per label."""
        return self.mesh.stats

    def new_cache(self) -> ShardedKVCache:
        """A fresh cache for one request."""
        inner = self.model.model
        rotary = inner.rotary_emb
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype

        def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # What the model's rotary embedding computes (angles from its inv_freq, scaled), for any shape
            # of positions; read at each call, so a rotary embedding that updates inv_freq is followed.
            angles = positions.unsqueeze(-1) * rotary.inv_freq
            cos, sin = angles.cos(), angles.sin()
            scale = rotary.attention_scaling
            if scale != 1.0:
                cos, sin = cos * scale, sin * scale
            return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([sin, sin], dim=-1).to(dtype)

        return ShardedKVCache(len(inner.layers), self.mesh.group("ring"), self.kv, rope, device)

    def forward_tokens(self, input_ids: torch.Tensor, start: int, cache: ShardedKVCache) -> torch.Tensor:
        """Run the decoder on `input_ids [B, L]` at positions `start…start+L-1`; logits of the last one `[B, 1, V]`."""
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return forward_tokens(self.model, input_ids, positions, cache, last_only=True)

    def prefill(self, input_ids: torch.Tensor, cache: ShardedKVCache) -> torch.Tensor:
        """The prompt's forward over the ranks (ring attention) into `cache`; the next-token logits `[B, 1, V]`,
        the same on every rank (broadcast from the last shard)."""
        check_prompt_length(input_ids.shape[1], 0, self.model.config.max_position_embeddings, self.config.seq)
        began = time.perf_counter()
        start, end = cache.begin_prefill(input_ids.shape[1])
        logits = self.forward_tokens(input_ids[:, start:end], start, cache)
        cache.end_forward()
        comm = cache.comm
        logits = comm.broadcast_async(logits.contiguous(), comm.size - 1, LOGITS_LABEL).wait()
        self.prefill_s, self.step_seconds = time.perf_counter() - began, []
        return logits


def forward_tokens(
    model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, cache: AttendingCache, last_only: bool = False
) -> torch.Tensor:
    """Run `model`'s decoder on `input_ids [B, L]` at `positions [L]` with a paragen cache; the fp32 logits after
    each token `[B, L, V]` (`last_only`: after the last, `[B, 1, V]`)."""
    inner = model.model
    positions = positions.expand(input_ids.shape[0], -1)
    hidden = inner.embed_tokens(input_ids)
    embeddings = inner.rotary_emb(hidden, positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions,
                       use_cache=True, **cache_argument(cache))
    if last_only:
        hidden = hidden[:, -1:]
    return model.lm_head(inner.norm(hidden)).float()


def _sharded_generate_forward(self: nn.Module, forward, input_ids=None, attention_mask=None, **kwargs):
    cache = cache_in(kwargs)
    if not isinstance(cache, ShardedKVCache):
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    runtime: LLMRuntime = self.paragen
    if input_ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("a sequence-sharded model takes input_ids, not inputs_embeds")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded batches are not supported by the sequence-sharded cache: give every row the same length")
    if cache.total == 0:
        logits = runtime.prefill(input_ids, cache)
    else:
        check_prompt_length(cache.total, input_ids.shape[1], self.config.max_position_embeddings, 1)
        for i in range(input_ids.shape[1]):
            began = time.perf_counter()
            logits = runtime.forward_tokens(input_ids[:, i:i + 1], cache.begin_decode(1), cache)
            cache.end_forward()
            runtime.step_seconds.append(time.perf_counter() - began)
    return CausalLMOutputWithPast(logits=logits, **cache_argument(cache))


def check(model, config: ParallelConfig, kv: KVConfig) -> None:
    """Refuse what the sharded runtime cannot run, before any collective: heads not divisible by `tp`,
    sliding-window layers, a key rank larger than the key width allows, or speculative decoding with `tp` > 1. `model`: a causal LM or its
    transformers config."""
    model_config = model.config if isinstance(model, nn.Module) else model
    check_tensor_parallel(model_config, config.tp)
    layer_types = getattr(model_config, "layer_types", None) or []
    window = getattr(model_config, "sliding_window", None)
    windowed = window is not None and getattr(model_config, "use_sliding_window", True)  # Qwen2 names a window it may not use
    if any(t != "full_attention" for t in layer_types) or windowed:
        raise ValueError("sliding-window attention layers are not supported by the sequence-sharded cache")
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    if kv.mode == "offload":
        kv.key_rank(model_config.num_key_value_heads // config.tp * head_dim)
    if kv.mode == "speculative" and config.tp != 1:
        raise ValueError("speculative decoding runs with tp = 1 (sequence shards only)")


def install(model: nn.Module, config: ParallelConfig, kv: KVConfig) -> nn.Module:
    """Shard a checked causal LM's requests over the ranks of the resolved `config` (`seq` prompt shards ×
    `tp` weight shards), in place; its runtime is `model.paragen`."""
    mesh = ParallelMesh(config, next(model.parameters()).device)
    if config.tp > 1:
        model = shard_weights(model, mesh.group("tp"), config.tp)
    for layer in model.model.layers:
        shard_attention(layer.self_attn)
    model.paragen = LLMRuntime(model=model, config=config, kv=kv, mesh=mesh)
    intercept(model, "forward", lambda forward, *args, **kwargs: _sharded_generate_forward(model, forward, *args, **kwargs), tag="llm.forward")
    return model


def parallelize_llm(model: nn.Module, config: ParallelConfig | None = None, kv: KVConfig | None = None) -> LLMRuntime:
    """Shard `model`'s requests over the ranks (`seq` prompt shards × `tp` weight shards), in place:
    `paragen.parallelize(model, config, kv)`, returning the runtime.

    Call `paragen.init()` first; the runtime (also `model.paragen`) has `new_cache()`, which makes the cache of
    each request (pass it with `paragen.cache_argument`).
    """
    return parallelize(model, config, kv).paragen
