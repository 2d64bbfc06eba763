"""OFA's text tokenizer on the `tokenizers` library.

OFA (English) uses BART's byte-level BPE (``vocab.json`` + ``merges.txt``, 50265 entries including
``<mask>``) to which ModelScope's ``OfaForAllTasks`` adds ``<code_0>``..``<code_8191>`` and
``<bin_0>``..``<bin_999>`` as extra tokens, giving 59457 ids. This module reproduces ModelScope's
``OFATokenizer`` (a transformers ``BartTokenizer``) exactly for the two things the captioner needs:

* :meth:`OFATokenizer.encode_prompt` - ``<s>`` + BPE(text, no special tokens, truncated) + ``</s>``,
  what ModelScope's OFA preprocessor feeds the encoder;
* :meth:`OFATokenizer.decode` - ``batch_decode(ids, skip_special_tokens=True)`` followed by ``.strip()``,
  what ``OfaForAllTasks`` does with the best hypothesis.

No transformers import: encoding runs on a ``tokenizers.Tokenizer`` built from the two files; decoding is
done here in plain Python because the reference's handling of added tokens (each one becomes its own
space-separated piece) differs from ``tokenizers``' own decoder.

:func:`train_demo_bpe` trains a small-corpus byte-level BPE with BART's layout for the offline demo
checkpoint (the published vocabulary cannot be downloaded here).
"""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

__all__ = ["NUM_BINS", "NUM_CODES", "OFATokenizer", "load_tokenizer", "postprocess_caption", "train_demo_bpe"]

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"

NUM_CODES = 8192
NUM_BINS = 1000

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table (byte-level BPE's printable byte alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _read_merges(path: Path) -> list[tuple[str, str]]:
    # Exactly what transformers' BartTokenizer does: drop the first line ("#version: 0.2") and the last
    # (empty after the trailing newline).
    lines = path.read_text(encoding="utf-8").split("\n")[1:-1]
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


class OFATokenizer:
    """BART byte-level BPE plus OFA's ``<code_*>``/``<bin_*>`` tokens, identical to ModelScope's tokenizer.

    Build it with :meth:`from_pretrained` on a checkpoint directory holding ``vocab.json`` and
    ``merges.txt``. ``len(tokenizer)`` is the vocabulary size the model's logits have (59457 for the
    published checkpoint).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, add_ofa_tokens: bool = True):
        """Create the tokenizer from a BART vocabulary and its merges (see :meth:`from_pretrained`)."""
        for tok in (BOS, PAD, EOS, UNK, MASK):
            if tok not in vocab:
                raise ValueError(
                    f"vocab.json has no {tok!r} entry; is this a BART byte-level BPE vocabulary?"
                )
        self._vocab = dict(vocab)
        self.bos_id = vocab[BOS]
        self.pad_id = vocab[PAD]
        self.eos_id = vocab[EOS]
        self.unk_id = vocab[UNK]
        self.mask_id = vocab[MASK]

        tk = Tokenizer(models.BPE(vocab=self._vocab, merges=merges, unk_token=None, fuse_unk=False))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        # As transformers' BartTokenizer: <mask> swallows the whitespace before it (lstrip), the others match
        # literally, and special/added tokens written in the input text are kept whole. ("normalized" makes no
        # difference: there is no normalizer.)
        tk.add_special_tokens(
            [
                AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
                for t in (BOS, PAD, EOS, UNK)
            ]
            + [AddedToken(MASK, lstrip=True, rstrip=False, normalized=False, special=True)]
        )
        self._added: list[str] = []
        if add_ofa_tokens:
            self._added = [f"<code_{i}>" for i in range(NUM_CODES)] + [f"<bin_{i}>" for i in range(NUM_BINS)]
            # Added one by one in ModelScope's order: ids are len(vocab), len(vocab)+1, ...
            tk.add_tokens(
                [
                    AddedToken(t, lstrip=False, rstrip=False, normalized=True, special=False)
                    for t in self._added
                ]
            )
        self._tk = tk

        self._id_to_token: dict[int, str] = {i: t for t, i in self._vocab.items()}
        base = len(self._vocab)
        self._added_ids = {base + k: t for k, t in enumerate(self._added if add_ofa_tokens else [])}
        for tid, tok in self._added_ids.items():
            if tk.token_to_id(tok) != tid:  # would only happen if vocab.json already held such a token
                raise ValueError(f"added token {tok!r} got id {tk.token_to_id(tok)}, expected {tid}")
        self._special_ids = frozenset((self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OFATokenizer:
        """Load ``vocab.json`` + ``merges.txt`` from a checkpoint directory and add OFA's tokens."""
        d = Path(path)
        with open(d / VOCAB_FILE, encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab, _read_merges(d / MERGES_FILE))

    def __len__(self) -> int:
        return len(self._vocab) + len(self._added)

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without the added OFA tokens (50265 for BART)."""
        return len(self._vocab)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary entry or added token), or None."""
        return self._tk.token_to_id(token)

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of ``text`` without any special tokens (special and added tokens in the text are kept whole)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str, max_src_length: int = 256) -> list[int]:
        """``<s>`` + BPE(text) truncated to ``max_src_length`` tokens + ``</s>``, as ModelScope's OFA preprocessor."""
        if max_src_length < 0:
            raise ValueError(f"max_src_length must be >= 0, got {max_src_length}")
        return [self.bos_id, *self.tokenize(text)[:max_src_length], self.eos_id]

    def _bpe_to_text(self, tokens: list[str]) -> str:
        dec = _byte_decoder()
        return bytes(dec[c] for c in "".join(tokens)).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a generated id sequence, as the reference's ``batch_decode(skip_special_tokens=True)`` + ``strip()``.

        Special tokens (``<s> <pad> </s> <unk> <mask>``) are dropped wherever they are; runs of BPE tokens are
        byte-decoded (invalid UTF-8 becomes U+FFFD); every added ``<code_*>``/``<bin_*>`` token becomes its own
        piece and the pieces are joined with one space (so ``" a"``, ``<bin_1>``, ``" b"`` gives ``"a <bin_1>  b"``).
        """
        pieces: list[str] = []
        run: list[str] = []
        for i in ids:
            i = int(i)
            if i in self._special_ids:
                continue
            added = self._added_ids.get(i)
            if added is not None:
                if run:
                    s = self._bpe_to_text(run)
                    if s:
                        pieces.append(s)
                    run = []
                pieces.append(added)
                continue
            tok = self._id_to_token.get(i)
            if tok is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self)})")
            run.append(tok)
        if run:
            pieces.append(self._bpe_to_text(run))
        return " ".join(pieces).strip()

    def batch_decode(self, sequences: Iterable[Sequence[int]]) -> list[str]:
        """:meth:`decode` for each sequence."""
        return [self.decode(s) for s in sequences]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def load_tokenizer(path: str | os.PathLike, language: str = "en") -> OFATokenizer:
    """The tokenizer of a checkpoint directory for its configuration.json ``language`` (en; zh/cn to come)."""
    if language == "en":
        return OFATokenizer.from_pretrained(path)
    raise NotImplementedError(f"configuration.json model.language {language!r} is not supported (en)")


def postprocess_caption(text: str, language: str = "en") -> str:
    """The reference's caption clean-up: for English, drop every ``string.punctuation`` character, strip."""
    if language == "en":
        return text.translate(_PUNCTUATION).strip()
    return text


# --------------------------------------------------------------------------------------------------------
# Demo vocabulary

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
