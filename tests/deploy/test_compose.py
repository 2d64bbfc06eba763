"""docker/compose.yaml and what it refers to: images, ports, volumes, Prometheus scraping, Grafana provisioning,
Locust. Parsed offline (no Docker engine); ``${VAR:-default}`` resolved with an empty environment."""

from __future__ import annotations

import ast
import re
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


@pytest.fixture(scope="module")
def compose():
    return load_compose()


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
    opened = parse_ports(interpolate(raw, {"OFA_PUBLISH_ADDRESS": "0.0.0.0"})["services"]["triton"]["ports"])
    assert {p.host_ip for p in opened} == {"0.0.0.0"}


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
