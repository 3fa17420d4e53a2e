"""Write the offline Qwen-style byte-level BPE tokenizer shipped with the embedded pipelines whose text encoder is a
Qwen model: tiny-qwenimage (Qwen2.5-VL), tiny-flux2 (FLUX.2 [klein], Qwen3) and tiny-zimage (Z-Image, Qwen3).

Real Qwen tokenizers are byte-level BPE models of 151,643 pieces plus added tokens; they cannot be downloaded here,
so this builds a small stand-in with the same layout and behaviour, using only the `tokenizers` library:

- NFC normalisation, Qwen2's pre-tokenisation regex (letters glued to one leading non-letter such as the space,
  every digit its own piece, newlines apart) then byte-level mapping (a space is `Ġ`), a byte-level decoder: any
  text encodes (every byte is a piece) and decodes back exactly;
- a BPE model whose first 256 ids are the bytes, then the merges learnt (deterministically: no vocabulary limit,
  so training runs until every corpus word is one piece) from a fixed corpus: the words (and the blank line) of
  the pipelines' prompt templates and the prompt vocabulary of `tools/make_t5_tokenizer.py`, each as `word`,
  ` word` and ` Word`; whole words are then one token, as in Qwen, so Qwen-Image's system prompt up to the user's
  text is 34 tokens, the `prompt_template_encode_start_idx` its pipeline drops;
- after the BPE pieces, Qwen3's added tokens in Qwen's order: `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>`
  (eos), the grounding and vision tokens (`<|vision_start|>`, `<|vision_end|>`, `<|vision_pad|>`,
  `<|image_pad|>`, `<|video_pad|>`, which Qwen2.5-VL's config names by id: see `special_ids`), the tool-call,
  fill-in-the-middle and `<think>`/`</think>` tokens (the last ones not special, as in Qwen3);
- a chat template that writes what Qwen3's does for plain messages (`<|im_start|>role\\ncontent<|im_end|>\\n`, the
  generation prompt `<|im_start|>assistant\\n`, then `<think>\\n\\n</think>\\n\\n` when `enable_thinking` is false).

The text encoders' `vocab_size` is the tokenizer's size rounded up to a multiple of 64 (`model_vocab_size`), as
Qwen pads its embedding table; their configs write it and the ids above as numbers (1664; `<|endoftext|>` 1630,
`<|im_end|>` 1632, `<|vision_start|>` 1639, `<|image_pad|>` 1642, ...), so a change of the corpus must update
them (this script prints both).

The output is deterministic; re-running it must leave the committed files unchanged:

    python tools/make_bpe_tokenizer.py            # writes every Qwen tokenizer folder of the embedded configs
    python tools/make_bpe_tokenizer.py OUT_DIR    # or only OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_t5_tokenizer import WORDS  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "paragen" / "pipelines" / "configs"
FOLDERS = ("tiny-qwenimage/tokenizer", "tiny-flux2/tokenizer", "tiny-zimage/tokenizer")

# Qwen2's pre-tokenisation regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MODEL_MAX_LENGTH = 131072
PAD, EOS = "<|endoftext|>", "<|im_end|>"
# (token, special) in Qwen3's order of ids (151643 on in the real vocabulary).
ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True), ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
# The prompt templates of the pipelines that use this tokenizer (Qwen-Image's system prompt, the chat roles, the
# blank lines around Qwen3's empty thinking block, one token as in Qwen).
TEMPLATES = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "user\n", "assistant\n", "\n\n",
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def corpus() -> list[str]:
    """The training texts: the templates, then every prompt word alone, after a space and capitalised."""
    texts = list(TEMPLATES)
    for word in WORDS:
        texts += [word, " " + word, " " + word[:1].upper() + word[1:]]
    return texts


def build() -> Tokenizer:
    """The tokenizer, its merges learnt from `corpus()`."""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=0, show_progress=False, special_tokens=[],
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS if not s])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in ADDED_TOKENS if s])
    # add_special_tokens after add_tokens would reorder the ids: put every added token back in Qwen's order.
    return _ordered(tok)


def _ordered(tok: Tokenizer) -> Tokenizer:
    """`tok` with its added tokens numbered in `ADDED_TOKENS` order right after the BPE pieces."""
    data = json.loads(tok.to_str())
    base = len(data["model"]["vocab"])
    by_content = {t["content"]: t for t in data["added_tokens"]}
    data["added_tokens"] = [{**by_content[t], "id": base + i} for i, (t, _) in enumerate(ADDED_TOKENS)]
    return Tokenizer.from_str(json.dumps(data))


def special_ids(tok: Tokenizer | None = None) -> dict[str, int]:
    """The ids of the added tokens, by content (the text encoders' configs name some of them)."""
    tok = tok or build()
    return {t: tok.token_to_id(t) for t, _ in ADDED_TOKENS}


def model_vocab_size(tok: Tokenizer | None = None) -> int:
    """The text encoders' embedding rows: the tokenizer's size rounded up to a multiple of 64."""
    size = (tok or build()).get_vocab_size(with_added_tokens=True)
    return -(-size // 64) * 64


def write(folder: Path) -> None:
    """Write the tokenizer as a transformers Qwen2 tokenizer folder (tokenizer.json, tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str]) -> None:
    folders = [Path(a) for a in argv] or [CONFIGS / f for f in FOLDERS]
    tok = build()
    for folder in folders:
        write(folder)
        print(f"wrote {folder} ({tok.get_vocab_size(with_added_tokens=True)} tokens, "
              f"text encoder vocab_size {model_vocab_size(tok)})")
    print("ids:", json.dumps(special_ids(tok)))


if __name__ == "__main__":
    main(sys.argv[1:])
