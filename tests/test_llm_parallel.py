"""Sequence-sharded causal LMs on real ranks (gloo; 2 and 4 ranks) against one process.

- ring attention over uneven shards equals full causal attention;
- dense sharded prefill + decode equals `generate` with transformers' `DynamicCache` in one process
  (greedy tokens identical, logits within fp32 tolerance) for seq=2, seq=4 and seq=2 × tp=2 (DeepSpeed
  AutoTP), and sampled decoding with the same seed gives the same tokens;
- `offload` with the full SVD rank and a budget covering the whole context equals that reference too;
- the decode merge sends (N−1)·B·Hq·(D+1) fp32 values per layer and token from each rank.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from paragen.kernels.attention import repeat_kv
from paragen.parallel.llm import cache_argument
from paragen.pipelines.llm.loading import load_llm
from tests.multiproc import run_spec_worker
from tests.workers.llm_worker import ring_inputs

WORKER = "tests/workers/llm_worker.py"
PROMPT = torch.randint(3, 92, (301,), generator=torch.Generator().manual_seed(11)).tolist()
NEW = 6
# tiny-llama: 4 layers, 8 query heads of 32 dims
LAYERS, HEADS, DIM = 4, 8, 32


def _reference(sample: bool = False, seed: int = 0):
    model = load_llm("tiny-llama")
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([PROMPT]), **cache_argument(DynamicCache()), max_new_tokens=NEW, do_sample=sample,
                         top_k=None, top_p=None, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(PROMPT):], torch.stack(out.logits)


def _generate(name: str, seq: int, **extra) -> dict:
    return {"name": name, "kind": "generate", "model": "tiny-llama", "seq": seq, "prompt": PROMPT, "new_tokens": NEW,
            **extra}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    specs = [
        {"name": "ring", "kind": "ring", "seed": 1, "length": 97},
        _generate("dense", 2),
        _generate("sampled", 2, sample=True, seed=5),
        _generate("offload_full", 2, kv="offload", rank=4 * 32, budget=1.0),
    ]
    return run_spec_worker(WORKER, specs, 2, tmp_path_factory.mktemp("llm2"), timeout=600)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    specs = [
        {"name": "ring", "kind": "ring", "seed": 2, "length": 103},
        _generate("dense", 4),
        _generate("dense_tp2", 2, tp=2),
    ]
    return run_spec_worker(WORKER, specs, 4, tmp_path_factory.mktemp("llm4"), timeout=600)


def _check_ring(result: dict, seed: int, length: int) -> None:
    q, k, v = ring_inputs(seed, length)
    want = F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), is_causal=True, scale=0.25)
    got = torch.cat(result["parts"], dim=2)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    ring = result["stats"]["llm_ring_kv"]  # rank 0's: it sends its own block once and needs nothing
    assert ring["calls"] == len(result["parts"]) - 1 and ring["bytes_recv"] == 0
    assert ring["bytes_sent"] == result["parts"][0].numel() * 4  # K and V of 2 kv heads = 4 query heads' out


def _check_generate(result: dict, reference) -> None:
    tokens, logits = reference
    assert torch.equal(result["tokens"], tokens)
    assert (result["logits"] - logits).abs().max() < 1e-4


def test_ring_prefill_equals_full_causal_attention_2_ranks(two_ranks):
    _check_ring(two_ranks["ring"], 1, 97)


def test_ring_prefill_equals_full_causal_attention_4_ranks(four_ranks):
    _check_ring(four_ranks["ring"], 2, 103)


def test_dense_seq2_equals_dynamic_cache(two_ranks):
    _check_generate(two_ranks["dense"], _reference())


def test_dense_seq4_equals_dynamic_cache(four_ranks):
    _check_generate(four_ranks["dense"], _reference())


def test_dense_seq2_tp2_equals_dynamic_cache(four_ranks):
    _check_generate(four_ranks["dense_tp2"], _reference())


def test_sampled_decoding_matches_one_process(two_ranks):
    tokens, _ = _reference(sample=True, seed=5)
    greedy, _ = _reference()
    assert torch.equal(two_ranks["sampled"]["tokens"], tokens)
    assert not torch.equal(tokens, greedy)  # the sampled run really sampled


def test_offload_full_rank_full_budget_equals_dense(two_ranks):
    _check_generate(two_ranks["offload_full"], _reference())


def test_decode_merge_bytes_follow_the_formula(two_ranks, four_ranks):
    for result, ranks, heads in ((two_ranks["dense"], 2, HEADS), (four_ranks["dense"], 4, HEADS),
                                 (four_ranks["dense_tp2"], 2, HEADS // 2)):
        merge = result["stats"]["llm_decode_merge"]
        per_call = (ranks - 1) * heads * (DIM + 1) * 4
        assert merge["calls"] == LAYERS * (NEW - 1)
        assert merge["bytes_sent"] == per_call * merge["calls"]
