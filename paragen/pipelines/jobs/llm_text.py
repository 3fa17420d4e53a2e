"""What an LLM request says, as token ids, and its tokens back as text.

A request gives its prompt one of four ways: text (`prompt`), a text file (`prompt_file`), chat messages
(`messages`, rendered by the tokenizer's chat template), or — for the embedded passkey models only — nothing, and
a passkey prompt of `context` tokens is made with the key at `depth`. Every way is bounded by the model's positions
before anything of its size is built or read. A prompt whose tokens hold a passkey (made, or given as text) carries
its key, so the report says whether the answer is the key. `TextStream` turns tokens decided one after another back
into text as they come, for streaming.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
from pydantic import ConfigDict

from paragen.pipelines.llm.passkey import find_key, make_prompt
from paragen.pipelines.llm.runtime import check_prompt_length

TEXT_BYTES_PER_TOKEN = 32  # a text prompt longer than this many bytes a position cannot fit the model


@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))
class Message:
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Prompted:
    """A checked request, the token ids every rank feeds to `generate`, the passkey its prompt holds (if any), and
    the tokenizer that reads the answer."""

    request: Any  # an LLMRequest
    ids: torch.Tensor  # [1, L]
    key: str | None
    tokenizer: Any


def has_text(request: Any) -> bool:
    """Whether the request gives its prompt as text, a file or chat messages (else: a passkey prompt is made)."""
    return any(value is not None for value in (request.prompt, request.prompt_file, request.messages))


def prompt_ids(request: Any, tokenizer: Any, positions: int, shards: int) -> tuple[torch.Tensor, str | None]:
    """The request's token ids `[1, L]` and the passkey they hold; ValueError, before anything of the prompt's size
    exists, for a prompt the model's `positions` (with the new tokens) or the `shards` cannot take."""
    if not has_text(request):
        check_prompt_length(request.context, request.new_tokens, positions, shards)
        passkey = make_prompt(request.context, request.depth, torch.Generator().manual_seed(request.seed))
        return passkey.tokens.unsqueeze(0), passkey.key
    if request.messages is not None:
        text, special = chat_text(tokenizer, request.messages, positions), False  # the template writes the <s>
    else:
        text, special = read_text(request, positions), True
    ids = tokenizer(text, add_special_tokens=special, return_tensors="pt").input_ids
    check_prompt_length(ids.shape[1], request.new_tokens, positions, shards)
    return ids, find_key(ids[0].tolist())


def read_text(request: Any, positions: int) -> str:
    """The request's text prompt (from its file), refused before it is read or tokenised when it is longer than
    the model's positions could hold at `TEXT_BYTES_PER_TOKEN` bytes a token."""
    if request.prompt is not None:
        _check_size(len(request.prompt.encode()), positions)
        return request.prompt
    try:
        size = Path(request.prompt_file).stat().st_size
    except OSError as error:
        raise ValueError(f"--prompt-file {request.prompt_file!r} cannot be read: {error.strerror}") from None
    _check_size(size, positions)
    return Path(request.prompt_file).read_text(encoding="utf-8")


def chat_text(tokenizer: Any, messages: tuple[Message, ...], positions: int) -> str:
    """The messages rendered by the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template: send a completion (prompt) instead")
    _check_size(sum(len(message.content.encode()) for message in messages), positions)
    conversation = [{"role": message.role, "content": message.content} for message in messages]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def _check_size(size: int, positions: int) -> None:
    most = positions * TEXT_BYTES_PER_TOKEN
    if size > most:
        raise ValueError(f"a prompt of {size} bytes cannot fit the model's {positions} positions (at most "
                         f"{most} bytes, {TEXT_BYTES_PER_TOKEN} a token)")


class TextStream:
    """The text of tokens decided one batch after another: `add` returns what the new ones add to the text (held
    back while it ends in the middle of a character, as a byte-level token can leave it); `rest` what the whole
    answer's text adds to what was returned."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new

    def rest(self, whole: str) -> str:
        new, self.sent = whole[self.sent:], len(whole)
        return new


__all__ = ["Message", "Prompted", "TEXT_BYTES_PER_TOKEN", "TextStream", "chat_text", "has_text", "prompt_ids",
           "read_text"]
