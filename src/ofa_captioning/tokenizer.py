"""OFA's text tokenizers on the `tokenizers` library, one per configuration.json ``language``.

English (``en``): OFA uses BART's byte-level BPE (``vocab.json`` + ``merges.txt``, 50265 entries including
``<mask>``) to which ModelScope's ``OfaForAllTasks`` adds ``<code_0>``..``<code_8191>`` and
``<bin_0>``..``<bin_999>`` as extra tokens, giving 59457 ids. :class:`OFATokenizer` reproduces ModelScope's
``OFATokenizer`` (a transformers ``BartTokenizer``) exactly.

Chinese (``zh``/``cn``): a BERT-style ``vocab.txt`` (``<s> <pad> </s> <unk>``, then bert-base-chinese's entries),
``<mask>`` appended when absent, then the same 8192 + 1000 tokens (30325 ids for the published files).
:class:`OFATokenizerZH` reproduces ModelScope's ``OFATokenizerZH`` (BERT basic tokenization + WordPiece) exactly.

Both provide the two things the captioner needs:

* ``encode_prompt`` - ``<s>`` + tokens(text, no special tokens, truncated) + ``</s>``, what ModelScope's OFA
  preprocessor feeds the encoder;
* ``decode`` - ``batch_decode(ids, skip_special_tokens=True)`` followed by ``.strip()``, what ``OfaForAllTasks``
  does with the best hypothesis.

No transformers import. Decoding is done in plain Python because the reference's handling of added tokens (each
one becomes its own space-separated piece) differs from ``tokenizers``' own decoders.
"""

from __future__ import annotations

import json
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import (
    AddedToken,
    NormalizedString,
    PreTokenizedString,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
)

from .config import LANGUAGES

__all__ = [
    "NUM_BINS",
    "NUM_CODES",
    "OFATokenizer",
    "OFATokenizerZH",
    "load_tokenizer",
    "postprocess_caption",
]

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
VOCAB_TXT_FILE = "vocab.txt"  # Chinese checkpoints: BERT-style WordPiece vocabulary
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

NUM_CODES = 8192
NUM_BINS = 1000

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"


def _truncate(ids: list[int], max_src_length: int) -> list[int]:
    # transformers truncates only when max_length is truthy: a max_src_length of 0 keeps every token.
    if max_src_length < 0:
        raise ValueError(f"max_src_length must be >= 0, got {max_src_length}")
    return ids[:max_src_length] if max_src_length else ids


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


class _OFATokenizerBase:
    """What the English and Chinese tokenizers share: prompt encoding and decoding to the reference's text.

    A subclass sets ``bos_id``/``eos_id``, ``_special_ids``, ``_tk`` (the ``tokenizers`` pipeline) and implements
    :meth:`tokenize`, :meth:`_piece` (an id's token and whether it is an added OFA token) and :meth:`_run_to_text`
    (the text of a run of vocabulary tokens).
    """

    bos_id: int
    eos_id: int
    _special_ids: frozenset[int]
    _tk: Tokenizer

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def _piece(self, i: int) -> tuple[str, bool]:
        raise NotImplementedError

    def _run_to_text(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (vocabulary entry, special or added token), or None."""
        return self._tk.token_to_id(token)

    def encode_prompt(self, text: str, max_src_length: int = 256) -> list[int]:
        """``<s>`` + :meth:`tokenize` (text) truncated to ``max_src_length`` tokens + ``</s>``, as ModelScope's OFA
        preprocessor. ``max_src_length`` 0 means no truncation, as in transformers (which truncates only for a
        truthy length)."""
        return [self.bos_id, *_truncate(self.tokenize(text), max_src_length), self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a generated id sequence, as the reference's ``batch_decode(skip_special_tokens=True)`` + ``strip()``.

        Special tokens (``<s> <pad> </s> <unk> <mask>``) are dropped wherever they are; each run of vocabulary
        tokens becomes text (:meth:`_run_to_text`); every added ``<code_*>``/``<bin_*>`` token becomes its own
        piece and the pieces are joined with one space (so ``" a"``, ``<bin_1>``, ``" b"`` gives ``"a <bin_1>  b"``
        in English).
        """
        pieces: list[str] = []
        run: list[str] = []
        for i in ids:
            i = int(i)
            if i in self._special_ids:
                continue
            tok, added = self._piece(i)
            if not added:
                run.append(tok)
                continue
            if run:
                text = self._run_to_text(run)
                if text:
                    pieces.append(text)
                run = []
            pieces.append(tok)
        if run:
            pieces.append(self._run_to_text(run))
        return " ".join(pieces).strip()

    def batch_decode(self, sequences: Iterable[Sequence[int]]) -> list[str]:
        """:meth:`decode` for each sequence."""
        return [self.decode(s) for s in sequences]


class OFATokenizer(_OFATokenizerBase):
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

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of ``text`` without any special tokens (special and added tokens in the text are kept whole)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def _piece(self, i: int) -> tuple[str, bool]:
        added = self._added_ids.get(i)
        if added is not None:
            return added, True
        tok = self._id_to_token.get(i)
        if tok is None:
            raise ValueError(f"token id {i} is outside the vocabulary (size {len(self)})")
        return tok, False

    def _run_to_text(self, tokens: list[str]) -> str:
        # Byte-level BPE: invalid UTF-8 becomes U+FFFD.
        dec = _byte_decoder()
        return bytes(dec[c] for c in "".join(tokens)).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------
# Chinese: BERT basic tokenization + WordPiece over vocab.txt

# The BERT character classes exactly as transformers' tokenization_utils defines them, on Python's unicodedata.


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_chinese_char(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


class _BasicTokenizer:
    """transformers' ``BasicTokenizer`` (BERT basic tokenization), step for step, as a ``tokenizers`` pre-tokenizer.

    Plain Python because ``tokenizers``' ``BertNormalizer`` + ``BertPreTokenizer`` differ from it: they apply no
    NFC normalisation (``e`` + U+0301, compatibility characters such as U+2329 or U+F900 stay unchanged), strip
    accents before lowercasing instead of after and strip every combining mark instead of only Mn, keep
    unassigned code points (category Cn, which BERT removes as control characters), use older Unicode tables
    (characters added since Unicode 9 get other categories) and an older CJK range (U+2B820..U+2CEAF are not
    Chinese characters there); and they cannot keep the special tokens whole (``never_split``). Measured over
    every code point in "a{c}b c": 830594 differences with lowercasing, 831343 without.
    """

    def __init__(
        self, do_lower_case: bool, strip_accents: bool | None, tokenize_chinese_chars: bool, never_split
    ):
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.never_split = frozenset(never_split)

    def words(self, text: str) -> list[str]:
        """The basic tokens of ``text`` (one piece between special/added tokens)."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif self.tokenize_chinese_chars and _is_chinese_char(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        text = unicodedata.normalize("NFC", "".join(chars))
        out: list[str] = []
        for token in text.split():
            if token in self.never_split:
                out.append(token)
                continue
            if self.do_lower_case:
                token = token.lower()
                if self.strip_accents is not False:
                    token = _strip_accents(token)
            elif self.strip_accents:
                token = _strip_accents(token)
            out.extend(self._split_on_punctuation(token))
        # As transformers: join and split again (accent stripping can leave empty or whitespace tokens).
        return " ".join(out).split()

    @staticmethod
    def _split_on_punctuation(token: str) -> list[str]:
        pieces: list[str] = []
        start_new = True
        for ch in token:
            if _is_punctuation(ch):
                pieces.append(ch)
                start_new = True
            else:
                if start_new:
                    pieces.append("")
                start_new = False
                pieces[-1] += ch
        return pieces

    def _split(self, _index: int, normalized: NormalizedString) -> list[NormalizedString]:
        return [NormalizedString(w) for w in self.words(normalized.normalized)]

    def pre_tokenize(self, pretok: PreTokenizedString) -> None:
        """``tokenizers`` custom pre-tokenizer entry point."""
        pretok.split(self._split)


# tokenizer_config.json keys: those OFATokenizerZH reads and this tokenizer honours, those that do not change
# what the tokenizer does, and the special tokens, which must keep ModelScope's defaults.
_TOKENIZER_CONFIG_HONOURED = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
_TOKENIZER_CONFIG_INERT = frozenset(
    (
        "tokenizer_class",
        "model_max_length",
        "name_or_path",
        "special_tokens_map_file",
        "padding_side",
        "truncation_side",
        "model_input_names",
        "processor_class",
        "do_basic_tokenize",  # allowed when true (the default), checked below
        "clean_up_tokenization_spaces",  # allowed when false (the default), checked below
        "split_special_tokens",  # allowed when false (the default), checked below
        "never_split",  # allowed when empty, checked below
        "added_tokens_decoder",  # allowed when it agrees with the ids built here, checked below
        "additional_special_tokens",  # allowed when empty, checked below
        "extra_special_tokens",  # allowed when empty, checked below
    )
)
_ZH_SPECIALS = {
    "bos_token": BOS,
    "eos_token": EOS,
    "sep_token": EOS,
    "cls_token": BOS,
    "unk_token": UNK,
    "pad_token": PAD,
    "mask_token": MASK,
}


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_tokenizer_config(d: Path) -> dict:
    """The options of ``tokenizer_config.json`` (absent: ModelScope's defaults); anything unsupported is refused."""
    for name in ("added_tokens.json", "special_tokens_map.json"):
        if (d / name).exists():
            raise ValueError(
                f"{d / name}: not supported (the Chinese tokenizer takes its tokens from vocab.txt)"
            )
    path = d / TOKENIZER_CONFIG_FILE
    if not path.exists():
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")

    def refuse(key: str) -> ValueError:
        return ValueError(f"{path}: {key}={cfg[key]!r} is not supported by the Chinese tokenizer")

    for key, value in cfg.items():
        if key in _ZH_SPECIALS:
            if _token_content(value) != _ZH_SPECIALS[key]:
                raise refuse(key)
        elif key in ("do_lower_case", "tokenize_chinese_chars"):
            if not isinstance(value, bool):
                raise refuse(key)
        elif key == "strip_accents":
            if value is not None and not isinstance(value, bool):
                raise refuse(key)
        elif key not in _TOKENIZER_CONFIG_INERT:
            raise ValueError(
                f"{path}: unknown key {key!r}; the Chinese tokenizer cannot tell whether it matters"
            )
    if cfg.get("do_basic_tokenize", True) is not True:
        raise refuse("do_basic_tokenize")
    for key in ("clean_up_tokenization_spaces", "split_special_tokens"):
        if cfg.get(key, False) is not False:
            raise refuse(key)
    for key in ("never_split", "additional_special_tokens", "extra_special_tokens"):
        if cfg.get(key):
            raise refuse(key)
    return {k: cfg[k] for k in _TOKENIZER_CONFIG_HONOURED if k in cfg} | (
        {"added_tokens_decoder": cfg["added_tokens_decoder"]} if cfg.get("added_tokens_decoder") else {}
    )


def _read_vocab_txt(path: Path) -> list[str]:
    # As ModelScope's load_vocab: one token per line, only the trailing "\n" removed, id = line index.
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f.readlines()]


class OFATokenizerZH(_OFATokenizerBase):
    """BERT basic tokenization + WordPiece over ``vocab.txt``, plus OFA's tokens: ModelScope's ``OFATokenizerZH``.

    Build it with :meth:`from_pretrained` on a checkpoint directory holding ``vocab.txt`` (and optionally a
    ``tokenizer_config.json`` overriding ``do_lower_case``/``strip_accents``/``tokenize_chinese_chars``).
    ``<mask>`` is appended when ``vocab.txt`` has no such line, then ``<code_*>`` and ``<bin_*>`` follow, as in
    ModelScope. Encoding: lowercasing (when ``do_lower_case``) of the whole text, splitting out the special and
    added tokens and BERT's basic tokenization in Python (see :class:`_BasicTokenizer` for why), WordPiece with
    unknown token ``<unk>`` by the ``tokenizers`` library. Unknown characters become ``<unk>`` (id 3), not BERT's
    ``[UNK]``; ``[UNK]``, ``[CLS]`` and the like are ordinary tokens here and decode literally.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        add_ofa_tokens: bool = True,
    ):
        """Create the tokenizer from the lines of ``vocab.txt`` (see :meth:`from_pretrained`)."""
        self._vocab: dict[str, int] = {}
        for i, tok in enumerate(vocab):
            if tok in self._vocab:
                raise ValueError(f"vocab.txt has {tok!r} twice (lines {self._vocab[tok] + 1} and {i + 1})")
            self._vocab[tok] = i
        for tok in (BOS, PAD, EOS, UNK):
            if tok not in self._vocab:
                raise ValueError(f"vocab.txt has no {tok!r} line; is this an OFA Chinese vocabulary?")
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.bos_id = self._vocab[BOS]
        self.pad_id = self._vocab[PAD]
        self.eos_id = self._vocab[EOS]
        self.unk_id = self._vocab[UNK]

        self._id_to_token: dict[int, str] = {i: t for t, i in self._vocab.items()}
        size = len(self._vocab)
        if MASK in self._vocab:
            self.mask_id = self._vocab[MASK]
        else:  # transformers appends a special token that the vocabulary lacks
            self.mask_id = size
            self._id_to_token[size] = MASK
            size += 1
        self._added: dict[int, str] = {}
        if add_ofa_tokens:
            for k, t in enumerate(
                [f"<code_{i}>" for i in range(NUM_CODES)] + [f"<bin_{i}>" for i in range(NUM_BINS)]
            ):
                if t in self._vocab:
                    raise ValueError(f"vocab.txt already holds {t!r}; OFA adds it itself")
                self._added[size + k] = t
            self._id_to_token.update(self._added)
        self._size = size + len(self._added)
        self._specials = (BOS, PAD, EOS, UNK, MASK)
        self._special_ids = frozenset((self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id))

        tk = Tokenizer(
            models.WordPiece(
                vocab=self._vocab, unk_token=UNK, continuing_subword_prefix="##", max_input_chars_per_word=100
            )
        )
        self._basic = _BasicTokenizer(do_lower_case, strip_accents, tokenize_chinese_chars, self._specials)
        tk.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(self._basic)
        # As transformers' slow tokenizer: special and added tokens are matched on the (lowercased) text and
        # kept whole, without eating neighbouring whitespace. Without a normalizer "normalized" makes no difference.
        tk.add_special_tokens(
            [AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in self._specials]
        )
        tk.add_tokens(
            [AddedToken(t, lstrip=False, rstrip=False, normalized=False) for t in self._added.values()]
        )
        for tid, tok in [(self.mask_id, MASK), *self._added.items()]:
            if tk.token_to_id(tok) != tid:
                raise ValueError(f"added token {tok!r} got id {tk.token_to_id(tok)}, expected {tid}")
        self._tk = tk

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OFATokenizerZH:
        """Load ``vocab.txt`` (and ``tokenizer_config.json`` if present) from a checkpoint directory."""
        d = Path(path)
        options = _read_tokenizer_config(d)
        added_decoder = options.pop("added_tokens_decoder", None)
        tok = cls(_read_vocab_txt(d / VOCAB_TXT_FILE), **options)
        if added_decoder:
            for sid, spec in added_decoder.items():
                content = _token_content(spec)
                flags = spec if isinstance(spec, dict) else {}
                if tok._id_to_token.get(int(sid)) != content or any(
                    flags.get(k) for k in ("lstrip", "rstrip", "single_word")
                ):
                    raise ValueError(
                        f"{d / TOKENIZER_CONFIG_FILE}: added_tokens_decoder entry {sid}: {spec!r} is not supported"
                    )
        return tok

    def __len__(self) -> int:
        return self._size

    @property
    def vocab_size(self) -> int:
        """Number of lines of ``vocab.txt`` (without ``<mask>`` if appended and the added OFA tokens)."""
        return len(self._vocab)

    def tokenize(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` without any special tokens (special and added tokens in the text are kept whole)."""
        if self.do_lower_case:
            # transformers lowercases the text character by character before it looks for the special tokens.
            text = "".join(ch.lower() for ch in text)
        return self._tk.encode(text, add_special_tokens=False).ids

    def _piece(self, i: int) -> tuple[str, bool]:
        if not 0 <= i < self._size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {len(self)})")
        return self._id_to_token[i], i in self._added

    def _run_to_text(self, tokens: list[str]) -> str:
        # ModelScope's OFATokenizerZH.convert_tokens_to_string: word pieces join, CJK characters stay
        # space-separated (the Chinese post-processing removes those spaces).
        return " ".join(tokens).replace(" ##", "").strip()


# --------------------------------------------------------------------------------------------------------
# By language

_PUNCTUATION = str.maketrans("", "", string.punctuation)
# ModelScope's OfaForAllTasks.detokenizer: drop every run of spaces after or before a character that is not a
# space, an ASCII letter or digit, or one of . , : ! ?
_DETOKENIZER = re.compile("((?<=[^ a-zA-Z0-9.,:!?]) +| +(?=[^ a-zA-Z0-9.,:!?]))")


def _check_language(language: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(
            f"configuration.json model.language {language!r} is not supported; "
            f"ModelScope's OFA accepts {', '.join(LANGUAGES)}"
        )


def load_tokenizer(path: str | os.PathLike, language: str = "en") -> OFATokenizer | OFATokenizerZH:
    """The tokenizer of a checkpoint directory for its configuration.json ``model.language``.

    ``en``: :class:`OFATokenizer` (``vocab.json`` + ``merges.txt``); ``zh`` or ``cn``: :class:`OFATokenizerZH`
    (``vocab.txt``). Any other value is refused.
    """
    _check_language(language)
    if language == "en":
        return OFATokenizer.from_pretrained(path)
    return OFATokenizerZH.from_pretrained(path)


def postprocess_caption(text: str, language: str = "en") -> str:
    """The reference's clean-up of a decoded caption (``OfaForAllTasks.postprocess``) for ``language``.

    ``en``: drop every ``string.punctuation`` character, strip. ``zh``/``cn``: punctuation is kept and the spaces
    next to any character other than ASCII letters, digits and ``.,:!?`` are removed (ModelScope's detokenizer):
    "一 款 时 尚 女 包" -> "一款时尚女包", "iphone 12 手 机" -> "iphone 12手机".
    """
    _check_language(language)
    if language == "en":
        return text.translate(_PUNCTUATION).strip()
    return _DETOKENIZER.sub("", text)
