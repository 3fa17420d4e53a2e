"""Train the embedded passkey models: 2-layer Llamas that retrieve a passkey from long contexts, and a draft.

    python tools/train_passkey.py --model tiny-passkey         [--minutes 12]  # loss on the answer digits
    python tools/train_passkey.py --model tiny-passkey-lm      [--minutes 15]  # ... and on the text after them
    python tools/train_passkey.py --model tiny-passkey-draft   [--minutes 6]   # on every next token

The model's shape is the `config.json` already in its folder (`configs/NAME`, or `--out`). The data is generated
on the fly by `paragen.pipelines.llm.passkey`: filler, a slot-tagged key at a random depth, the question, the
answer, and for the last two the filler that goes on after it. What each loss covers:
- `tiny-passkey`: the answer digits only. What it writes after them is an untrained guess.
- `tiny-passkey-lm`: the answer digits' mean cross-entropy plus the mean over the text after them, so what it
  writes after the answer is the text it was trained on, as for a real LLM: the target on which speculative
  decoding's acceptance means something. (A loss on the filler before the question as well taught the model
  a retrieval that the offloaded cache's sparse selection no longer finds; with the loss after the answer
  only, dense decoding answers every key but the offloaded cache still loses later digits: see the README.)
- `tiny-passkey-draft` (1 layer, the third level of `paragen llm --kv speculative --draft tiny-passkey-draft`):
  every next token, since a draft guesses whatever comes next over a StreamingLLM window rather than
  retrieving the key.
Two things make it train on a CPU in well under an hour:
- the training sequences are short (hundreds of tokens), but their position ids are spread over a
  long range (random gaps between filler tokens), so the model sees the relative distances of a long
  context without paying for one; an explicit all-ones `attention_mask` is passed, because without
  one transformers reads a jump in `position_ids` as the start of a new packed sequence;
- a curriculum: short spans and sequences first, then longer spans and more filler tokens, so the
  retrieval head learns to stand out among many distractors.
Every `--eval-every` steps it measures the accuracy of the answer digits and of the text after them on real
(unspread) contexts, teacher-forced, and it writes the
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
CONFIGS = ROOT / "paragen" / "pipelines" / "configs"
# model -> (what the loss covers besides the answer: nothing, the text after it, every token; default minutes)
RECIPES = {"tiny-passkey": ("answer", 12.0), "tiny-passkey-lm": ("follow", 15.0), "tiny-passkey-draft": ("every", 6.0)}
FOLLOW = 32  # filler tokens after the answer: the text goes on, as it does when the model generates
TIGHT_TAIL = 32  # prompt tokens before the question at consecutive positions, as they are in a real context
# (fraction of the run, tokens per sequence, position span, sequences per batch)
CURRICULUM = (
    (0.15, 128, 512, 48),
    (0.25, 256, 8192, 32),
    (0.30, 512, 65536, 16),
    (0.30, 1024, 120000, 8),
)


def training_batch(length: int, span: int, batch: int, generator: torch.Generator, text: str) -> dict[str, torch.Tensor]:
    """Prompts and answers, with the text that follows them (`FOLLOW` filler tokens) unless `text` is "answer",
    `length` tokens a row, with spread position ids; `answer` and `text` mark which targets (`input_ids` shifted)
    the loss covers: the answer digits, and the text after them ("follow") or every other token ("every")."""
    follow = 0 if text == "answer" else FOLLOW
    rows, positions = [], []
    for _ in range(batch):
        depth = float(torch.rand((), generator=generator))
        prompt = make_prompt(length - DIGITS - follow, depth, generator, follow=follow)
        tokens = torch.cat([prompt.tokens, torch.tensor(key_tokens(prompt.key)), prompt.follow])
        widest = max(1, span // length)
        gaps = torch.randint(1, widest + 1, (len(tokens),), generator=generator)
        gaps[prompt.key_index + 1: prompt.key_index + 1 + DIGITS] = 1  # the key's digits
        # the answer follows the question directly; text after it reads on from the prompt's last tokens
        gaps[len(prompt.tokens) - (TIGHT_TAIL if follow else 0):] = 1
        gaps[0] = 0
        start = int(torch.randint(max(1, 131000 - int(gaps.sum())), (1,), generator=generator))
        rows.append(tokens)
        positions.append(start + torch.cumsum(gaps, 0))
    answer = torch.zeros(length - 1, dtype=torch.bool)
    answer[length - follow - DIGITS - 1: length - follow - 1] = True
    covered = {"answer": torch.zeros_like(answer), "follow": torch.arange(length - 1) >= length - follow - 1,
               "every": ~answer}[text]
    return {"input_ids": torch.stack(rows), "position_ids": torch.stack(positions), "answer": answer, "text": covered}


def training_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy: the answer digits' mean plus the text's mean, so the text trains without
    drowning the six digits that need retrieval."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, position_ids=batch["position_ids"], attention_mask=torch.ones_like(ids)).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    answer = losses[:, batch["answer"]].mean()
    return answer + losses[:, batch["text"]].mean() if batch["text"].any() else answer


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, length: int, trials: int, seed: int) -> tuple[float, float]:
    """Teacher-forced greedy accuracy on real contexts of `length` tokens, keys at spread depths: of the
    answer digits, and of the `FOLLOW` tokens of text after them."""
    generator = torch.Generator().manual_seed(seed)
    digits = text = 0
    for i in range(trials):
        prompt: PasskeyPrompt = make_prompt(length, (i + 0.5) / trials, generator, follow=FOLLOW)
        answer = torch.tensor(key_tokens(prompt.key))
        ids = torch.cat([prompt.tokens, answer, prompt.follow]).unsqueeze(0)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=DIGITS + FOLLOW + 1).logits
        guess = logits[0, :-1].argmax(-1)
        digits += int((guess[:DIGITS] == answer).sum())
        text += int((guess[DIGITS:] == prompt.follow).sum())
    return digits / (trials * DIGITS), text / (trials * FOLLOW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=RECIPES, default="tiny-passkey", help="which model (its loss and folder)")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget (default: the model's)")
    parser.add_argument("--out", type=Path, default=None, help="the model's folder (its config.json); default: "
                        "paragen/pipelines/configs/MODEL")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    text, minutes = RECIPES[args.model]
    args.out = args.out or CONFIGS / args.model
    args.minutes = args.minutes or minutes
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
        loss = training_loss(model, training_batch(length, span, batch, generator, text))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            row = {"step": step, "minutes": round(elapsed / 60, 2), "length": length, "span": span,
                   "loss": round(loss.item(), 4)}
            for name, length, trials, seed in (("1k", 1024, 8, 7), ("4k", 4096, 4, 8)):
                row[f"acc_{name}"], row[f"text_{name}"] = accuracy(model, length, trials, seed)
            model.train()
            log.append(row)
            print(json.dumps(row), flush=True)
    model.eval()
    final = {"steps": step, "minutes": round((time.monotonic() - start) / 60, 2)}
    for name, length, trials, seed in (("4k", 4096, 16, 100), ("16k", 16384, 8, 101)):
        final[f"acc_{name}"], final[f"text_{name}"] = accuracy(model, length, trials, seed)
    print(json.dumps(final), flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
    (args.out / "training_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "curriculum": CURRICULUM, "log": log, "final": final}, indent=1))


if __name__ == "__main__":
    main()
