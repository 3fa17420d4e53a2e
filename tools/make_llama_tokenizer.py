"""Write the offline Llama tokenizer of the embedded tiny-hunyuanvideo pipeline (its `tokenizer` folder).

transformers 5 rebuilds a LlamaTokenizer(Fast) from the vocab and merges of tokenizer.json (Metaspace
pre-tokeniser without splitting, BPE with byte fallback), so this writes that layout: ids 0-3 <unk> <s> </s> <pad>,
the 256 byte-fallback pieces <0x00>..<0xFF>, single characters, then left-to-right merge chains that make every
word of the HunyuanVideo prompt template and every prompt word of tools/make_t5_tokenizer.py one token ("▁word"),
and the Llama-3 header tokens <|start_header_id|> <|end_header_id|> <|eot_id|> as special added tokens.
HunyuanVideoPipeline crops the first 95 tokens (crop_start) of "<template with the prompt>": the template prefix
tokenises to exactly 95 tokens (with <s>), as with the real Llama-3 tokenizer, so the kept tokens start at the prompt.
Deterministic:

    python tools/make_llama_tokenizer.py [OUT_DIR]   # default: configs/tiny-hunyuanvideo/tokenizer
"""
from __future__ import annotations

import re
import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_t5_tokenizer import ACCENTED, SUFFIXES, WORDS  # noqa: E402
from tokenizer_files import write_json_files  # noqa: E402

SPACE = "\u2581"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
HEADER = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = (  # diffusers' HunyuanVideo DEFAULT_PROMPT_TEMPLATE
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
CROP_START = 95


def targets() -> list[str]:
    """Whole tokens to build: '▁word' for every word (template and prompt words), 'word' for the template words that
    follow a special token or newlines, '\\n\\n'."""
    words = list(WORDS) + re.findall(r"[A-Za-z]+", TEMPLATE.replace("<|", " ").replace("|>", " "))
    out: list[str] = []
    for w in words:
        for t in (SPACE + w,):
            if t not in out:
                out.append(t)
    for t in ("system", "user", "Describe"):
        out.append(t)
    out.append("\n\n")
    return out


def build() -> Tokenizer:
    vocab: dict[str, int] = {}

    def add(piece: str) -> None:
        if piece not in vocab:
            vocab[piece] = len(vocab)

    for s in SPECIAL:
        add(s)
    for b in range(256):
        add(f"<0x{b:02X}>")
    for c in SPACE + "\n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation + ACCENTED:
        add(c)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    # chains of '▁' words first: every merge that completes a '▁' word ranks before any other merge
    ordered = sorted(targets(), key=lambda t: not t.startswith(SPACE))
    for t in ordered:
        for i in range(2, len(t) + 1):
            pair = (t[: i - 1], t[i - 1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                add(t[:i])
    for s in HEADER:
        add(s)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL + HEADER])
    return tok


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": 512,
        "padding_side": "right",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }
    write_json_files(folder, {"tokenizer_config.json": config})


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "paragen" / "pipelines" / "configs" / "tiny-hunyuanvideo" / "tokenizer"
    write(out)
    prefix = TEMPLATE.split("{}")[0]
    print(out, build().get_vocab_size(), "prefix tokens:", len(build().encode(prefix).ids))
