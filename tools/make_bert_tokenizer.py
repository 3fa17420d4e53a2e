"""Write the offline BERT tokenizer of the embedded tiny-hunyuandit pipeline (its `tokenizer` folder).

HunyuanDiT's first text encoder is a BERT (a Chinese RoBERTa, WordPiece, [CLS] ... [SEP]); it cannot be downloaded
here, so this builds a small stand-in with the same layout and behaviour, using only the `tokenizers` library: a
WordPiece vocabulary whose ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK], then single characters (ASCII, accented
Latin, a few common CJK characters), the "##" continuations of the characters and of common suffixes, and the
prompt words of tools/make_t5_tokenizer.py as whole words; BERT's normaliser (lower case, accents kept, CJK
characters split apart) and pre-tokeniser, "[CLS] $A [SEP]" around every sequence. Characters outside the
vocabulary become [UNK], as in BERT. Deterministic:

    python tools/make_bert_tokenizer.py [OUT_DIR]   # default: configs/tiny-hunyuandit/tokenizer
"""
from __future__ import annotations

import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_t5_tokenizer import ACCENTED, SUFFIXES, WORDS  # noqa: E402
from tokenizer_files import write_json_files  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CJK = (  # common Chinese characters (HunyuanDiT prompts are often Chinese)
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权"
    "收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信"
    "马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连"
    "断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存"
    "候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞"
)
MAX_LENGTH = 512


def vocabulary() -> list[str]:
    """The WordPiece pieces in id order."""
    chars = string.ascii_lowercase + string.digits + string.punctuation + ACCENTED.lower()
    pieces = list(SPECIAL)
    pieces += [c for c in dict.fromkeys(chars + CJK)]
    pieces += [f"##{c}" for c in dict.fromkeys(string.ascii_lowercase + string.digits + ACCENTED.lower())]
    pieces += [f"##{s}" for s in SUFFIXES if s.isalpha()]
    pieces += [w for w in WORDS if w not in pieces]
    return list(dict.fromkeys(pieces))


def build() -> Tokenizer:
    vocab = {piece: i for i, piece in enumerate(vocabulary())}
    tok = Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    return tok


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok = build()
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    (folder / "vocab.txt").write_text("".join(f"{piece}\n" for piece in vocabulary()), encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": False,
        "clean_up_tokenization_spaces": True,
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    write_json_files(folder, {"tokenizer_config.json": config})


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "paragen/pipelines/configs/tiny-hunyuandit/tokenizer"
    write(out)
    print(out, build().get_vocab_size())
