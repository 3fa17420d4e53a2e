"""The LLM runtime's parts in one process: attention merges, the stores, selection, config checks, the
passkey prompt, and `generate` through the sharded cache against transformers' `DynamicCache`."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from paragen.kernels.attention import (
    causal_attention_with_lse,
    grouped_query_attention_with_lse,
    merge_attention_partials,
    repeat_kv,
)
from paragen.kernels.chunk_fetch import ChunkFetcher
from paragen.parallel import ParallelConfig
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.parallel.llm.dense_store import DenseStore
from paragen.parallel.llm.host_store import HostStore
from paragen.parallel.llm.offload_store import OffloadStore
from paragen.parallel.llm.shards import shard_bounds
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.llm.passkey import ASK, DIGITS, KEY, decode_key, key_tokens, make_prompt


def _qkv(seed: int, heads=4, kv_heads=2, length=64, dim=16, queries=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, queries or length, dim, generator=g)
    k = torch.randn(1, kv_heads, length, dim, generator=g)
    v = torch.randn(1, kv_heads, length, dim, generator=g)
    return q, k, v


def test_lse_merge_of_disjoint_parts_equals_attention_over_their_union():
    q, k, v = _qkv(0, queries=3)
    full = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2))
    cuts = [(0, 10), (10, 41), (41, 64)]
    parts = [grouped_query_attention_with_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in cuts]
    # a part that saw no key (lse -inf) must not change the result
    parts.append((torch.zeros_like(parts[0][0]), torch.full_like(parts[0][1], float("-inf"))))
    out, lse = merge_attention_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    assert torch.allclose(out, full, atol=1e-5)
    scores = (q @ repeat_kv(k, 2).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)


def test_causal_and_grouped_attention_match_sdpa():
    q, k, v = _qkv(1)
    out, _ = causal_attention_with_lse(q, repeat_kv(k, 2), repeat_kv(v, 2))
    assert torch.allclose(out, F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True), atol=1e-5)
    out, _ = grouped_query_attention_with_lse(q, k, v)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2)), atol=1e-5)


def _rope_table(dim: int):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))

    def rope(positions):
        angles = positions.float().unsqueeze(-1) * inv
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()
    return rope


def _stores(keys_pre, values, kv: KVConfig, start=100):
    from paragen.kernels.rope import apply_rope

    rope = _rope_table(keys_pre.shape[-1])
    cos, sin = rope(torch.arange(start, start + keys_pre.shape[2]))
    keys = apply_rope(keys_pre, cos, sin)
    fetcher = ChunkFetcher(torch.device("cpu"))
    return DenseStore(keys, values, grows=True), OffloadStore(keys_pre, keys, values, start, rope, kv, True, fetcher), fetcher


def test_offload_store_at_full_rank_and_budget_equals_dense():
    q, k, v = _qkv(2, length=203, dim=16, queries=1)
    dense, offload, fetcher = _stores(k, v, KVConfig(mode="offload", rank=2 * 16, budget=1.0, window=11))
    for _ in range(2):  # the second step reuses every chunk
        got, got_lse = offload.attend(q, 0.25)
        want, want_lse = dense.attend(q, 0.25)
        assert torch.allclose(got, want, atol=1e-4) and torch.allclose(got_lse, want_lse, atol=1e-4)
    extra_k, extra_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    dense.append(extra_k, extra_v)
    offload.append(extra_k, extra_v)
    assert torch.allclose(offload.attend(q, 0.25)[0], dense.attend(q, 0.25)[0], atol=1e-4)
    fetcher.close()


def test_host_store_streams_blocks_to_the_same_attention_as_dense():
    _, k, v = _qkv(2, length=203, dim=16, queries=1)
    fetcher = ChunkFetcher(torch.device("cpu"))
    dense, host = DenseStore(k, v, grows=True), HostStore(k, v, True, fetcher, block=50)  # 5 blocks, the last of 3
    block_q, block_k, block_v = _qkv(2, length=4, dim=16, queries=4)
    got, got_lse = host.append_and_attend(block_q, block_k, block_v, 0.25)  # a verification block of 4 tokens
    want, want_lse = dense.append_and_attend(block_q, block_k, block_v, 0.25)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got_lse, want_lse, atol=1e-5)
    assert host.fetched_bytes == 2 * 203 * 2 * 16 * 4  # the 203 held tokens' K and V, both heads, fp32
    host.truncate(205)  # two of the four drafted tokens rejected
    dense.truncate(205)
    assert torch.equal(host.tokens()[0], dense.tokens()[0])
    q = block_q[:, :, :1]
    assert torch.allclose(host.append_and_attend(q, block_k[:, :, :1], block_v[:, :, :1], 0.25)[0],
                          dense.append_and_attend(q, block_k[:, :, :1], block_v[:, :, :1], 0.25)[0], atol=1e-5)
    assert host.device_bytes() == 0 and host.host_bytes() == dense.device_bytes()
    fetcher.close()


def test_a_planted_needle_is_selected_and_chunks_are_reused():
    g = torch.Generator().manual_seed(3)
    length, dim, chunk = 4096, 32, 8
    keys = 0.3 * torch.randn(1, 2, length, dim, generator=g)
    values = torch.randn(1, 2, length, dim, generator=g)
    needle = 1234  # in chunk 154
    direction = torch.randn(dim, generator=g)
    keys[:, :, needle] = 12 * direction / direction.norm()
    kv = KVConfig(mode="offload", budget=1 / 64, rank=2 * dim, chunk=chunk, outliers=0.0)
    dense, offload, fetcher = _stores(keys, values, kv, start=0)
    # the query looks for the needle's post-RoPE key
    needle_key = dense.tokens()[0][:, :, needle]
    query = needle_key.unsqueeze(2).repeat_interleave(2, dim=1)
    offload.attend(query, 1 / math.sqrt(dim))
    chosen = offload._resident[0]
    assert (chosen == needle // chunk).any(dim=-1).all(), chosen
    assert offload.count == math.ceil(length / 64 / chunk)
    fetched = offload.fetched_bytes
    assert fetched == offload.count * chunk * dim * 4 * 2  # every chunk of both heads fetched once
    out, _ = offload.attend(query, 1 / math.sqrt(dim))
    assert offload.fetched_bytes == fetched  # the same chunks again: nothing fetched
    want, _ = dense.attend(query, 1 / math.sqrt(dim))
    assert torch.allclose(out, want, atol=2e-2)  # the needle dominates both
    fetcher.close()


def test_kv_config_and_shards_refuse_bad_values():
    with pytest.raises(ValueError, match=r"budget is a fraction of the context in \(0, 1\]"):
        KVConfig(budget=0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        KVConfig(budget=1.5)
    with pytest.raises(ValueError, match="larger than the key width allows"):
        KVConfig(mode="offload", rank=65).key_rank(64)
    assert KVConfig().key_rank(1024) == 160
    with pytest.raises(ValueError, match="kv mode"):
        KVConfig(mode="sparse")
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    with pytest.raises(ValueError, match="cannot be cut"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match=r"seq \(3\) × tp \(1\) = 3, but the world size is 2"):
        ParallelConfig(seq=3).resolve(2)
    with pytest.raises(ValueError, match=r"cfg=2: this layout splits by seq, tp only"):
        ParallelConfig(seq=2, cfg=2).resolve(4)


def test_passkey_prompt_holds_the_key_where_it_says():
    prompt = make_prompt(1000, 0.25, torch.Generator().manual_seed(5))
    tokens = prompt.tokens.tolist()
    assert len(tokens) == 1000 and tokens[-1] == ASK and tokens[prompt.key_index] == KEY
    assert decode_key(tokens[prompt.key_index + 1: prompt.key_index + 1 + DIGITS]) == prompt.key
    assert abs(prompt.key_index / 1000 - 0.25) < 0.02
    assert decode_key(key_tokens("012345")) == "012345" and decode_key([0] * DIGITS) == "??????"


@pytest.mark.parametrize("kv", [KVConfig(mode="dense"), KVConfig(mode="offload", rank=4 * 32, budget=1.0)],
                         ids=["dense", "offload-full"])
def test_generate_through_the_sharded_cache_equals_dynamic_cache(kv):
    model = load_llm("tiny-llama")
    ids = torch.randint(3, 92, (1, 333), generator=torch.Generator().manual_seed(4))
    want = model.generate(ids, **cache_argument(DynamicCache()), max_new_tokens=5, do_sample=False, top_k=None,
                          top_p=None, output_logits=True, return_dict_in_generate=True)
    runtime = parallelize_llm(model, ParallelConfig(), kv)
    cache = runtime.new_cache()
    got = model.generate(ids, **cache_argument(cache), max_new_tokens=5, do_sample=False, top_k=None, top_p=None,
                         output_logits=True, return_dict_in_generate=True)
    cache.close()
    assert torch.equal(got.sequences, want.sequences)
    assert torch.allclose(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4)
    assert cache.get_seq_length() == 333 + 4 and len(runtime.step_seconds) == 4
    # without a sharded cache the model is the stock one
    again = model.generate(ids, **cache_argument(DynamicCache()), max_new_tokens=5, do_sample=False, top_k=None, top_p=None)
    assert torch.equal(again, want.sequences)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_share_the_path(family):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=92, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = (Qwen2ForCausalLM(Qwen2Config(**shape)) if family == "qwen2"
             else MistralForCausalLM(MistralConfig(sliding_window=None, **shape))).eval()
    ids = torch.randint(3, 92, (1, 150), generator=torch.Generator().manual_seed(6))
    want = model.generate(ids, **cache_argument(DynamicCache()), max_new_tokens=4, do_sample=False, top_k=None,
                          top_p=None, output_logits=True, return_dict_in_generate=True)
    runtime = parallelize_llm(model, ParallelConfig(), KVConfig())
    got = model.generate(ids, **cache_argument(runtime.new_cache()), max_new_tokens=4, do_sample=False, top_k=None,
                         top_p=None, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.allclose(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4)


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=92, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=64))
    with pytest.raises(ValueError, match="sliding-window"):
        parallelize_llm(model, ParallelConfig(), KVConfig())
