"""OFATokenizer (tokenizers-based) against ModelScope's OFATokenizer (transformers BartTokenizer + added tokens)."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys

import pytest

from ofa_captioning.demo_vocab import train_demo_bpe
from ofa_captioning.tokenizer import NUM_BINS, NUM_CODES, OFATokenizer

EDGE_STRINGS = [
    " what does the image describe?",
    "what does the image describe?",
    "",
    " ",
    "   ",
    "a man riding a horse on a beach",
    "  leading spaces",
    "trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "it's they're we've I'm you'll he'd",
    "Numbers 12345 678.9 and 1,000,000",
    "punctuation!?... (brackets) [x] {y} <z> @#$%^&*",
    "émigré café naïve Ångström",
    "emoji 🙂🚀 and CJK 中文字符 and Cyrillic текст",
    "combining e\u0301 and nbsp\u00a0here and em\u2003space",
    "a <code_5> b",
    "x<bin_3>y",
    "a<code_12><code_13>b",
    "<code_8191><bin_0><bin_999>",
    "<code_8192> <bin_1000> <code_-1>",
    " <mask> mask swallows the space before it",
    "a  <mask>",
    "<s>hello</s>",
    "Hello <s> world <pad> and <unk> and </s>",
    "<<s>> <code_5 > < bin_5>",
    "\u200b zero width \ufeff BOM",
    "a" * 300,
    " the" * 300,
]


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ,.!?';:-0123456789\t\n") + [
        "<code_1>",
        "<code_8191>",
        "<bin_2>",
        "<mask>",
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
        "é",
        "🙂",
        "中",
        "  ",
        "\u00a0",
        "'s",
        " the",
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _random_ids(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    seqs = []
    for _ in range(n):
        ids = []
        for _ in range(rng.randint(0, 24)):
            r = rng.random()
            if r < 0.4:
                ids.append(rng.randrange(vocab))
            elif r < 0.55:
                ids.append(rng.choice([0, 1, 2, 3, 50264]))  # specials, dropped anywhere
            elif r < 0.75:
                ids.append(rng.randrange(50265, vocab))  # <code_*> / <bin_*>
            else:
                ids.append(rng.randrange(4, 600))  # single bytes and short merges: invalid UTF-8 runs
        seqs.append(ids)
    return seqs


@pytest.fixture(scope="session")
def tok(demo_checkpoint) -> OFATokenizer:
    return OFATokenizer.from_pretrained(demo_checkpoint)


# ---------------------------------------------------------------------------------------------- layout


def test_vocabulary_size_and_ids(tok: OFATokenizer) -> None:
    assert len(tok) == 59457
    assert tok.vocab_size == 50265
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 50264)
    assert tok.token_to_id("<code_0>") == 50265
    assert tok.token_to_id(f"<code_{NUM_CODES - 1}>") == 50265 + NUM_CODES - 1
    assert tok.token_to_id("<bin_0>") == 50265 + NUM_CODES
    assert tok.token_to_id(f"<bin_{NUM_BINS - 1}>") == 59456


def test_demo_bpe_files_have_barts_layout(demo_checkpoint) -> None:
    vocab = json.loads((demo_checkpoint / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50265
    assert sorted(vocab.values()) == list(range(50265))
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 50264]
    lines = (demo_checkpoint / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""
    merges = [line.split(" ") for line in lines[1:-1]]
    assert len(merges) == 50265 - 5 - 256  # every non-special, non-byte entry comes from one merge
    assert all(len(m) == 2 and m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab for m in merges)
    # The default prompt's words are whole tokens of the demo vocabulary.
    assert all(w in vocab for w in ("Ġwhat", "Ġdoes", "Ġthe", "Ġimage", "Ġdescribe"))


def test_train_demo_bpe_is_deterministic(tmp_path, demo_checkpoint) -> None:
    # Same seed in another process (the demo checkpoint's build) -> byte-identical files.
    train_demo_bpe(tmp_path, seed=0)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (demo_checkpoint / name).read_bytes(), name


def test_train_demo_bpe_rejects_tiny_vocab(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_demo_bpe(tmp_path, vocab_size=100)


def test_missing_special_token_is_an_error() -> None:
    with pytest.raises(ValueError, match="<mask>"):
        OFATokenizer({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4}, [])


def test_tokenizer_module_does_not_import_transformers() -> None:
    code = (
        "import sys, ofa_captioning.tokenizer, ofa_captioning.images, ofa_captioning.download; "
        "bad = [m for m in ('transformers', 'modelscope', 'tritonclient', 'triton_python_backend_utils') "
        "if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.reference
def test_prompt_ids_equal_reference_preprocessor(tok: OFATokenizer, reference) -> None:
    prompt = reference.cfg.model.get("prompt", " what does the image describe?")
    max_src = reference.cfg.model.get("max_src_length", 256)
    ids = tok.encode_prompt(prompt, max_src)
    assert ids == reference.source_tokens()
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 8


@pytest.mark.reference
def test_encode_matches_reference_on_many_strings(tok: OFATokenizer, reference) -> None:
    ref = reference.tokenizer
    mismatches = []
    for s in EDGE_STRINGS + _random_strings(2000, seed=1):
        expected = ref(s, add_special_tokens=False, max_length=256, truncation=True)["input_ids"]
        got = tok.tokenize(s)[:256]
        if got != expected:
            mismatches.append((s, expected, got))
    assert not mismatches, mismatches[:5]


@pytest.mark.reference
@pytest.mark.parametrize("max_src_length", [0, 1, 3, 7, 256])
def test_encode_prompt_truncates_like_reference(tok: OFATokenizer, reference, max_src_length: int) -> None:
    ref = reference.tokenizer
    for s in (" what does the image describe?", " a very long prompt " * 40, "<code_1> <bin_2> x" * 5):
        body = ref(s, add_special_tokens=False, max_length=max_src_length, truncation=True)["input_ids"]
        assert tok.encode_prompt(s, max_src_length) == [ref.bos_token_id, *body, ref.eos_token_id]


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.reference
def test_decode_matches_reference_batch_decode(tok: OFATokenizer, reference) -> None:
    ref = reference.tokenizer
    assert len(ref) == len(tok)
    mismatches = []
    for ids in _random_ids(3000, len(tok), seed=2):
        expected = ref.batch_decode([ids], skip_special_tokens=True)[0].strip()
        got = tok.decode(ids)
        if got != expected:
            mismatches.append((ids, expected, got))
    assert not mismatches, mismatches[:5]


@pytest.mark.reference
def test_decode_roundtrips_text_like_reference(tok: OFATokenizer, reference) -> None:
    ref = reference.tokenizer
    for s in EDGE_STRINGS + _random_strings(300, seed=3):
        ids = tok.encode_prompt(s, 10_000)
        assert tok.decode(ids) == ref.batch_decode([ids], skip_special_tokens=True)[0].strip()


def test_decode_added_tokens_are_space_separated_pieces(tok: OFATokenizer) -> None:
    # The reference (transformers' slow tokenizer) decodes each added token as its own piece and joins the
    # pieces with one space, keeping the BPE text's own leading space: " a", <code_5>, " b" -> "a <code_5>  b".
    a, b = tok.tokenize(" a"), tok.tokenize(" b")
    code5, bin3 = tok.token_to_id("<code_5>"), tok.token_to_id("<bin_3>")
    assert tok.decode([*a, code5, *b]) == "a <code_5>  b"
    assert tok.decode([code5, bin3]) == "<code_5> <bin_3>"
    assert tok.decode([tok.bos_id, code5, tok.eos_id, *tok.tokenize("x"), tok.pad_id]) == "<code_5> x"
    assert tok.decode([*tok.tokenize("x"), bin3, *tok.tokenize("y")]) == "x <bin_3> y"


def test_decode_skips_special_tokens_everywhere(tok: OFATokenizer) -> None:
    body = tok.tokenize(" a dog on a bench")
    noisy = [tok.bos_id, *body[:2], tok.mask_id, tok.unk_id, *body[2:], tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(noisy) == "a dog on a bench"
    assert tok.decode([tok.bos_id, tok.eos_id]) == ""
    assert tok.decode([]) == ""


def test_decode_invalid_utf8_becomes_replacement_character(tok: OFATokenizer) -> None:
    # "é" is two bytes; its first byte alone is invalid UTF-8.
    first_byte = tok.tokenize("é")[:1]
    assert len(tok.tokenize("é")) == 2
    assert tok.decode([*tok.tokenize("a"), *first_byte, *tok.tokenize("b")]) == "a\ufffdb"


def test_decode_rejects_ids_outside_vocabulary(tok: OFATokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, len(tok)])


def test_encode_prompt_rejects_negative_length(tok: OFATokenizer) -> None:
    with pytest.raises(ValueError):
        tok.encode_prompt("x", -1)


@pytest.mark.reference
@pytest.mark.parametrize("batch", [1, 2])
def test_reference_caption_is_decode_of_top_hypothesis(
    tok: OFATokenizer, reference, image_corpus, batch
) -> None:
    # The caption the reference pipeline returns == our decode of its best hypothesis, English punctuation
    # stripped. Also guards the harness against OfaForAllTasks.postprocess unwrapping one-element batches.
    pixels = reference.pixels([b for _, b in image_corpus[:batch]])
    captions = reference.caption(pixels, beam_size=2, max_length=4)
    hyps = reference.generate(pixels, beam_size=2, max_length=4)
    assert len(captions) == batch
    for (text, score), h in zip(captions, hyps, strict=True):
        expected = (
            tok.decode(h[0]["tokens"].tolist()).translate(str.maketrans("", "", string.punctuation)).strip()
        )
        assert text == expected
        assert score == pytest.approx(float(h[0]["score"]), abs=0)
