"""Fixtures for the adapter unit tests: a stand-in ``triton_python_backend_utils``, a stand-in engine, the
real config.pbtxt files parsed the way Triton hands them to ``initialize(args)``. No server is started."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from ofa_serving import settings as settings_module

from . import fake_pb_utils

REPO = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO / "model_repository"
ENV_NAMES = sorted(
    {
        row["env"]
        for cls in (
            settings_module.OFASettings,
            settings_module.PreprocessSettings,
            settings_module.ServerSettings,
        )
        for row in settings_module.describe_settings(cls)
        if row["env"]
    }
)


def model_config(name: str) -> dict:
    """model_repository/<name>/config.pbtxt as the JSON dict Triton passes in ``args["model_config"]``."""
    message = text_format.Parse(
        (MODEL_REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    config["name"] = name
    return config


def init_args(name: str, config: dict | None = None) -> dict:
    """``initialize(args)`` of a Python backend model (the keys tritonserver 2.51 passes)."""
    return {
        "model_config": json.dumps(config or model_config(name)),
        "model_instance_kind": "CPU",
        "model_instance_name": f"{name}_0_0",
        "model_instance_device_id": "0",
        "model_repository": str(MODEL_REPOSITORY / name),
        "model_version": "1",
        "model_name": name,
    }


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No setting leaks in from the developer's shell."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pb(monkeypatch):
    """The stand-in ``triton_python_backend_utils``, importable by the adapters."""
    fake_pb_utils.Logger.records = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    return fake_pb_utils


@dataclass(frozen=True)
class StandInCaption:
    text: str
    score: float


class StandInCaptioner:
    """The engine's public API (docs/CONTRACTS.md) with predictable answers: the caption names the image id
    (pixel [0, 0, 0]) and the settings it was generated with; a negative id makes the batch fail."""

    instances: list[StandInCaptioner] = []
    patch_image_size = 480
    default_beam_size, default_max_length, default_num_captions = 5, 16, 1
    setting_limits = (16, 64)

    def __init__(self, path, device, dtype, allow_tf32=False, cuda_graphs=False):
        self.path, self.device, self.dtype = path, device, dtype
        self.allow_tf32, self.cuda_graphs = allow_tf32, cuda_graphs
        self.calls: list[tuple[tuple[int, ...], int | None, int | None]] = []
        self.n_best_calls: list[int | None] = []

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, *, allow_tf32=False, cuda_graphs=False):
        instance = cls(path, device, dtype, allow_tf32, cuda_graphs)
        cls.instances.append(instance)
        return instance

    def validate_settings(self, beam_size, max_length):
        beam = self.default_beam_size if beam_size is None else int(beam_size)
        length = self.default_max_length if max_length is None else int(max_length)
        if not 1 <= beam <= 16:
            raise ValueError(f"beam_size must be between 1 and 16, got {beam}")
        if not 1 <= length <= 64:
            raise ValueError(f"max_length must be between 1 and 64, got {length}")
        return beam, length

    def validate_num_captions(self, num_captions, beam_size):
        n = self.default_num_captions if num_captions is None else int(num_captions)
        if not 1 <= n <= beam_size:
            raise ValueError(f"num_captions must be between 1 and {beam_size}, got {n}")
        return n

    def warmup(self, batch_sizes=(1,), beam_size=None, max_length=None):
        """Recorded as ``("warmup", batch_sizes)`` at the default settings, else with the beam size and length."""
        settings = () if beam_size is None and max_length is None else (beam_size, max_length)
        self.calls.append(("warmup", tuple(batch_sizes), *settings))

    def normalize_pixels(self, pixels):
        """uint8 pixels -> float32 with the same values (so the image id survives), recorded."""
        self.calls.append(("normalize", tuple(pixels.shape), str(pixels.dtype)))
        return pixels.float()

    def generate(self, pixel_values, beam_size=None, max_length=None):
        self.calls.append((tuple(pixel_values.shape), beam_size, max_length))
        ids = [float(v) for v in pixel_values[:, 0, 0, 0]]
        if any(i < 0 for i in ids):
            raise RuntimeError("stand-in engine failure")
        return [StandInCaption(f"image {i:g} beam {beam_size} len {max_length}", -i / 10) for i in ids]

    def generate_n_best(self, pixel_values, beam_size=None, max_length=None, num_captions=None):
        """``generate`` (recorded as such) plus ``num_captions - 1`` worse alternatives per image; an image id
        of 1000 or more has only one hypothesis (the engine's short list after non-finite scores)."""
        self.n_best_calls.append(num_captions)
        best = self.generate(pixel_values, beam_size, max_length)
        return [
            [c] + [StandInCaption(f"{c.text} alt {k}", c.score - k) for k in range(1, num_captions)]
            if c.score > -100
            else [c]
            for c in best
        ]


@pytest.fixture
def engine(monkeypatch):
    """Installs the stand-in engine as ``ofa_captioning.captioner.Captioner``; yields its class."""
    StandInCaptioner.instances = []
    module = types.ModuleType("ofa_captioning.captioner")
    module.Captioner = StandInCaptioner
    module.Caption = StandInCaption
    monkeypatch.setitem(sys.modules, "ofa_captioning.captioner", module)
    return StandInCaptioner


@pytest.fixture
def model(pb, engine, tmp_path, monkeypatch):
    """The ``ofa`` adapter, initialized on the stand-in engine (its warm-up calls forgotten)."""
    monkeypatch.setenv("OFA_MODEL_DIR", str(tmp_path))
    m = load_adapter("ofa").TritonPythonModel()
    m.initialize(init_args("ofa"))
    m.captioner.calls.clear()  # forget the warm-up
    return m


def load_adapter(name: str):
    """A fresh import of model_repository/<name>/1/model.py (needs the ``pb`` fixture)."""
    path = MODEL_REPOSITORY / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"triton_adapter_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pixels(image_id: float, rows: int = 1, size: int = 480) -> np.ndarray:
    """``pixel_values`` of ``rows`` images whose id (pixel [0, 0, 0]) is ``image_id``, ``image_id + 1``, ..."""
    out = np.zeros((rows, 3, size, size), dtype=np.float32)
    out[:, 0, 0, 0] = image_id + np.arange(rows)
    return out


def int_input(*values: int) -> np.ndarray:
    """An INT32 [batch, 1] input."""
    return np.array([[v] for v in values], dtype=np.int32)
