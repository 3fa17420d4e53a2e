"""One configuration of the long-context LLM benchmark at one context length (run by bench_llm.py,
alone or under torchrun).

Loads the embedded `tiny-passkey` model and either leaves it stock (`--kv stock`: transformers'
`DynamicCache` in this one process, no paragen runtime) or shards it with `parallelize_llm` over the
world's ranks (`--kv dense`, `--kv offload` or `--kv speculative`: seq = the world size; `speculative_draft` adds
the embedded `tiny-passkey-draft` as the third level). After a warm-up request it
answers `--keys` passkey prompts of `context − new_tokens` tokens each (the key at depths
(i + ½)/keys), greedily. A `LogitsProcessor` stamps `time.perf_counter()` each time `generate` hands
it the logits of a forward, i.e. once per generated token: the first stamp minus the start of the call
is the prefill, the intervals after it are the decode steps of the 2nd, 3rd, … generated token.
Speculative decoding has no per-token forward: a round (draft, one verification, a refresh if due) yields
kept + 1 tokens, and each of them is given an equal share of the round's time; its run report
(`SpeculativeStats.report`), the drafted and kept tokens per round and the verified tokens are recorded too.
Every rank reports per request its KV bytes (device, host, fetched), its `CommStats` deltas and the
shapes the driver's byte formula needs, and its peak resident memory; rank 0 writes them with the
generated tokens.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
from common import write_result
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import paragen
from paragen.comms import all_gather_objects, world_size
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.parallel.llm.config import SpeculativeConfig
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.llm.passkey import DIGITS, decode_key, make_prompt
from paragen.pipelines.llm.speculative import generate_speculative

DRAFT_MODEL = "tiny-passkey-draft"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_seed(context: int, index: int) -> int:
    """The seed of prompt `index` at `context`: every configuration answers the same prompts."""
    return 1000 * context + index


def depth(index: int, keys: int) -> float:
    """Where prompt `index` of `keys` hides its key: evenly spread, away from both ends."""
    return (index + 0.5) / keys


def dynamic_bytes(cache: DynamicCache) -> int:
    """Bytes of the keys and values a `DynamicCache` holds (all of them on the device)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


class TokenClock(LogitsProcessor):
    """Stamps every call (one per generated token) and reads the cache's device bytes at the first,
    i.e. right after the prefill; leaves the scores unchanged."""

    def __init__(self, device_bytes) -> None:
        self.device_bytes = device_bytes
        self.stamps: list[float] = []
        self.after_prefill = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.after_prefill = self.device_bytes()
        return scores


class Runner:
    """One process's model and the way it makes, measures and closes a cache per request."""

    def __init__(self, kv: str, model: str, speculative: SpeculativeConfig) -> None:
        self.model = load_llm(model)
        self.runtime = None
        self.speculative = kv.startswith("speculative")
        self.draft = load_llm(DRAFT_MODEL) if kv == "speculative_draft" else None
        if kv != "stock":
            config = paragen.ParallelConfig(seq=world_size(), tp=1)
            mode = "speculative" if self.speculative else kv
            self.runtime = parallelize_llm(self.model, config, KVConfig(mode=mode, speculative=speculative))

    def new_cache(self):
        return DynamicCache() if self.runtime is None else self.runtime.new_cache()

    def comm_snapshot(self) -> dict:
        return {} if self.runtime is None else self.runtime.mesh.stats.snapshot()

    @staticmethod
    def device_bytes(cache) -> int:
        return dynamic_bytes(cache) if isinstance(cache, DynamicCache) else cache.device_bytes()

    @staticmethod
    def close(cache) -> dict:
        """The cache's host and fetched bytes; stops its fetch worker."""
        if isinstance(cache, DynamicCache):
            return {"host_bytes": 0, "fetched_bytes": 0, "rebuild_s": 0.0, "fetch_wait_s": 0.0,
                    "bounds": [[0, cache.get_seq_length()]]}
        cache.close()
        rebuild_s, fetch_wait_s = cache.fetch_overlap_s()
        return {"host_bytes": cache.host_bytes(), "fetched_bytes": cache.fetched_bytes(), "rebuild_s": rebuild_s,
                "fetch_wait_s": fetch_wait_s, "bounds": [list(b) for b in cache.bounds]}

    def request(self, tokens: torch.Tensor, new_tokens: int) -> dict:
        """Generate greedily after `tokens`; this rank's times, bytes and new tokens."""
        if world_size() > 1:
            dist.barrier()  # every rank starts the request together
        if self.speculative:
            return self._speculative(tokens, new_tokens)
        cache = self.new_cache()
        clock = TokenClock(lambda: self.device_bytes(cache))
        before = self.comm_snapshot()
        start = time.perf_counter()
        out = self.model.generate(tokens[None], **cache_argument(cache), max_new_tokens=new_tokens, do_sample=False,
                                  top_k=None, top_p=None, logits_processor=LogitsProcessorList([clock]))
        request_s = time.perf_counter() - start
        device = self.device_bytes(cache)
        return {
            "prefill_s": clock.stamps[0] - start, "decode_s": [b - a for a, b in zip(clock.stamps, clock.stamps[1:])],
            "request_s": request_s, "new_tokens": out[0, len(tokens):].tolist(),
            "device_bytes_after_prefill": clock.after_prefill, "device_bytes": device, **self.close(cache),
            "comm": _delta(before, self.comm_snapshot()),
        }


    def _speculative(self, tokens: torch.Tensor, new_tokens: int) -> dict:
        before = self.comm_snapshot()
        start = time.perf_counter()
        out = generate_speculative(self.model, tokens[None], max_new_tokens=new_tokens, draft_model=self.draft)
        request_s = time.perf_counter() - start
        stats = out.stats
        retrieval = out.retrieval.device_bytes() if out.retrieval is not None else 0  # on the drafting rank
        return {
            "prefill_s": self.runtime.prefill_s, "decode_s": stats.token_seconds(), "request_s": request_s,
            "new_tokens": out.sequences[0, len(tokens):].tolist(), "device_bytes_after_prefill": None,
            "device_bytes": out.cache.device_bytes() + retrieval, **self.close(out.cache), "retrieval_bytes": retrieval,
            "verified_tokens": sum(gamma + 1 for gamma in stats.gammas), "speculative": stats.report(),
            "gammas": stats.gammas, "kept": stats.kept, "comm": _delta(before, self.comm_snapshot()),
        }


def model_shape(model) -> dict:
    """What the byte formulas need: layers, heads, head width, vocabulary, element size."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"layers": config.num_hidden_layers, "q_heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": head_dim, "vocab": config.vocab_size,
            "itemsize": next(model.parameters()).element_size(), "positions": config.max_position_embeddings}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-passkey")
    p.add_argument("--kv", choices=("stock", "dense", "offload", "speculative", "speculative_draft"), default="stock",
                   help="stock: DynamicCache, no paragen runtime (one process); dense/offload: paragen's KV store; "
                        "speculative: TriForce over the dense store (speculative_draft: with tiny-passkey-draft)")
    p.add_argument("--gamma", type=int, default=SpeculativeConfig.gamma, help="speculative: tokens per verification")
    p.add_argument("--retrieval-budget", type=int, default=SpeculativeConfig.budget,
                   help="speculative: retrieval cache tokens (capped at the prompt)")
    p.add_argument("--refresh-every", type=int, default=0, help="speculative: rebuild the retrieval cache every N")
    p.add_argument("--context", type=int, required=True, help="prompt + generated tokens")
    p.add_argument("--keys", type=int, default=1, help="passkey prompts (requests) to answer")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup-tokens", type=int, default=256, help="prompt length of the warm-up request")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.new_tokens < DIGITS:
        p.error(f"--new-tokens must be at least {DIGITS}: the answer is the first {DIGITS} new tokens")

    if args.kv == "stock":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--kv stock runs in one process")
        torch.set_num_threads(args.threads)
    else:
        paragen.init(threads=args.threads)
    prompt_length = args.context - args.new_tokens
    budget = min(args.retrieval_budget, prompt_length)
    # The warm-up prompt must hold the retrieval budget too (speculative).
    warm_length = min(max(args.warmup_tokens, budget if args.kv.startswith("speculative") else 0), prompt_length)
    speculative = SpeculativeConfig(gamma=args.gamma, budget=budget, refresh_every=args.refresh_every)
    runner = Runner(args.kv, args.model, speculative)

    warm = make_prompt(warm_length, 0.5, torch.Generator().manual_seed(0))
    runner.request(warm.tokens, min(4, args.new_tokens))
    requests, answers = [], []
    for i in range(args.keys):
        generator = torch.Generator().manual_seed(prompt_seed(args.context, i))
        prompt = make_prompt(prompt_length, depth(i, args.keys), generator)
        row = runner.request(prompt.tokens, args.new_tokens)
        row.update(key=prompt.key, key_index=prompt.key_index, depth=depth(i, args.keys),
                   answer=decode_key(row["new_tokens"][:DIGITS]))
        row["correct"] = row["answer"] == prompt.key
        answers.append(row["new_tokens"])
        requests.append(row)

    mine = {"requests": requests, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}
    ranks = all_gather_objects(runner.runtime.mesh.group("world"), mine) if runner.runtime is not None else [mine]
    if paragen.is_output_rank():
        result = {"kv": args.kv, "world_size": world_size(), "model": args.model, "context": args.context,
                  "prompt_tokens": prompt_length, "new_tokens": args.new_tokens, "keys": args.keys,
                  "shape": model_shape(runner.model), "batch": 1, "ranks": ranks}
        write_result(args.out, result, torch.tensor(answers))
    paragen.shutdown()


def _delta(before: dict, after: dict) -> dict:
    """Per label: what `after` counts beyond `before` (two `CommStats` snapshots)."""
    zero = {"bytes_recv": 0, "bytes_sent": 0, "wait_s": 0.0, "calls": 0}
    return {label: {k: row[k] - before.get(label, zero)[k] for k in zero}
            for label, row in after.items() if label != "total"}


if __name__ == "__main__":
    main()
