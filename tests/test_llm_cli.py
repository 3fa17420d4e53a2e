"""`paragen llm` end to end on real ranks: a passkey answered through the offloaded cache, and bad input
refused with one clear error on every rank, before any collective, with no report written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.multiproc import check_all_ok, expect_bad_input, run_ranks, start_ranks

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)

LLM = ["-m", "paragen", "llm", "--timeout", "30"]


def test_answers_the_passkey_through_the_offloaded_cache(tmp_path):
    check_all_ok(run_ranks([*LLM, "--context", "4096", "--depth", "0.3", "--kv", "offload", "--new-tokens", "8",
                            "--out", str(tmp_path)], 2))
    (report,) = tmp_path.glob("*.json")
    data = json.loads(report.read_text())
    assert data["correct"] is True and data["answer"] == data["passkey"]
    assert data["config"]["seq"] == 2 and data["kv"]["mode"] == "offload" and data["prompt_tokens"] == 4096
    assert data["comm_per_rank"]["0"]["llm_ring_kv"]["bytes_sent"] > 0
    assert "llm_tp_all_reduce" not in data["comm_per_rank"]["0"]  # tp = 1: no tensor-parallel all-reduce
    ranks = data["kv_per_rank"]
    assert ranks["0"]["host_bytes"] > ranks["0"]["device_bytes"] > 0 and ranks["1"]["fetched_bytes_per_token"] > 0


def test_speculative_decoding_answers_the_passkey_with_the_dense_tokens(tmp_path):
    common = ["--context", "2048", "--depth", "0.6", "--new-tokens", "10"]
    check_all_ok(run_ranks([*LLM, *common, "--kv", "speculative", "--retrieval-budget", "256", "--gamma", "4",
                            "--draft", "tiny-passkey-draft", "--refresh-every", "2", "--out", str(tmp_path / "spec")], 2))
    check_all_ok(run_ranks([*LLM, *common, "--out", str(tmp_path / "dense")], 2))
    (spec,), (dense,) = (list((tmp_path / name).glob("*.json")) for name in ("spec", "dense"))
    data, want = json.loads(spec.read_text()), json.loads(dense.read_text())
    assert data["new_tokens"] == want["new_tokens"] and data["correct"] is True
    assert data["kv"]["mode"] == "speculative" and data["kv"]["speculative"]["budget"] == 256
    report = data["speculative"]
    assert report["verifications"] >= 1 and report["refreshes"] >= 1 and report["draft_model"]["checks"] >= 1
    assert report["acceptance_rate"] == report["accepted"] / report["drafted"]
    assert report["bytes_per_verification"] > 0 and data["kv_per_rank"]["0"]["retrieval_bytes"] > 0
    assert data["kv_per_rank"]["1"]["retrieval_bytes"] == 0  # the retrieval cache lives on the drafting rank


def test_a_full_cache_in_host_memory_decodes_the_dense_tokens_and_counts_its_copies(tmp_path):
    common = ["--model", "tiny-passkey-lm", "--context", "2048", "--depth", "0.4", "--new-tokens", "12"]
    check_all_ok(run_ranks([*LLM, *common, "--kv", "speculative", "--retrieval-budget", "256", "--full-cache", "host",
                            "--out", str(tmp_path / "host")], 2))
    check_all_ok(run_ranks([*LLM, *common, "--out", str(tmp_path / "dense")], 2))
    (host,), (dense,) = (list((tmp_path / name).glob("*.json")) for name in ("host", "dense"))
    data, want = json.loads(host.read_text()), json.loads(dense.read_text())
    assert data["new_tokens"] == want["new_tokens"] and data["correct"] is True
    first = data["kv_per_rank"]["0"]  # rank 0 holds the first half of the prompt and never grows
    assert first["device_bytes"] == 0 and first["host_bytes"] == 2 * 1024 * 2 * 32 * 4 * 2  # layers, tokens, kv heads, dims, fp32, K and V
    decoded = len(data["new_tokens"]) - 1  # after the prefill's token
    # every verification streams the whole shard once per layer
    assert first["fetched_bytes_per_token"] * decoded == data["speculative"]["verifications"] * first["host_bytes"]


def _checkpoint(folder: Path, *, remote: bool = False, pickle: bool = False, vocab: int | None = None) -> Path:
    config = json.loads((Path("paragen/pipelines/configs/tiny-passkey/config.json")).read_text())
    if vocab is not None:
        config["vocab_size"] = vocab
    if remote:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if pickle:
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    else:
        save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


BAD_INPUTS = {
    "prompt longer than the positions": (2, ["--context", "200000"], "exceeds the model's 131072 positions"),
    "budget zero": (2, ["--kv", "offload", "--budget", "0"], "in (0, 1]"),
    "budget above one": (1, ["--kv", "offload", "--budget", "1.5"], "in (0, 1]"),
    "rank too large": (2, ["--kv", "offload", "--rank", "65"], "larger than the key width allows"),
    "seq x tp not the world": (2, ["--seq", "3"], "seq (3) × tp (1) = 3, but the world size is 2"),
    "heads not divisible by tp": (4, ["--tp", "4"], "does not divide the model's 2 key-value heads"),
    "depth outside [0, 1]": (1, ["--depth", "1.5"], "depth must be at most 1, got 1.5"),
    "remote code": (2, ["--model", "{remote}", "--prompt", "hi"], "needs remote code"),
    "pickle weights": (2, ["--model", "{pickle}", "--prompt", "hi"], "pickle weights"),
    "gamma below one": (2, ["--kv", "speculative", "--gamma", "0"], "gamma (tokens drafted per verification) must be >= 1"),
    "retrieval budget above the prompt": (2, ["--kv", "speculative", "--context", "1024", "--retrieval-budget", "2048"],
                                          "is larger than the prompt (1024 tokens)"),
    "draft with another tokenizer": (2, ["--kv", "speculative", "--context", "1024", "--retrieval-budget", "512",
                                         "--draft", "{other_vocab}"], "tokenizer differs from the target's"),
    "draft without speculative": (2, ["--draft", "tiny-passkey-draft"], "add --kv speculative"),
    "full cache without speculative": (2, ["--kv", "offload", "--full-cache", "host"],
                                       "--full-cache places speculative decoding's full cache: add --kv speculative"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_fails_fast_on_every_rank(tmp_path, case):
    world, args, message = BAD_INPUTS[case]
    folders = {"remote": _checkpoint(tmp_path / "remote", remote=True), "pickle": _checkpoint(tmp_path / "pickle", pickle=True),
               "other_vocab": _checkpoint(tmp_path / "other_vocab", vocab=100)}
    args = [a.format(**folders) for a in args]
    procs = start_ranks([*LLM, *args, "--out", str(tmp_path / "out")], world)
    expect_bad_input(procs, message)
    assert not (tmp_path / "out").exists()
