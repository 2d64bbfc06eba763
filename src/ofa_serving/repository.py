"""Several checkpoints in one tritonserver: a model repository generated from the committed one.

``OFA_MODELS`` names the public models and their checkpoints, e.g.
``OFA_MODELS="caption=checkpoints/ofa-distilled-en caption_zh=checkpoints/ofa-muge-zh"`` (entries separated by
spaces or commas). For each public name ``N`` :func:`generate_repository` writes, from ``model_repository/``:

* ``N_preprocess`` and ``N_ofa``: the committed ``preprocess`` and ``ofa`` (config.pbtxt and ``1/model.py``) with
  ``pixel_values`` dims ``[3, S, S]`` from the checkpoint's ``patch_image_size`` and the ``model_dir``
  parameter set to the checkpoint;
* ``N``: the committed ``caption`` ensemble wired to those two steps.

Each generated config.pbtxt is the committed one parsed, changed field by field and written back through
Triton's schema (:mod:`ofa_serving.model_config`), under a header naming its source and every value changed;
the committed comments are not copied (the committed files are the ones to read and edit).

The public name ``caption`` keeps the committed step names ``preprocess`` and ``ofa``, so that dashboards, the
autoscaler's rules and clients that key on ``model="ofa"`` keep working when a second model is added beside it.
Without ``OFA_MODELS`` nothing is generated: the committed repository serves one ``caption`` model with
``OFA_MODEL_DIR``. The model settings' environment variables (``OFA_DEVICE``, ...) apply to every model;
``OFA_MODEL_DIR`` must be empty for the generated models (the environment wins over their ``model_dir``).

The serving profile (``OFA_PROFILE``, :mod:`ofa_serving.profiles`) fills the generated configs: ``cpu`` keeps the
committed values, ``gpu`` writes the GPU ones (bigger batches, short queue delays, several ``preprocess``
instances, ``KIND_GPU`` instances of ``ofa``). With the ``gpu`` profile ``make serve`` generates a repository for
its one checkpoint too (:func:`prepare_server`).

Command line (e.g. in a container, before ``tritonserver --model-repository=OUT``)::

    OFA_MODELS="caption=/models/en caption_b=/models/b" python -m ofa_serving.repository OUT [--profile gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .model_config import (
    ModelConfig,
    read_config,
    rename_steps,
    set_parameter,
    set_tensor_dims,
    write_config,
)
from .profiles import PROFILES, apply_profile, resolve_profile
from .settings import ServerSettings, SettingsError
from .tensors import pixel_values

__all__ = [
    "DEFAULT_NAME",
    "MARKER",
    "ServedModel",
    "step_names",
    "parse_models",
    "served_models",
    "generate_repository",
    "prepare_models",
    "prepare_server",
    "main",
]

#: The public model of the committed repository (and of ``make serve`` without ``OFA_MODELS``).
DEFAULT_NAME = "caption"
#: Written into a generated repository; only a directory holding it is ever emptied and rewritten.
MARKER = "generated-by-ofa-serving.json"

_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
_SOURCE_MODELS = ("caption", "preprocess", "ofa")


@dataclass(frozen=True)
class ServedModel:
    """One public ensemble and the two Triton models behind it."""

    name: str
    checkpoint: Path
    preprocess: str
    ofa: str

    @property
    def models(self) -> tuple[str, str, str]:
        """The Triton model names serving this public name, the ensemble first."""
        return (self.name, self.preprocess, self.ofa)


def step_names(name: str) -> tuple[str, str]:
    """``(preprocess, ofa)`` model names behind the public ensemble ``name``."""
    return ("preprocess", "ofa") if name == DEFAULT_NAME else (f"{name}_preprocess", f"{name}_ofa")


def parse_models(spec: str, *, base: Path | None = None) -> list[ServedModel]:
    """The models of an ``OFA_MODELS`` value (``name=path`` entries, separated by spaces or commas).

    Names are lowercase (``[a-z][a-z0-9_]*``), unique, and no model name may be generated twice; relative paths
    are taken from ``base`` (default: the current directory). Raises :class:`SettingsError` naming the entry.
    """
    base = Path.cwd() if base is None else base
    where = "environment variable OFA_MODELS"
    entries = [e for e in re.split(r"[\s,]+", spec.strip()) if e]
    if not entries:
        raise SettingsError(f"{where}: no models in {spec!r}; expected name=checkpoint_dir entries")
    models, taken = [], {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not path:
            raise SettingsError(f"{where}: {entry!r} is not name=checkpoint_dir")
        if not _NAME.fullmatch(name):
            raise SettingsError(
                f"{where}: model name {name!r} must be lowercase letters, digits and _, starting with a letter"
            )
        model = ServedModel(name, (base / Path(path).expanduser()).resolve(), *step_names(name))
        for triton_name in model.models:
            if triton_name in taken:
                raise SettingsError(
                    f"{where}: {entry!r} needs the Triton model {triton_name!r}, already used by "
                    f"{taken[triton_name]!r}"
                )
            taken[triton_name] = entry
        models.append(model)
    return models


def served_models(spec: str | None = None) -> dict[str, tuple[str, ...]]:
    """``{public name: (ensemble, preprocess, ofa)}`` of what the server serves for an ``OFA_MODELS`` value
    (``None`` or empty: the committed repository's one ``caption`` model)."""
    if not spec or not spec.strip():
        return {DEFAULT_NAME: (DEFAULT_NAME, *step_names(DEFAULT_NAME))}
    return {m.name: m.models for m in parse_models(spec)}


def generate_repository(
    models: Sequence[ServedModel],
    out_dir: str | Path,
    source: str | Path | None = None,
    profile: str = "cpu",
) -> Path:
    """Write the model repository serving ``models`` into ``out_dir`` (created, or rewritten if generated before).

    ``source`` is the committed repository (default: ``model_repository/`` of the checkout). Each checkpoint
    must exist; its configuration.json gives the image size. ``profile`` (``cpu`` | ``gpu``) fills the configs
    (:func:`ofa_serving.profiles.apply_profile`). Returns ``out_dir``.
    """
    from ofa_captioning.config import load_task_config

    from .launcher import default_model_repository

    source = Path(source) if source else default_model_repository()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise SettingsError(f"{out} is not empty and was not generated here; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    committed = {name: read_config(source / name / "config.pbtxt") for name in _SOURCE_MODELS}
    filled = {name: apply_profile(name, config, profile) for name, config in committed.items()}
    for model in models:
        if not (model.checkpoint / "config.json").is_file():
            raise SettingsError(f"model {model.name!r}: {model.checkpoint} is not a checkpoint directory")
        pixels = pixel_values(load_task_config(model.checkpoint).patch_image_size)
        why = f"public model {model.name!r}, checkpoint {model.checkpoint}"
        for step in ("preprocess", "ofa"):
            config = _copy(committed[step])
            set_tensor_dims(config, pixels.name, pixels.dims)
            set_parameter(config, "model_dir", str(model.checkpoint))
            header = _header(step, why, profile, filled[step])
            _write_model(out / getattr(model, step), config, header, source / step / "1" / "model.py")
        ensemble = _copy(committed["caption"])
        rename_steps(ensemble, {"preprocess": model.preprocess, "ofa": model.ofa})
        _write_model(out / model.name, ensemble, _header("caption", why, profile, filled["caption"]), None)
    manifest = {
        m.name: {"checkpoint": str(m.checkpoint), "models": list(m.models), "profile": profile}
        for m in models
    }
    (out / MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def prepare_models(settings: ServerSettings, out_dir: str | Path | None = None, **server_options):
    """The server of ``make serve`` with ``OFA_MODELS``: ``(TritonServer, models, generated repository)``.

    ``server_options`` go to :meth:`TritonServer.from_settings` (e.g. ``admin_key``).

    The repository is generated into ``out_dir`` (default: a new temporary directory; the caller removes it)
    from ``OFA_MODEL_REPOSITORY`` (default ``model_repository/``). ``OFA_MODEL_DIR`` may not be set as well, and
    is passed to the server empty, so that each model's ``model_dir`` parameter applies.
    """
    if settings.model_dir is not None:
        raise SettingsError(
            "environment variables OFA_MODELS and OFA_MODEL_DIR are both set: OFA_MODELS names every checkpoint; "
            "unset OFA_MODEL_DIR"
        )
    models = parse_models(settings.models)
    server, out = _generated_server(
        settings, models, resolve_profile(settings.profile), out_dir, server_options
    )
    return server, models, out


def prepare_server(settings: ServerSettings, model_dir: str | Path, **server_options):
    """The server of ``make serve`` for one checkpoint: ``(TritonServer, generated repository or None)``.

    The ``cpu`` profile serves the committed repository as it is. The ``gpu`` profile (``OFA_PROFILE``; ``auto``
    where torch sees a CUDA device) generates a repository with the GPU values into a new temporary directory
    (the caller removes it), with the public model ``caption`` and the checkpoint in its ``model_dir``.
    """
    from .launcher import TritonServer

    profile = resolve_profile(settings.profile)
    if profile == "cpu":
        return TritonServer.from_settings(settings, model_dir=model_dir, **server_options), None
    models = [ServedModel(DEFAULT_NAME, Path(model_dir).resolve(), *step_names(DEFAULT_NAME))]
    return _generated_server(settings, models, profile, None, server_options)


def _generated_server(settings: ServerSettings, models, profile: str, out_dir, server_options):
    """``(TritonServer, repository)``: ``models`` generated into ``out_dir`` (default: a new temporary directory,
    removed again if the generation fails), served with each model's own ``model_dir`` parameter."""
    from .launcher import TritonServer

    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="ofa-model-repository-"))
    try:
        generate_repository(models, out, settings.model_repository, profile)
    except BaseException:
        if out_dir is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    server = TritonServer.from_settings(
        settings, model_repository=out, model_dir=None, env={"OFA_MODEL_DIR": ""}, **server_options
    )
    return server, out


def _copy(config: ModelConfig) -> ModelConfig:
    copy = ModelConfig()
    copy.CopyFrom(config)
    return copy


def _header(step: str, why: str, profile: str, filled: Sequence[str]) -> list[str]:
    lines = [
        f"Generated by ofa_serving.repository from model_repository/{step}/config.pbtxt for the {why};",
        "rewritten at every start: edit the committed file instead (its comments explain each field).",
    ]
    if filled:
        lines.append(
            f"Serving profile {profile} (ofa_serving.profiles) sets, instead of the committed values:"
        )
        lines.extend(f"  {line}" for line in filled)
    return lines


def _write_model(target: Path, config: ModelConfig, header: Sequence[str], model_py: Path | None) -> None:
    (target / "1").mkdir(parents=True)
    write_config(config, target / "config.pbtxt", header)
    if model_py is not None:
        shutil.copy2(model_py, target / "1" / "model.py")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``python -m ofa_serving.repository OUT [--models SPEC] [--source DIR]``; prints the models per name."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m ofa_serving.repository",
        description="Generate a Triton model repository serving several checkpoints (OFA_MODELS).",
    )
    parser.add_argument("out", type=Path, help="directory to write (created; rewritten if generated before)")
    parser.add_argument("--models", default=environ.get("OFA_MODELS", ""), help="default: $OFA_MODELS")
    parser.add_argument("--source", type=Path, default=None, help="committed model repository to start from")
    parser.add_argument(
        "--profile",
        choices=("auto", *PROFILES),
        default=(environ.get("OFA_PROFILE", "") or "auto").lower(),
        help="serving profile filling the configs (default: $OFA_PROFILE, else auto: gpu where torch sees CUDA)",
    )
    args = parser.parse_args(argv)
    try:
        models = parse_models(args.models)
        generate_repository(models, args.out, args.source, resolve_profile(args.profile))
    except (SettingsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for model in models:
        print(f"{model.name}: {', '.join(model.models)} <- {model.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
