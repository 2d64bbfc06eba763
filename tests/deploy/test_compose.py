"""docker/compose.yaml and what it refers to: images, ports, volumes, hardening, secrets, Prometheus scraping,
Grafana provisioning, Locust. Parsed offline (no Docker engine); ``${VAR:-default}`` resolved with an environment
that holds only the required secrets (:data:`REQUIRED_ENV`). Where a docker CLI with the compose plugin exists,
``docker compose config`` checks the file too."""

from __future__ import annotations

import ast
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from .deploylib import (
    DOCKER,
    REPO,
    flag_map,
    interpolate,
    load_compose,
    parse_dockerfile,
    parse_duration,
    parse_ports,
    pyproject,
    run,
)

SERVER = parse_dockerfile(DOCKER / "Dockerfile")
SERVER_FLAGS = flag_map(SERVER.in_stage(SERVER.final_stage, "CMD")[0].exec_form())
LOCUST = parse_dockerfile(DOCKER / "locust" / "Dockerfile")


#: The variables compose refuses to start without (placeholders: the tests only need them set).
REQUIRED_ENV = {
    "OFA_ADMIN_KEY": "test-admin-key-0123456789",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}
#: Services that run from this file by default or with the load profile.
SERVICES = ("triton", "prometheus", "grafana", "locust-master", "locust-worker")


@pytest.fixture(scope="module")
def compose():
    return load_compose(REQUIRED_ENV)


@pytest.fixture(scope="module")
def raw():
    """The file as written (no interpolation)."""
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def host_path(source: str) -> Path:
    """A bind-mount source: relative to the compose file's directory."""
    return (DOCKER / source).resolve()


def mounts(service: dict) -> list[dict]:
    """Volumes of a service in long form (type, source, target, read_only)."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append(entry)
            continue
        parts = entry.split(":")
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": parts[2:] == ["ro"]})
    return out


def test_services(services):
    assert {"triton", "prometheus", "grafana", "locust-master", "locust-worker"} <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), (
            f"{name}: pin the image tag ({image!r})"
        )


def test_images_built_here_carry_the_project_version(services):
    version = pyproject()["project"]["version"]
    for name in ("triton", "locust-master", "locust-worker"):
        assert services[name]["image"].endswith(f":{version}"), name


def test_builds_point_at_existing_dockerfiles(services):
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = host_path(build["context"])
        assert context == REPO, f"{name}: build from the repository root (the Dockerfiles copy src/, ...)"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        declared = set(parse_dockerfile(context / build["dockerfile"]).args())
        unknown = set(build.get("args", {})) - declared
        assert not unknown, f"{name}: build args {unknown} are not ARGs of {build['dockerfile']}"


def test_triton_ports_match_the_image_and_default_to_loopback(services):
    ports = parse_ports(services["triton"]["ports"])
    image_ports = {int(SERVER_FLAGS[f"--{k}-port"]) for k in ("http", "grpc", "metrics")}
    assert {p.container_port for p in ports} == image_ports
    for name, service in services.items():
        for p in parse_ports(service.get("ports", [])):
            assert p.host_ip == "127.0.0.1", f"{name}: publish on loopback unless OFA_PUBLISH_ADDRESS says so"
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    environ = {**REQUIRED_ENV, "OFA_PUBLISH_ADDRESS": "0.0.0.0"}
    opened = parse_ports(interpolate(raw, environ)["services"]["triton"]["ports"])
    assert {p.host_ip for p in opened} == {"0.0.0.0"}


# -- hardening and secrets -----------------------------------------------------------------------------------


def memory_bytes(text: str) -> int:
    """A compose memory size ('16g', '512m', '2gb') in bytes."""
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert m, f"not a memory size: {text!r}"
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ")


def test_services_are_locked_down(services):
    # Read-only root filesystem, no capabilities, no privilege escalation, a memory limit: for every service.
    for name in SERVICES:
        service = services[name]
        assert service.get("read_only") is True, f"{name}: read_only: true"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop: [ALL]"
        assert "no-new-privileges:true" in service.get("security_opt", []), f"{name}: no-new-privileges"
        limit = service.get("mem_limit") or service.get("deploy", {}).get("resources", {}).get("limits", {})
        limit = limit.get("memory") if isinstance(limit, dict) else limit
        assert limit and memory_bytes(limit) >= 256 * 2**20, f"{name}: a memory limit"
        assert "privileged" not in service and "cap_add" not in service, name
        assert service.get("network_mode") != "host" and service.get("pid") != "host", name


def test_writable_places_under_a_read_only_root(services):
    # Whatever a service writes is a tmpfs or a volume: Triton's HOME=/tmp (torch, CUDA caches, the supervisor's
    # state) and /dev/shm for the Python backend (shm_size), the data directories of Prometheus and Grafana.
    def tmpfs(service: dict) -> set[str]:
        entries = service.get("tmpfs", [])
        return {e.split(":")[0] for e in ([entries] if isinstance(entries, str) else entries)}

    triton = services["triton"]
    assert SERVER.env(SERVER.final_stage)["HOME"] == "/tmp" and "/tmp" in tmpfs(triton)
    assert memory_bytes(triton["shm_size"]) >= 2**30, "the Python backend's tensors go through /dev/shm"
    volumes = {
        name: {m["target"] for m in mounts(s) if not m.get("read_only")} for name, s in services.items()
    }
    assert "/prometheus" in volumes["prometheus"]
    assert "/var/lib/grafana" in volumes["grafana"]
    for name in SERVICES:
        assert "/tmp" in tmpfs(services[name]), f"{name}: a tmpfs on /tmp"


def test_triton_memory_limit_matches_kubernetes(services):
    deployment = [d for d in yaml.safe_load_all((DOCKER / "k8s" / "deployment.yaml").read_text()) if d][0]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    k8s = container["resources"]["limits"]["memory"]
    assert memory_bytes(services["triton"]["mem_limit"]) == memory_bytes(k8s.replace("Gi", "g"))


def required_variable(value: str) -> str | None:
    """The variable a value requires (``${VAR:?message}``), else None."""
    m = re.fullmatch(r"\$\{(\w+):\?[^}]+\}", str(value))
    return m.group(1) if m else None


def test_grafana_needs_a_password_and_a_login(raw, services):
    env = raw["services"]["grafana"]["environment"]
    assert required_variable(env["GF_SECURITY_ADMIN_PASSWORD"]) == "GRAFANA_ADMIN_PASSWORD", (
        "no default password: compose must refuse to start without GRAFANA_ADMIN_PASSWORD"
    )
    resolved = services["grafana"]["environment"]
    assert resolved["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in resolved
    assert resolved["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_required_secrets_stop_compose_when_missing(raw):
    # Compose (like this interpolation) refuses the file when a required secret is missing, naming it.
    for missing in REQUIRED_ENV:
        environ = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            interpolate(raw, environ)


SECRET_NAME = re.compile(r"KEY|PASSWORD|PASSWD|TOKEN|SECRET", re.I)


def test_no_literal_secret(raw):
    # Every secret-looking variable of every service comes from the environment: ${VAR:?...} or ${VAR:-} (empty:
    # unset), never a value written in the file.
    seen = set()
    for name, service in raw["services"].items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form of environment"
        for key, value in environment.items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE") and key != "GF_SECURITY_ADMIN_USER":
                value = str(value)
                assert re.fullmatch(r"\$\{\w+(:\?[^}]+|:-)\}", value), f"{name}: {key} must not be a literal"
                seen.add(key)
    assert {"OFA_ADMIN_KEY", "OFA_API_KEY", "GF_SECURITY_ADMIN_PASSWORD", "CAPTION_API_KEY"} <= seen


def test_keys_reach_the_server_and_the_load_generators(raw, services):
    triton = raw["services"]["triton"]["environment"]
    assert required_variable(triton["OFA_ADMIN_KEY"]) == "OFA_ADMIN_KEY", (
        "the health check needs the admin key"
    )
    assert triton["OFA_API_KEY"] == "${OFA_API_KEY:-}", "optional: empty leaves inference open"
    for name in ("locust-master", "locust-worker"):
        assert raw["services"][name]["environment"]["CAPTION_API_KEY"] == "${OFA_API_KEY:-}", name
    # With a key set, both sides carry the same one.
    keyed = load_compose({**REQUIRED_ENV, "OFA_API_KEY": "k" * 32})["services"]
    assert (
        keyed["triton"]["environment"]["OFA_API_KEY"]
        == keyed["locust-worker"]["environment"]["CAPTION_API_KEY"]
        == "k" * 32
    )
    assert services["triton"]["environment"]["OFA_ADMIN_KEY"] == REQUIRED_ENV["OFA_ADMIN_KEY"]


def docker_compose() -> list[str] | None:
    """``docker compose`` (the CLI plugin, Compose v2) when it is installed, else None."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_config():
    # The real parser, where it exists (not on the development machines): the file is valid with the secrets
    # set (both profiles) and refused without them.
    cli = docker_compose()
    if cli is None:
        pytest.skip("no docker CLI with the compose plugin here; the structural tests above cover the file")
    base = [*cli, "-f", str(DOCKER / "compose.yaml"), "--profile", "load", "config", "--quiet"]
    environ = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV and k != "OFA_API_KEY"}
    ok = run(base, env={**environ, **REQUIRED_ENV})
    assert ok.returncode == 0, ok.stderr
    refused = run(base, env={**environ, "OFA_ADMIN_KEY": REQUIRED_ENV["OFA_ADMIN_KEY"]})
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr


def test_triton_gets_a_gpu(services):
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert int(devices[0].get("count", 1)) >= 1


def test_triton_checkpoint_volume(services):
    triton = services["triton"]
    env_dir = SERVER.env(SERVER.final_stage)["OFA_MODEL_DIR"]
    assert triton["environment"]["OFA_MODEL_DIR"] == env_dir
    checkpoint = [m for m in mounts(triton) if m["target"] == env_dir]
    assert len(checkpoint) == 1 and checkpoint[0]["read_only"], (
        "mount the checkpoint read-only at OFA_MODEL_DIR"
    )
    # The default is where `python -m ofa_captioning.download` puts the checkpoint.
    from ofa_captioning.download import DEFAULT_DIR

    assert host_path(checkpoint[0]["source"]) == (REPO / DEFAULT_DIR).resolve()


def test_triton_shutdown_and_shm(services):
    triton = services["triton"]
    assert parse_duration(triton["stop_grace_period"]) > int(SERVER_FLAGS["--exit-timeout-secs"])
    assert re.fullmatch(r"\d+(gb|g|mb|m)", str(triton["shm_size"]).lower())
    assert SERVER.all("HEALTHCHECK"), "locust waits for service_healthy, which needs the image's HEALTHCHECK"


def test_bind_mount_sources_exist(services):
    checkpoint_target = SERVER.env(SERVER.final_stage)["OFA_MODEL_DIR"]
    for name, service in services.items():
        for m in mounts(service):
            if m["type"] == "bind" and m["target"] != checkpoint_target:
                assert host_path(m["source"]).exists(), f"{name}: {m['source']} does not exist"


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for m in mounts(service):
            if m["type"] == "volume":
                assert m["source"] in declared, f"{name}: volume {m['source']} is not declared"


def container_path(service: dict, target: str) -> Path | None:
    """The host path that a path inside the container comes from (through bind mounts)."""
    best = None
    for m in mounts(service):
        covers = target == m["target"] or target.startswith(m["target"].rstrip("/") + "/")
        if m["type"] == "bind" and covers and (best is None or len(m["target"]) > len(best["target"])):
            best = m
    if best is None:
        return None
    rest = target[len(best["target"]) :].lstrip("/")
    return host_path(best["source"]) / rest


# -- Prometheus -----------------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_triton_metrics_port(services):
    prometheus = services["prometheus"]
    flags = flag_map(prometheus["command"])
    config_path = container_path(prometheus, flags["--config.file"])
    assert config_path is not None and config_path.is_file()
    config = yaml.safe_load(config_path.read_text())
    targets = [
        t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    ]
    assert f"triton:{SERVER_FLAGS['--metrics-port']}" in targets, targets
    # The published port is the one Prometheus listens on.
    listen = int(flags["--web.listen-address"].rsplit(":", 1)[1])
    assert listen in {p.container_port for p in parse_ports(prometheus["ports"])}


# -- Grafana --------------------------------------------------------------------------------------------------


def test_grafana_provisioning(services):
    grafana = services["grafana"]
    provisioning = container_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    datasources = [
        yaml.safe_load(p.read_text()) for p in sorted((provisioning / "datasources").glob("*.y*ml"))
    ]
    providers = [yaml.safe_load(p.read_text()) for p in sorted((provisioning / "dashboards").glob("*.y*ml"))]
    assert datasources and providers

    # The data source reaches the prometheus service on the port it listens on.
    (ds,) = [d for doc in datasources for d in doc["datasources"] if d["type"] == "prometheus"]
    m = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"])
    assert m and m.group(1) in services, ds["url"]
    listen = flag_map(services[m.group(1)]["command"])["--web.listen-address"]
    assert m.group(2) == listen.rsplit(":", 1)[1]

    # Every provider's folder is mounted and holds dashboards that use this data source.
    for doc in providers:
        for provider in doc["providers"]:
            folder = container_path(grafana, provider["options"]["path"])
            assert folder is not None and folder.is_dir(), provider
            dashboards = list(folder.glob("*.json"))
            assert dashboards, f"no dashboard in {folder}"
            for path in dashboards:
                text = path.read_text()
                uids = set(re.findall(r'"datasource":\s*\{[^}]*"uid":\s*"([^"]+)"', text))
                assert uids == {ds["uid"]}, f"{path.name} uses data sources {uids}, provisioned: {ds['uid']}"

    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_path(grafana, home).is_file()


# -- Locust ---------------------------------------------------------------------------------------------------


def locust_options() -> set[str]:
    """Options of Locust 2.47 (its --help) and those the locustfile adds (its add_argument calls)."""
    locust = Path(sys.executable).parent / "locust"
    result = run([str(locust), "--help"])
    options = set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))
    assert "--master-host" in options, result.stdout + result.stderr
    tree = ast.parse((REPO / "load_tests" / "locustfile.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options.update(
                a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")
            )
    return options


def test_locust_services(services):
    options = locust_options()
    entrypoint = LOCUST.all("ENTRYPOINT")[-1].exec_form()
    locustfile = entrypoint[entrypoint.index("-f") + 1]
    master_name = "locust-master"
    for name in ("locust-master", "locust-worker"):
        service = services[name]
        assert set(service.get("profiles", [])) == {"load"}, "load generation starts only on request"
        # The locustfile the image runs is the one of this checkout.
        source = container_path(service, locustfile)
        assert source == REPO / "load_tests" / "locustfile.py" and source.is_file()
        used = {a.partition("=")[0] for a in service["command"] if a.startswith("--")}
        assert used <= options, f"{name}: unknown Locust options {used - options}"
        env = service["environment"]
        assert env["TRITON_HOST"] == "triton"
        assert int(env["GRPC_PORT"]) == int(SERVER_FLAGS["--grpc-port"])
        assert int(env["HTTP_PORT"]) == int(SERVER_FLAGS["--http-port"])
    worker = services["locust-worker"]["command"]
    assert worker[worker.index("--master-host") + 1] == master_name
    assert services["locust-master"]["depends_on"]["triton"]["condition"] == "service_healthy"
