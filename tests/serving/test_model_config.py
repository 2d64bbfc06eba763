"""ofa_serving.model_config: config.pbtxt read and written through Triton's ModelConfig message, and the field
helpers the profiles and the generated repositories use."""

from __future__ import annotations

import pytest

from ofa_serving.model_config import (
    ModelConfig,
    format_config,
    get_parameter,
    instance_group,
    parse_config,
    read_config,
    rename_steps,
    set_dynamic_batching,
    set_instance_group,
    set_parameter,
    set_tensor_dims,
    tensor_dims,
    write_config,
)
from ofa_serving.settings import SettingsError

from .conftest import MODEL_REPOSITORY


@pytest.mark.parametrize("name", ["caption", "preprocess", "ofa"])
def test_a_written_config_reads_back_as_the_committed_one(name, tmp_path):
    config = read_config(MODEL_REPOSITORY / name / "config.pbtxt")
    assert isinstance(config, ModelConfig) and config.ListFields()
    write_config(config, tmp_path / "config.pbtxt", ["first line", "second"])
    text = (tmp_path / "config.pbtxt").read_text()
    assert text.startswith("# first line\n# second\n")
    assert read_config(tmp_path / "config.pbtxt") == config


def test_a_line_break_in_the_header_stays_a_comment():
    text = format_config(parse_config("max_batch_size: 4"), ["checkpoint /a\nb", ""])
    assert text == "# checkpoint /a\n# b\n#\nmax_batch_size: 4\n"
    assert parse_config(text).max_batch_size == 4


def test_non_ascii_strings_survive(tmp_path):
    config = parse_config("")
    set_parameter(config, "model_dir", '/models/ofa "zh" 中文')
    write_config(config, tmp_path / "config.pbtxt")
    assert "中文" in (tmp_path / "config.pbtxt").read_text()
    assert get_parameter(read_config(tmp_path / "config.pbtxt"), "model_dir") == '/models/ofa "zh" 中文'


def test_a_file_tritonserver_would_refuse_is_refused_naming_it(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text("max_batch_size: 4\nmax_batch_sise: 8\n")
    with pytest.raises(
        SettingsError, match=f"{path}: not a valid Triton model configuration: .*max_batch_sise"
    ):
        read_config(path)


def test_parameters():
    config = read_config(MODEL_REPOSITORY / "ofa" / "config.pbtxt")
    assert get_parameter(config, "model_dir") == ""
    assert get_parameter(config, "no_such") is None
    set_parameter(config, "model_dir", "/ckpt")
    set_parameter(config, "new_one", "x")
    assert get_parameter(config, "model_dir") == "/ckpt" and get_parameter(config, "new_one") == "x"
    assert get_parameter(config, "device") == ""  # the others as they were


def test_instance_group_and_dynamic_batching():
    config = read_config(MODEL_REPOSITORY / "ofa" / "config.pbtxt")
    assert instance_group(config) == ("KIND_MODEL", 1)
    set_instance_group(config, "KIND_GPU", 2)
    assert instance_group(config) == ("KIND_GPU", 2)
    timeout = config.dynamic_batching.default_queue_policy.default_timeout_microseconds
    set_dynamic_batching(config, max_queue_delay_us=2000)
    set_dynamic_batching(config, max_queue_size=256)
    batching = config.dynamic_batching
    assert batching.max_queue_delay_microseconds == 2000
    assert batching.default_queue_policy.max_queue_size == 256
    assert batching.default_queue_policy.default_timeout_microseconds == timeout == 60_000_000
    with pytest.raises(ValueError, match="KIND_TPU"):
        set_instance_group(config, "KIND_TPU", 1)
    with pytest.raises(SettingsError, match="expected one instance_group, the config has 0"):
        instance_group(parse_config(""))


def test_tensor_dims():
    pre = read_config(MODEL_REPOSITORY / "preprocess" / "config.pbtxt")
    assert tensor_dims(pre, "pixel_values") == [3, 480, 480]
    set_tensor_dims(pre, "pixel_values", (3, 384, 384))
    assert tensor_dims(pre, "pixel_values") == [3, 384, 384]
    assert tensor_dims(pre, "image") == [1]
    with pytest.raises(SettingsError, match="no tensor 'pixels'"):
        set_tensor_dims(pre, "pixels", (3, 384, 384))
    with pytest.raises(SettingsError, match="no tensor 'pixels'"):
        tensor_dims(pre, "pixels")


def test_rename_steps():
    config = read_config(MODEL_REPOSITORY / "caption" / "config.pbtxt")
    rename_steps(config, {"preprocess": "ofa", "ofa": "b_ofa"})  # all at once: a new name may be an old one
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["ofa", "b_ofa"]
    with pytest.raises(
        SettingsError, match="the ensemble has 0 steps running 'preprocess' where one is expected"
    ):
        rename_steps(config, {"preprocess": "x"})
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["ofa", "b_ofa"]
