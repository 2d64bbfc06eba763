"""COCO caption metrics with pycocoevalcap, exactly as its ``COCOEvalCap.evaluate`` computes them.

The captions and references go through pycocoevalcap's PTB tokenizer (Stanford CoreNLP, lowercased,
punctuation removed), then BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D (pycocoevalcap's ``Cider`` is the CIDEr-D
variant: Gaussian length penalty, clipped counts, sigma 6) and SPICE where its Stanford CoreNLP models are
present. Scores are pycocoevalcap's raw values (CIDEr-D 1.201 is the 120.1 papers print).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .java import ensure_java

__all__ = [
    "ALL_METRICS",
    "COCO_NAMES",
    "METRIC_GROUPS",
    "ScoringError",
    "Scores",
    "score_captions",
    "spice_models_present",
]

#: Our metric names, in table order, and pycocoevalcap's names for them (``COCOEvalCap.eval`` keys).
COCO_NAMES = {
    "BLEU-1": "Bleu_1",
    "BLEU-2": "Bleu_2",
    "BLEU-3": "Bleu_3",
    "BLEU-4": "Bleu_4",
    "METEOR": "METEOR",
    "ROUGE-L": "ROUGE_L",
    "CIDEr-D": "CIDEr",
    "SPICE": "SPICE",
}
ALL_METRICS = tuple(COCO_NAMES)
#: What ``--metrics`` takes: a scorer each (BLEU's scorer gives the four n-gram orders at once).
METRIC_GROUPS = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr-D",),
    "spice": ("SPICE",),
}


class ScoringError(RuntimeError):
    """pycocoevalcap could not score the captions (Java missing, a scorer failed)."""


@dataclass
class Scores:
    """Corpus scores ``{metric: value}``, per-image scores ``{image_id: {metric: value}}``, skipped metrics
    with the reason."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_image: dict[int | str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _spice_dir() -> Path:
    import pycocoevalcap.spice  # pycocoevalcap itself is a namespace package (no __file__)

    return Path(pycocoevalcap.spice.__file__).parent


def spice_models_present() -> bool:
    """Whether SPICE's Stanford CoreNLP 3.6.0 jars are installed (pycocoevalcap downloads them on first use)."""
    lib = _spice_dir() / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").is_file() and (
        lib / "stanford-corenlp-3.6.0-models.jar"
    ).is_file()


@contextlib.contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """Capture what pycocoevalcap and its Java subprocesses print (file descriptors 1 and 2)."""
    text = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    printed = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.write(printed.getvalue() + sink.read().decode(errors="replace"))


def _tokenize(tokenizer, captions: Mapping, what: str) -> dict:
    out = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    got = sum(len(v) for v in out.values())
    want = sum(len(v) for v in captions.values())
    if set(out) != set(captions) or got != want:
        raise ScoringError(f"the PTB tokenizer returned {got} of {want} {what} (did Java fail?)")
    return out


def score_captions(
    predictions: Mapping[int | str, str],
    references: Mapping[int | str, Sequence[str]],
    *,
    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "cider", "spice"),
    spice: str = "auto",
) -> Scores:
    """Score one caption per image against its references, as pycocoevalcap's ``COCOEvalCap`` does.

    ``predictions`` and ``references`` must cover the same image ids. ``metrics`` picks scorers from
    :data:`METRIC_GROUPS`. ``spice``: ``auto`` (run SPICE when its models are present, else skip it with the
    reason in :attr:`Scores.skipped`), ``on`` (fail without them), ``off``.
    """
    unknown = sorted(set(metrics) - set(METRIC_GROUPS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRIC_GROUPS)}")
    if spice not in ("auto", "on", "off"):
        raise ValueError(f"spice must be auto, on or off, got {spice!r}")
    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise ScoringError(
            f"predictions and references differ: no caption for {missing}, no references for {extra}"
        )
    if not predictions:
        raise ScoringError("nothing to score")
    ensure_java()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    result = Scores()
    ids = list(references)  # COCOEvalCap's order: the images in dataset order
    run_spice = "spice" in metrics and spice != "off"
    if run_spice and not spice_models_present():
        reason = (
            f"SPICE skipped: its Stanford CoreNLP 3.6.0 models are not in {_spice_dir() / 'lib'} (pycocoevalcap "
            "downloads them from nlp.stanford.edu on first use; run `python -m pycocoevalcap.spice."
            "get_stanford_models` where the site is reachable)"
        )
        if spice == "on":
            raise ScoringError(reason)
        result.skipped["SPICE"] = reason
        run_spice = False
    elif "spice" not in metrics or spice == "off":
        result.skipped["SPICE"] = "SPICE not requested"
    for group in ("bleu", "meteor", "rouge", "cider"):
        if group not in metrics:
            for name in METRIC_GROUPS[group]:
                result.skipped[name] = f"{name} not requested"

    scorers = []
    log = io.StringIO()
    try:
        with _captured_output() as log:
            tokenizer = PTBTokenizer()
            gts = _tokenize(tokenizer, {i: list(references[i]) for i in ids}, "references")
            res = _tokenize(tokenizer, {i: [predictions[i]] for i in ids}, "captions")
            if "bleu" in metrics:
                scorers.append((Bleu(4), METRIC_GROUPS["bleu"]))
            if "meteor" in metrics:
                scorers.append((Meteor(), METRIC_GROUPS["meteor"]))
            if "rouge" in metrics:
                scorers.append((Rouge(), METRIC_GROUPS["rouge"]))
            if "cider" in metrics:
                scorers.append((Cider(), METRIC_GROUPS["cider"]))
            if run_spice:
                from pycocoevalcap.spice.spice import Spice

                scorers.append((Spice(), METRIC_GROUPS["spice"]))
            for scorer, names in scorers:
                corpus, per_image = scorer.compute_score(gts, res)
                if len(names) == 1:
                    corpus, per_image = [corpus], [per_image]
                for name, value, values in zip(names, corpus, per_image, strict=True):
                    result.metrics[name] = float(value)
                    for image_id, v in zip(gts, values, strict=True):
                        v = v["All"]["f"] if isinstance(v, dict) else v  # SPICE: its F-score
                        result.per_image.setdefault(image_id, {})[name] = float(v)
    except ScoringError:
        raise
    except Exception as exc:  # noqa: BLE001 - a scorer's failure, with what it printed
        printed = log.getvalue().strip()[-2000:]
        raise ScoringError(f"pycocoevalcap failed: {type(exc).__name__}: {exc}\n{printed}".rstrip()) from exc
    finally:
        for scorer, _ in scorers:
            process = getattr(scorer, "meteor_p", None)
            if process is not None:  # Meteor's Java process otherwise lives until garbage collection
                with contextlib.suppress(Exception):
                    process.stdin.close()
                    process.kill()
                    process.wait(timeout=10)
    result.metrics = {m: result.metrics[m] for m in ALL_METRICS if m in result.metrics}
    return result
