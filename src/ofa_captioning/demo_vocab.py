"""Vocabularies of the offline demo checkpoints (the published ones cannot be downloaded here).

* :func:`train_demo_bpe` trains a small-corpus byte-level BPE in BART's layout (``vocab.json`` + ``merges.txt``)
  for the English demo checkpoint;
* :func:`write_demo_vocab_txt` writes a small BERT-style ``vocab.txt`` in the layout of ModelScope's Chinese OFA
  checkpoints for the Chinese demo checkpoint.

Both are deterministic. Their token ids are not those of the published vocabularies: captions of the demo
checkpoints are meaningless either way (the weights are random).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from .tokenizer import BOS, EOS, MASK, MERGES_FILE, PAD, UNK, VOCAB_FILE, VOCAB_TXT_FILE

__all__ = ["train_demo_bpe", "write_demo_vocab_txt"]

# --------------------------------------------------------------------------------------------------------
# English: byte-level BPE

_ADJECTIVES = [
    "small",
    "large",
    "big",
    "little",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "brown",
    "orange",
    "purple",
    "pink",
    "gray",
    "young",
    "old",
    "tall",
    "short",
    "wooden",
    "metal",
    "plastic",
    "glass",
    "empty",
    "full",
    "open",
    "closed",
    "bright",
    "dark",
    "sunny",
    "cloudy",
    "snowy",
    "wet",
    "dry",
    "busy",
    "quiet",
    "crowded",
    "clean",
    "dirty",
    "colorful",
    "striped",
    "spotted",
    "happy",
    "sleepy",
    "hungry",
    "shiny",
    "broken",
    "new",
    "vintage",
]
_NOUNS = [
    "man",
    "woman",
    "person",
    "child",
    "boy",
    "girl",
    "people",
    "dog",
    "cat",
    "horse",
    "cow",
    "sheep",
    "bird",
    "elephant",
    "giraffe",
    "zebra",
    "bear",
    "car",
    "bus",
    "truck",
    "train",
    "bicycle",
    "motorcycle",
    "boat",
    "airplane",
    "street",
    "road",
    "sidewalk",
    "field",
    "grass",
    "beach",
    "ocean",
    "water",
    "river",
    "lake",
    "mountain",
    "hill",
    "tree",
    "forest",
    "building",
    "house",
    "kitchen",
    "table",
    "chair",
    "bed",
    "couch",
    "room",
    "window",
    "door",
    "wall",
    "floor",
    "plate",
    "bowl",
    "cup",
    "glass",
    "pizza",
    "sandwich",
    "cake",
    "banana",
    "apple",
    "orange",
    "broccoli",
    "food",
    "laptop",
    "phone",
    "computer",
    "keyboard",
    "television",
    "clock",
    "vase",
    "book",
    "umbrella",
    "bag",
    "kite",
    "surfboard",
    "skateboard",
    "frisbee",
    "ball",
    "bat",
    "racket",
    "sign",
    "light",
    "pole",
    "fence",
    "bench",
    "park",
    "city",
    "sky",
    "snow",
    "wave",
    "player",
    "team",
    "game",
    "shape",
    "circle",
    "square",
    "triangle",
    "star",
    "gradient",
    "pattern",
    "image",
    "picture",
    "photo",
    "text",
    "letter",
    "word",
    "line",
    "stripe",
]
_VERBS = [
    "sitting",
    "standing",
    "walking",
    "running",
    "riding",
    "holding",
    "eating",
    "playing",
    "flying",
    "lying",
    "parked",
    "looking",
    "carrying",
    "throwing",
    "catching",
    "driving",
    "crossing",
    "waiting",
    "swimming",
    "jumping",
    "sleeping",
    "smiling",
    "talking",
    "cutting",
    "cooking",
    "reading",
    "watching",
    "surfing",
    "skiing",
    "skating",
    "grazing",
    "drawing",
    "showing",
]
_PREPS = [
    "on",
    "in",
    "at",
    "near",
    "next",
    "to",
    "under",
    "over",
    "beside",
    "behind",
    "with",
    "by",
    "across",
    "along",
    "through",
    "into",
    "from",
    "of",
]
_PROMPTS = (
    " what does the image describe?",
    " what is in the image?",
    " what color is the object?",
    " how many objects are there?",
    " which region does the text describe?",
)


def _demo_corpus(seed: int) -> Iterator[str]:
    """Deterministic training text: caption-like English plus enough pseudo-words to fill the vocabulary."""
    rng = random.Random(seed)
    for _ in range(3000):
        yield from _PROMPTS
    for _ in range(40000):
        a, b = rng.choice(_ADJECTIVES), rng.choice(_ADJECTIVES)
        n1, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
        v, p = rng.choice(_VERBS), rng.choice(_PREPS)
        k = rng.randint(2, 12)
        form = rng.randrange(5)
        if form == 0:
            s = f"a {a} {n1} {v} {p} a {b} {n2}."
        elif form == 1:
            s = f"The {n1}s are {v} {p} the {n2}, {k} of them."
        elif form == 2:
            s = f"{k} {a} {n1}s {p} the {b} {n2}"
        elif form == 3:
            s = f"an image of a {a} {n1} and a {b} {n2}!"
        else:
            s = f"Two {n1}s {v} {p} the {n2}; it's {a} and {b}?"
        yield s
    # Pseudo-words: each distinct word seen at least twice so that min_frequency=2 still merges it.
    consonants, vowels = "bcdfghjklmnprstvwxyz", "aeiou"
    for i in range(90000):
        n = rng.randint(2, 5)
        w = "".join(
            rng.choice(consonants)
            + rng.choice(vowels)
            + (rng.choice(consonants) if rng.random() < 0.3 else "")
            for _ in range(n)
        )
        if i % 7 == 0:
            w = w.capitalize()
        yield f" {w} {w} {rng.randint(0, 99999)}"


def train_demo_bpe(out_dir: str | os.PathLike, vocab_size: int = 50265, seed: int = 0) -> Path:
    """Train a byte-level BPE in BART's layout and write ``vocab.json`` + ``merges.txt`` into ``out_dir``.

    ``<s> <pad> </s> <unk>`` get ids 0-3 and ``<mask>`` the last id (``vocab_size - 1``), like BART. The
    training corpus is generated from ``seed``, so the files are the same for the same arguments. This
    vocabulary exists only for the offline demo checkpoint: it is not BART's, and ids differ from it.
    """
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 4 + 256 + 1:
        raise ValueError(
            f"vocab_size must be at least 261 (specials + byte alphabet + <mask>), got {vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        _demo_corpus(seed),
        vocab_size=vocab_size - 1,  # <mask> is appended after training so that it comes last
        min_frequency=2,
        show_progress=False,
        special_tokens=[BOS, PAD, EOS, UNK],
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if len(vocab) != vocab_size - 1:
        raise RuntimeError(
            f"BPE training produced {len(vocab)} entries, expected {vocab_size - 1}; corpus too small"
        )
    if [vocab[t] for t in (BOS, PAD, EOS, UNK)] != [0, 1, 2, 3]:
        raise RuntimeError("special tokens did not get ids 0-3")
    vocab[MASK] = vocab_size - 1
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / VOCAB_FILE).write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
    (out / MERGES_FILE).write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------------
# Chinese: BERT-style vocab.txt

# Characters of the Chinese prompt, of the post-processing examples and of everyday captions; most of the rest
# of the vocabulary is generated from the CJK Unified Ideographs block.
_COMMON_CJK = (
    "图片描述了什么内容一款时尚女包手机个的是在有和人男狗猫车上中大小红白黑色张只两三四五六七八九十年月日天地"
    "山水花树草鸟鱼马牛羊房子门窗桌椅床书笔纸衣服鞋帽裙裤袋杯碗盘瓶灯电视脑话新旧好美丽长短高低多少前后左右"
    "里外东西南北街道路桥河海湖城市家园公店站着看坐走跑吃喝玩穿戴拿放开关"
)
_FULL_WIDTH_PUNCTUATION = "，。、；：？！“”‘’（）《》【】「」…—～·￥％＋－＝"
_OTHER_CHARS = "£¥°±×÷éèêëàâäáçñöóôüúùíîïαβγδσπμΩ"
_ENGLISH_WORDS = [
    "the",
    "a",
    "an",
    "and",
    "of",
    "on",
    "in",
    "with",
    "man",
    "woman",
    "dog",
    "cat",
    "phone",
    "iphone",
    "ipad",
    "apple",
    "nike",
    "logo",
    "style",
    "new",
    "hot",
    "sale",
    "t",
    "shirt",
    "size",
    "color",
    "red",
    "blue",
    "white",
    "black",
    "pro",
    "max",
    "mini",
    "plus",
]
_SUFFIXES = ("s", "es", "ed", "ing", "er", "ly", "one", "hone", "ad", "ike")


def _zh_vocab_entries(num_range_chars: int, range_stride: int) -> list[str]:
    entries = [BOS, PAD, EOS, UNK]
    # bert-base-chinese's first entries, shifted by 4 as in ModelScope's Chinese checkpoints.
    entries += (
        ["[PAD]"]
        + [f"[unused{i}]" for i in range(1, 100)]
        + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    )
    entries += [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII, upper and lower case
    entries += list(_FULL_WIDTH_PUNCTUATION) + list(_OTHER_CHARS)
    entries += [str(n) for n in range(10, 100)] + ["100", "1000"] + [str(y) for y in range(2000, 2031)]
    cjk = list(_COMMON_CJK)
    cjk += [chr(0x4E00 + i) for i in range(num_range_chars)]
    cjk += [chr(c) for c in range(0x4E00 + num_range_chars, 0x9FA6, range_stride)]
    entries += cjk
    entries += _ENGLISH_WORDS
    entries += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    entries += [f"##{s}" for s in _SUFFIXES]
    entries += [f"##{c}" for c in cjk[:600]]
    seen: set[str] = set()
    out = []
    for e in entries:  # first occurrence wins; vocab.txt has no duplicate lines
        if e not in seen:
            seen.add(e)
            out.append(e)
    return out


def write_demo_vocab_txt(
    out_dir: str | os.PathLike, num_range_chars: int = 3000, range_stride: int = 7
) -> Path:
    """Write a BERT-style ``vocab.txt`` in the layout of ModelScope's Chinese OFA checkpoints into ``out_dir``.

    Layout: ``<s> <pad> </s> <unk>`` at ids 0-3, then bert-base-chinese's kind of entries: ``[PAD]``,
    ``[unused1..99]``, ``[UNK] [CLS] [SEP] [MASK] <S> <T>``, printable ASCII, full-width punctuation, a few Latin
    and Greek letters, numbers, CJK characters (the ones of the default Chinese prompt and common caption words,
    the first ``num_range_chars`` of U+4E00.. and every ``range_stride``-th after), English words and ``##``
    word pieces. No ``<mask>`` line: the tokenizer appends it, as for the published files. Returns the file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / VOCAB_TXT_FILE
    path.write_text(
        "".join(e + "\n" for e in _zh_vocab_entries(num_range_chars, range_stride)), encoding="utf-8"
    )
    return path
