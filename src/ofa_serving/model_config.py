"""Triton's ``config.pbtxt`` read and written through Triton's own schema.

A config.pbtxt is the protobuf text form of ``inference.ModelConfig``; :func:`read_config` parses it into the
``ModelConfig`` message that tritonclient ships (``tritonclient.grpc.model_config_pb2``) with
``google.protobuf.text_format``, the same parser tritonserver uses, and :func:`write_config` writes a message back.
The serving profiles (:mod:`ofa_serving.profiles`) and the generated repositories (:mod:`ofa_serving.repository`)
change fields of the message, never the text, so a comment or an indentation in the committed file cannot move
what they edit. A written file holds the header given and the fields: the committed comments are not carried
over (they explain the committed file, which stays the one to read and edit).

The helpers below cover the fields the generators change; any other field is a plain attribute of the message
(``config.max_batch_size = 64``). Importing this module imports tritonclient's gRPC package (about 0.2 s);
the model adapters, which run in the Python backend's stub, never import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from .settings import SettingsError

__all__ = [
    "ModelConfig",
    "data_type_name",
    "format_config",
    "get_parameter",
    "instance_group",
    "parse_config",
    "read_config",
    "rename_steps",
    "set_dynamic_batching",
    "set_instance_group",
    "set_parameter",
    "set_tensor_dims",
    "tensor_dims",
    "tensors_named",
    "write_config",
]

#: Triton's model configuration message (``inference.ModelConfig``, model_config.proto).
ModelConfig = model_config_pb2.ModelConfig


def parse_config(text: str, where: str = "config.pbtxt") -> ModelConfig:
    """``text`` (protobuf text format) as a :data:`ModelConfig`; a syntax error or an unknown field raises
    :class:`SettingsError` naming ``where``, as tritonserver refuses such a file."""
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as exc:
        raise SettingsError(f"{where}: not a valid Triton model configuration: {exc}") from None


def read_config(path: str | Path) -> ModelConfig:
    """The config.pbtxt at ``path`` as a :data:`ModelConfig` (comments dropped)."""
    path = Path(path)
    return parse_config(path.read_text(encoding="utf-8"), str(path))


def format_config(config: ModelConfig, header: Iterable[str] = ()) -> str:
    """``config`` in protobuf text format, each line of ``header`` above it as a ``#`` comment (a line break
    inside one starts another comment line)."""
    lines = [part for line in header for part in (line.splitlines() or [""])]
    comments = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    return comments + text_format.MessageToString(config, as_utf8=True)


def write_config(config: ModelConfig, path: str | Path, header: Iterable[str] = ()) -> None:
    """Write ``config`` to ``path`` (a config.pbtxt) with ``header`` as comment lines on top."""
    Path(path).write_text(format_config(config, header), encoding="utf-8")


def data_type_name(data_type: int) -> str:
    """Triton's name of a ``DataType`` value, e.g. ``"TYPE_UINT8"``."""
    return model_config_pb2.DataType.Name(data_type)


# -- parameters ----------------------------------------------------------------------------------------------


def get_parameter(config: ModelConfig, key: str) -> str | None:
    """The ``string_value`` of parameter ``key`` (``None`` when the config has no such parameter)."""
    return config.parameters[key].string_value if key in config.parameters else None


def set_parameter(config: ModelConfig, key: str, value: str) -> None:
    """Set parameter ``key`` to the string ``value`` (added when absent)."""
    config.parameters[key].string_value = value


# -- scheduling and placement --------------------------------------------------------------------------------


def instance_group(config: ModelConfig) -> tuple[str, int]:
    """``(kind, count)`` of the config's one instance group, e.g. ``("KIND_CPU", 1)``; a config with no or
    several groups raises :class:`SettingsError`."""
    if len(config.instance_group) != 1:
        raise SettingsError(f"expected one instance_group, the config has {len(config.instance_group)}")
    group = config.instance_group[0]
    return model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind), group.count


def set_instance_group(config: ModelConfig, kind: str, count: int) -> None:
    """Make the config's instances one group of ``count`` instances of ``kind`` (``"KIND_GPU"``, ...)."""
    value = model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
    del config.instance_group[:]
    config.instance_group.add(kind=value, count=count)


def set_dynamic_batching(
    config: ModelConfig, *, max_queue_delay_us: int | None = None, max_queue_size: int | None = None
) -> None:
    """Set the dynamic batcher's queue delay and its default queue policy's size (``None``: unchanged); the
    rest of ``dynamic_batching`` stays as it is."""
    batching = config.dynamic_batching
    if max_queue_delay_us is not None:
        batching.max_queue_delay_microseconds = max_queue_delay_us
    if max_queue_size is not None:
        batching.default_queue_policy.max_queue_size = max_queue_size


# -- tensors and ensemble steps ------------------------------------------------------------------------------


def tensors_named(config: ModelConfig, name: str) -> list:
    """The inputs and outputs of ``config`` called ``name`` (``ModelInput`` / ``ModelOutput`` messages)."""
    return [t for t in (*config.input, *config.output) if t.name == name]


def tensor_dims(config: ModelConfig, name: str) -> list[int]:
    """The dims of tensor ``name`` (without the batch dimension); :class:`SettingsError` when absent."""
    found = tensors_named(config, name)
    if not found:
        raise SettingsError(f"the model configuration has no tensor {name!r}")
    return list(found[0].dims)


def set_tensor_dims(config: ModelConfig, name: str, dims: Sequence[int]) -> None:
    """Set the dims of every input and output called ``name``; :class:`SettingsError` when there is none."""
    found = tensors_named(config, name)
    if not found:
        raise SettingsError(f"the model configuration has no tensor {name!r}")
    for tensor in found:
        tensor.dims[:] = list(dims)


def rename_steps(config: ModelConfig, names: Mapping[str, str]) -> None:
    """Point the ensemble's steps at other models: each step whose ``model_name`` is a key of ``names`` runs
    ``names[key]`` instead. Every key must name exactly one step (:class:`SettingsError` otherwise)."""
    steps = config.ensemble_scheduling.step
    matching = {old: [step for step in steps if step.model_name == old] for old in names}
    for old, found in matching.items():
        if len(found) != 1:
            raise SettingsError(f"the ensemble has {len(found)} steps running {old!r} where one is expected")
    for old, (step,) in matching.items():  # all found first: a new name may be another key
        step.model_name = names[old]
