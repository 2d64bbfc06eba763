"""The generated model repository of OFA_MODELS (several checkpoints in one server), offline: parsing the
variable, the generated config.pbtxt files (parsed as Triton parses them), the adapters loading them, the launcher
wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from ofa_serving import repository, serve
from ofa_serving.repository import (
    MARKER,
    ServedModel,
    generate_repository,
    parse_models,
    prepare_models,
    served_models,
)
from ofa_serving.settings import ServerSettings, SettingsError, load_settings

from .conftest import MODEL_REPOSITORY, init_args, load_adapter


def checkpoint(path, patch_image_size=None):
    """A directory with what the generator and the preprocess adapter read (no weights needed here)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "pytorch_model.bin").write_bytes(b"")
    if patch_image_size is not None:
        (path / "configuration.json").write_text(
            json.dumps({"model": {"patch_image_size": patch_image_size}})
        )
    return path


def parsed(path):
    """A config.pbtxt as Triton's protobuf parser reads it, as a dict."""
    message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def committed(name):
    return parsed(MODEL_REPOSITORY / name / "config.pbtxt")


@pytest.fixture
def two(tmp_path):
    """Two checkpoints (480 and 384 px) and the repository generated for them."""
    en = checkpoint(tmp_path / "ckpt" / "en")
    small = checkpoint(tmp_path / "ckpt" / "small", patch_image_size=384)
    models = parse_models("caption=ckpt/en, caption_small=ckpt/small", base=tmp_path)
    out = generate_repository(models, tmp_path / "repo")
    return models, out, en, small


def test_parse_names_checkpoints_and_step_models(tmp_path):
    models = parse_models("  caption=a \n zh=/abs/b,ab_test=c/d ", base=tmp_path)
    assert models == [
        ServedModel("caption", tmp_path / "a", "preprocess", "ofa"),
        ServedModel("zh", Path("/abs/b"), "zh_preprocess", "zh_ofa"),
        ServedModel("ab_test", tmp_path / "c" / "d", "ab_test_preprocess", "ab_test_ofa"),
    ]
    assert models[2].models == ("ab_test", "ab_test_preprocess", "ab_test_ofa")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no models"),
        ("caption", "'caption' is not name=checkpoint_dir"),
        ("caption=", "'caption=' is not name=checkpoint_dir"),
        ("Caption=x", "model name 'Caption' must be lowercase"),
        ("9x=x", "model name '9x' must be lowercase"),
        ("a-b=x", "model name 'a-b' must be lowercase"),
        ("a=x a=y", "'a=y' needs the Triton model 'a', already used by 'a=x'"),
        ("a=x a_ofa=y", "'a_ofa=y' needs the Triton model 'a_ofa', already used by 'a=x'"),
        ("ofa=x caption=y", "'caption=y' needs the Triton model 'ofa', already used by 'ofa=x'"),
    ],
)
def test_bad_specs_are_refused_naming_the_entry(tmp_path, spec, message):
    with pytest.raises(SettingsError, match="OFA_MODELS") as info:
        parse_models(spec, base=tmp_path)
    assert message in str(info.value)


def test_served_models_per_public_name():
    assert served_models(None) == served_models("") == {"caption": ("caption", "preprocess", "ofa")}
    assert served_models("caption=/a caption_b=/b") == {
        "caption": ("caption", "preprocess", "ofa"),
        "caption_b": ("caption_b", "caption_b_preprocess", "caption_b_ofa"),
    }


def test_generated_repository_holds_one_ensemble_and_two_steps_per_name(two):
    models, out, _, _ = two
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == sorted(
        ["caption", "preprocess", "ofa", "caption_small", "caption_small_preprocess", "caption_small_ofa"]
    )
    for model in models:
        for step, source in ((model.preprocess, "preprocess"), (model.ofa, "ofa")):
            code = (out / step / "1" / "model.py").read_bytes()
            assert code == (MODEL_REPOSITORY / source / "1" / "model.py").read_bytes()
        assert (out / model.name / "1").is_dir()
    manifest = json.loads((out / MARKER).read_text())
    assert manifest["caption_small"]["models"] == [
        "caption_small",
        "caption_small_preprocess",
        "caption_small_ofa",
    ]


def test_generated_steps_differ_from_the_committed_ones_only_in_dims_and_model_dir(two):
    _, out, en, small = two
    for step, source, ckpt, size in (
        ("preprocess", "preprocess", en, 480),
        ("ofa", "ofa", en, 480),
        ("caption_small_preprocess", "preprocess", small, 384),
        ("caption_small_ofa", "ofa", small, 384),
    ):
        got, want = parsed(out / step / "config.pbtxt"), committed(source)
        assert got["parameters"]["model_dir"] == {"string_value": str(ckpt)}
        pixels = [t for t in got.get("input", []) + got["output"] if t["name"] == "pixel_values"]
        assert [p["dims"] for p in pixels] == [[str(3), str(size), str(size)]]
        for config in (got, want):  # everything else as committed
            config["parameters"].pop("model_dir")
            for t in config.get("input", []) + config["output"]:
                if t["name"] == "pixel_values":
                    t.pop("dims")
        assert got == want
        assert (out / step / "config.pbtxt").read_text().startswith("# Generated by ofa_serving.repository")


def test_generated_ensembles_are_wired_to_their_own_steps(two):
    _, out, _, _ = two
    for name, pre, ofa in (
        ("caption", "preprocess", "ofa"),
        ("caption_small", "caption_small_preprocess", "caption_small_ofa"),
    ):
        got, want = parsed(out / name / "config.pbtxt"), committed("caption")
        assert [s["model_name"] for s in got["ensemble_scheduling"]["step"]] == [pre, ofa]
        for step in got["ensemble_scheduling"]["step"] + want["ensemble_scheduling"]["step"]:
            step.pop("model_name")
        assert got == want  # inputs, outputs, maps, response cache as committed


def test_the_generated_configs_do_not_depend_on_the_committed_files_layout(two, tmp_path):
    """Fields of Triton's message, not lines of text: the same repository from sources written on one line each,
    without comments, in another field order."""
    models, out, _, _ = two
    source = tmp_path / "one-line"
    for name in ("caption", "preprocess", "ofa"):
        message = text_format.Parse(
            (MODEL_REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        lines = []
        for field, _ in reversed(message.ListFields()):
            single = model_config_pb2.ModelConfig()
            single.CopyFrom(message)
            for other, _ in message.ListFields():
                if other.name != field.name:
                    single.ClearField(other.name)
            lines.append(text_format.MessageToString(single, as_one_line=True))
        (source / name / "1").mkdir(parents=True)
        (source / name / "config.pbtxt").write_text("\n".join(lines) + "\n")
        if name != "caption":
            (source / name / "1" / "model.py").write_bytes(
                (MODEL_REPOSITORY / name / "1" / "model.py").read_bytes()
            )
    again = generate_repository(models, tmp_path / "again", source)
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == sorted(p.name for p in again.iterdir() if p.is_dir())
    for name in names:
        assert parsed(again / name / "config.pbtxt") == parsed(out / name / "config.pbtxt")


def test_the_adapters_load_the_generated_configs_with_their_checkpoint(two, pb, engine, monkeypatch):
    _, out, _, small = two
    monkeypatch.setenv("OFA_MODEL_DIR", "")  # what the launcher passes: empty = unset, the parameter applies
    monkeypatch.setattr(engine, "patch_image_size", 384)

    def args(name):
        config = parsed(out / name / "config.pbtxt")
        config["name"] = name
        return init_args(name, config)

    ofa = load_adapter("ofa").TritonPythonModel()
    ofa.initialize(args("caption_small_ofa"))
    assert ofa.captioner.path == small and ofa.model_name == "caption_small_ofa"
    pre = load_adapter("preprocess").TritonPythonModel()
    pre.initialize(args("caption_small_preprocess"))
    assert pre.size == 384 and pre.settings.model_dir == small
    with pytest.raises(SettingsError, match=r"'pixel_values' has dims \[3, 480, 480\].*patch_image_size 384"):
        load_adapter("ofa").TritonPythonModel().initialize(args("ofa"))  # the 480 px one


def test_regenerating_replaces_only_a_generated_directory(two, tmp_path):
    models, out, _, _ = two
    generate_repository(models[:1], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["caption", "preprocess", "ofa", MARKER])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(SettingsError, match="not empty and was not generated here"):
        generate_repository(models, tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"


def test_a_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="'caption_x': .*nothing is not a checkpoint directory"):
        generate_repository(parse_models("caption_x=nothing", base=tmp_path), tmp_path / "repo")


def test_prepare_models_starts_the_server_on_the_generated_repository(two, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(ServerSettings, environ={"OFA_MODELS": "caption=ckpt/en zh=ckpt/small"})
    server, models, out = prepare_models(settings, tmp_path / "generated")
    assert [m.name for m in models] == ["caption", "zh"] and out == tmp_path / "generated"
    assert f"--model-repository={out.resolve()}" in server.command()
    assert server.environment()["OFA_MODEL_DIR"] == ""  # the models' model_dir parameters apply
    assert parsed(out / "zh_ofa" / "config.pbtxt")["parameters"]["model_dir"]["string_value"] == str(
        (tmp_path / "ckpt" / "small").resolve()
    )


def test_models_and_model_dir_together_are_refused(two, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    environ = {"OFA_MODELS": "caption=ckpt/en", "OFA_MODEL_DIR": str(tmp_path / "ckpt" / "en")}
    with pytest.raises(SettingsError, match="OFA_MODELS and OFA_MODEL_DIR are both set"):
        prepare_models(load_settings(ServerSettings, environ=environ))
    monkeypatch.setenv("OFA_MODELS", "caption=ckpt/missing")
    monkeypatch.setattr(repository.tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    assert serve.main() == 2
    assert "ckpt/missing is not a checkpoint directory" in capsys.readouterr().err
    assert list((tmp_path / "temp").iterdir()) == []  # the temporary repository is removed again


def test_usage_text_names_the_models(two):
    server = serve.TritonServer(http_port=18000, grpc_port=18001, metrics_port=18002)
    text = serve.usage_text(server, "configured", ("caption_zh", "caption"))
    assert "Models: caption_zh, caption" in text and "--model caption_zh" in text
    assert "http://127.0.0.1:18000/v2/models/caption_zh/infer" in text


def test_command_line(two, tmp_path, capsys):
    spec = f"caption={tmp_path / 'ckpt' / 'en'} b={tmp_path / 'ckpt' / 'small'}"
    assert repository.main([str(tmp_path / "cli"), "--models", spec]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"caption: caption, preprocess, ofa <- {tmp_path / 'ckpt' / 'en'}",
        f"b: b, b_preprocess, b_ofa <- {tmp_path / 'ckpt' / 'small'}",
    ]
    assert parsed(tmp_path / "cli" / "b_preprocess" / "config.pbtxt")["output"][0]["dims"] == [
        "3",
        "384",
        "384",
    ]
    assert repository.main([str(tmp_path / "cli2")], environ={"OFA_MODELS": "X=y"}) == 2
    assert "model name 'X' must be lowercase" in capsys.readouterr().err


def test_the_kubernetes_patch_in_the_docs_is_valid_and_keeps_the_images_flags():
    """docs/deployment.md's patch for several checkpoints, applied to docker/k8s/deployment.yaml: schema-valid
    (strict) and running tritonserver with the image CMD's flags on the generated repository."""
    import re

    import kubernetes_validate
    import yaml

    from tests.deploy.test_k8s import KUBERNETES_VERSIONS

    repo = MODEL_REPOSITORY.parent
    docs = (repo / "docs" / "deployment.md").read_text()
    patch = yaml.safe_load(re.search(r"kustomize overlay:\n\n```yaml\n(.*?)```", docs, re.S).group(1))
    manifests = yaml.safe_load_all((repo / "docker" / "k8s" / "deployment.yaml").read_text())
    deployment = next(d for d in manifests if d and d["kind"] == "Deployment")
    pod, extra = deployment["spec"]["template"]["spec"], patch["spec"]["template"]["spec"]
    container, wanted = pod["containers"][0], extra["containers"][0]
    assert container["name"] == wanted["name"]
    container["args"] = wanted["args"]
    env = {e["name"]: e for e in container["env"] + wanted["env"]}  # strategic merge: by name
    container["env"] = list(env.values())
    container["volumeMounts"] += wanted["volumeMounts"]
    pod["volumes"] += extra["volumes"]
    for version in (KUBERNETES_VERSIONS[0], KUBERNETES_VERSIONS[-1]):
        kubernetes_validate.validate(deployment, version, strict=True)
    assert env["OFA_MODEL_DIR"]["value"] == "" and env["OFA_MODELS"]["value"].startswith("caption=")
    script = container["args"][-1]
    generate, run = script.split(" && exec ")
    assert generate.split()[:3] == ["python3", "-m", "ofa_serving.repository"]
    out = generate.split()[3]
    cmd = re.search(
        r'CMD \["python3", "-m", "ofa_serving.supervisor",(.*?)\]',
        (repo / "docker" / "Dockerfile").read_text(),
        re.S,
    ).group(1)
    image_flags = set(re.findall(r'"(--[^"]+)"', cmd))
    supervised = ["python3", "-m", "ofa_serving.supervisor", "tritonserver"]
    run_flags = set(run.split()[len(supervised) :])
    assert run.split()[: len(supervised)] == supervised and f"--model-repository={out}" in run_flags
    assert run_flags - {f"--model-repository={out}"} == {
        f for f in image_flags if not f.startswith("--model-repository=")
    }
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert out.startswith("/tmp/") and "/tmp" in mounts  # a writable emptyDir (read-only root filesystem)
    for entry in env["OFA_MODELS"]["value"].split():
        assert entry.split("=", 1)[1] in mounts
