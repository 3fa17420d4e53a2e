"""`generate_speculative`: lossless hierarchical speculative decoding (TriForce) with a model parallelised
under `KVConfig(mode="speculative")`, with `generate`'s sampling arguments.

It is a paragen function rather than a `model.generate` path: transformers' hook for a custom draft
source (its candidate generator) is not a public, stable API, and its assisted decoding crops a cache
on every rank one token at a time, where this verifies a block in one sharded forward and lets only the
drafting rank draft. The machinery is `paragen.parallel.llm.speculative`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paragen.parallel.interrupt import Watch
from paragen.parallel.llm.attention import shard_attention
from paragen.parallel.llm.cache import AttendingCache, ShardedKVCache
from paragen.parallel.llm.local_cache import LocalCache, StreamingCache, empty_stores
from paragen.parallel.llm.retrieval import DRAFTING_RANK
from paragen.parallel.llm.speculative import Sampling, SpeculativeStats, prefill_streaming, speculative_generate
from paragen.pipelines.llm.runtime import check_prompt_length, forward_tokens
from paragen.pipelines.registry import CAUSAL_LMS


@dataclass
class SpeculativeOutput:
    """The prompt and its new tokens `[1, L + new]`, the statistics, and the caches (for accounting): the full
    sharded cache, and on the drafting rank the retrieval cache (None elsewhere)."""

    sequences: torch.Tensor
    stats: SpeculativeStats
    cache: ShardedKVCache
    retrieval: LocalCache | None


def check_draft(target_config, draft_config, same_tokenizer: bool = True) -> None:
    """Refuse a draft model that does not speak the target's tokens: another vocabulary size, a tokenizer the
    caller found different (`same_tokenizer`), or an architecture paragen cannot attend for."""
    architectures = getattr(draft_config, "architectures", None) or []
    if architectures and not set(architectures) & set(CAUSAL_LMS):
        raise ValueError(f"the draft model is a {architectures[0]}; a draft must be one of {', '.join(CAUSAL_LMS)}")
    if draft_config.vocab_size != target_config.vocab_size or not same_tokenizer:
        raise ValueError(f"the draft model's tokenizer differs from the target's (vocabularies of "
                         f"{draft_config.vocab_size} and {target_config.vocab_size} tokens{'' if same_tokenizer else ', different tokens'}): "
                         "a draft must share the target's tokenizer")


def check_speculative(model: nn.Module, prompt_tokens: int, batch: int, new_tokens: int,
                      draft_model: nn.Module | None = None) -> None:
    """Refuse what speculative decoding cannot run, before any collective (the same answer on every rank)."""
    runtime = model.paragen
    if runtime.kv.mode != "speculative":
        raise ValueError(f"speculative decoding needs a model parallelised with KVConfig(mode='speculative'), not "
                         f"{runtime.kv.mode!r}")
    if batch != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time (batch 1), got a batch of {batch}")
    if new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {new_tokens}")
    check_prompt_length(prompt_tokens, new_tokens, model.config.max_position_embeddings, runtime.config.seq)
    runtime.kv.speculative.check_context(prompt_tokens)
    if draft_model is not None:
        check_draft(model.config, draft_model.config)
        check_prompt_length(prompt_tokens, new_tokens, draft_model.config.max_position_embeddings, 1)


def _forward(model: nn.Module):
    def forward(ids: torch.Tensor, positions: torch.Tensor, cache: AttendingCache) -> torch.Tensor:
        return forward_tokens(model, ids, positions, cache)[0]

    return forward


def _streaming_draft(draft_model: nn.Module, prompt: torch.Tensor, sink: int, window: int):
    """The draft model, its attention routed through paragen caches, with a StreamingLLM cache holding the prompt."""
    if not getattr(draft_model, "_paragen_draft", False):
        for layer in draft_model.model.layers:
            shard_attention(layer.self_attn)
        draft_model._paragen_draft = True
    config = draft_model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    weight = next(draft_model.parameters())
    stores = empty_stores(config.num_hidden_layers, 1, config.num_key_value_heads, head_dim, weight.dtype, weight.device)
    forward = _forward(draft_model)
    cache = StreamingCache(stores, sink, window)
    prefill_streaming(forward, cache, prompt)
    return forward, cache


@torch.no_grad()
def generate_speculative(
    model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, do_sample: bool = False,
    temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, draft_model: nn.Module | None = None,
    watch: Watch | None = None,
) -> SpeculativeOutput:
    """Greedy or sampled continuation of `input_ids [1, L]`, token for token what the model would generate
    with its full cache (greedy), or from its distribution (sampling, with `temperature` and `top_p`; the
    drafting rank's generator seeded by `seed`). Every rank calls it with the same arguments; `draft_model`
    (optional, sharing the tokenizer) is the third level and runs on the drafting rank; `watch` may stop it
    between rounds and receives the tokens as they are accepted (`paragen.parallel.interrupt`)."""
    runtime = model.paragen
    check_speculative(model, input_ids.shape[1], input_ids.shape[0], max_new_tokens, draft_model)
    spec, sampling = runtime.kv.speculative, Sampling(do_sample, temperature, top_p, seed)
    target = runtime.model
    cache = runtime.new_cache()
    first = runtime.prefill(input_ids, cache)[0, -1]
    draft = None
    if draft_model is not None and cache.comm.rank == DRAFTING_RANK:
        draft = _streaming_draft(draft_model, input_ids[0], spec.draft_sink, spec.draft_window)
    tokens, stats, retrieval = speculative_generate(_forward(target), cache, first, spec, sampling, max_new_tokens,
                                                    draft, watch)
    new = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
    return SpeculativeOutput(torch.cat([input_ids, new], dim=1), stats, cache, retrieval)
