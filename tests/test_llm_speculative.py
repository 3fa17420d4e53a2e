"""Speculative decoding (TriForce) over the sequence-sharded cache, on real ranks (gloo; 1, 2 and 4) and in
one process.

- greedy tokens equal single-process `generate` with `DynamicCache` for tiny-llama (random weights: drafts
  are mostly rejected) and tiny-passkey, with and without a draft model (random tiny-llama weights), with
  retrieval-cache refreshes, with the full cache in host memory (streamed in blocks), at uneven shard sizes
  (301 and 601 prompt tokens);
- sampling with a fixed seed gives the same tokens on 1 and 2 ranks;
- the sampler's tokens follow the target distribution: the rejection test on fixed distributions, and the
  whole pipeline's second token against the marginal computed from plain forwards (chi-square bound);
- rollback: after rejections the full cache (every rank's shard) and the retrieval cache hold exactly the
  kept tokens' keys and values, checked against a dense forward of prompt + output;
- verification merges attention once per layer: the merge all-gather's calls are layers × verifications;
- bad input (gamma < 1, a budget above the prompt, a draft of another vocabulary, batch > 1) is refused.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from paragen.kernels.speculative import sampling_probs, verify_greedy, verify_sampled
from paragen.parallel import ParallelConfig
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.parallel.llm.config import SpeculativeConfig
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.llm.passkey import make_prompt
from paragen.pipelines.llm.speculative import generate_speculative
from tests.multiproc import run_spec_worker

WORKER = "tests/workers/llm_worker.py"
NEW, LONGER = 12, 20  # new tokens; LONGER for the refresh runs, so that a refresh falls inside the request
PROMPTS = {
    "tiny-llama": torch.randint(3, 92, (301,), generator=torch.Generator().manual_seed(1)).tolist(),
    "tiny-passkey": make_prompt(601, 0.3, torch.Generator().manual_seed(3)).tokens.tolist(),
}
LAYERS = {"tiny-llama": 4, "tiny-passkey": 2}
OPTIONS = {"gamma": 4, "budget": 96, "sink": 8, "recent": 24}  # 8 chunks of 8 chosen over the whole context
RANDOM_DRAFT = {"draft": "tiny-llama", "draft_seed": 7, "draft_window": 64, "draft_sink": 4}
CHI2_DF7_P001 = 24.32  # the chi-square quantile at p = 0.001 with 7 degrees of freedom


def _spec(name: str, model: str, seq: int, **extra) -> dict:
    return {"name": name, "kind": "speculative", "model": model, "seq": seq, "prompt": PROMPTS[model],
            "new_tokens": NEW, **OPTIONS, **extra}


SAMPLED = {"sample": True, "temperature": 1.0, "top_p": 0.95, "seed": 5}
HOST = {"full_cache": "host", "host_block": 64}  # 301 and 601 tokens: several blocks, the last one partial


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    specs = [_spec("llama", "tiny-llama", 1), _spec("sampled", "tiny-llama", 1, **SAMPLED),
             _spec("passkey_draft", "tiny-passkey", 1, **RANDOM_DRAFT),
             _spec("passkey_host", "tiny-passkey", 1, **HOST)]
    return run_spec_worker(WORKER, specs, 1, tmp_path_factory.mktemp("spec1"), timeout=600)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    specs = [
        _spec("llama", "tiny-llama", 2, caches=True),
        _spec("llama_draft", "tiny-llama", 2, **RANDOM_DRAFT),
        _spec("passkey", "tiny-passkey", 2, caches=True),
        _spec("passkey_draft", "tiny-passkey", 2, **RANDOM_DRAFT),
        _spec("passkey_refresh", "tiny-passkey", 2, refresh_every=2, new_tokens=LONGER),
        _spec("sampled", "tiny-llama", 2, **SAMPLED),
        _spec("llama_host", "tiny-llama", 2, caches=True, **HOST),
    ]
    return run_spec_worker(WORKER, specs, 2, tmp_path_factory.mktemp("spec2"), timeout=600)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    specs = [_spec("llama", "tiny-llama", 4, caches=True),
             _spec("passkey_draft", "tiny-passkey", 4, caches=True, **RANDOM_DRAFT),
             _spec("passkey_low", "tiny-passkey", 4, refresh_below=0.9, new_tokens=LONGER)]
    return run_spec_worker(WORKER, specs, 4, tmp_path_factory.mktemp("spec4"), timeout=600)


def _dense_tokens(model_name: str) -> torch.Tensor:
    model = load_llm(model_name)
    ids = torch.tensor([PROMPTS[model_name]])
    out = model.generate(ids, **cache_argument(DynamicCache()), max_new_tokens=LONGER, do_sample=False, top_k=None,
                         top_p=None)
    return out[0, ids.shape[1]:]


@pytest.fixture(scope="module")
def dense():
    return {name: _dense_tokens(name) for name in PROMPTS}


CASES = [("one_rank", "llama", "tiny-llama"), ("one_rank", "passkey_draft", "tiny-passkey"),
         ("one_rank", "passkey_host", "tiny-passkey"), ("two_ranks", "llama_host", "tiny-llama"),
         ("two_ranks", "llama", "tiny-llama"), ("two_ranks", "llama_draft", "tiny-llama"),
         ("two_ranks", "passkey", "tiny-passkey"), ("two_ranks", "passkey_draft", "tiny-passkey"),
         ("two_ranks", "passkey_refresh", "tiny-passkey"), ("four_ranks", "llama", "tiny-llama"),
         ("four_ranks", "passkey_draft", "tiny-passkey"), ("four_ranks", "passkey_low", "tiny-passkey")]


@pytest.mark.slow
@pytest.mark.parametrize("fixture,name,model", CASES, ids=[f"{f}-{n}" for f, n, _ in CASES])
def test_greedy_tokens_equal_dynamic_cache(request, dense, fixture, name, model):
    result = request.getfixturevalue(fixture)[name]
    assert torch.equal(result["tokens"], dense[model][: len(result["tokens"])])
    stats = result["stats"]
    assert stats["verifications"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"]
    assert len(result["tokens"]) == stats["accepted"] + stats["verifications"] + 1  # + the prefill's token


@pytest.mark.slow
def test_drafts_are_checked_and_refreshes_happen(two_ranks, four_ranks):
    assert two_ranks["llama_draft"]["stats"]["draft_model"]["checks"] > 0
    assert four_ranks["passkey_draft"]["stats"]["draft_model"]["drafted"] > 0
    assert two_ranks["passkey_refresh"]["stats"]["refreshes"] >= 1
    assert two_ranks["passkey"]["stats"]["refreshes"] == 0
    low = four_ranks["passkey_low"]["stats"]
    assert low["refreshes"] >= 1 and low["refresh_bytes"] > 0


@pytest.mark.slow
def test_sampling_with_a_seed_is_the_same_on_one_and_two_ranks(one_rank, two_ranks, dense):
    assert torch.equal(one_rank["sampled"]["tokens"], two_ranks["sampled"]["tokens"])
    assert not torch.equal(two_ranks["sampled"]["tokens"], dense["tiny-llama"][:NEW])  # it really sampled


def _dense_kv(model_name: str, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of prompt + output[:-1] from one plain forward with a DynamicCache (the last output
    token is never fed)."""
    model = load_llm(model_name)
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.tensor([PROMPTS[model_name] + tokens[:-1].tolist()]), **cache_argument(cache), use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.slow
@pytest.mark.parametrize("fixture,name,model", [("two_ranks", "llama", "tiny-llama"), ("two_ranks", "passkey", "tiny-passkey"),
                                                ("two_ranks", "llama_host", "tiny-llama"), ("four_ranks", "llama", "tiny-llama"),
                                                ("four_ranks", "passkey_draft", "tiny-passkey")])
def test_every_cache_holds_exactly_the_kept_tokens(request, fixture, name, model):
    result = request.getfixturevalue(fixture)[name]
    assert result["stats"]["accepted"] < result["stats"]["drafted"]  # drafts were rejected and rolled back
    want = _dense_kv(model, result["tokens"])
    generated = NEW - 1
    for layer, (keys, values) in enumerate(want):
        full_keys = torch.cat([rank[layer][0] for rank in result["full"]], dim=2)
        full_values = torch.cat([rank[layer][1] for rank in result["full"]], dim=2)
        assert full_keys.shape == keys.shape and torch.allclose(full_keys, keys, atol=1e-4)
        assert torch.allclose(full_values, values, atol=1e-4)
        tail_keys, tail_values = (t[:, :, -generated:] for t in result["retrieval"][layer])
        assert torch.allclose(tail_keys, keys[:, :, -generated:], atol=1e-4)
        assert torch.allclose(tail_values, values[:, :, -generated:], atol=1e-4)
        assert result["retrieval"][layer][0].shape[2] == OPTIONS["budget"] + generated


@pytest.mark.slow
def test_a_full_cache_in_host_memory_streams_every_verification(one_rank, two_ranks):
    # rank 0's share of the prompt: all 601 tokens on one rank, the first 151 of 301 on two
    for result, model, held in ((one_rank["passkey_host"], "tiny-passkey", 601), (two_ranks["llama_host"], "tiny-llama", 151)):
        config = load_llm(model).config
        per_token = 2 * config.num_key_value_heads * config.head_dim * 4 * LAYERS[model]  # K and V, fp32, every layer
        kv, stats = result["kv"], result["stats"]
        assert kv["device_bytes"] == 0 and kv["host_bytes"] >= held * per_token
        assert kv["fetched_bytes"] >= stats["verifications"] * held * per_token  # every verification reads it all


@pytest.mark.slow
def test_verification_merges_once_per_layer(two_ranks, four_ranks):
    for result, model in ((two_ranks["llama"], "tiny-llama"), (two_ranks["passkey"], "tiny-passkey"),
                          (four_ranks["llama"], "tiny-llama")):
        merge = result["comm"]["llm_decode_merge"]
        assert merge["calls"] == LAYERS[model] * result["stats"]["verifications"]
        assert result["stats"]["bytes_per_verification"] > 0


# ---- the sampler: its tokens follow the target distribution -------------------------------------------
def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_keeps_the_target_distribution():
    p = torch.tensor([[0.05, 0.1, 0.2, 0.3, 0.05, 0.1, 0.15, 0.05], [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    q = torch.tensor([[0.3, 0.3, 0.05, 0.05, 0.1, 0.1, 0.05, 0.05]])  # far from p[0]: many rejections
    generator = torch.Generator().manual_seed(0)
    counts, drafted_kept = torch.zeros(8), 0
    trials = 20000
    for _ in range(trials):
        drafted = torch.multinomial(q[0], 1, generator=generator)
        kept, after = verify_sampled(p, q, drafted, generator)
        counts[int(drafted) if kept else after] += 1
        drafted_kept += kept
    assert _chi_square(counts, p[0]) < CHI2_DF7_P001
    assert (counts / trials - p[0]).abs().sum() / 2 < 0.02  # total variation
    # kept with probability sum_x min(p, q) = 0.6 here
    assert abs(drafted_kept / trials - float(torch.minimum(p[0], q[0]).sum())) < 0.02


def test_greedy_verification_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert verify_greedy(logits, torch.tensor([1, 0])) == (2, 2)
    assert verify_greedy(logits, torch.tensor([1, 2])) == (1, 0)
    assert verify_greedy(logits, torch.tensor([0, 0])) == (0, 1)
    probs = sampling_probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), top_p=0.75)
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))  # 0.5 + 0.3 reach 0.75
    hot = sampling_probs(torch.tensor([[1.0, 0.0]]), temperature=2.0)
    assert torch.allclose(hot, torch.softmax(torch.tensor([[0.5, 0.0]]), dim=-1))


def _small_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper distributions, so the retrieval level's differ from the full one's
    return model


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    kept = torch.zeros_like(probs)
    mass = 0.0
    for index in probs.argsort(descending=True).tolist():
        if mass >= top_p:
            break
        kept[index] = probs[index]
        mass += float(probs[index])
    return kept / kept.sum()


@pytest.mark.slow
def test_speculative_sampling_follows_the_dense_distribution():
    """The second new token (the first one drafted and verified) over many seeds, against its marginal
    Σ_a p(a | prompt) · p(x | prompt, a) from plain forwards of the model."""
    model = _small_model()
    prompt = torch.randint(0, 8, (1, 48), generator=torch.Generator().manual_seed(1))
    temperature, top_p = 1.3, 0.9
    with torch.no_grad():
        first = _top_p(torch.softmax(model(prompt).logits[0, -1] / temperature, dim=-1), top_p)
        marginal = sum(float(first[a]) * _top_p(torch.softmax(
            model(torch.cat([prompt, torch.tensor([[a]])], dim=1)).logits[0, -1] / temperature, dim=-1), top_p)
            for a in range(8))
    parallelize_llm(model, ParallelConfig(), KVConfig(mode="speculative", speculative=SpeculativeConfig(
        gamma=2, budget=12, chunk=4, sink=4, recent=4)))
    counts, drafted, accepted = torch.zeros(8), 0, 0
    runs = 2500
    for seed in range(runs):
        out = generate_speculative(model, prompt, max_new_tokens=4, do_sample=True, temperature=temperature,
                                   top_p=top_p, seed=seed)
        counts[int(out.sequences[0, prompt.shape[1] + 1])] += 1
        drafted, accepted = drafted + out.stats.drafted, accepted + out.stats.accepted
    assert accepted < 0.95 * drafted  # drafts differ from the target often enough to test the rejection path
    live = marginal > 0
    assert counts[~live].sum() == 0
    assert _chi_square(counts[live], marginal[live]) < CHI2_DF7_P001
    assert (counts / runs - marginal).abs().sum() / 2 < 0.05


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_speculative_input_is_refused():
    with pytest.raises(ValueError, match="gamma"):
        SpeculativeConfig(gamma=0)
    with pytest.raises(ValueError, match="full cache lives on one of device, host"):
        SpeculativeConfig(full_cache="disk")
    model = load_llm("tiny-llama")
    parallelize_llm(model, ParallelConfig(), KVConfig(mode="speculative", speculative=SpeculativeConfig(budget=400)))
    ids = torch.tensor([PROMPTS["tiny-llama"]])
    with pytest.raises(ValueError, match="larger than the prompt"):
        generate_speculative(model, ids, max_new_tokens=4)
    with pytest.raises(ValueError, match="batch 1"):
        generate_speculative(model, ids.repeat(2, 1), max_new_tokens=4)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="tokenizer differs"):
        generate_speculative(model, torch.cat([ids, ids], dim=1), max_new_tokens=4, draft_model=other)
    dense = load_llm("tiny-llama")
    parallelize_llm(dense, ParallelConfig(), KVConfig())
    with pytest.raises(ValueError, match="mode='speculative'"):
        generate_speculative(dense, ids, max_new_tokens=4)
