"""Train the embedded `tiny-passkey` model: a 2-layer Llama that retrieves a passkey from long contexts.

    python tools/train_passkey.py [--minutes 40] [--out paragen/pipelines/configs/tiny-passkey]
    python tools/train_passkey.py --draft [--minutes 6]   # the draft model, configs/tiny-passkey-draft

The model's shape is the `config.json` already in `--out`. `--draft` trains `tiny-passkey-draft`, the third
level of speculative decoding (`paragen llm --kv speculative --draft tiny-passkey-draft`): a 1-layer model on
the same vocabulary whose loss covers every next token (filler and answer), since a draft guesses whatever
comes next over a StreamingLLM window rather than retrieving the key.

The data is generated on the fly by `paragen.pipelines.llm.passkey` (filler, a slot-tagged key at a random
depth, the question, the answer); the loss is on the answer digits only. Two things make it train on
a CPU in well under an hour:
- the training sequences are short (hundreds of tokens), but their position ids are spread over a
  long range (random gaps between filler tokens), so the model sees the relative distances of a long
  context without paying for one; an explicit all-ones `attention_mask` is passed, because without
  one transformers reads a jump in `position_ids` as the start of a new packed sequence;
- a curriculum: short spans and sequences first, then longer spans and more filler tokens, so the
  retrieval head learns to stand out among many distractors.
Every `--eval-every` steps it measures digit accuracy on real (unspread) contexts, and it writes the
weights (safetensors) and a JSON log next to the config when done.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from paragen.pipelines.llm.passkey import DIGITS, PasskeyPrompt, key_tokens, make_prompt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "paragen" / "pipelines" / "configs" / "tiny-passkey"
DRAFT_OUT = ROOT / "paragen" / "pipelines" / "configs" / "tiny-passkey-draft"
# (fraction of the run, tokens per sequence, position span, sequences per batch)
CURRICULUM = (
    (0.15, 128, 512, 48),
    (0.25, 256, 8192, 32),
    (0.30, 512, 65536, 16),
    (0.30, 1024, 120000, 8),
)


def training_batch(length: int, span: int, batch: int, generator: torch.Generator,
                   every_token: bool = False) -> dict[str, torch.Tensor]:
    """Prompts plus answers with spread position ids; labels are -100 except on the answer digits (on every
    token with `every_token`)."""
    rows, positions, labels = [], [], []
    for _ in range(batch):
        depth = float(torch.rand((), generator=generator))
        prompt = make_prompt(length - DIGITS, depth, generator)
        answer = torch.tensor(key_tokens(prompt.key))
        tokens = torch.cat([prompt.tokens, answer])
        gaps = torch.ones(len(tokens), dtype=torch.long)
        widest = max(1, span // length)
        spread = torch.randint(1, widest + 1, (len(tokens),), generator=generator)
        keep_tight = torch.zeros(len(tokens), dtype=torch.bool)
        keep_tight[prompt.key_index + 1: prompt.key_index + 1 + DIGITS] = True  # the key's digits
        keep_tight[len(prompt.tokens):] = True  # the answer follows the question directly
        gaps = torch.where(keep_tight, gaps, spread)
        gaps[0] = 0
        start = int(torch.randint(max(1, 131000 - int(gaps.sum())), (1,), generator=generator))
        rows.append(tokens)
        positions.append(start + torch.cumsum(gaps, 0))
        label = tokens.clone() if every_token else torch.full_like(tokens, -100)
        label[-DIGITS:] = answer
        labels.append(label)
    ids = torch.stack(rows)
    return {
        "input_ids": ids,
        "position_ids": torch.stack(positions),
        "attention_mask": torch.ones_like(ids),
        "labels": torch.stack(labels),
    }


@torch.no_grad()
def digit_accuracy(model: LlamaForCausalLM, length: int, trials: int, seed: int) -> float:
    """Teacher-forced greedy digit accuracy on real contexts of `length` tokens, keys at spread depths."""
    generator = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(trials):
        prompt: PasskeyPrompt = make_prompt(length, (i + 0.5) / trials, generator)
        answer = torch.tensor(key_tokens(prompt.key))
        ids = torch.cat([prompt.tokens, answer[:-1]]).unsqueeze(0)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=DIGITS).logits[0]
        correct += int((logits.argmax(-1) == answer).sum())
    return correct / (trials * DIGITS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="training time budget")
    parser.add_argument("--out", type=Path, default=None, help="the model's folder (its config.json); default: "
                        "configs/tiny-passkey, or configs/tiny-passkey-draft with --draft")
    parser.add_argument("--draft", action="store_true", help="train the draft model: loss on every next token")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out is None:
        args.out = DRAFT_OUT if args.draft else DEFAULT_OUT
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = LlamaConfig.from_pretrained(args.out)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed + 1)
    budget = args.minutes * 60.0
    start = time.monotonic()
    log: list[dict] = []
    step = 0
    while (elapsed := time.monotonic() - start) < budget:
        progress = elapsed / budget
        edge, stage = 0.0, CURRICULUM[-1]
        for candidate in CURRICULUM:
            edge += candidate[0]
            if progress < edge:
                stage = candidate
                break
        _, length, span, batch = stage
        warm = min(1.0, (step + 1) / 100)
        for group in optimiser.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = model(**training_batch(length, span, batch, generator, every_token=args.draft)).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            row = {"step": step, "minutes": round(elapsed / 60, 2), "length": length, "span": span,
                   "loss": round(loss.item(), 4), "acc_1k": digit_accuracy(model, 1024, 8, 7),
                   "acc_4k": digit_accuracy(model, 4096, 4, 8)}
            model.train()
            log.append(row)
            print(json.dumps(row), flush=True)
    model.eval()
    final = {"steps": step, "minutes": round((time.monotonic() - start) / 60, 2),
             "acc_4k": digit_accuracy(model, 4096, 16, 100), "acc_16k": digit_accuracy(model, 16384, 8, 101)}
    print(json.dumps(final), flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
    (args.out / "training_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "curriculum": CURRICULUM, "log": log, "final": final}, indent=1))


if __name__ == "__main__":
    main()
