"""Passkey retrieval with the trained `tiny-passkey` model at 4K and 16K tokens, through the sharded cache
with `dense` and with `offload` at the default budget (1/64 of the context).

Each length asks for several keys at depths spread evenly from the start to the end of the filler; an
answer counts when all six digits are right. Both modes must answer every key (accuracy 1.0): what
`tools/train_passkey.py` measured for this model is in `configs/tiny-passkey/training_log.json`.
"""
from __future__ import annotations

import pytest
import torch

from paragen.parallel import ParallelConfig
from paragen.parallel.llm import KVConfig, cache_argument
from paragen.pipelines.llm import parallelize_llm
from paragen.pipelines.llm.loading import load_llm
from paragen.pipelines.llm.passkey import DIGITS, WORD_IDS, decode_key, make_prompt

TRIALS = {4096: 12, 16384: 6}


@pytest.fixture(scope="module")
def models():
    made = {}
    for mode in ("dense", "offload"):
        model = load_llm("tiny-passkey")
        made[mode] = (model, parallelize_llm(model, ParallelConfig(), KVConfig(mode=mode)))
    return made


@pytest.mark.parametrize("length", list(TRIALS))
def test_dense_and_offload_answer_every_key(models, length):
    generator = torch.Generator().manual_seed(length)
    answers = {"dense": [], "offload": []}
    keys = []
    for i in range(TRIALS[length]):
        prompt = make_prompt(length, (i + 0.5) / TRIALS[length], generator)
        keys.append(prompt.key)
        for mode, (model, runtime) in models.items():
            cache = runtime.new_cache()
            out = model.generate(prompt.tokens.unsqueeze(0), **cache_argument(cache), max_new_tokens=DIGITS,
                                 do_sample=False, top_k=None, top_p=None)
            cache.close()
            answers[mode].append(decode_key(out[0, length:].tolist()))
    assert answers["dense"] == keys, f"dense at {length}: {answers['dense']} for {keys}"
    assert answers["offload"] == keys, f"offload at {length}: {answers['offload']} for {keys}"


def test_the_language_model_twin_answers_and_goes_on_with_the_text():
    """`tiny-passkey-lm` (trained also on the text after the answer) answers densely at 4K and then writes
    filler words, never another digit or marker."""
    model = load_llm("tiny-passkey-lm")
    runtime = parallelize_llm(model, ParallelConfig(), KVConfig(mode="dense"))
    generator = torch.Generator().manual_seed(11)
    for i in range(4):
        prompt = make_prompt(4096, (i + 0.5) / 4, generator)
        cache = runtime.new_cache()
        out = model.generate(prompt.tokens.unsqueeze(0), **cache_argument(cache), max_new_tokens=DIGITS + 16,
                             do_sample=False, top_k=None, top_p=None)[0, 4096:].tolist()
        cache.close()
        assert decode_key(out) == prompt.key
        assert set(out[DIGITS:]) <= set(WORD_IDS.values()), out
