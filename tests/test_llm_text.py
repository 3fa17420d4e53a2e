"""The passkey world as text: the tokenizer shipped with every embedded LLM maps its text to its tokens and back
exactly (and is what `tools/make_passkey_tokenizer.py` writes); a request's prompt as text, a file or chat
messages, bounded before it is read; `--print-prompt`; text streamed as tokens come."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from paragen.pipelines.jobs import schema
from paragen.pipelines.jobs.llm import LLMRequest
from paragen.pipelines.jobs.llm_text import Message, TextStream, prompt_ids
from paragen.pipelines.llm.loading import EMBEDDED_LLMS, model_root
from paragen.pipelines.llm.passkey import ASK_TEXT, DIGITS, UNK, digit_token, make_prompt
from tests.multiproc import ROOT
from tools.make_passkey_tokenizer import build

PROMPTS = [(context, depth, seed) for seed, (context, depth) in enumerate(
    [(10, 0.0), (11, 1.0), (64, 0.5), (300, 0.13), (1000, 0.77), (4096, 0.5)])]


@pytest.fixture(scope="module", params=EMBEDDED_LLMS)
def tokenizer(request):
    return AutoTokenizer.from_pretrained(model_root(request.param), local_files_only=True)


@pytest.mark.parametrize("context, depth, seed", PROMPTS)
def test_a_passkey_prompt_goes_to_text_and_back_to_the_same_tokens(tokenizer, context, depth, seed):
    prompt = make_prompt(context, depth, torch.Generator().manual_seed(seed))
    text = tokenizer.decode(prompt.tokens, skip_special_tokens=True)
    assert tokenizer(text).input_ids == prompt.tokens.tolist()
    assert f"The pass key is {prompt.key} " in text + " " and text.endswith(ASK_TEXT)
    assert [c for c in text if c.isdigit()] == list(prompt.key)  # the key's digits are the only digits


def test_text_goes_to_tokens_and_back_to_the_same_text(tokenizer):
    for text in ("the grass is green . The pass key is 041977 here we go",
                 "What is the pass key? The pass key is 9",  # a key cut short: its slots as far as they go
                 "there and back again ."):
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    slots = tokenizer("The pass key is 555555").input_ids[2:]
    assert slots == [digit_token(slot, 5) for slot in range(DIGITS)]  # one digit, six tokens by where it stands
    assert tokenizer("hello 7 the").input_ids[1:] == [UNK, UNK, tokenizer.convert_tokens_to_ids("the")]


def test_the_chat_template_writes_the_messages_after_the_start_token(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "system", "content": "the sky is blue ."},
                                          {"role": "user", "content": "here we go ."}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<s>the sky is blue . here we go ."


def test_the_shipped_tokenizers_are_what_the_script_writes():
    built = json.loads(build().to_str())
    for model in EMBEDDED_LLMS:
        shipped = json.loads((model_root(model) / "tokenizer.json").read_text())
        assert shipped["model"] == built["model"] and shipped["normalizer"] == built["normalizer"], model
        assert shipped["decoder"] == built["decoder"] and shipped["post_processor"] == built["post_processor"], model


def test_a_request_takes_one_prompt_and_embedded_models_take_text():
    LLMRequest(prompt="the sky is blue .")
    LLMRequest(messages=(Message("user", "here we go ."),))
    with pytest.raises(ValueError, match="give one prompt: prompt or messages, not both"):
        LLMRequest(prompt="a", messages=(Message("user", "b"),))
    with pytest.raises(ValueError, match="a local checkpoint needs a text prompt"):
        LLMRequest(model="/models/llama")


def test_prompt_ids_come_from_text_a_file_or_messages_and_carry_the_key(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_root("tiny-passkey"), local_files_only=True)
    prompt = make_prompt(200, 0.4, torch.Generator().manual_seed(9))
    text = tokenizer.decode(prompt.tokens, skip_special_tokens=True)
    (tmp_path / "prompt.txt").write_text(text)
    for request in (LLMRequest(prompt=text), LLMRequest(prompt_file=str(tmp_path / "prompt.txt")),
                    LLMRequest(messages=(Message("user", text),)), LLMRequest(context=200, depth=0.4, seed=9)):
        ids, key = prompt_ids(request, tokenizer, 131072, 2)
        assert ids[0].tolist() == prompt.tokens.tolist() and key == prompt.key
    with pytest.raises(ValueError, match="exceeds the model's 210 positions"):
        prompt_ids(LLMRequest(prompt=text, new_tokens=16), tokenizer, 210, 1)
    with pytest.raises(ValueError, match="cannot fit the model's 4 positions"):  # refused before it is read
        prompt_ids(LLMRequest(prompt_file=str(tmp_path / "prompt.txt")), tokenizer, 4, 1)


def test_text_streams_as_tokens_come_and_ends_as_the_whole_text():
    tokenizer = AutoTokenizer.from_pretrained(model_root("tiny-passkey"), local_files_only=True)
    ids = tokenizer("The pass key is 123456 the sky is blue .", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer)
    pieces = [stream.add([token]) for token in ids]
    assert "".join(pieces) == tokenizer.decode(ids) and pieces[1:7] == [" 1", *"23456"]
    assert stream.rest(tokenizer.decode(ids)) == ""


def test_print_prompt_prints_the_passkey_prompt_as_text():
    done = subprocess.run([sys.executable, "-m", "paragen", "llm", "--print-prompt", "--context", "64", "--depth",
                           "0.5", "--seed", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(model_root("tiny-passkey"), local_files_only=True)
    prompt = make_prompt(64, 0.5, torch.Generator().manual_seed(2))
    assert tokenizer(done.stdout.rstrip("\n")).input_ids == prompt.tokens.tolist()


def test_a_request_file_line_may_hold_chat_messages():
    model = schema.fields_model(LLMRequest, schema.PER_REQUEST)
    fields = schema.given(schema.parse_fields(model, '{"messages": [{"role": "user", "content": "here we go ."}]}'))
    assert schema.replace(LLMRequest(), **fields).messages == (Message("user", "here we go ."),)
    with pytest.raises(ValueError, match=r"messages.0.role must be 'system', 'user' or 'assistant'"):
        schema.parse_fields(model, '{"messages": [{"role": "bot", "content": "hi"}]}')


@pytest.mark.parametrize("kv", ["dense", "offload", "speculative"])
def test_every_kv_mode_hands_its_tokens_out_as_decided_and_stops_when_asked(tmp_path, kv):
    import paragen
    from paragen.parallel.interrupt import RequestCancelled, Watch

    options = {"retrieval_budget": 256} if kv == "speculative" else {}
    runner = paragen.JobRunner("llm", model="tiny-passkey-lm", kv=kv, out=str(tmp_path), **options)
    tokenizer = AutoTokenizer.from_pretrained(model_root("tiny-passkey-lm"), local_files_only=True)
    text = tokenizer.decode(make_prompt(1024, 0.5, torch.Generator().manual_seed(5)).tokens, skip_special_tokens=True)
    item = runner.checked(runner.request(prompt=text, new_tokens=20))
    batches: list[list[int]] = []
    report = runner.generate(item, Watch(on_tokens=batches.append))
    assert sum(batches, []) == report["new_tokens"] and len(report["new_tokens"]) == 20
    assert len(batches) == 20 if kv != "speculative" else len(batches) < 20  # a round's accepted tokens together
    seen: list[int] = []
    with pytest.raises(RequestCancelled, match=r"cancelled after \d+ new tokens") as stopped:
        runner.generate(item, Watch(interrupt=lambda: len(seen) >= 3, on_tokens=seen.extend))
    assert 3 <= len(seen) < 20
    assert len(seen) <= int(str(stopped.value).split()[2]) <= len(seen) + 1  # the message counts the new tokens
