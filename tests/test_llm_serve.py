"""`paragen serve llm` as users call it — the official `openai` client against 2 real ranks: a passkey prompt given
as text (completions and chat) answered with its key, streamed text equal to the whole answer for the same seed in
the dense and speculative modes, usage counted as the tokenizer counts, a client leaving mid-stream stopping the
decode, idle ranks staying inside --timeout."""
from __future__ import annotations

import re
import signal
import time

import pytest
import torch
from openai import BadRequestError, OpenAI
from transformers import AutoTokenizer

from paragen.pipelines.llm.loading import model_root
from paragen.pipelines.llm.passkey import make_prompt
from tests.serve_client import Server, call, wait_for

pytestmark = pytest.mark.slow  # multi-process end-to-end runs (make test-fast skips them)


def _tokenizer(model: str):
    return AutoTokenizer.from_pretrained(model_root(model), local_files_only=True)


def _passkey_text(model: str, context: int, depth: float, seed: int) -> tuple[str, str]:
    """A passkey prompt as text (the shipped tokenizer's surface) and its key."""
    prompt = make_prompt(context, depth, torch.Generator().manual_seed(seed))
    return _tokenizer(model).decode(prompt.tokens, skip_special_tokens=True), prompt.key


def _client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="no key is set", max_retries=0, timeout=120)


def _streamed_equals_whole(client: OpenAI, model: str, text: str, tokens: int, **sampling) -> str:
    """Stream a completion and a chat answer; each must equal its whole answer for the same seed. The text."""
    whole = client.completions.create(model=model, prompt=text, max_tokens=tokens, **sampling)
    chunks = list(client.completions.create(model=model, prompt=text, max_tokens=tokens, stream=True,
                                            stream_options={"include_usage": True}, **sampling))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage and chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    messages = [{"role": "user", "content": text}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, **sampling)
    deltas = list(client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, stream=True,
                                                 **sampling))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(delta.choices[0].delta.content or "" for delta in deltas) == chat.choices[0].message.content
    assert chat.choices[0].message.content == whole.choices[0].text  # the template adds nothing to a passkey prompt
    return whole.choices[0].text


def test_a_dense_server_answers_text_and_chat_and_streams_what_it_answers(tmp_path):
    model = "tiny-passkey"
    text, key = _passkey_text(model, 512, 0.3, 3)
    with Server(["llm", "--model", model, "--new-tokens", "6", "--timeout", "6", "--out", str(tmp_path)]) as server:
        time.sleep(9)  # idle past --timeout: the ranks' rounds keep every collective short
        client = _client(server)
        done = client.completions.create(model=model, prompt=text, max_tokens=6, temperature=0)
        assert done.choices[0].text == key and done.choices[0].finish_reason == "length"
        prompt_tokens = len(_tokenizer(model)(text).input_ids)
        assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
            prompt_tokens, 6, prompt_tokens + 6) and prompt_tokens == 512
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=6,
                                              temperature=0)
        assert chat.choices[0].message.content == key and chat.usage.prompt_tokens == 512

        assert _streamed_equals_whole(client, model, text, 12, temperature=0).startswith(key)
        _streamed_equals_whole(client, model, text, 12, temperature=0.9, seed=7)
        tokens = list(client.completions.create(model=model, prompt=text, max_tokens=12, stream=True, temperature=0))
        assert sum(1 for chunk in tokens if chunk.choices[0].text) == 12  # dense: each token as it is decided

        passkey = call(server.url, "/v1/completions", {"context": 256, "seed": 1, "temperature": 0})
        assert passkey.body["choices"][0]["text"] == passkey.body["paragen"]["reports"][0]["passkey"]
        for bad, words in (({"context": 3}, "too short"), ({"prompt": text, "stop": ["."]}, "stop is not a field"),
                           ({"prompt": text, "stream_options": {"include_usage": True}}, "add stream: true")):
            reply = call(server.url, "/v1/completions", bad)
            assert reply.status == 400 and words in reply.body["error"]["message"], reply
        reply = call(server.url, "/v1/chat/completions", {"prompt": text})
        assert reply.status == 400 and "prompt is not a field" in reply.body["error"]["message"]
        with pytest.raises(BadRequestError, match="messages must hold at least 1"):
            client.chat.completions.create(model=model, messages=[], max_tokens=4)

        # a client that leaves mid-stream: the ranks stop decoding at their next token
        stream = client.completions.create(model=model, prompt=text, max_tokens=4000, stream=True)
        next(iter(stream))
        stream.close()
        wait_for(server.url, 'paragen_requests_total{outcome="cancelled"} 1')
        stopped = re.search(r"request \w+: 499 .* cancelled after (\d+) new tokens", server.log(0))
        assert stopped and 1 <= int(stopped.group(1)) < 4000, server.log(0)[-3000:]

        server.signal(signal.SIGINT, ranks=(1,))  # any rank's signal stops every rank
        assert server.wait() == [0, 0]


def test_a_speculative_server_streams_each_rounds_tokens_and_answers_as_the_dense_one(tmp_path):
    model = "tiny-passkey-lm"
    text, key = _passkey_text(model, 2048, 0.6, 4)
    args = ["llm", "--model", model, "--kv", "speculative", "--retrieval-budget", "512", "--timeout", "60",
            "--out", str(tmp_path)]
    with Server(args) as server:
        client = _client(server)
        greedy = _streamed_equals_whole(client, model, text, 24, temperature=0)
        assert greedy.startswith(key)
        _streamed_equals_whole(client, model, text, 24, temperature=0.8, top_p=0.95, seed=3)
        server.signal(signal.SIGTERM)
        assert server.wait() == [0, 0]
    dense = Server(["llm", "--model", model, "--timeout", "60", "--out", str(tmp_path / "dense")])
    with dense:
        assert _client(dense).completions.create(model=model, prompt=text, max_tokens=24,
                                                 temperature=0).choices[0].text == greedy  # lossless
