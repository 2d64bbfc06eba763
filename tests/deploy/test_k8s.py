"""docker/k8s/: schema-valid manifests (kubernetes-validate, strict, oldest and newest bundled Kubernetes),
consistent with each other, with the image and with Triton's metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from .deploylib import (
    DOCKER,
    K8S,
    REPO,
    TRITON_METRICS,
    TRITON_MODEL_METRICS,
    flag_map,
    label_values,
    parse_dockerfile,
    promql_facts,
    pyproject,
    require,
    served_models,
)

SERVER = parse_dockerfile(DOCKER / "Dockerfile")
SERVER_FLAGS = flag_map(SERVER.in_stage(SERVER.final_stage, "CMD")[0].exec_form())  # (after the supervisor)
IMAGE_USER = int(SERVER.in_stage(SERVER.final_stage, "USER")[-1].args.split(":")[0])
MANIFESTS = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "locust.yaml", "podmonitor.yaml"]
#: API versions of the kinds used here; stable in every Kubernetes since 1.25 (autoscaling/v2 GA in 1.23,
#: policy/v1 PodDisruptionBudget in 1.21, batch/v1 Job long before).
EXPECTED_API = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "Job": "batch/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
}
KUBERNETES_VERSIONS = ["1.25.0", "1.37.0"]  # oldest and newest schemas kubernetes-validate 1.37 bundles


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def objects() -> list[dict]:
    return [doc for name in MANIFESTS for doc in load(name)]


def one(kind: str, name: str | None = None) -> dict:
    found = [o for o in objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def deployment():
    return one("Deployment", "ofa-triton")


@pytest.fixture(scope="module")
def container(deployment):
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"]
    return c


@pytest.fixture(scope="module")
def adapter_rules():
    return yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


# -- schemas --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_schema_valid(version):
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    # strict: unknown fields (typos such as `readinesProbe`) are errors, not silently ignored.
    checked = 0
    for obj in objects():
        assert obj.get("apiVersion") == EXPECTED_API.get(obj["kind"]), (
            f"{obj['kind']}: {obj.get('apiVersion')}"
        )
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: no schema in kubernetes-validate, checked structurally below
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 7


def test_validation_catches_typos():
    kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")
    bad = one("Deployment", "ofa-triton")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_existing_manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert set(resources) == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"}
    for resource in resources:
        assert (K8S / resource).is_file()
    version = pyproject()["project"]["version"]
    (image,) = kustomization["images"]
    assert image["name"] == "ofa-captioning-triton" and image["newTag"] == version


# -- the server Deployment ------------------------------------------------------------------------------------


def test_selectors_match_pod_labels(deployment):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    for obj in objects():
        if obj["kind"] == "Service" and obj["metadata"]["name"].startswith("ofa-triton"):
            assert matches(obj["spec"]["selector"], pod_labels), obj["metadata"]["name"]
    assert matches(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(one("PodMonitor")["spec"]["selector"]["matchLabels"], pod_labels)


def test_container_ports_are_the_image_ports(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {k: int(SERVER_FLAGS[f"--{k}-port"]) for k in ("http", "grpc", "metrics")}


def test_image_and_command_come_from_the_dockerfile(container):
    version = pyproject()["project"]["version"]
    assert container["image"] == f"ofa-captioning-triton:{version}"
    # No command/args: the image's CMD (checked against the launcher in test_dockerfile.py) is the command line.
    assert "command" not in container and "args" not in container


def test_probes_hit_triton_health_endpoints(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def target(probe: dict) -> tuple[str, int]:
        get = probe["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], port

    http = int(SERVER_FLAGS["--http-port"])
    assert target(container["readinessProbe"]) == ("/v2/health/ready", http)
    assert target(container["startupProbe"]) == ("/v2/health/ready", http)


def test_liveness_is_the_images_deep_probe(container):
    # Not the blind /v2/health/live, which stays green over a dead backend stub: the image's HEALTHCHECK command
    # (tests/hardening/test_healing.py runs it against a server with a dead stub).
    liveness = container["livenessProbe"]
    command = liveness["exec"]["command"]
    healthcheck = SERVER.all("HEALTHCHECK")[0].args.partition(" CMD ")[2]
    assert command == json.loads(healthcheck)
    assert command[:3] == ["python3", "-m", "ofa_serving.probe"]
    probe_timeout = float(command[command.index("--timeout") + 1])
    assert liveness["timeoutSeconds"] > probe_timeout, "the probe reports before the kubelet gives up on it"
    # the supervisor heals within seconds; the kubelet restarts the container only when that fails for longer
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60


def test_probe_timings(container):
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "loading + warm-up can take minutes"


def test_gpu_and_resources(container, deployment):
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == 1
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "/tmp" in mounts, "HOME=/tmp must be writable under a read-only root filesystem"
    assert SERVER.env(SERVER.final_stage)["HOME"] == "/tmp"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OFA_MODEL_DIR"] == SERVER.env(SERVER.final_stage)["OFA_MODEL_DIR"]


def test_graceful_termination(container, deployment):
    spec = deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(pre_stop[1]) + int(SERVER_FLAGS["--exit-timeout-secs"])
    assert spec["terminationGracePeriodSeconds"] > drain, "SIGKILL would cut in-flight requests short"
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_runs_as_the_image_user_non_root(container, deployment):
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_USER != 0
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]


def test_metrics_are_scraped_from_the_metrics_port(deployment, container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and ports[endpoint["port"]] == ports["metrics"]


def test_services_expose_the_container_ports(container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = one("Service", "ofa-triton")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "grpc", "metrics"}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports, port
        assert port["port"] == ports[port["targetPort"]], "keep the service ports equal to Triton's"
    headless = one("Service", "ofa-triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["grpc"]


# -- autoscaling ----------------------------------------------------------------------------------------------


def adapter_query(template: str) -> str:
    """An adapter metricsQuery with its Go template filled in as the adapter does for one pod."""
    return (
        template.replace("<<.LabelMatchers>>", 'namespace="default",pod="ofa-triton-0"')
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.Series>>", "nv_inference_queue_duration_us")
    )


def test_hpa_targets_the_deployment_with_custom_pod_metrics(adapter_rules):
    hpa = one("HorizontalPodAutoscaler")
    spec = hpa["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "ofa-triton")
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
    served = {rule["name"]["as"] for rule in adapter_rules}
    names = []
    for metric in spec["metrics"]:
        assert metric["type"] == "Pods"
        name = metric["pods"]["metric"]["name"]
        assert name in served, f"HPA metric {name} is not served by the adapter rules ({sorted(served)})"
        assert metric["pods"]["target"]["type"] == "AverageValue"
        assert float(metric["pods"]["target"]["averageValue"]) > 0
        names.append(name)
    assert "ofa_queue_time_us_per_request" in names, "scale on Triton's queue time of ofa"
    # Two replicas at least, so that the disruption budget can always let one go.
    pdb = one("PodDisruptionBudget")["spec"]
    assert spec["minReplicas"] > pdb["minAvailable"]


def test_adapter_rules_use_real_triton_metrics(adapter_rules):
    models = served_models()
    for rule in adapter_rules:
        series = promql_facts(rule["seriesQuery"])
        query = promql_facts(adapter_query(rule["metricsQuery"]))
        metrics = {s.metric for s in series.selectors + query.selectors}
        assert metrics <= TRITON_METRICS, f"{rule['name']['as']}: {metrics - TRITON_METRICS}"
        assert metrics <= TRITON_MODEL_METRICS, "per-pod scaling needs per-model series"
        assert label_values(series, "model") == label_values(query, "model") == {"ofa"} <= models
        # The adapter maps these two labels to objects; Prometheus must attach them (PodMonitor, annotations).
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert query.grouping_labels == {"pod"}
        (series_metric,) = {s.metric for s in series.selectors}
        assert re.fullmatch(rule["name"]["matches"], series_metric)
        assert "<<.LabelMatchers>>" in rule["metricsQuery"], "without it every pod gets the same value"


def test_queue_time_rule_divides_queue_time_by_requests(adapter_rules):
    (rule,) = [r for r in adapter_rules if r["name"]["as"] == "ofa_queue_time_us_per_request"]
    query = rule["metricsQuery"]
    assert query.index("nv_inference_queue_duration_us") < query.index("/")
    assert query.index("/") < query.index("nv_inference_request_success")


# -- Locust ---------------------------------------------------------------------------------------------------


def arg_value(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise KeyError(flag)


def test_locust_jobs():
    master, worker = one("Job", "ofa-locust-master"), one("Job", "ofa-locust-worker")
    service = one("Service", "ofa-locust-master")
    master_pod = master["spec"]["template"]
    worker_args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    master_args = master_pod["spec"]["containers"][0]["args"]
    assert "--master" in master_args and "--headless" in master_args and "--worker" in worker_args
    # Workers find the master through its Service, on a port the master pod exposes.
    assert arg_value(worker_args, "--master-host") == service["metadata"]["name"]
    assert matches(service["spec"]["selector"], master_pod["metadata"]["labels"])
    master_ports = {p["name"]: p["containerPort"] for p in master_pod["spec"]["containers"][0]["ports"]}
    (bind,) = [p for p in service["spec"]["ports"] if p["name"] == "master"]
    assert int(arg_value(worker_args, "--master-port")) == bind["port"] == master_ports[bind["targetPort"]]
    # The master waits for exactly the workers the worker Job starts.
    assert int(arg_value(master_args, "--expect-workers")) == worker["spec"]["parallelism"]
    assert worker["spec"]["completions"] == worker["spec"]["parallelism"]
    # Both talk to the server Service on its gRPC/HTTP ports.
    triton = {p["name"]: p["port"] for p in one("Service", "ofa-triton")["spec"]["ports"]}
    for job in (master, worker):
        (c,) = job["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["TRITON_HOST"] == "ofa-triton"
        assert int(env["GRPC_PORT"]) == triton["grpc"] and int(env["HTTP_PORT"]) == triton["http"]
        assert c["image"] == f"ofa-captioning-locust:{pyproject()['project']['version']}"
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_locust_args_are_known_options():
    from .test_compose import locust_options

    options = locust_options()
    for name in ("ofa-locust-master", "ofa-locust-worker"):
        (c,) = one("Job", name)["spec"]["template"]["spec"]["containers"]
        used = {a.partition("=")[0] for a in c["args"] if a.startswith("--")}
        assert used <= options, f"{name}: unknown Locust options {used - options}"


def test_every_manifest_is_documented():
    docs = (REPO / "docs" / "deployment.md").read_text()
    for path in sorted(Path(K8S).glob("*.yaml")):
        assert f"docker/k8s/{path.name}" in docs or path.name in docs, (
            f"{path.name} is not in docs/deployment.md"
        )
