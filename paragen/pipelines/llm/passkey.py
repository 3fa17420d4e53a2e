"""The synthetic passkey task: filler text, a number to remember somewhere in it, the question at the end.

A prompt reads `<bos> filler … <key> d₁ … d₆ filler … <ask>`, and the answer is `d₁ … d₆`. Filler is
the classic passkey padding: a few fixed sentences repeated. The six digits are *slot-tagged* tokens
(digit v in slot j is its own token), which makes retrieval one attention lookup — the query at
answer slot j asks for "the slot j+1 digit", and only the key holds one — instead of an induction
circuit that a 2-layer model learns slowly. Nothing else about the task is easier: the key sits at
any depth of a context of any length, among thousands of filler tokens. After the answer the text goes
on: the filler continues where the prompt's left off (`make_prompt(..., follow=n)` gives those tokens).

The same vocabulary serves the embedded `tiny-passkey` model (trained by `tools/train_passkey.py`)
and `tiny-llama` (random weights), so both run the same prompts.

As text (the surface the shipped tokenizer maps to and from these tokens exactly, `tools/make_passkey_tokenizer.py`):
words separated by single spaces, the key marker and the six digits as `The pass key is 594833`, the question as
`What is the pass key?`; the start token is `<s>`, added by the tokenizer. The key's digits are the only digits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FILLER_SENTENCES = (
    "the grass is green .",
    "the sky is blue .",
    "the sun is yellow .",
    "here we go .",
    "there and back again .",
)
DIGITS = 6
BOS, KEY, ASK = 0, 1, 2
BOS_TEXT, KEY_TEXT, ASK_TEXT = "<s>", "The pass key is", "What is the pass key?"  # their surface as text
_WORDS = sorted({w for s in FILLER_SENTENCES for w in s.split()})
WORD_IDS = {w: 3 + i for i, w in enumerate(_WORDS)}
UNK = 31  # text outside the passkey world (an id no training sequence holds)
DIGIT_BASE = 32
VOCAB_SIZE = DIGIT_BASE + 10 * DIGITS  # 92
_SENTENCE_IDS = [torch.tensor([WORD_IDS[w] for w in s.split()]) for s in FILLER_SENTENCES]
FIXED_TOKENS = 1 + 1 + DIGITS + 1  # bos, key marker, digits, question


def check_passkey_length(length: int) -> None:
    """Refuse a prompt length that cannot hold the fixed tokens and at least one filler token."""
    if length < FIXED_TOKENS + 1:
        raise ValueError(f"a passkey prompt of {length} tokens is too short: it holds {FIXED_TOKENS} fixed tokens "
                         f"(start, key marker, {DIGITS} key digits, question) and some filler; use a context of at "
                         f"least {FIXED_TOKENS + 1} tokens")


def digit_token(slot: int, value: int) -> int:
    """The token of digit `value` in answer slot `slot` (0-based)."""
    return DIGIT_BASE + 10 * slot + value


def key_tokens(key: str) -> list[int]:
    """The slot-tagged tokens of a `DIGITS`-digit key such as "041977"."""
    if len(key) != DIGITS or not key.isdigit():
        raise ValueError(f"a passkey is {DIGITS} decimal digits, got {key!r}")
    return [digit_token(j, int(c)) for j, c in enumerate(key)]


def decode_key(tokens: list[int]) -> str:
    """The digits that slot-tagged `tokens` spell; a token that is not the right slot's digit reads `?`."""
    out = []
    for j, t in enumerate(tokens[:DIGITS]):
        value = t - digit_token(j, 0)
        out.append(str(value) if 0 <= value < 10 else "?")
    return "".join(out)


def find_key(tokens: list[int]) -> str | None:
    """The key a prompt's tokens hold after their key marker (None without a whole one)."""
    if KEY not in tokens:
        return None
    at = tokens.index(KEY) + 1
    key = decode_key(tokens[at:at + DIGITS])
    return key if len(key) == DIGITS and "?" not in key else None


def filler(length: int, generator: torch.Generator) -> torch.Tensor:
    """`length` filler tokens: the fixed sentences repeated in the order of a seeded random start."""
    start = int(torch.randint(len(_SENTENCE_IDS), (1,), generator=generator))
    cycle = torch.cat(_SENTENCE_IDS[start:] + _SENTENCE_IDS[:start])
    reps = -(-length // len(cycle))
    return cycle.repeat(reps)[:length]


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: `tokens` (ending with the question), the `key` and where it sits (`key_index`), and
    `follow`: the filler that continues the text after the answer (empty unless asked for)."""

    tokens: torch.Tensor
    key: str
    key_index: int
    follow: torch.Tensor


def make_prompt(length: int, depth: float, generator: torch.Generator, follow: int = 0) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens whose key starts at fraction `depth` of the filler, and the
    `follow` filler tokens that continue the text after the answer (the same prompt whatever `follow`)."""
    check_passkey_length(length)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = "".join(str(int(d)) for d in torch.randint(10, (DIGITS,), generator=generator))
    text = filler(length - FIXED_TOKENS + follow, generator)
    pad = text[:length - FIXED_TOKENS]
    at = int(round(depth * len(pad)))
    needle = torch.tensor([KEY] + key_tokens(key))
    tokens = torch.cat([torch.tensor([BOS]), pad[:at], needle, pad[at:], torch.tensor([ASK])])
    return PasskeyPrompt(tokens=tokens, key=key, key_index=1 + at, follow=text[len(pad):])
