"""Write the offline T5 tokenizer shipped with the embedded DiT pipelines (tiny-pixart, tiny-sd3, tiny-flux, tiny-wan,
tiny-wan22, tiny-hunyuandit, tiny-auraflow, tiny-allegro, tiny-ltx, tiny-cogvideox, tiny-mochi).

Real T5 tokenizers are SentencePiece Unigram models of 32,000 pieces plus 100 sentinel tokens; they cannot be
downloaded here, so this builds a small stand-in with the same layout and behaviour, using only the
`tokenizers` library: a Unigram model whose ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>`, then a few hundred
pieces (the word-boundary marker, single ASCII and accented Latin characters, common suffixes, common English
words as `▁word`), then the sentinels `<extra_id_99>` ... `<extra_id_0>`; whitespace split + Metaspace
pre-tokenisation, `</s>` appended to every sequence. Characters outside the vocabulary (CJK, emoji, rare
symbols) become `<unk>`, as in T5.

The output is deterministic; re-running it must leave the committed files unchanged:

    python tools/make_t5_tokenizer.py            # writes every T5 tokenizer folder of the embedded configs
    python tools/make_t5_tokenizer.py OUT_DIR    # or only OUT_DIR
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_files import write_folders, write_json_files  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "paragen" / "pipelines" / "configs"
FOLDERS = ("tiny-pixart/tokenizer", "tiny-sd3/tokenizer_3", "tiny-flux/tokenizer_2", "tiny-wan/tokenizer",
           "tiny-wan22/tokenizer", "tiny-hunyuandit/tokenizer_2", "tiny-auraflow/tokenizer", "tiny-allegro/tokenizer",
           "tiny-ltx/tokenizer", "tiny-cogvideox/tokenizer", "tiny-mochi/tokenizer", "tiny-helios/tokenizer")

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
EXTRA_IDS = 100
MODEL_MAX_LENGTH = 512  # as t5-v1_1-xxl; the pipelines pass their own max_sequence_length
SPACE = "\u2581"  # SentencePiece's word-boundary marker

ACCENTED = "àáâäãåæçèéêëìíîïñòóôöõøœùúûüýÿß" "ÀÁÂÄÃÅÆÇÈÉÊËÌÍÎÏÑÒÓÔÖÕØŒÙÚÛÜÝ"
SUFFIXES = (
    "s", "es", "ed", "ing", "er", "ers", "est", "ly", "y", "ion", "tion", "ness", "ful", "less", "able",
    "al", "ic", "ish", "ist", "ment", "en", "ous", "ive", "ity", "'s", "n't",
)
WORDS = (
    # function words
    "a", "an", "the", "of", "in", "on", "at", "by", "for", "with", "from", "to", "into", "over", "under",
    "above", "below", "behind", "near", "and", "or", "but", "is", "are", "was", "be", "it", "its", "this",
    "that", "as", "up", "down", "out", "off", "very", "no", "not", "some", "many", "one", "two", "three",
    "four", "five", "his", "her", "their", "he", "she", "they", "we", "you", "i", "my", "who", "has", "have",
    # prompt vocabulary
    "photo", "picture", "image", "painting", "drawing", "illustration", "portrait", "landscape", "render",
    "art", "style", "detailed", "realistic", "high", "quality", "resolution", "sharp", "focus", "lighting",
    "light", "dark", "bright", "soft", "cinematic", "digital", "oil", "watercolor", "sketch", "close",
    "view", "wide", "angle", "shot", "background", "foreground", "scene", "color", "colors", "colorful",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "brown", "gold",
    "golden", "silver", "big", "small", "large", "tiny", "little", "old", "new", "young", "beautiful",
    "happy", "cute", "tall", "long", "round", "square", "wooden", "metal", "glass", "stone", "cube",
    "sphere", "box", "ball", "table", "chair", "room", "house", "building", "city", "street", "road",
    "car", "bus", "train", "boat", "ship", "plane", "bike", "tree", "trees", "forest", "flower", "flowers",
    "grass", "garden", "field", "mountain", "mountains", "hill", "river", "lake", "sea", "ocean", "beach",
    "sand", "desert", "snow", "rain", "water", "fire", "sky", "cloud", "clouds", "sun", "sunset", "sunrise",
    "moon", "star", "stars", "night", "day", "morning", "evening", "winter", "summer", "spring", "autumn",
    "space", "planet", "earth", "world", "man", "woman", "men", "women", "person", "people", "boy", "girl",
    "child", "baby", "face", "eyes", "hair", "hand", "hands", "astronaut", "robot", "king", "queen",
    "knight", "wizard", "dragon", "horse", "dog", "cat", "bird", "fish", "lion", "tiger", "bear", "fox",
    "wolf", "rabbit", "cow", "owl", "cactus", "food", "apple", "coffee", "cup", "bowl", "pizza", "cake",
    "book", "door", "window", "wall", "floor", "bridge", "castle", "tower", "church", "market", "park",
    "riding", "sitting", "standing", "walking", "running", "flying", "holding", "wearing", "looking",
    "playing", "eating", "reading", "made", "covered", "filled", "front", "top", "side", "middle", "center",
    "left", "right", "hat", "dress", "shirt", "jacket", "glasses", "sign", "text", "word", "words", "logo",
    "says", "written", "cartoon", "anime", "3d", "4k", "8k", "hd", "photorealistic", "studio", "camera",
    "lens", "macro", "bokeh", "vibrant", "pastel", "neon", "vintage", "modern", "futuristic", "fantasy",
    "magic", "epic", "dramatic", "peaceful", "calm", "misty", "foggy", "sunny", "cloudy", "stormy",
)


def vocabulary(words: tuple[str, ...] = WORDS) -> list[tuple[str, float]]:
    """(piece, log-probability) in id order; whole words score higher than the characters spelling them."""
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation + ACCENTED
    pieces: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, -3.0)]
    pieces += [(c, -10.0) for c in chars]
    pieces += [(SPACE + c, -9.0) for c in string.ascii_lowercase + string.digits]
    pieces += [(s, -8.0) for s in SUFFIXES]
    seen = {p for p, _ in pieces}
    for rank, word in enumerate(words):
        piece = SPACE + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -6.0 - rank / 1000))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    return pieces


def build(words: tuple[str, ...] = WORDS) -> Tokenizer:
    """The tokenizer whose whole-word pieces are `words`."""
    tok = Tokenizer(Unigram(vocabulary(words), unk_id=2, byte_fallback=False))
    metaspace = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, eos_id)]
    )
    specials = [PAD, EOS, UNK] + [f"<extra_id_{i}>" for i in reversed(range(EXTRA_IDS))]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


def write(folder: Path, words: tuple[str, ...] = WORDS, max_length: int = MODEL_MAX_LENGTH) -> None:
    """Write the tokenizer (whole-word pieces `words`, `max_length` tokens a pipeline pads to by default) as a
    transformers T5 tokenizer folder."""
    folder.mkdir(parents=True, exist_ok=True)
    build(words).save(str(folder / "tokenizer.json"), pretty=True)
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": max_length,
        "extra_ids": EXTRA_IDS,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        **special,
    }
    write_json_files(folder, {"tokenizer_config.json": config, "special_tokens_map.json": special})


if __name__ == "__main__":
    write_folders(sys.argv[1:], [CONFIGS / f for f in FOLDERS], write, lambda: build().get_vocab_size())
