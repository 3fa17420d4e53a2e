"""Benchmark of long-context decoding on this machine: transformers' DynamicCache against paragen's
sequence-sharded KV cache, dense and offloaded (ShadowKV), on the embedded passkey model.

Configurations (one rank is one core here, as on a cluster one rank is one GPU; 1 thread per rank):
  dynamic_1x1   the stock model with `transformers.DynamicCache()` in one process: no paragen runtime
                (`parallelize_llm` is not called; the prompt's causal mask is skipped for SDPA's
                `is_causal`, so the prefill runs the flash kernel without a dense L×L mask)
  dense_2r      paragen, seq=2 on 2 ranks, `KVConfig(mode="dense")`: ring-attention prefill, exact K/V
                of each half on its rank, decode attention merged by log-sum-exp
  offload_1x1   paragen, seq=1 in one process, `KVConfig(mode="offload")` with its defaults (budget 1/64,
                key rank 160/1024 of the key width = 10 of 64, chunks of 8 tokens, window 32, outliers 1/256)
  offload_2r    the same offload store on each of 2 ranks (seq=2)
  spec_1x1      paragen, seq=1, `KVConfig(mode="speculative")`: TriForce over the dense store — the target over a
                retrieval cache (4096 tokens, capped at the prompt: sink 16, recent 64, top chunks of 8 by landmark
                score) drafts gamma = 6 tokens, one forward of 7 tokens over the full cache verifies them
  spec_2r       the same on 2 ranks (seq=2): the chunks are chosen over both shards, the retrieval cache and the
                drafting live on rank 0, the verification merges across the ranks
  spec_draft_2r spec_2r with the embedded `tiny-passkey-draft` (1 layer) over a StreamingLLM cache (16 sink, 256
                in all) drafting 4 tokens per check by the retrieval level

Workload: the embedded `tiny-passkey` model (2 layers, hidden 128, 4 query heads and 2 key/value heads of
width 32, 131072 positions; random weights if its safetensors are missing, then every answer is wrong).
A context of C tokens is a prompt of C − new_tokens tokens (`paragen.pipelines.llm.passkey.make_prompt`: filler,
a 6-digit key, the question) followed by the new_tokens generated greedily, so the longest request fills
the model's last position. At each context every configuration answers the same `--keys` prompts (seeded
by context and index), their keys at depths (i + ½)/keys; the answer is the first 6 new tokens read by
`decode_key`, and accuracy is the share of prompts whose answer equals the key. The longest context this
machine can hold is bounded here by the model's positions (131072), not by memory: the report records both.

Each configuration runs in fresh processes, one per context and round (the order repeats over rounds,
so slow drifts of the machine hit all alike), after one warm-up request of 256 prompt tokens in the same
process. Time is measured on rank 0 by a `LogitsProcessor` that stamps `time.perf_counter()` every time
`generate` hands it a forward's logits, i.e. once per generated token: prefill = first stamp − the start
of the `generate` call (with the broadcast of the last shard's logits); decode = the intervals between
consecutive stamps, i.e. the 2nd, 3rd, … generated token, each interval holding one decode forward plus
generate's own work for one token (token choice, cache bookkeeping). Decode tokens/s of a request =
intervals / their sum. Spreads (median, p10–p90) pool every request of every round. Peak RSS is each
rank's `ru_maxrss` (model, libraries, warm-up included), the largest over rounds.

KV bytes are read from the caches at the end of each request (after its last decode step), per rank:
  DynamicCache  keys and values of every layer: exactly the tokens held (prompt + new − 1), all "device";
                every decode step concatenates one token onto each layer's K and V, a copy of the whole cache
  DenseStore    (`paragen/parallel/llm/dense_store.py`) the allocated capacity of the shard's exact post-RoPE
                K and V: the shard's tokens, plus on the last rank (which stores generated tokens) 64 + L/64
                spare slots for them
  OffloadStore  (`paragen/parallel/llm/offload_store.py`) on the device: the SVD factors of the pre-RoPE keys
                of the chunked part (left [S_c, r], right [r, Hkv·D]), one landmark per chunk and key head,
                the outlier mask, the outlier chunks' exact K and V, last step's selected chunks (rebuilt K,
                fetched V) and the exact tail (`DenseStore`: tokens after the last whole chunk — on the last
                shard at least the 32-token window — and the generated tokens, with its spare slots);
                on the host: the values of the chunked part. Fetched bytes = host→device value chunks.
On this CPU machine "device" and "host" are the same memory: the split is what would sit on a GPU.
Fetched bytes per decoded token = a request's fetched bytes / its decode steps (new tokens − 1).
Overlap of the fetch (offload): per rank, the milliseconds per decoded token spent rebuilding keys (and
applying RoPE) while the value fetch was in flight, and the milliseconds then left waiting for the fetch
(`OffloadStore.rebuild_s`, `fetch_wait_s`); a wait near zero means the fetch hid behind the rebuild.

Bytes per request and rank, per label (b = 4 bytes per fp32 element; N ranks; B = 1 prompt; Hq, Hkv
query and key/value heads, D their width, V the vocabulary, ℓ layers; shard i holds L_i prompt tokens,
rank r is shard r; `paragen/comms/group.py` counts what it puts on the wire):
  llm_ring_kv         prefill, per layer: rank r < N−1 sends Σ_{i≤r} 2·B·Hkv·L_i·D·b (its own block, then
                      each earlier block it received, forwarded once), the last rank sends nothing; rank r
                      receives Σ_{i<r} 2·B·Hkv·L_i·D·b (only the earlier shards, which causal attention uses)
  llm_prefill_logits  once: the last rank sends (N−1)·B·V·b, every other rank receives B·V·b
  llm_decode_merge    per decode step and layer: sent = received = (N−1)·B·Hq·(D+1)·b (the all-gather of each
                      rank's partial output and its log-sum-exp; 528 bytes for N = 2 here, 1056 per token
                      over the 2 layers)
A single rank moves nothing. The driver evaluates the formula on the shapes and shard bounds the worker
recorded and compares it with `CommStats` for every request of every rank.

Speculative decoding has no per-token step: a round (draft, verification, refresh) yields kept + 1 tokens and
each is given an equal share of the round's time (`bench/llm_worker.py`); its device KV bytes are the full
cache's plus, on rank 0, the retrieval cache's. Its bytes per request add, besides the merge of each
verification (the formula's merge over the verified tokens, Σ(gamma_i + 1), instead of one per token):
  llm_spec_tokens     per round, rank 0 sends (N−1)·8·gamma_i bytes of drafted token ids, every other rank receives 8·gamma_i
  llm_spec_decision   rank 0 sends (N−1)·8 for the first token, then (N−1)·16 per round (kept, next); the others receive
  llm_retrieval_query once: the last rank sends (N−1)·ℓ·B·Hq·D·b (the prompt's last query per layer)
  llm_retrieval_*     the chunk scores and the chosen K/V depend on the selection: measured, not in the formula
Speculative against paragen dense (`speculative_vs_dense`): spec_2r's and spec_draft_2r's decode tokens/s over
dense_2r's, and whether their tokens equal dense_2r's; the goal: identical tokens and >= 2x at 32K and 128K.

Summary at each context: offload_1x1 decode tokens/s ÷ dynamic_1x1's and the device KV bytes ratio
offload_1x1 / dynamic_1x1, with both accuracies; the targets at 32768 tokens: offload ≥ 3× the tokens/s of
DynamicCache with ≤ 1/6 of its device KV bytes and the same passkey accuracy.

    python bench/bench_llm.py [--contexts 8192 32768 131072] [--rounds 2] [--new-tokens 32] [--keys N]
        [--only offload_1x1,offload_2r]
        → bench/results/llm_cpu.json (with --only, merged into the existing report)

A configuration that cannot run at a context (longer than the model's positions, or whose worker fails,
e.g. killed for memory) is recorded as skipped with the reason instead of stopping the benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, median_ratio, report_header, rerun_plan, run_worker, spread

from paragen.pipelines.llm.loading import llm_config_dict

WORKER = ROOT / "bench" / "llm_worker.py"
CONFIGS = {  # name -> (worker --kv, ranks, threads per rank)
    "dynamic_1x1": ("stock", 1, 1),
    "dense_2r": ("dense", 2, 1),
    "offload_1x1": ("offload", 1, 1),
    "offload_2r": ("offload", 2, 1),
    "spec_1x1": ("speculative", 1, 1),
    "spec_2r": ("speculative", 2, 1),
    "spec_draft_2r": ("speculative_draft", 2, 1),
}
SPEC_VS_DENSE = {"spec_2r": "dense_2r", "spec_draft_2r": "dense_2r"}
SPEC_GOAL = 2.0  # speculative decode tokens/s over paragen dense's, at 32K and 128K
MEASURED_ONLY = ("llm_retrieval_scores", "llm_retrieval_kv")  # bytes depend on the chunks chosen
BASELINE = "dynamic_1x1"
DEFAULT_CONTEXTS = (8192, 32768, 131072)
TARGET_CONTEXT = 32768
TARGETS = {"tokens_per_s_ratio_ge": 3.0, "device_kv_ratio_le": 1 / 6}
MANY_KEYS_UP_TO = 32768  # default --keys: 4 prompts up to this context, 1 beyond


# ---- the formula --------------------------------------------------------------------------------
def formula_request(shape: dict, bounds: list[list[int]], rank: int, decode_steps: int, batch: int,
                    gammas: list[int] | None = None) -> dict:
    """Bytes {label: {sent, recv}} rank `rank` should move in one request (`gammas`: the tokens drafted per
    verification, speculative; `decode_steps` then counts the verified tokens)."""
    ranks = len(bounds)
    if ranks == 1:
        return {}
    lengths = [stop - start for start, stop in bounds]
    b = 4  # the K/V blocks, logits and merged partials are fp32
    kv_token = 2 * batch * shape["kv_heads"] * shape["head_dim"] * b
    layers = shape["layers"]
    logits = batch * shape["vocab"] * b
    last = rank == ranks - 1
    merge = decode_steps * layers * (ranks - 1) * batch * shape["q_heads"] * (shape["head_dim"] + 1) * b
    rows = {
        "llm_ring_kv": {"sent": 0 if last else layers * sum(lengths[: rank + 1]) * kv_token,
                        "recv": layers * sum(lengths[:rank]) * kv_token},
        "llm_prefill_logits": {"sent": (ranks - 1) * logits if last else 0, "recv": 0 if last else logits},
        "llm_decode_merge": {"sent": merge, "recv": merge},
    }
    if gammas is not None:
        def broadcast(size: int, src: int) -> dict:
            return {"sent": (ranks - 1) * size if rank == src else 0, "recv": 0 if rank == src else size}

        rows.update(llm_spec_tokens=broadcast(8 * sum(gammas), 0), llm_spec_decision=broadcast(8 + 16 * len(gammas), 0),
                    llm_retrieval_query=broadcast(layers * batch * shape["q_heads"] * shape["head_dim"] * b, ranks - 1))
    return rows


def merge_bytes_per_token(shape: dict, ranks: int, batch: int = 1) -> int:
    """Decode-merge bytes each rank sends per generated token, over all layers: ℓ·(N−1)·B·Hq·(D+1)·4."""
    return shape["layers"] * (ranks - 1) * batch * shape["q_heads"] * (shape["head_dim"] + 1) * 4


def bytes_check(results: list[dict]) -> list[dict]:
    """Per rank and label: measured and formula bytes of one request, and whether every request matched."""
    report = []
    for r in range(len(results[0]["ranks"])):
        labels: dict[str, dict] = {}
        for res in results:
            for req in res["ranks"][r]["requests"]:
                want = formula_request(res["shape"], req["bounds"], r, req.get("verified_tokens", len(req["decode_s"])),
                                       res["batch"], req.get("gammas"))
                for label in sorted(set(want) | set(req["comm"]) - set(MEASURED_ONLY)):
                    got = req["comm"].get(label, {"bytes_sent": 0, "bytes_recv": 0})
                    expected = want.get(label, {"sent": 0, "recv": 0})
                    row = labels.setdefault(label, {
                        "measured_sent": got["bytes_sent"], "formula_sent": expected["sent"],
                        "measured_recv": got["bytes_recv"], "formula_recv": expected["recv"], "match": True})
                    row["match"] &= (got["bytes_sent"], got["bytes_recv"]) == (expected["sent"], expected["recv"])
        report.append({"rank": r, "labels": labels})
    return report


# ---- one configuration at one context -------------------------------------------------------------
def _summarise(results: list[dict], ranks: int, threads: int) -> dict:
    """One configuration at one context, over rounds: times, accuracy, KV bytes per rank, bytes vs formula."""
    first = results[0]
    timed = [req for res in results for req in res["ranks"][0]["requests"]]
    steps = [len(req["decode_s"]) for req in timed]
    checks = bytes_check(results)
    per_rank = []
    for r in range(len(first["ranks"])):
        reqs = [req for res in results for req in res["ranks"][r]["requests"]]
        waits = {label: statistics.fmean(req["comm"].get(label, {"wait_s": 0.0})["wait_s"] for req in reqs)
                 for label in sorted({k for req in reqs for k in req["comm"]})}
        per_rank.append({
            "rank": r, "shard": reqs[0]["bounds"][r],
            "device_bytes": max(req["device_bytes"] for req in reqs),
            "device_bytes_after_prefill": _largest(req["device_bytes_after_prefill"] for req in reqs),
            "host_bytes": max(req["host_bytes"] for req in reqs),
            "fetched_bytes_per_token": statistics.fmean(req["fetched_bytes"] / max(1, len(req["decode_s"]))
                                                        for req in reqs),
            "rebuild_ms_per_token": statistics.fmean(1000 * req["rebuild_s"] / max(1, len(req["decode_s"])) for req in reqs),
            "fetch_wait_ms_per_token": statistics.fmean(1000 * req["fetch_wait_s"] / max(1, len(req["decode_s"]))
                                                        for req in reqs),
            "comm_wait_s_per_request": waits,
            "peak_rss_mib": max(res["ranks"][r]["peak_rss_mib"] for res in results),
        })

    def total(key: str) -> float:
        return sum(row[key] for row in per_rank)

    correct = [req["correct"] for req in timed]
    return {
        "ranks": ranks, "threads_per_rank": threads, "kv": first["kv"], "prompt_tokens": first["prompt_tokens"],
        "keys": first["keys"], "rounds": len(results), "requests": len(timed),
        "prefill_s": spread([req["prefill_s"] for req in timed]),
        "decode_tokens_per_s": spread([n / sum(req["decode_s"]) for n, req in zip(steps, timed)]),
        "decode_ms_per_token": spread([1000 * s for req in timed for s in req["decode_s"]]),
        "request_s": spread([req["request_s"] for req in timed]),
        "accuracy": sum(correct) / len(correct),
        "answers": [{"key": req["key"], "answer": req["answer"], "depth": req["depth"], "key_index": req["key_index"]}
                    for req in first["ranks"][0]["requests"]],
        "new_tokens": [req["new_tokens"] for req in first["ranks"][0]["requests"]],
        "rounds_agree": all(res["ranks"][0]["requests"][i]["new_tokens"] == req["new_tokens"]
                            for res in results for i, req in enumerate(first["ranks"][0]["requests"])),
        "device_bytes": total("device_bytes"),
        "device_bytes_after_prefill": None if None in [row["device_bytes_after_prefill"] for row in per_rank]
        else total("device_bytes_after_prefill"),
        "host_bytes": total("host_bytes"), "fetched_bytes_per_token": total("fetched_bytes_per_token"),
        "per_rank": per_rank,
        "merge_bytes_per_token_per_rank": merge_bytes_per_token(first["shape"], ranks, first["batch"]),
        "bytes_per_request": checks,
        "bytes_formula_matches": all(row["match"] for rank in checks for row in rank["labels"].values()),
        **({"speculative": _speculative_summary(timed)} if "speculative" in timed[0] else {}),
    }


def _largest(values) -> int | None:
    """The largest of byte counts, None if any is unknown (speculative: not read after the prefill)."""
    values = list(values)
    return None if None in values else max(values)


def _speculative_summary(timed: list[dict]) -> dict:
    """Rank 0's speculative counts, pooled over requests: TriForce's acceptance rate (accepted / drafted), mean
    kept tokens per verification, refreshes, bytes per verification, the retrieval cache's bytes."""
    reports = [req["speculative"] for req in timed]
    drafted, accepted = sum(r["drafted"] for r in reports), sum(r["accepted"] for r in reports)
    verifications = sum(r["verifications"] for r in reports)
    draft_drafted = sum(r["draft_model"]["drafted"] for r in reports)
    return {
        "drafted": drafted, "accepted": accepted, "verifications": verifications,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_per_verification": accepted / max(1, verifications),
        "refreshes": sum(r["refreshes"] for r in reports),
        "bytes_per_verification": statistics.fmean(r["bytes_per_verification"] for r in reports),
        "retrieval_bytes": max(req["retrieval_bytes"] for req in timed),
        "draft_model_acceptance_rate": (sum(r["draft_model"]["accepted"] for r in reports) / draft_drafted
                                        if draft_drafted else None),
        "draft_s": statistics.fmean(r["draft_s"] for r in reports),
        "verify_s": statistics.fmean(r["verify_s"] for r in reports),
        "refresh_s": statistics.fmean(r["refresh_s"] for r in reports),
    }


def summary_lines(report: dict) -> list[str]:
    """offload_1x1 against dynamic_1x1 at each context, then the targets (printed by the bench and the plot)."""
    lines = []
    for context, rows in report["summary"].items():
        row = rows.get("offload_1x1")
        if row:
            lines.append(f"{context:>7}: offload_1x1 {row['tokens_per_s_ratio']:.2f}x the tokens/s of DynamicCache with "
                         f"{row['device_kv_ratio']:.3f} of its device KV (1/{1 / row['device_kv_ratio']:.1f}); passkey "
                         f"{row['accuracy']:.2f} vs {row['baseline_accuracy']:.2f}")
    for context, rows in report.get("speculative_vs_dense", {}).items():
        for name, row in rows.items():
            lines.append(f"{context:>7}: {name} {row['tokens_per_s_ratio']:.2f}x the tokens/s of {row['versus']} "
                         f"(goal {SPEC_GOAL:.0f}x), identical tokens: {row['identical_tokens']}, acceptance "
                         f"{row['acceptance_rate']}")
    return lines + [f"targets at {TARGET_CONTEXT}: {report['targets']}"]


def skip_reason(context: int, new_tokens: int, positions: int) -> str | None:
    """Why no configuration can run at `context` (None: it can)."""
    if context > positions:
        return f"the model has {positions} positions, fewer than the {context} of this context"
    if context - new_tokens < 16:
        return f"a prompt of {context - new_tokens} tokens is too short for the passkey task"
    return None


def _run(name: str, context: int, round_index: int, args, keys: int, tmp: str) -> dict | str:
    """One worker run; its result, or why it failed."""
    kv, ranks, threads = CONFIGS[name]
    out = Path(tmp) / f"{name}_{context}_{round_index}.json"
    worker_args = ["--model", args.model, "--kv", kv, "--context", str(context), "--keys", str(keys),
                   "--new-tokens", str(args.new_tokens), "--warmup-tokens", str(args.warmup_tokens)]
    try:
        result = run_worker(WORKER, f"{name} @ {context}", worker_args, ranks, threads, out)
    except (RuntimeError, OSError, ValueError) as error:
        return f"worker failed in round {round_index + 1}: {_failure(str(error))}"
    result.pop("image")  # the generated tokens, also in the JSON
    return result


def _failure(message: str) -> str:
    """The telling lines of a failed worker's stderr: its last error and, under torchrun, the exit code."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|Exception)\b|Killed|can't open", line)
              and "ChildFailedError" not in line]
    exits = [line for line in lines if line.startswith("exitcode")]
    return "; ".join(errors[-1:] + exits[-1:]) or (lines[-1] if lines else "no output (killed, e.g. for memory?)")


# ---- the report ---------------------------------------------------------------------------------
def _versus_baseline(configs: dict, context: str) -> dict:
    """At one context: every configuration against dynamic_1x1 (decode speed, prefill speed, device KV)."""
    base = configs.get(BASELINE, {}).get("contexts", {}).get(context)
    out = {}
    for name, c in configs.items():
        mine = c["contexts"].get(context)
        if base is None or mine is None or "skipped" in mine or "skipped" in base:
            continue
        pair = {BASELINE: base, name: mine}
        prompts = zip(base["answers"], mine["answers"], base["new_tokens"], mine["new_tokens"])
        agree = [a == b for p, q, x, y in prompts if (p["key"], p["depth"]) == (q["key"], q["depth"])
                 for a, b in zip(x, y)]
        out[name] = {
            "tokens_per_s_ratio": median_ratio(pair, name, BASELINE, "decode_tokens_per_s"),
            "prefill_speedup": median_ratio(pair, BASELINE, name, "prefill_s"),
            "device_kv_ratio": mine["device_bytes"] / base["device_bytes"],
            "accuracy": mine["accuracy"], "baseline_accuracy": base["accuracy"],
            "same_tokens_as_baseline": sum(agree) / len(agree) if agree else None,  # same prompts only
        }
    return out


def speculative_vs_dense(configs: dict, context: str) -> dict:
    """At one context: each speculative configuration's decode tokens/s over paragen dense's, and whether its
    tokens equal dense's on every prompt."""
    out = {}
    for name, dense in SPEC_VS_DENSE.items():
        mine = configs.get(name, {}).get("contexts", {}).get(context)
        base = configs.get(dense, {}).get("contexts", {}).get(context)
        if mine is None or base is None or "skipped" in mine or "skipped" in base:
            continue
        ratio = median_ratio({dense: base, name: mine}, name, dense, "decode_tokens_per_s")
        out[name] = {"versus": dense, "tokens_per_s_ratio": ratio, "goal_met": ratio >= SPEC_GOAL,
                     "identical_tokens": mine["new_tokens"] == base["new_tokens"],
                     "acceptance_rate": mine["speculative"]["acceptance_rate"],
                     "mean_accepted_per_verification": mine["speculative"]["mean_accepted_per_verification"]}
    return out


def _targets(summary: dict) -> dict | None:
    """The issue's targets for offload_1x1 against DynamicCache at 32K tokens (None where it did not run)."""
    row = summary.get(str(TARGET_CONTEXT), {}).get("offload_1x1")
    if row is None:
        return None
    speed, kv = row["tokens_per_s_ratio"], row["device_kv_ratio"]
    return {"context": TARGET_CONTEXT, "tokens_per_s_ratio": speed, "device_kv_ratio": kv,
            "tokens_per_s_ge_3x": speed >= TARGETS["tokens_per_s_ratio_ge"],
            "device_kv_le_one_sixth": kv <= TARGETS["device_kv_ratio_le"],
            "same_accuracy": row["accuracy"] == row["baseline_accuracy"],
            "accuracy": row["accuracy"], "baseline_accuracy": row["baseline_accuracy"]}


def longest_context(config: dict) -> dict:
    """What bounds the context on this machine: the model's positions, or the RAM a dense fp32 KV cache
    fills (the KV alone: weights and activations are small next to it for this model)."""
    positions = config["max_position_embeddings"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"model_positions": positions, "ram_bytes": ram, "dense_kv_bytes_per_token": per_token,
            "dense_kv_tokens_ram_holds": ram // per_token, "longest": min(positions, ram // per_token),
            "bound_by": "model positions" if positions <= ram // per_token else "memory"}


def _keys(context: int, args) -> int:
    return args.keys if args.keys is not None else (4 if context <= MANY_KEYS_UP_TO else 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-passkey")
    p.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS),
                   help="tokens per request: prompt + generated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--keys", type=int, default=None,
                   help=f"passkey prompts per context (default 4 up to {MANY_KEYS_UP_TO} tokens, 1 beyond)")
    p.add_argument("--warmup-tokens", type=int, default=256,
                   help="prompt tokens of the warm-up request (speculative: at least the retrieval budget)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llm_cpu.json"))
    args = p.parse_args()
    names, previous = rerun_plan(p, args, CONFIGS, list(CONFIGS), ("model", "new_tokens", "warmup_tokens"))

    longest = longest_context(llm_config_dict(args.model))
    positions = longest["model_positions"]
    print(f"longest context: {longest['longest']} tokens, bound by {longest['bound_by']} (the model has {positions} "
          f"positions; {longest['ram_bytes'] / 2**30:.0f} GiB of RAM would hold "
          f"{longest['dense_kv_tokens_ram_holds']} tokens of dense KV)", file=sys.stderr)

    runs: dict[str, dict[int, list[dict] | str]] = {name: {} for name in names}
    for context in args.contexts:
        reason = skip_reason(context, args.new_tokens, positions)
        for name in names:
            if reason:
                runs[name][context] = reason
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
            for context in args.contexts:
                for name in names:
                    if isinstance(runs[name].get(context), str):
                        continue  # skipped, or failed in an earlier round
                    result = _run(name, context, round_index, args, _keys(context, args), tmp)
                    if isinstance(result, str):
                        print(f"  {name} @ {context}: skipped, {result}", file=sys.stderr)
                        runs[name][context] = result
                    else:
                        runs[name].setdefault(context, []).append(result)

    configs = dict(previous.get("configs", {}))
    for name, by_context in runs.items():
        kv, ranks, threads = CONFIGS[name]
        entry = configs.setdefault(name, {"kv": kv, "ranks": ranks, "threads_per_rank": threads, "contexts": {}})
        for context, results in by_context.items():
            entry["contexts"][str(context)] = ({"skipped": results} if isinstance(results, str)
                                               else _summarise(results, ranks, threads))
        entry["contexts"] = dict(sorted(entry["contexts"].items(), key=lambda kv: int(kv[0])))
    configs = {n: configs[n] for n in CONFIGS if n in configs}
    contexts = sorted({int(c) for entry in configs.values() for c in entry["contexts"]})
    summary = {str(c): _versus_baseline(configs, str(c)) for c in contexts}
    report = {
        **report_header("llm"),
        "workload": {"model": args.model, "contexts": contexts, "new_tokens": args.new_tokens,
                     "warmup_tokens": args.warmup_tokens, "rounds": args.rounds,
                     "keys": {**previous.get("workload", {}).get("keys", {}),
                              **{str(c): _keys(c, args) for c in args.contexts}},
                     "prompt": "context − new_tokens tokens; key at depths (i + ½)/keys; greedy decoding",
                     "decode_times": "rank 0's LogitsProcessor stamps, from the 2nd generated token on",
                     "kv_bytes": "read from the caches at the end of each request; summed over ranks"},
        "longest_context": longest,
        "rerun": names if previous else None,
        "summary": summary,
        "targets": _targets(summary),
        "speculative_vs_dense": {str(c): speculative_vs_dense(configs, str(c)) for c in contexts},
        "bytes_formula_matches": {n: {c: row["bytes_formula_matches"] for c, row in entry["contexts"].items()
                                      if "skipped" not in row} for n, entry in configs.items()},
        "configs": configs,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("configs", "machine", "bytes_formula_matches")},
                     indent=2))
    _print_rows(report)


def _print_rows(report: dict) -> None:
    """One line per configuration and context, then offload_1x1 against DynamicCache per context."""
    for context in report["workload"]["contexts"]:
        for name, entry in report["configs"].items():
            c = entry["contexts"].get(str(context))
            if c is None:
                continue
            if "skipped" in c:
                print(f"{context:>7} {name:12s} skipped: {c['skipped']}")
                continue
            memory = "/".join(f"{r['peak_rss_mib']:.0f}" for r in c["per_rank"])
            print(f"{context:>7} {name:12s} prefill {c['prefill_s']['median']:7.2f} s  "
                  f"decode {c['decode_tokens_per_s']['median']:7.1f} tok/s  "
                  f"device KV {c['device_bytes'] / 2**20:8.2f} MiB  host {c['host_bytes'] / 2**20:7.2f} MiB  "
                  f"fetched {c['fetched_bytes_per_token'] / 2**10:6.1f} KiB/tok  accuracy {c['accuracy']:.2f}  "
                  f"RSS {memory} MiB  bytes = formula: {c['bytes_formula_matches']}")
    print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
