"""The one settings helper: precedence, empty strings, booleans, clear errors at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ofa_serving.settings import (
    OFASettings,
    PreprocessSettings,
    ServerSettings,
    SettingsError,
    describe_settings,
    load_settings,
    resolve_device,
    resolve_dtype,
)

REPO = Path(__file__).resolve().parents[2]


def params(**values: str) -> dict:
    return {"parameters": {k: {"string_value": v} for k, v in values.items()}}


def test_defaults_when_nothing_is_set():
    s = load_settings(OFASettings, params(model_dir="/ckpt"), environ={})
    assert s == OFASettings(
        model_dir=Path("/ckpt"), device="auto", dtype="auto", torch_threads=0, warmup=True
    )


def test_environment_wins_over_config_parameter_which_wins_over_default():
    config = params(model_dir="/from/config", device="cpu", torch_threads="3")
    s = load_settings(OFASettings, config, environ={"OFA_MODEL_DIR": "/from/env", "OFA_TORCH_THREADS": "2"})
    assert s.model_dir == Path("/from/env")
    assert s.torch_threads == 2
    assert s.device == "cpu"  # only in the config
    assert s.dtype == "auto"  # nowhere: default


def test_model_config_as_json_text_like_triton_passes_it():
    s = load_settings(
        PreprocessSettings, json.dumps(params(model_dir="/c", max_image_bytes="1000")), environ={}
    )
    assert s.max_image_bytes == 1000 and s.model_dir == Path("/c")


def test_empty_strings_mean_unset():
    config = params(model_dir="/c", device="", torch_threads="  ")
    s = load_settings(OFASettings, config, environ={"OFA_DEVICE": "", "OFA_DTYPE": ""})
    assert (s.device, s.dtype, s.torch_threads) == ("auto", "auto", 0)
    # an empty environment variable does not hide the config parameter
    s = load_settings(OFASettings, params(model_dir="/c", device="cpu"), environ={"OFA_DEVICE": ""})
    assert s.device == "cpu"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("1", True), ("YES", True), ("on", True), ("false", False), ("0", False), ("No", False)],
)
def test_booleans(raw, expected):
    assert load_settings(OFASettings, params(model_dir="/c"), environ={"OFA_WARMUP": raw}).warmup is expected


@pytest.mark.parametrize(
    ("environ", "config", "message"),
    [
        (
            {"OFA_TORCH_THREADS": "abc"},
            {},
            "environment variable OFA_TORCH_THREADS: expected an integer, got 'abc'",
        ),
        (
            {},
            {"torch_threads": "-1"},
            "config.pbtxt parameter 'torch_threads': expected at least 0, got '-1'",
        ),
        ({"OFA_WARMUP": "maybe"}, {}, "environment variable OFA_WARMUP: expected a boolean"),
        (
            {"OFA_DEVICE": "tpu"},
            {},
            "environment variable OFA_DEVICE: expected one of auto, cpu, cuda, got 'tpu'",
        ),
        ({}, {"dtype": "float64"}, "config.pbtxt parameter 'dtype': expected one of auto, float32"),
    ],
)
def test_bad_values_fail_at_load_naming_the_setting(environ, config, message):
    with pytest.raises(SettingsError) as info:
        load_settings(OFASettings, params(model_dir="/c", **config), environ=environ)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("env", "param"), [("OFA_ALLOW_TF32", "allow_tf32"), ("OFA_CUDA_GRAPHS", "cuda_graphs")]
)
def test_precision_switches_default_off_parse_as_booleans_and_name_a_bad_value(env, param):
    name = param
    assert getattr(load_settings(OFASettings, params(model_dir="/c"), environ={}), name) is False
    assert getattr(load_settings(OFASettings, params(model_dir="/c", **{param: "true"}), environ={}), name)
    on_by_config = params(model_dir="/c", **{param: "yes"})
    assert getattr(load_settings(OFASettings, on_by_config, environ={env: "off"}), name) is False
    with pytest.raises(SettingsError, match=f"^environment variable {env}: expected a boolean .*got 'fast'$"):
        load_settings(OFASettings, params(model_dir="/c"), environ={env: "fast"})
    with pytest.raises(SettingsError, match=f"^config.pbtxt parameter '{param}': expected a boolean"):
        load_settings(OFASettings, params(model_dir="/c", **{param: "2"}), environ={})


def test_required_setting_missing_names_both_sources():
    with pytest.raises(SettingsError, match="OFA_MODEL_DIR.*'model_dir'.*required"):
        load_settings(OFASettings, params(), environ={})


def test_choices_are_case_insensitive():
    assert load_settings(OFASettings, params(model_dir="/c"), environ={"OFA_DEVICE": "CPU"}).device == "cpu"


def test_server_settings_from_environment():
    s = load_settings(
        ServerSettings, environ={"HOST": "0.0.0.0", "HTTP_PORT": "18000", "OFA_RESPONSE_CACHE_BYTES": "0"}
    )
    assert (s.host, s.http_port, s.grpc_port, s.metrics_port) == ("0.0.0.0", 18000, 8001, 8002)
    assert s.response_cache_bytes == 0 and s.model_dir is None and s.download is True
    with pytest.raises(SettingsError, match="GRPC_PORT: expected at most 65535, got '70000'"):
        load_settings(ServerSettings, environ={"GRPC_PORT": "70000"})


def test_device_and_dtype_resolution():
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(SettingsError, match="cuda"):
        resolve_device("cuda", cuda_available=False)
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_dtype("float16", "cuda:0") == "float16"
    # The engine runs float16 on a CPU for checks; the server refuses to serve it there.
    with pytest.raises(
        SettingsError, match=r"^OFA_DTYPE / parameter 'dtype': float16 is only served on CUDA"
    ):
        resolve_dtype("fp16", "cpu")


def test_docs_list_every_setting():
    """docs/serving.md is where users look them up: every environment variable and parameter is in it."""
    docs = (REPO / "docs" / "serving.md").read_text()
    from ofa_serving.settings import SecuritySettings, SupervisorSettings

    for cls in (OFASettings, PreprocessSettings, ServerSettings, SecuritySettings, SupervisorSettings):
        for row in describe_settings(cls):
            if row["env"]:
                assert f"`{row['env']}`" in docs, row["env"]
            if row["param"]:
                assert f"`{row['param']}`" in docs, row["param"]


def test_secret_settings_stay_out_of_the_repr(tmp_path):
    from ofa_serving.settings import SecuritySettings

    s = load_settings(
        SecuritySettings,
        environ={"OFA_ADMIN_KEY": "admin-secret-0123456789", "OFA_API_KEY": "api-secret-0123456789",
                 "OFA_API_KEY_FILE": str(tmp_path / "k"), "OFA_ALLOW_UNPATCHED_TRITON": "yes"},
    )  # fmt: skip
    assert s.admin_key == "admin-secret-0123456789" and s.api_key == "api-secret-0123456789"
    assert s.api_key_file == tmp_path / "k" and s.allow_unpatched_triton is True
    assert "-secret-0123456789" not in repr(s) and str(tmp_path / "k") in repr(s)
    assert load_settings(SecuritySettings, environ={}).allow_unpatched_triton is False
    with pytest.raises(SettingsError, match="OFA_ALLOW_UNPATCHED_TRITON: expected a boolean"):
        load_settings(SecuritySettings, environ={"OFA_ALLOW_UNPATCHED_TRITON": "please"})
