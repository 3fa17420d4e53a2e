"""Time to first token and inter-token latency of a streamed completion through `paragen serve llm`, on 1 and 2
ranks, dense and speculative, at 8K and 32K tokens of context.

Each configuration starts a server (`tiny-passkey-lm`; speculative: TriForce over a 4,096-token retrieval cache),
sends one warm-up request per context, then `--reps` streamed completions of `--tokens` greedy tokens of the same
passkey prompt given as text (the shipped tokenizer's surface), timed at the client from the request sent:
- time to first token: until the first chunk holding text arrives (the prefill, and the first decoded token);
- inter-token latency: (last chunk − first chunk) / (tokens − 1), the decode's pace as a client sees it (a
  speculative round's accepted tokens arrive in one chunk, so its chunks are fewer and further apart).
Every answer must start with the prompt's key, and a configuration's answers must all be equal (greedy). Median and
p10–p90 over the repetitions. Writes `bench/results/llm_stream_cpu.json`.

    .venv/bin/python bench/bench_llm_stream.py [--contexts 8192,32768] [--tokens 64] [--reps 5]
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, report_header, spread

sys.path.insert(0, str(ROOT))
from paragen.pipelines.llm.passkey import make_prompt  # noqa: E402
from tests.serve_client import Server  # noqa: E402 — the tests' server driver

MODEL = "tiny-passkey-lm"
MODES = {"dense": [], "speculative": ["--kv", "speculative", "--retrieval-budget", "4096"]}


def passkey_text(context: int, seed: int) -> tuple[str, str]:
    """A passkey prompt of `context` tokens as text, and its key."""
    from transformers import AutoTokenizer

    from paragen.pipelines.llm.loading import model_root

    prompt = make_prompt(context, 0.5, torch.Generator().manual_seed(seed))
    tokenizer = AutoTokenizer.from_pretrained(model_root(MODEL), local_files_only=True)
    return tokenizer.decode(prompt.tokens, skip_special_tokens=True), prompt.key


def streamed(url: str, text: str, tokens: int) -> dict:
    """One streamed completion: its text, the seconds to its first text chunk and the arrival of every chunk."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"prompt": text, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:2000]}")
    arrivals, pieces, usage = [], [], None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            if choice["text"]:
                arrivals.append(time.perf_counter() - sent)
                pieces.append(choice["text"])
    connection.close()
    return {"text": "".join(pieces), "arrivals_s": arrivals, "completion_tokens": usage["completion_tokens"]}


def measure(ranks: int, mode: str, contexts: list[int], tokens: int, reps: int) -> dict:
    """Start a server of `ranks` ranks in `mode`; time `reps` streamed completions per context."""
    with tempfile.TemporaryDirectory() as out:
        server = Server(["llm", "--model", MODEL, *MODES[mode], "--new-tokens", str(tokens), "--timeout", "600",
                         "--max-new-tokens", str(tokens), "--out", out], ranks).start(wait_s=600)
        try:
            results = {}
            for context in contexts:
                text, key = passkey_text(context, seed=context)
                streamed(server.url, text, tokens)  # warm-up
                runs = [streamed(server.url, text, tokens) for _ in range(reps)]
                if any(not run["text"].startswith(key) or run["text"] != runs[0]["text"] for run in runs):
                    raise RuntimeError(f"{ranks} rank(s), {mode}, {context}: an answer lacks the key or differs")
                results[str(context)] = {
                    "ttft_s": spread([run["arrivals_s"][0] for run in runs]),
                    "inter_token_s": spread([(run["arrivals_s"][-1] - run["arrivals_s"][0])
                                             / (run["completion_tokens"] - 1) for run in runs]),
                    "chunks": len(runs[0]["arrivals_s"]), "tokens": runs[0]["completion_tokens"],
                    "answer_starts_with_key": True}
                print(f"  {ranks} rank(s), {mode}, {context}: {results[str(context)]}", file=sys.stderr)
            server.signal()
            server.wait()
            return results
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "llm_stream_cpu.json"))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    results = {f"{ranks}_{mode}": measure(ranks, mode, contexts, args.tokens, args.reps)
               for mode in MODES for ranks in (1, 2)}
    report = {**report_header("llm_stream"),
              "workload": {"model": MODEL, "contexts": contexts, "tokens": args.tokens, "reps": args.reps,
                           "modes": {mode: flags for mode, flags in MODES.items()}, "ranks": [1, 2]},
              "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, by_context in results.items():
        for context, r in by_context.items():
            print(f"{name} {context}: TTFT {r['ttft_s']['median']:.3f} s, inter-token "
                  f"{1000 * r['inter_token_s']['median']:.1f} ms, {r['chunks']} chunks for {r['tokens']} tokens")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
