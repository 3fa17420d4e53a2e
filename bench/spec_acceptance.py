"""Which retrieval-cache refresh pays, measured by acceptance (counts, not time): speculative decoding of the
embedded `tiny-passkey-lm` in one process, greedy, under each refresh policy, with and without the draft model.

    python bench/spec_acceptance.py [--model tiny-passkey-lm] [--context 32768] [--budget 4096] [--gamma 6]
        [--new-tokens 32] [--prompts 4] → bench/results/llm_lm_spec_acceptance.json

Policies: `never` (TriForce: the retrieval cache built once, from the prompt's last query), `every1` and
`every4` (rebuilt after every verification, every 4), `below0.5` (rebuilt when the acceptance since the last
build falls below 0.5). Per
policy: acceptance rate (accepted / drafted), mean drafted tokens kept per verification, verifications,
refreshes and their bytes, whether the passkey was answered, and the draft model's acceptance by the retrieval
level. Fewer verifications for the same tokens is what a refresh has to buy; its cost (a landmark pass over
the cache and two collectives) is to be weighed with timings on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import ROOT, report_header

from paragen.parallel import ParallelConfig
from paragen.parallel.llm import KVConfig, SpeculativeConfig
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.llm.passkey import DIGITS, decode_key, make_prompt
from paragen.pipelines.llm.speculative import generate_speculative

POLICIES = {"never": {}, "every1": {"refresh_every": 1}, "every4": {"refresh_every": 4}, "below0.5": {"refresh_below": 0.5}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-passkey-lm", help="the target model")
    p.add_argument("--context", type=int, default=32768, help="prompt + new tokens")
    p.add_argument("--budget", type=int, default=4096, help="retrieval cache tokens")
    p.add_argument("--gamma", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4, help="passkey prompts, keys at depths (i + ½)/prompts")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "llm_lm_spec_acceptance.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    draft = load_llm("tiny-passkey-draft")
    prompts = [make_prompt(args.context - args.new_tokens, (i + 0.5) / args.prompts, torch.Generator().manual_seed(i))
               for i in range(args.prompts)]
    rows = {}
    for name, refresh in POLICIES.items():
        model = load_llm(args.model)
        parallelize_llm(model, ParallelConfig(), KVConfig(mode="speculative", speculative=SpeculativeConfig(
            gamma=args.gamma, budget=args.budget, **refresh)))
        for level, draft_model in (("target", None), ("with_draft", draft)):
            runs = []
            for prompt in prompts:
                out = generate_speculative(model, prompt.tokens[None], max_new_tokens=args.new_tokens,
                                           draft_model=draft_model)
                report = out.stats.report()
                new = out.sequences[0, prompt.tokens.shape[0]:].tolist()
                runs.append({key: report[key] for key in ("drafted", "accepted", "verifications", "acceptance_rate",
                                                          "mean_accepted_per_verification", "refreshes", "refresh_bytes")}
                            | {"correct": decode_key(new[:DIGITS]) == prompt.key,
                               "draft_model_acceptance_rate": report["draft_model"]["acceptance_rate"]})
            drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
            rows[f"{name}/{level}"] = {"acceptance_rate": accepted / drafted if drafted else None,
                                       "verifications": sum(r["verifications"] for r in runs),
                                       "refreshes": sum(r["refreshes"] for r in runs), "runs": runs}
            print(f"{name:9s} {level:10s} acceptance {rows[f'{name}/{level}']['acceptance_rate']:.2f}  "
                  f"verifications {rows[f'{name}/{level}']['verifications']}  refreshes "
                  f"{rows[f'{name}/{level}']['refreshes']}", flush=True)
    report = {**report_header("llm_spec_acceptance"), "workload": vars(args), "policies": POLICIES, "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
