"""OFATokenizerZH (BERT basic tokenization + tokenizers' WordPiece) against ModelScope's OFATokenizerZH.

The vocabulary is the Chinese demo checkpoint's ``vocab.txt`` (written on its own here: no weights needed). The
reference is ModelScope's ``OFATokenizerZH.from_pretrained`` plus the ``<code_*>``/``<bin_*>`` tokens added
exactly as ``OfaForAllTasks`` adds them.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ofa_captioning.demo_vocab import write_demo_vocab_txt
from ofa_captioning.tokenizer import (
    NUM_BINS,
    NUM_CODES,
    OFATokenizerZH,
    load_tokenizer,
    postprocess_caption,
)

PROMPT = " 图片描述了什么内容?"

EDGE_STRINGS = [
    PROMPT,
    "图片描述了什么内容?",
    "",
    " ",
    "\t\n\r\u3000\u00a0\u2028",
    "一款时尚女包",
    "iPhone 12手机，全新！",
    "Hello World HELLO",
    "[UNK] [CLS] [SEP] [MASK] <S> <T>",
    "<s>图片</s><pad><unk><mask>",
    "<S>图片</S><PAD><UNK><MASK>",  # lowercased first, then they are special tokens
    "<\x00s> <s\u200b> <\ufffdmask>",  # cleaned into a special token's text: never_split keeps it whole
    "x<code_5>y <CODE_6> <bin_999><bin_1000><code_8192>",
    "<code_5 > < bin_5> <<s>>",
    "ÉMIGRÉ café naïve Ångström e\u0301 E\u0301",
    "ΑΣ ΟΔΟΣ σς İstanbul ß ﬁ",
    "\u2329 \uf900 \u2f800 \U0002b820 \U0002f800 \u3400",
    "🙂🚀 한국어 日本語のテキスト ไทย",
    "\x00\x01\x7f\u200b\u200d\ufeff\ufffd\U000e0001 control",
    "\U00010ffff \u0378 \U000e01ef unassigned",
    "１２３ ＡＢＣ ａｂｃ",
    "2024年3月5日 3.14 1,000 100% ￥99",
    "##a ## ###",
    "a" * 100,
    "a" * 101,
    "图" * 300,
]

_ASCII_WORDS = ["iphone", "Nike", "the", "a", "phone", "max", "PRO", "t-shirt", "hello", "word", "x", "Z"]
_PUNCT = list("，。、；：？！“”‘’（）《》【】「」…—～·,.!?;:'\"()[]{}<>-_/\\@#$%^&*+=|`~")
_WHITESPACE = [
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\u3000",
    "\u00a0",
    "\u2009",
    "\u2028",
    "\u0085",
    "\x0b",
    "\x0c",
]
_CONTROL = ["\x00", "\x01", "\x1f", "\x7f", "\u200b", "\u200e", "\ufeff", "\ufffd", "\u00ad"]
_ACCENTED = list("éèêëàâäáçñöóôüúùíîïÉÈÀÇÑÖÜ") + ["e\u0301", "a\u0300", "o\u0308", "n\u0303"]
_SPECIALS = ["<s>", "</s>", "<pad>", "<unk>", "<mask>", "<S>", "<MASK>", "<code_1>", "<bin_2>", "<CODE_3>"]


def _random_char(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.30:
        return chr(rng.randrange(0x4E00, 0x9FA6))  # in and out of the demo vocabulary
    if r < 0.33:
        return chr(
            rng.choice(
                [rng.randrange(0x3400, 0x4DC0), rng.randrange(0x20000, 0x2CEB0), 0xF900 + rng.randrange(512)]
            )
        )
    if r < 0.38:
        return chr(
            rng.randrange(0x80, 0x3000)
        )  # Latin-1 .. CJK symbols: letters, marks, punctuation, symbols
    if r < 0.40:
        return chr(rng.randrange(0x10000, 0x30000))  # astral: emoji, rare scripts, unassigned
    if r < 0.45:
        return rng.choice("0123456789")
    if r < 0.52:
        return rng.choice(_PUNCT)
    if r < 0.62:
        return rng.choice(_WHITESPACE)
    if r < 0.65:
        return rng.choice(_CONTROL)
    if r < 0.70:
        return rng.choice(_ACCENTED)
    if r < 0.73:
        return rng.choice(_SPECIALS)
    if r < 0.76:
        return chr(rng.randrange(0xFF01, 0xFF5F))  # full-width ASCII
    return rng.choice(_ASCII_WORDS)


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(_random_char(rng) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def random_ids(n: int, tok: OFATokenizerZH, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    base = tok.vocab_size
    seqs = []
    for _ in range(n):
        ids = []
        for _ in range(rng.randint(0, 24)):
            r = rng.random()
            if r < 0.5:
                ids.append(rng.randrange(base))  # includes [UNK], [CLS], ## pieces, CJK, ASCII
            elif r < 0.65:
                ids.append(rng.choice([tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id]))
            elif r < 0.85:
                ids.append(rng.randrange(tok.mask_id + 1, len(tok)))  # <code_*> / <bin_*>
            else:
                ids.append(rng.randrange(base - 700, base))  # the ## word pieces at the end of vocab.txt
        seqs.append(ids)
    return seqs


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zh-vocab")
    write_demo_vocab_txt(d)
    return d


@pytest.fixture(scope="module")
def tok(vocab_dir) -> OFATokenizerZH:
    return OFATokenizerZH.from_pretrained(vocab_dir)


def _reference_tokenizer(path: Path):
    """ModelScope's tokenizer as OfaForAllTasks builds it for a zh/cn checkpoint."""
    from load_tests.testkit.reference import install_stand_ins

    install_stand_ins()
    from modelscope.models.multi_modal.ofa.tokenization_ofa import OFATokenizerZH as RefTokenizer

    ref = RefTokenizer.from_pretrained(str(path))
    ref.add_tokens([f"<code_{i}>" for i in range(NUM_CODES)])
    ref.add_tokens([f"<bin_{i}>" for i in range(NUM_BINS)])
    return ref


@pytest.fixture(scope="module")
def ref_tok(vocab_dir):
    return _reference_tokenizer(vocab_dir)


def _encode_mismatches(tok, ref, strings, max_length=256):
    bad = []
    for s in strings:
        expected = ref(s, add_special_tokens=False, max_length=max_length, truncation=True)["input_ids"]
        got = tok.tokenize(s)[:max_length]
        if got != expected:
            bad.append((s, expected, got))
    return bad


def _decode_mismatches(tok, ref, sequences):
    bad = []
    for ids in sequences:
        expected = ref.batch_decode([ids], skip_special_tokens=True)[0].strip()
        got = tok.decode(ids)
        if got != expected:
            bad.append((ids, expected, got))
    return bad


# ---------------------------------------------------------------------------------------------- layout


def test_layout_and_ids(tok: OFATokenizerZH, vocab_dir: Path) -> None:
    lines = (vocab_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and lines[-1] == ""
    assert lines[4:8] == ["[PAD]", "[unused1]", "[unused2]", "[unused3]"] and lines[104] == "[UNK]"
    assert "<mask>" not in lines
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(lines) - 1
    assert tok.mask_id == tok.vocab_size  # appended
    assert tok.token_to_id("<code_0>") == tok.vocab_size + 1
    assert tok.token_to_id(f"<bin_{NUM_BINS - 1}>") == len(tok) - 1
    assert len(tok) == tok.vocab_size + 1 + NUM_CODES + NUM_BINS


def test_published_layout_sizes(tmp_path: Path) -> None:
    # 4 + 21128 bert-base-chinese lines -> <mask> 21132, <code_0> 21133, <bin_0> 29325, 30325 in all (notes, 2.1).
    lines = ["<s>", "<pad>", "</s>", "<unk>"] + [f"tok{i}" for i in range(21128)]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in lines), encoding="utf-8")
    t = OFATokenizerZH.from_pretrained(tmp_path)
    assert (t.mask_id, t.token_to_id("<code_0>"), t.token_to_id("<bin_0>"), len(t)) == (
        21132,
        21133,
        29325,
        30325,
    )
    # A vocab.txt that has its own <mask> line keeps it; nothing is appended.
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in [*lines, "<mask>"]), encoding="utf-8")
    t = OFATokenizerZH.from_pretrained(tmp_path)
    assert (t.mask_id, len(t)) == (21132, 30325)


def test_demo_vocab_is_deterministic(tmp_path: Path, vocab_dir: Path) -> None:
    write_demo_vocab_txt(tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == (vocab_dir / "vocab.txt").read_bytes()


def test_bad_vocabularies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="<unk>"):
        OFATokenizerZH(["<s>", "<pad>", "</s>", "a"])
    with pytest.raises(ValueError, match="twice"):
        OFATokenizerZH(["<s>", "<pad>", "</s>", "<unk>", "a", "a"])
    with pytest.raises(ValueError, match="<code_3>"):
        OFATokenizerZH(["<s>", "<pad>", "</s>", "<unk>", "<code_3>"])


def test_prompt_ids(tok: OFATokenizerZH) -> None:
    ids = tok.encode_prompt(PROMPT)
    # Every character of the prompt is its own vocabulary entry, "?" included: no <unk>.
    assert len(ids) == 12 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
    assert tok.decode(ids) == "图 片 描 述 了 什 么 内 容 ?"
    assert postprocess_caption(tok.decode(ids), "zh") == "图片描述了什么内容?"
    assert tok.encode_prompt(PROMPT, 3) == ids[:4] + [tok.eos_id]
    with pytest.raises(ValueError):
        tok.encode_prompt(PROMPT, -1)


def test_unknown_characters_become_unk_not_bert_unk(tok: OFATokenizerZH) -> None:
    assert tok.tokenize("🙂") == [tok.unk_id] == [3]
    # BERT's [UNK] (id 104 here, as in the published layout) is an ordinary entry: text "[UNK]" is split like any
    # other bracketed word and never yields it.
    assert tok.token_to_id("[UNK]") == 104
    ids = tok.tokenize("[UNK]")
    assert ids[0] == tok.token_to_id("[") and ids[-1] == tok.token_to_id("]") and 104 not in ids


def test_decode_rules(tok: OFATokenizerZH) -> None:
    t = tok.token_to_id
    code5, bin3 = t("<code_5>"), t("<bin_3>")
    assert tok.decode([t("一"), t("款"), tok.eos_id]) == "一 款"
    assert tok.decode([t("iphone"), t("##s"), t("12")]) == "iphones 12"
    assert tok.decode([t("##a"), t("x")]) == "##a x"  # a leading ## piece keeps its ##
    assert tok.decode([t("一"), code5, t("款"), bin3]) == "一 <code_5> 款 <bin_3>"
    assert tok.decode([t("[UNK]"), t("[CLS]"), tok.unk_id, tok.mask_id, tok.bos_id]) == "[UNK] [CLS]"
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tok)])


def test_module_does_not_import_transformers() -> None:
    code = (
        "import sys, ofa_captioning.tokenizer as t, ofa_captioning.demo_vocab; "
        "bad = [m for m in ('transformers', 'modelscope') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- by language


def test_load_tokenizer_dispatch(vocab_dir: Path) -> None:
    assert isinstance(load_tokenizer(vocab_dir, "zh"), OFATokenizerZH)
    assert isinstance(load_tokenizer(vocab_dir, "cn"), OFATokenizerZH)
    with pytest.raises(FileNotFoundError, match="vocab.json"):  # en reads the BPE files
        load_tokenizer(vocab_dir, "en")
    for lang in ("fr", "EN", "", "zh-CN"):
        with pytest.raises(ValueError, match=r"model\.language"):
            load_tokenizer(vocab_dir, lang)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("一 款 时 尚 女 包", "一款时尚女包"),
        ("iphone 12 手 机", "iphone 12手机"),
        ("a dog on the grass", "a dog on the grass"),  # spaces between ASCII words stay
        ("新 款 nike 运 动 鞋 ， 舒 适 ！", "新款nike运动鞋，舒适！"),
        ("3 . 5 折 , 包 邮 !", "3 . 5折,包邮!"),  # spaces next to a CJK character go, between ASCII stay
        ("价 格 ： 99 元", "价格：99元"),
        ("<code_5> 图", "<code_5>图"),  # ">" is outside the kept set
        ("  图  ", "图"),
        ("", ""),
    ],
)
def test_postprocess_zh(text: str, expected: str) -> None:
    assert postprocess_caption(text, "zh") == expected
    assert postprocess_caption(text, "cn") == expected


def test_postprocess_keeps_english_rule_and_refuses_others() -> None:
    assert postprocess_caption(" a dog, on grass! ", "en") == "a dog on grass"
    with pytest.raises(ValueError, match=r"configuration\.json model\.language 'fr'"):
        postprocess_caption("x", "fr")


# ---------------------------------------------------------------------------------------------- tokenizer_config.json


def _with_config(src: Path, dst: Path, cfg: dict) -> Path:
    dst.mkdir()
    shutil.copy(src / "vocab.txt", dst / "vocab.txt")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


@pytest.mark.parametrize(
    "cfg",
    [
        {"do_lower_case": False},
        {"do_lower_case": False, "strip_accents": True},
        {"do_lower_case": True, "strip_accents": False, "tokenizer_class": "OFATokenizerZH"},
    ],
    ids=["cased", "cased-strip-accents", "lower-keep-accents"],
)
@pytest.mark.reference
def test_tokenizer_config_override_matches_reference(vocab_dir: Path, tmp_path: Path, cfg: dict) -> None:
    d = _with_config(vocab_dir, tmp_path / "ckpt", cfg)
    tok = OFATokenizerZH.from_pretrained(d)
    ref = _reference_tokenizer(d)
    assert tok.do_lower_case == ref.do_lower_case == cfg["do_lower_case"]
    bad = _encode_mismatches(tok, ref, EDGE_STRINGS + random_strings(400, seed=11))
    assert not bad, bad[:5]
    if not cfg[
        "do_lower_case"
    ]:  # the override changes the ids (uppercase ASCII letters are their own entries)
        assert tok.tokenize("Hello") != OFATokenizerZH.from_pretrained(vocab_dir).tokenize("Hello")


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"do_lower_case": "no"}, "do_lower_case"),
        ({"bos_token": "[CLS]"}, "bos_token"),
        ({"never_split": ["abc"]}, "never_split"),
        ({"clean_up_tokenization_spaces": True}, "clean_up_tokenization_spaces"),
        ({"do_basic_tokenize": False}, "do_basic_tokenize"),
        ({"something_new": 1}, "something_new"),
    ],
)
def test_unsupported_tokenizer_config_is_refused(
    vocab_dir: Path, tmp_path: Path, cfg: dict, match: str
) -> None:
    d = _with_config(vocab_dir, tmp_path / "ckpt", cfg)
    with pytest.raises(ValueError, match=match):
        OFATokenizerZH.from_pretrained(d)


def test_tokenizer_config_with_default_values_is_accepted(vocab_dir: Path, tmp_path: Path) -> None:
    cfg = {
        "do_lower_case": True,
        "bos_token": "<s>",
        "mask_token": {"content": "<mask>", "lstrip": False},
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {"0": {"content": "<s>", "lstrip": False, "rstrip": False}},
    }
    d = _with_config(vocab_dir, tmp_path / "ckpt", cfg)
    assert OFATokenizerZH.from_pretrained(d).tokenize("ABC") == OFATokenizerZH.from_pretrained(
        vocab_dir
    ).tokenize("abc")


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.reference
def test_reference_layout(tok: OFATokenizerZH, ref_tok) -> None:
    assert len(ref_tok) == len(tok)
    assert (ref_tok.bos_token_id, ref_tok.pad_token_id, ref_tok.eos_token_id, ref_tok.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert ref_tok.mask_token_id == tok.mask_id
    assert ref_tok.convert_tokens_to_ids(["<code_0>", "<bin_999>"]) == [
        tok.token_to_id("<code_0>"),
        tok.token_to_id("<bin_999>"),
    ]


@pytest.mark.reference
def test_encode_matches_reference_on_many_strings(tok: OFATokenizerZH, ref_tok) -> None:
    strings = EDGE_STRINGS + random_strings(2000, seed=1)
    bad = _encode_mismatches(tok, ref_tok, strings)
    assert not bad, bad[:5]
    # The corpus reaches the interesting cases: unknown characters, special and added tokens, word pieces.
    ids = {i for s in strings for i in tok.tokenize(s)}
    assert {tok.unk_id, tok.bos_id, tok.mask_id, tok.token_to_id("<code_1>")} <= ids
    assert any(tok.decode([i]).startswith("##") for i in ids)


@pytest.mark.reference
@pytest.mark.parametrize("max_src_length", [0, 1, 5, 256])
def test_encode_prompt_truncates_like_reference(tok: OFATokenizerZH, ref_tok, max_src_length: int) -> None:
    for s in (PROMPT, "一款时尚女包 iphone 12手机，" * 30, "a b c" * 100, "<code_1> 图 <bin_2> x" * 5):
        body = ref_tok(s, add_special_tokens=False, max_length=max_src_length, truncation=True)["input_ids"]
        assert tok.encode_prompt(s, max_src_length) == [0, *body, 2]


@pytest.mark.reference
def test_decode_matches_reference_batch_decode(tok: OFATokenizerZH, ref_tok) -> None:
    bad = _decode_mismatches(tok, ref_tok, random_ids(3000, tok, seed=2))
    assert not bad, bad[:5]


@pytest.mark.reference
def test_decode_roundtrips_text_like_reference(tok: OFATokenizerZH, ref_tok) -> None:
    bad = _decode_mismatches(
        tok, ref_tok, [tok.encode_prompt(s, 10_000) for s in EDGE_STRINGS + random_strings(500, 3)]
    )
    assert not bad, bad[:5]
