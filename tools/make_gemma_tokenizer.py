"""Write the offline Gemma tokenizer shipped with the embedded Gemma-conditioned pipelines (tiny-lumina2, tiny-sana, tiny-ltx2).

Real Gemma tokenizers are SentencePiece BPE models of 256,000 pieces with byte fallback; they cannot be downloaded
here, so this builds a small stand-in with the same layout and behaviour, using only the `tokenizers` library and
exactly the pipeline transformers' `GemmaTokenizer` rebuilds around the vocabulary and merges of `tokenizer.json`
(a BPE model with byte fallback and `<unk>`, a normaliser that turns every space into the word-boundary marker `▁`,
no prefix space, a decoder that turns `▁` back into spaces and fuses the fallback bytes):

- ids 0-6: `<pad>`, `<eos>`, `<bos>`, `<unk>`, `<mask>`, `<start_of_turn>`, `<end_of_turn>` (Gemma's first four ids
  are the same; its turn markers are 106 and 107);
- the 256 byte-fallback pieces `<0x00>` ... `<0xFF>`, so any text encodes without `<unk>`;
- single characters (`▁`, newline, ASCII letters, digits, punctuation);
- the common English and prompt words of the T5 stand-in (`tools/make_t5_tokenizer.py`, `WORDS`) and the words of
  Lumina-Image-2.0's system prompt (`SYSTEM_WORDS`) as `▁word` pieces,
  each reached through the merge chain `▁w`, `▁wo`, ... (every merge joins a `▁` prefix and one character, so the
  merges never cross a word boundary and the result does not depend on merge order between words);
- `<bos>` prepended to every sequence (Gemma's `add_bos_token`), no `<eos>`.

A prompt's first word has no `▁` (Gemma adds no prefix space), so it is spelled in characters; later words that are
in the list are one piece each.

The output is deterministic; re-running it must leave the committed files unchanged:

    python tools/make_gemma_tokenizer.py            # writes every Gemma tokenizer folder of the embedded configs
    python tools/make_gemma_tokenizer.py OUT_DIR    # or only OUT_DIR
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_t5_tokenizer import WORDS  # noqa: E402
from tokenizer_files import write_folders, write_json_files  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "paragen" / "pipelines" / "configs"
FOLDERS = ("tiny-lumina2/tokenizer", "tiny-sana/tokenizer", "tiny-ltx2/tokenizer")
# The words of Lumina2Pipeline's default system prompt ("You are an assistant designed to generate superior images
# with the superior degree of image-text alignment based on textual prompts or user prompts. <Prompt Start> ...")
# that WORDS lacks, so that the prompt Lumina 2 encodes stays short.
SYSTEM_WORDS = ("assistant", "designed", "generate", "superior", "images", "degree", "image-text",
                "alignment", "based", "textual", "prompts.", "prompts", "user", "<Prompt", "Start>")

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIALS = (PAD, EOS, BOS, UNK, MASK, START_OF_TURN, END_OF_TURN)
MODEL_MAX_LENGTH = 8192  # Gemma 2's positions; the pipelines pass their own max_sequence_length
SPACE = "\u2581"  # SentencePiece's word-boundary marker


def vocabulary(words: tuple[str, ...] = WORDS + SYSTEM_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(piece -> id, merges in rank order)."""
    pieces: list[str] = list(SPECIALS)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    pieces += [SPACE, "\n"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    seen = set(pieces)
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = SPACE + word
        for end in range(2, len(piece) + 1):
            left, right, joined = piece[: end - 1], piece[end - 1], piece[:end]
            if right not in seen:  # a character outside the list: the word stays spelled out
                break
            if joined not in seen:
                seen.add(joined)
                pieces.append(joined)
                merges.append((left, right))
    return {p: i for i, p in enumerate(pieces)}, merges


def build(words: tuple[str, ...] = WORDS + SYSTEM_WORDS) -> Tokenizer:
    """The tokenizer whose whole-word pieces are `words` (as transformers' GemmaTokenizer builds it)."""
    vocab, merges = vocabulary(words)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=UNK, dropout=None, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single=[BOS, "$A"], pair=[BOS, "$A", BOS, "$B"], special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    return tok


def write(folder: Path, words: tuple[str, ...] = WORDS + SYSTEM_WORDS, max_length: int = MODEL_MAX_LENGTH) -> None:
    """Write the tokenizer as a transformers Gemma tokenizer folder."""
    folder.mkdir(parents=True, exist_ok=True)
    build(words).save(str(folder / "tokenizer.json"), pretty=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "mask_token": MASK,
               "additional_special_tokens": [START_OF_TURN, END_OF_TURN]}
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "model_max_length": max_length,
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",  # as Gemma 2's; Lumina2Pipeline sets right padding itself
        "clean_up_tokenization_spaces": False,
        **special,
    }
    write_json_files(folder, {"tokenizer_config.json": config, "special_tokens_map.json": special})


if __name__ == "__main__":
    write_folders(sys.argv[1:], [CONFIGS / f for f in FOLDERS], write, lambda: build().get_vocab_size())
