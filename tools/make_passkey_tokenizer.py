"""Write the tokenizer shipped with the embedded passkey LLMs (tiny-passkey, tiny-passkey-lm, tiny-passkey-draft,
tiny-llama): the passkey world's text to its tokens and back, exactly (`paragen/pipelines/llm/passkey.py` says the
surface: words, `The pass key is 594833`, `What is the pass key?`).

The vocabulary is the models' (92 ids): `<s>`, the key marker, the question, the filler words, `<unk>` for text
outside that world, and 60 slot-tagged digits — digit v in slot j of the key is its own token, so one digit's text
maps to six different ids by where it stands after the key marker. A `tokenizers` pipeline does that without code
of its own (a custom component could not be saved): the normaliser rewrites the two phrases into one-word marks and
each key digit, slot 5 first, into a mark of its slot and value (a regex with a fixed-length look-behind on the key
marker and the digits before it); whitespace splits the words; a word-level model gives the ids; `<s>` is added to
every sequence. Decoding replaces every mark by its text and joins the words with spaces, the key's digits without
(slots 1-5 carry WordPiece's `##`). A minimal chat template joins the messages' contents with spaces after `<s>`
(the passkey world has no roles).

The output is deterministic; re-running it must leave the committed files unchanged:

    python tools/make_passkey_tokenizer.py            # every embedded passkey model's folder
    python tools/make_passkey_tokenizer.py OUT_DIR    # or only OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from paragen.pipelines.llm.passkey import (ASK, ASK_TEXT, BOS, BOS_TEXT, DIGITS, KEY, KEY_TEXT, UNK,  # noqa: E402
                                           WORD_IDS, digit_token)

CONFIGS = ROOT / "paragen" / "pipelines" / "configs"
MODELS = ("tiny-passkey", "tiny-passkey-lm", "tiny-passkey-draft", "tiny-llama")
KEY_MARK, ASK_MARK, UNK_TEXT = "⟨key⟩", "⟨ask⟩", "<unk>"
CONTINUE = "##"  # WordPiece's continuation prefix: glued to the word before when decoded
MAX_LENGTH = 131072  # the models' positions
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
                 "{% if not loop.last %} {% endif %}{% endfor %}")


def digit_mark(slot: int, value: int) -> str:
    """The one-word mark of digit `value` in key slot `slot` (letters only: no digit survives normalisation)."""
    return ("" if slot == 0 else CONTINUE) + f"⟨{'ABCDEF'[slot]}{'abcdefghij'[value]}⟩"


def build() -> Tokenizer:
    """The passkey tokenizer."""
    vocab = {BOS_TEXT: BOS, KEY_MARK: KEY, ASK_MARK: ASK, **WORD_IDS, UNK_TEXT: UNK}
    vocab.update({digit_mark(j, v): digit_token(j, v) for j in range(DIGITS) for v in range(10)})
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK_TEXT))
    marks = [normalizers.Replace(ASK_TEXT, f" {ASK_MARK} "), normalizers.Replace(f"{KEY_TEXT} ", f" {KEY_MARK} ")]
    for slot in reversed(range(DIGITS)):  # a slot's look-behind reads the digits before it, still unmarked
        marks += [normalizers.Replace(Regex(f"(?<={KEY_MARK} [0-9]{{{slot}}}){value}"), f" {digit_mark(slot, value)} ")
                  for value in range(10)]
    tokenizer.normalizer = normalizers.Sequence(marks)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS_TEXT} $A", special_tokens=[(BOS_TEXT, BOS)])
    texts = [decoders.Replace(KEY_MARK, KEY_TEXT), decoders.Replace(ASK_MARK, ASK_TEXT)]
    texts += [decoders.Replace(digit_mark(j, v), ("" if j == 0 else CONTINUE) + str(v))
              for j in range(DIGITS) for v in range(10)]
    tokenizer.decoder = decoders.Sequence([*texts, decoders.WordPiece(prefix=CONTINUE, cleanup=False)])
    tokenizer.add_special_tokens([AddedToken(BOS_TEXT, special=True, normalized=False)])
    return tokenizer


def write(folder: Path) -> None:
    """tokenizer.json and tokenizer_config.json in `folder`, as `PreTrainedTokenizerFast` loads them."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=build(), bos_token=BOS_TEXT, unk_token=UNK_TEXT,
                                   model_max_length=MAX_LENGTH, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> None:
    for folder in [Path(argv[0])] if argv else [CONFIGS / name for name in MODELS]:
        write(folder)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
