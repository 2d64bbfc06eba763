"""ModelScope's own OFA captioning, run in-process as the reference for parity tests and the benchmark.

What runs is ModelScope's code: ``OfaForAllTasks`` (which loads ``OFAModel.from_pretrained`` and
``OFATokenizer.from_pretrained``, adds the ``<code_*>``/``<bin_*>`` tokens and configures its
``SequenceGenerator`` from configuration.json), ``OfaPreprocessor`` -> ``OfaImageCaptioningPreprocessor`` with
``LoadImage`` (image files, exactly as the pipeline reads them), ModelScope's ``collate_fn``, and
``OfaForAllTasks.inference`` + ``postprocess`` for the text. Only ``ImageCaptioningPipeline`` itself is
bypassed, because its imports need packages that cannot be installed beside torch 2.13.0 CPU.

Those missing packages (torchvision, torchaudio, timm, cv2, ...) are imported by other ModelScope tasks at
module level, never called on the captioning path, except ``torchvision.transforms`` whose ``Compose``,
``Resize``, ``InterpolationMode``, ``ToTensor`` and ``Normalize`` the caption preprocessor applies to a PIL
image. :func:`install_stand_ins` registers stand-in modules for them (only where the real package is absent);
the transforms are re-expressed with torchvision's documented semantics for PIL input (``Resize`` on a PIL
image is ``PIL.Image.resize``; ``ToTensor`` is uint8 HWC -> float CHW / 255; ``Normalize`` is
``sub_(mean).div_(std)``); every other attribute is a placeholder that raises if it is ever used.

Usage::

    ref = Reference("checkpoints/ofa-tiny-demo")
    pixels = ref.pixels([jpeg_bytes, png_bytes])        # torch.float32 [B, 3, S, S]
    ref.caption(pixels)                                  # [(text, score), ...]
"""

from __future__ import annotations

import enum
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .parity import same_results, scores_close

#: Top-level packages ModelScope's OFA import chain needs but that cannot be installed here. A stand-in is
#: used only when the real package cannot be found.
STAND_IN_PACKAGES = (
    "torchvision",
    "torchaudio",
    "timm",
    "cv2",
    "librosa",
    "soundfile",
    "rapidfuzz",
    "zhconv",
    "unicodedata2",
)


class _Missing:
    """Placeholder for anything of a stand-in package; fails loudly when actually used."""

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        raise RuntimeError(
            f"{self._qualname} is a stand-in (package not installed) and was called by the reference"
        )


def _placeholder(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_Missing,), {"_qualname": qualname})


#: Submodules reached as attributes (``from torchvision import transforms``) rather than imported by name.
_STAND_IN_SUBMODULES = {"torchvision.transforms", "torchvision.transforms.functional"}


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        qualname = f"{self.__name__}.{name}"
        if qualname in _STAND_IN_SUBMODULES:
            return importlib.import_module(qualname)
        value = _placeholder(qualname)
        setattr(self, name, value)
        return value


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _pil_filter(mode: Any) -> int:
    from PIL import Image

    mode = mode.value if isinstance(mode, _InterpolationMode) else mode
    table = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "box": Image.Resampling.BOX,
        "hamming": Image.Resampling.HAMMING,
        "lanczos": Image.Resampling.LANCZOS,
        0: Image.Resampling.NEAREST,
        2: Image.Resampling.BILINEAR,
        3: Image.Resampling.BICUBIC,
    }
    if mode not in table:
        raise NotImplementedError(f"stand-in Resize: interpolation {mode!r}")
    return table[mode]


class _Compose:
    def __init__(self, transforms: Sequence[Any]):
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


class _Resize:
    """torchvision.transforms.Resize for PIL images (torchvision calls ``img.resize((w, h), filter)``)."""

    def __init__(
        self,
        size: Any,
        interpolation: Any = _InterpolationMode.BILINEAR,
        max_size: Any = None,
        antialias: Any = True,
    ):
        self.size = size
        self.interpolation = interpolation
        self.max_size = max_size

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        if not isinstance(img, Image.Image):
            raise NotImplementedError("stand-in Resize handles PIL images only")
        w, h = img.size
        if isinstance(self.size, int) or len(self.size) == 1:
            # Smaller edge matched to size, aspect ratio kept (torchvision's _compute_resized_output_size).
            s = self.size if isinstance(self.size, int) else self.size[0]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = s, int(s * long / short)
            if self.max_size is not None and new_long > self.max_size:
                new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = self.size
        return img.resize((new_w, new_h), _pil_filter(self.interpolation))


class _ToTensor:
    """torchvision.transforms.ToTensor for 8-bit PIL images: uint8 HWC -> float32 CHW in [0, 1]."""

    def __call__(self, pic: Any) -> torch.Tensor:
        import numpy as np

        if pic.mode not in ("RGB", "L", "RGBA", "CMYK", "LA", "P", "YCbCr"):
            raise NotImplementedError(f"stand-in ToTensor: mode {pic.mode}")
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
        img = img.permute((2, 0, 1)).contiguous()
        return img.to(dtype=torch.get_default_dtype()).div(255)


class _Normalize:
    """torchvision.transforms.Normalize: ``tensor.sub_(mean).div_(std)`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], inplace: bool = False):
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device)
        if mean.ndim == 1:
            mean = mean.view(-1, 1, 1)
        if std.ndim == 1:
            std = std.view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)


_TRANSFORMS_IMPL = {
    "Compose": _Compose,
    "Resize": _Resize,
    "InterpolationMode": _InterpolationMode,
    "ToTensor": _ToTensor,
    "Normalize": _Normalize,
}


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves stand-in modules for STAND_IN_PACKAGES (and their submodules) that are not installed."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".", 1)[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        mod = _StandInModule(spec.name)
        mod.__path__ = []  # a package, so that any submodule can be imported
        mod.__stand_in__ = True
        if spec.name == "torchvision.transforms":
            for k, v in _TRANSFORMS_IMPL.items():
                setattr(mod, k, v)
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass


_FINDER: _StandInFinder | None = None


def install_stand_ins() -> list[str]:
    """Register stand-ins for the missing packages of STAND_IN_PACKAGES; returns the names stood in for.

    transformers must be imported first: it probes optional packages when it is imported, and must see the
    missing ones as missing.
    """
    global _FINDER
    import transformers  # noqa: F401  (see above)

    if _FINDER is not None:
        return sorted(_FINDER.roots)
    missing = {name for name in STAND_IN_PACKAGES if importlib.util.find_spec(name) is None}
    _FINDER = _StandInFinder(missing)
    sys.meta_path.append(_FINDER)  # last: real packages always win
    return sorted(missing)


def _quiet_modelscope() -> None:
    import logging

    os.environ.setdefault("MODELSCOPE_LOG_LEVEL", str(logging.ERROR))
    for name in ("modelscope", "fairseq", "transformers", "PIL"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass


class Reference:
    """ModelScope's OFA captioning (model, tokenizer, generator, preprocessing, postprocessing) on a checkpoint dir.

    Torch threads are left at torch's default. Everything runs on CPU in float32, in eval mode, without grad.
    """

    def __init__(self, model_dir: str | os.PathLike):
        """Load the checkpoint with ModelScope's ``OfaForAllTasks`` and ``OfaPreprocessor``."""
        _quiet_modelscope()
        install_stand_ins()
        from modelscope.models.multi_modal.ofa.generate import sequence_generator
        from modelscope.models.multi_modal.ofa_for_all_tasks import OfaForAllTasks
        from modelscope.outputs import OutputKeys
        from modelscope.preprocessors.ofa.image_captioning import OfaImageCaptioningPreprocessor
        from modelscope.preprocessors.ofa.utils.collate import collate_fn
        from modelscope.utils.config import Config
        from modelscope.utils.constant import ModeKeys, ModelFile

        self.model_dir = str(Path(model_dir).resolve())
        self._sg = sequence_generator
        self._collate_fn = collate_fn
        self._caption_key = OutputKeys.CAPTION
        self.task_model = OfaForAllTasks(self.model_dir)
        self.task_model.eval()
        self.model = self.task_model.model  # OFAModel
        self.tokenizer = self.task_model.tokenizer
        self.generator = self.task_model.generator
        self.cfg = self.task_model.cfg
        # What OfaPreprocessor(model_dir) builds for the image-captioning task (OfaPreprocessor itself imports
        # ModelScope's pipelines and datasets packages, which need the HF `datasets` package).
        pre_cfg = Config.from_file(os.path.join(self.model_dir, ModelFile.CONFIGURATION))
        self.preprocessor = OfaImageCaptioningPreprocessor(
            cfg=pre_cfg, model_dir=self.model_dir, mode=ModeKeys.INFERENCE
        )
        self.patch_image_size = int(self.cfg.model.get("patch_image_size", 480))
        # What OfaForAllTasks passes to SequenceGenerator (its defaults updated with model.beam_search).
        self.generator_args: dict[str, Any] = {
            "beam_size": 5,
            "max_len_b": 16,
            "min_len": 1,
            "no_repeat_ngram_size": 3,
            "constraint_range": None,
        }
        if hasattr(self.cfg.model, "beam_search"):
            self.generator_args.update(dict(self.cfg.model.beam_search))

    # ---------------------------------------------------------------- preprocessing

    def samples(self, images: Sequence[bytes]) -> dict[str, Any]:
        """Collated reference batch for encoded images (each read from a file by ModelScope's LoadImage)."""
        items = []
        with tempfile.TemporaryDirectory(prefix="ofa-ref-") as tmp:
            for i, data in enumerate(images):
                p = Path(tmp) / f"image{i}"
                p.write_bytes(data)
                # OfaPreprocessor(path) -> OfaImageCaptioningPreprocessor({'image': path}) -> load_image(path).
                items.append({"image": str(p)})
            samples = [self.preprocessor(d) for d in items]
        return self._collate_fn(
            samples, pad_idx=self.tokenizer.pad_token_id, eos_idx=self.tokenizer.eos_token_id
        )

    def pixels(self, images: Sequence[bytes]) -> torch.Tensor:
        """Reference pixel batch float32 ``[B, 3, S, S]`` for encoded images."""
        return self.samples(images)["net_input"]["patch_images"]

    def source_tokens(self) -> list[int]:
        """The encoder's text input (bos + BPE(prompt) + eos) as the reference builds it."""
        prompt = self.cfg.model.get("prompt", " what does the image describe?")
        return self.preprocessor.tokenize_text(prompt).tolist()

    def net_input(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``net_input`` for a pixel batch: the prompt tokens repeated, the pixels, all patch masks True."""
        b = pixel_values.shape[0]
        src = torch.tensor([self.source_tokens()] * b, dtype=torch.long)
        return {
            "input_ids": src,
            "patch_images": pixel_values.to(torch.float32),
            "patch_masks": torch.ones(b, dtype=torch.bool),
        }

    # ---------------------------------------------------------------- network

    @torch.no_grad()
    def encoder(self, pixel_values: torch.Tensor) -> Any:
        """The reference encoder's output (``.last_hidden_state`` [B, image+text tokens, d_model], masks, ...)."""
        # As the generator's EnsembleModel.forward_encoder calls it.
        return self.model.encoder.forward(**self.net_input(pixel_values), output_hidden_states=True)

    @torch.no_grad()
    def decoder_logits(
        self, pixel_values: torch.Tensor, decoder_input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder logits [B, T, V] for ``decoder_input_ids`` (default: just bos, i.e. the first step)."""
        ni = self.net_input(pixel_values)
        if decoder_input_ids is None:
            decoder_input_ids = torch.full(
                (pixel_values.shape[0], 1), self.tokenizer.bos_token_id, dtype=torch.long
            )
        out = self.model(
            input_ids=ni["input_ids"],
            patch_images=ni["patch_images"],
            patch_masks=ni["patch_masks"],
            decoder_input_ids=decoder_input_ids,
        )
        return out.logits

    # ---------------------------------------------------------------- generation

    def make_generator(self, beam_size: int | None = None, max_length: int | None = None) -> Any:
        """The SequenceGenerator OfaForAllTasks uses, with ``beam_size``/``max_len_b`` overridden if given."""
        if beam_size is None and max_length is None:
            return self.generator
        args = dict(self.generator_args)
        if beam_size is not None:
            args["beam_size"] = beam_size
        if max_length is not None:
            args["max_len_b"] = max_length
        return self._sg.SequenceGenerator(tokenizer=self.tokenizer, **args)

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, beam_size: int | None = None, max_length: int | None = None
    ) -> list:
        """Raw SequenceGenerator output (per image: list of hypothesis dicts, best first)."""
        gen = self.make_generator(beam_size, max_length)
        return gen.generate([self.model], {"net_input": self.net_input(pixel_values)})

    @torch.no_grad()
    def results(
        self,
        pixel_values: torch.Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        num_return_sequences: int = 1,
    ) -> list[list[RefHypothesis]]:
        """Per image, the ``num_return_sequences`` best hypotheses as OfaForAllTasks returns them: its text
        (``inference`` + ``postprocess`` with that many return sequences), the generator's score and tokens."""
        gen = self.make_generator(beam_size, max_length)
        captured: list[Any] = []

        class _Capture(torch.nn.Module):
            beam_size = gen.beam_size

            def generate(self, models: Any, sample: Any, **kw: Any) -> Any:
                out = gen.generate(models, sample, **kw)
                captured.append(out)
                return out

        saved = self.task_model.generator, self.task_model.num_return_sequences
        self.task_model.generator = _Capture()
        self.task_model.num_return_sequences = num_return_sequences
        try:
            ret = self.task_model.inference({"net_input": self.net_input(pixel_values)})
        finally:
            self.task_model.generator, self.task_model.num_return_sequences = saved
        ret = self.task_model.postprocess(ret)
        caps = ret[self._caption_key]  # per image: [text, ...] (num_return_sequences of them)
        if pixel_values.shape[0] == 1:
            # postprocess unwraps one-element lists: a batch of one comes back as [texts], not [[texts]].
            caps = [caps]
        out = []
        for texts, hyps in zip(caps, captured[0], strict=True):
            texts = [texts] if isinstance(texts, str) else texts
            assert len(texts) == num_return_sequences and all(isinstance(t, str) for t in texts), texts
            out.append(
                [
                    RefHypothesis(tuple(h["tokens"].tolist()), float(h["score"]), text)
                    for text, h in zip(texts, hyps[:num_return_sequences], strict=True)
                ]
            )
        return out

    @torch.no_grad()
    def caption(
        self, pixel_values: torch.Tensor, beam_size: int | None = None, max_length: int | None = None
    ) -> list[tuple[str, float]]:
        """(caption, score) per image: OfaForAllTasks.inference + postprocess, score of the top hypothesis."""
        return [(h[0].text, h[0].score) for h in self.results(pixel_values, beam_size, max_length)]

    @torch.no_grad()
    def score_tokens(
        self, pixel_values: torch.Tensor, tokens: Sequence[int], beam_size: int | None = None
    ) -> float:
        """The score the reference generator would give the hypothesis ``tokens`` (no bos, ending with eos) of
        one image, by teacher forcing ModelScope's model over ``<s>`` + tokens: per-token log-softmax of the
        logits divided by ``temperature``, ``unk_penalty`` subtracted for ``<unk>``, summed, and divided by
        ``len(tokens) ** len_penalty`` when ``normalize_scores`` (the generator's own bans never hit a token it
        chose, so they do not enter)."""
        gen = self.make_generator(beam_size)
        assert pixel_values.shape[0] == 1
        toks = torch.tensor([list(tokens)], dtype=torch.long)
        prefix = torch.cat(
            [torch.full((1, 1), self.tokenizer.bos_token_id, dtype=torch.long), toks[:, :-1]], 1
        )
        logits = self.decoder_logits(pixel_values, prefix)[0].float() / gen.temperature
        lprobs = torch.log_softmax(logits, dim=-1).gather(1, toks[0][:, None])[:, 0]
        lprobs = lprobs - gen.unk_penalty * toks[0].eq(gen.unk).float()
        score = float(lprobs.sum())
        if gen.normalize_scores:
            score /= len(tokens) ** gen.len_penalty
        return score

    def caption_images(
        self, images: Sequence[bytes], beam_size: int | None = None, max_length: int | None = None
    ) -> list[tuple[str, float]]:
        """Encoded images -> (caption, score), the whole reference path."""
        return self.caption(self.pixels(images), beam_size=beam_size, max_length=max_length)


class RefHypothesis(NamedTuple):
    """One hypothesis: token ids (no bos, ending with eos), the generator's score, the caption text."""

    tokens: tuple[int, ...]
    score: float
    text: str


#: How much worse than the reference's best an engine caption may score where a beam-search near-tie made the two
#: searches diverge (the score tolerance itself is :data:`load_tests.testkit.parity.SCORE_ATOL`).
TIE_MARGIN = 0.02


def engine_results(
    engine: Any,
    pixel_values: torch.Tensor,
    beam_size: int | None = None,
    max_length: int | None = None,
    num_captions: int = 1,
) -> list[list[RefHypothesis]]:
    """The engine's ``num_captions`` best hypotheses per image in the same form (tokens, score, caption text)."""
    hyps = engine.generate_hypotheses(pixel_values, beam_size, max_length)
    return [
        [
            RefHypothesis(
                tuple(h.tokens), float(h.score), engine.postprocess(engine.tokenizer.decode(h.tokens))
            )
            for h in per_image[:num_captions]
        ]
        for per_image in hyps
    ]


def assert_tie_aware_parity(
    reference: Reference,
    pixel_values: torch.Tensor,
    got: list[list[RefHypothesis]],
    want: list[list[RefHypothesis]],
    beam_size: int | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """The one parity rule of the project, for every parity test: per image, the engine's hypothesis list
    ``got`` equals the reference's ``want`` (same tokens and texts, scores within ``SCORE_ATOL``), except where a
    beam-search near-tie made the searches diverge. Where lists differ, each engine hypothesis is re-scored with
    ModelScope's model (teacher forcing, :meth:`Reference.score_tokens`) and the image passes only if every
    engine score equals the reference model's score of the engine's tokens (``SCORE_ATOL``) and the engine's best
    is not worse than the reference's best by more than ``TIE_MARGIN``.

    Returns the names of the images that diverged this way (tests assert such divergences stay rare).
    """
    assert len(got) == len(want) == pixel_values.shape[0], (len(got), len(want), pixel_values.shape)
    names = list(names) if names is not None else [str(i) for i in range(len(got))]
    diverged, failures = [], []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if same_results(g, w):
            continue
        # Equal tokens must give equal text and score: only a different search path is excused.
        if len(g) == len(w) and all(a.tokens == b.tokens for a, b in zip(g, w, strict=True)):
            failures.append((names[i], "same tokens, different text or score", g, w))
            continue
        pix = pixel_values[i : i + 1]
        rescored = [reference.score_tokens(pix, h.tokens, beam_size) for h in g]
        bad_scores = [(h.score, r) for h, r in zip(g, rescored, strict=True) if not scores_close(h.score, r)]
        worse = bool(g and w) and g[0].score < w[0].score - TIE_MARGIN
        if bad_scores or worse or not g or len(g) != len(w):
            failures.append((names[i], f"rescored {rescored}", g, w))
        else:
            diverged.append(names[i])
    assert not failures, failures
    return diverged


def build_modelscope_checkpoint(
    out_dir: str | os.PathLike,
    model_config: dict[str, Any],
    task_config: dict[str, Any],
    tokenizer_dir: str | os.PathLike,
    seed: int = 0,
) -> Path:
    """A random-weight checkpoint built and saved by ModelScope: ``OFAModel(OFAConfig(**model_config))`` with the
    demo checkpoint's weight recipe (``ofa_captioning.demo_checkpoint._init_weights``: peaked attention, random
    norms and tables, EOS competing), written by ``OFAModel.save_pretrained`` (``config.json`` and
    ``pytorch_model.bin``), plus ``configuration.json`` and the tokenizer files of ``tokenizer_dir``."""
    import json
    import shutil

    from ofa_captioning.demo_checkpoint import _init_weights

    _quiet_modelscope()
    install_stand_ins()
    from modelscope.models.multi_modal.ofa import OFAModel as RefOFAModel
    from modelscope.models.multi_modal.ofa.configuration_ofa import OFAConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = RefOFAModel(OFAConfig(**model_config)).eval()
    _init_weights(model, seed)  # duck-typed: ModelScope's module names are the engine's
    model.save_pretrained(str(out), safe_serialization=False)
    (out / "configuration.json").write_text(json.dumps(task_config, indent=2) + "\n", encoding="utf-8")
    for name in ("vocab.json", "merges.txt", "vocab.txt"):
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out


def write_prefixed_copy(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``src_dir`` with its weights re-saved as ModelScope's trainer writes them: ``OfaForAllTasks.state_dict()``,
    i.e. every key prefixed ``model.`` (the other files are linked)."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if (
            f.is_file()
            and f.name not in ("pytorch_model.bin", "model.safetensors")
            and not f.name.startswith(".")
        ):
            (out / f.name).unlink(missing_ok=True)
            (out / f.name).symlink_to(f.resolve())
    from ofa_captioning.checkpoint import load_state_dict

    state = load_state_dict(src)
    torch.save({f"model.{k}": v for k, v in state.items()}, out / "pytorch_model.bin")
    return out
