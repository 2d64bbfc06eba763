"""CPU and GPU serving profiles, offline: the GPU configs generated from the committed repository (parsed as
Triton parses them), the adapters loading them under the stand-in pb_utils with the GPU mocked, the instance
device and the warm-up batch sizes."""

from __future__ import annotations

import pytest
import torch

from ofa_serving import profiles, repository
from ofa_serving.backend_utils import PixelStaging
from ofa_serving.model_config import instance_group, parse_config, read_config
from ofa_serving.profiles import (
    GpuProfile,
    apply_profile,
    gpu_profile,
    instance_device,
    resolve_profile,
    warmup_batch_sizes,
    warmup_plan,
)
from ofa_serving.repository import generate_repository, parse_models, prepare_server
from ofa_serving.settings import ServerSettings, SettingsError, load_settings

from .conftest import MODEL_REPOSITORY, init_args, load_adapter
from .test_repository import checkpoint, committed, parsed

VALUES = GpuProfile(preprocess_instances=3)


@pytest.fixture
def gpu_repo(tmp_path, monkeypatch):
    """The repository of one 480 px checkpoint (public name ``caption``) and one 384 px one, gpu profile."""
    en = checkpoint(tmp_path / "ckpt" / "en")
    checkpoint(tmp_path / "ckpt" / "small", patch_image_size=384)
    models = parse_models("caption=ckpt/en, caption_small=ckpt/small", base=tmp_path)
    monkeypatch.setattr(profiles, "gpu_profile", lambda cpu_count=None: VALUES)
    return generate_repository(models, tmp_path / "repo", profile="gpu"), en


def without(config, *paths):
    """``config`` without the fields at ``paths`` (``"a.b"``; list entries are walked into, absent ones skipped)."""
    for path in paths:
        *parents, last = path.split(".")
        nodes = [config]
        for key in parents:
            nodes = [n[key] for n in nodes if key in n]
            nodes = [x for n in nodes for x in (n if isinstance(n, list) else [n])]
        for node in nodes:
            node.pop(last, None)
    return config


GPU_FIELDS = (
    "max_batch_size",
    "dynamic_batching.max_queue_delay_microseconds",
    "dynamic_batching.default_queue_policy.max_queue_size",
    "instance_group.kind",
    "instance_group.count",
    "parameters.model_dir",
)


def test_gpu_profile_fills_the_documented_values(gpu_repo):
    out, _ = gpu_repo
    for name in ("ofa", "caption_small_ofa"):
        ofa = parsed(out / name / "config.pbtxt")
        assert ofa["max_batch_size"] == 64
        assert ofa["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
        assert ofa["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
        assert ofa["instance_group"] == [{"kind": "KIND_GPU", "count": 1}]
    for name in ("preprocess", "caption_small_preprocess"):
        pre = parsed(out / name / "config.pbtxt")
        assert pre["max_batch_size"] == 64
        assert pre["dynamic_batching"]["max_queue_delay_microseconds"] == "1000"
        assert pre["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256
        assert pre["instance_group"] == [{"kind": "KIND_CPU", "count": 3}]
    for name, pre, ofa in (
        ("caption", "preprocess", "ofa"),
        ("caption_small", *repository.step_names("caption_small")),
    ):
        ensemble = parsed(out / name / "config.pbtxt")
        steps = [parsed(out / s / "config.pbtxt")["max_batch_size"] for s in (pre, ofa)]
        assert ensemble["max_batch_size"] == 64 <= min(steps)


def test_gpu_profile_changes_nothing_else(gpu_repo):
    out, _ = gpu_repo
    for name, source in (("preprocess", "preprocess"), ("ofa", "ofa"), ("caption", "caption")):
        got, want = parsed(out / name / "config.pbtxt"), committed(source)
        assert got != want
        assert without(got, *GPU_FIELDS) == without(want, *GPU_FIELDS)


def test_the_header_names_the_profile_and_every_value_it_sets(gpu_repo):
    out, _ = gpu_repo
    header = [
        line for line in (out / "ofa" / "config.pbtxt").read_text().splitlines() if line.startswith("#")
    ]
    assert header[2] == "# Serving profile gpu (ofa_serving.profiles) sets, instead of the committed values:"
    fields = [line.removeprefix("#   ").split(" (")[0] for line in header[3:]]
    assert fields == [
        "max_batch_size: 64",
        "dynamic_batching.max_queue_delay_microseconds: 2000",
        "dynamic_batching.default_queue_policy.max_queue_size: 256",
        "instance_group: KIND_GPU x 1",
    ]
    assert all(line.endswith(")") for line in header[3:])  # each with its reason


def test_cpu_profile_changes_nothing():
    for name in ("preprocess", "ofa", "caption"):
        config = read_config(MODEL_REPOSITORY / name / "config.pbtxt")
        assert apply_profile(name, config, "cpu") == []
        assert config == read_config(MODEL_REPOSITORY / name / "config.pbtxt")


def test_the_profile_sets_fields_whatever_the_committed_files_layout():
    """Fields of the message, not lines of text: a config without the fields, or with them spelled another
    way, gets the same values."""
    bare = parse_config('backend: "python"\nmax_batch_size: 8\n')
    apply_profile("ofa", bare, "gpu", VALUES)
    committed_ofa = read_config(MODEL_REPOSITORY / "ofa" / "config.pbtxt")
    apply_profile("ofa", committed_ofa, "gpu", VALUES)
    for config in (bare, committed_ofa):
        assert config.max_batch_size == 64
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 256
        assert instance_group(config) == ("KIND_GPU", 1)
    two_groups = parse_config("instance_group [ { kind: KIND_CPU count: 2 }, { kind: KIND_MODEL } ]")
    apply_profile("preprocess", two_groups, "gpu", VALUES)
    assert instance_group(two_groups) == ("KIND_CPU", 3)


def test_unknown_profiles_and_models_are_refused():
    config = read_config(MODEL_REPOSITORY / "ofa" / "config.pbtxt")
    with pytest.raises(SettingsError, match="unknown serving profile 'tpu'"):
        apply_profile("ofa", config, "tpu")
    with pytest.raises(SettingsError, match="no gpu profile for model 'other'"):
        apply_profile("other", config, "gpu")
    assert config == read_config(MODEL_REPOSITORY / "ofa" / "config.pbtxt")


def test_preprocess_instances_follow_the_host_cores():
    assert [gpu_profile(c).preprocess_instances for c in (1, 2, 4, 8, 16, 64)] == [2, 2, 2, 4, 8, 8]


def test_resolve_profile():
    assert resolve_profile("auto", cuda_available=True) == "gpu"
    assert resolve_profile("", cuda_available=False) == "cpu"
    assert resolve_profile("CPU", cuda_available=True) == "cpu"
    assert resolve_profile("gpu", cuda_available=False) == "gpu"
    with pytest.raises(SettingsError, match="OFA_PROFILE: expected one of auto, cpu, gpu, got 'tpu'"):
        resolve_profile("tpu")
    with pytest.raises(SettingsError, match="OFA_PROFILE"):
        load_settings(ServerSettings, environ={"OFA_PROFILE": "tpu"})


def test_the_adapters_load_the_gpu_configs_on_their_device(gpu_repo, pb, engine, monkeypatch):
    out, en = gpu_repo
    monkeypatch.setenv("OFA_MODEL_DIR", "")  # what the launcher passes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    pinned = []  # the pinned staging buffer needs a real GPU: its size is recorded instead
    monkeypatch.setattr(PixelStaging, "allocate", lambda staging: pinned.append(staging.shape))

    def args(name, device_id):
        config = parsed(out / name / "config.pbtxt")
        config["name"] = name
        return {
            **init_args(name, config),
            "model_instance_kind": "GPU",
            "model_instance_device_id": device_id,
        }

    ofa = load_adapter("ofa").TritonPythonModel()
    ofa.initialize(args("ofa", "1"))
    (captioner,) = engine.instances
    assert captioner.path == en and captioner.device == "cuda:1" and str(captioner.dtype) == "torch.float16"
    assert chosen == ["cuda:1"]
    # ready = warm at the largest batch, first with the worst requests OFA_MAX_BEAM_TOKENS (320) allows
    assert captioner.calls == [("warmup", (64,), 16, 20), ("warmup", (64,), 5, 64), ("warmup", (1, 64))]
    assert captioner.allow_tf32 is False and captioner.cuda_graphs is False
    assert pinned == [(64, 3, 480, 480)]  # uint8 pixels of a full batch, allocated before serving
    pre = load_adapter("preprocess").TritonPythonModel()
    pre.initialize({**args("preprocess", "0"), "model_instance_kind": "CPU"})
    assert pre.size == 480 and pre.settings.model_dir == en


def test_a_gpu_instance_refuses_the_cpu_device_setting(gpu_repo, pb, engine, monkeypatch):
    out, _ = gpu_repo
    monkeypatch.setenv("OFA_DEVICE", "cpu")
    config = parsed(out / "ofa" / "config.pbtxt")
    args = {**init_args("ofa", config), "model_instance_kind": "GPU", "model_instance_device_id": "0"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SettingsError, match="'cpu' but the instance_group kind is KIND_GPU"):
        load_adapter("ofa").TritonPythonModel().initialize(args)


@pytest.mark.parametrize(
    ("kind", "device_id", "setting", "cuda", "expected"),
    [
        ("GPU", "0", "auto", True, "cuda:0"),
        ("GPU", "3", "cuda", True, "cuda:3"),
        ("MODEL", "0", "auto", True, "cuda"),
        ("MODEL", "0", "auto", False, "cpu"),
        ("CPU", "0", "cpu", True, "cpu"),
    ],
)
def test_instance_device(kind, device_id, setting, cuda, expected):
    args = {"model_instance_kind": kind, "model_instance_device_id": device_id}
    assert instance_device(args, setting, cuda) == expected


def test_a_gpu_instance_without_cuda_is_refused():
    with pytest.raises(SettingsError, match="KIND_GPU but torch sees no CUDA device"):
        instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "0"}, "auto", False)


@pytest.mark.parametrize(
    ("value", "device", "largest", "expected"),
    [
        ("", "cuda:0", 64, (1, 64)),
        ("", "cuda", 16, (1, 16)),
        ("", "cpu", 16, (1,)),
        ("", "cuda:0", 1, (1,)),
        ("4, 8 4", "cpu", 16, (4, 8)),
        ("16", "cuda:0", 16, (16,)),
    ],
)
def test_warmup_batch_sizes(value, device, largest, expected):
    assert warmup_batch_sizes(value, device, largest) == expected


@pytest.mark.parametrize(
    ("value", "message"), [("0", "0 is not between 1"), ("17", "17 is not"), ("a", "'a'")]
)
def test_bad_warmup_batch_sizes_name_the_setting(value, message):
    with pytest.raises(SettingsError, match="OFA_WARMUP_BATCH_SIZES") as info:
        warmup_batch_sizes(value, "cpu", 16)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("sizes", "device", "limits", "tokens", "expected"),
    [
        # The CPU keeps its fast start: the sizes at the checkpoint's defaults only.
        ((1,), "cpu", (16, 64), 320, [((1,), None, None)]),
        ((1, 16), "cpu", (16, 64), 1024, [((1, 16), None, None)]),
        # CUDA: the largest batch first at the widest beam and at the longest length the token bound allows.
        ((1, 64), "cuda:0", (16, 64), 320, [((64,), 16, 20), ((64,), 5, 64), ((1, 64), None, None)]),
        ((1, 64), "cuda", (16, 64), 1024, [((64,), 16, 64), ((1, 64), None, None)]),
        ((8, 4), "cuda:1", (16, 128), 100, [((8,), 16, 6), ((8,), 1, 100), ((8, 4), None, None)]),
        ((1,), "cuda", (16, 64), 4, [((1,), 4, 1), ((1,), 1, 4), ((1,), None, None)]),
    ],
)
def test_warmup_plan(sizes, device, limits, tokens, expected):
    assert warmup_plan(sizes, device, limits, tokens) == expected


def test_prepare_server_generates_the_gpu_repository_only_for_the_gpu_profile(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(repository.tempfile, "tempdir", str(tmp_path))
    server, generated = prepare_server(load_settings(ServerSettings, environ={"OFA_PROFILE": "cpu"}), ckpt)
    assert generated is None and server.model_repository == MODEL_REPOSITORY.resolve()
    assert server.environment()["OFA_MODEL_DIR"] == str(ckpt.resolve())
    server, generated = prepare_server(load_settings(ServerSettings, environ={"OFA_PROFILE": "gpu"}), ckpt)
    assert generated.parent == tmp_path and server.model_repository == generated.resolve()
    assert f"--model-repository={generated.resolve()}" in server.command()
    assert server.environment()["OFA_MODEL_DIR"] == ""  # the generated model_dir parameter applies
    ofa = parsed(generated / "ofa" / "config.pbtxt")
    assert ofa["instance_group"][0]["kind"] == "KIND_GPU"
    assert ofa["parameters"]["model_dir"]["string_value"] == str(ckpt.resolve())


def test_command_line_profile(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "ckpt")
    spec = f"caption={ckpt}"
    assert repository.main([str(tmp_path / "gpu"), "--models", spec, "--profile", "gpu"]) == 0
    assert parsed(tmp_path / "gpu" / "ofa" / "config.pbtxt")["instance_group"][0]["kind"] == "KIND_GPU"
    assert repository.main([str(tmp_path / "cpu"), "--models", spec], environ={"OFA_PROFILE": "cpu"}) == 0
    assert parsed(tmp_path / "cpu" / "ofa" / "config.pbtxt")["instance_group"][0]["kind"] == "KIND_MODEL"
