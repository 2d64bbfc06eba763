"""COCO caption evaluation of the OFA captioning model, served (gRPC/HTTP) or in-process.

``python -m ofa_eval run DATASET ...`` captions Karpathy's ``dataset_coco.json`` (a split) or a COCO
``captions_*.json`` with its images, scores the captions with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D, SPICE when its models are present) and writes a results JSON; ``python -m ofa_eval compare A B``
prints the per-metric differences of two results. Modules: ``dataset``, ``predict``, ``scoring``, ``results``,
``report``, ``java``, ``cli``.
"""

from .dataset import CaptionSet, DatasetError, Sample, load_caption_set
from .scoring import ALL_METRICS, COCO_NAMES, Scores, ScoringError, score_captions, spice_models_present

__all__ = [
    "ALL_METRICS",
    "COCO_NAMES",
    "CaptionSet",
    "DatasetError",
    "Sample",
    "Scores",
    "ScoringError",
    "load_caption_set",
    "score_captions",
    "spice_models_present",
]
