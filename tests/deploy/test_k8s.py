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
MANIFESTS = [
    "deployment.yaml",
    "service.yaml",
    "hpa.yaml",
    "pdb.yaml",
    "networkpolicy.yaml",
    "locust.yaml",
    "podmonitor.yaml",
]
#: API versions of the kinds used here; stable in every Kubernetes since 1.25 (autoscaling/v2 GA in 1.23,
#: policy/v1 PodDisruptionBudget in 1.21, batch/v1 Job long before).
EXPECTED_API = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "Job": "batch/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
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
    assert checked >= 8


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
    assert set(resources) == {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "networkpolicy.yaml"}
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
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OFA_MODEL_DIR"] == SERVER.env(SERVER.final_stage)["OFA_MODEL_DIR"]


#: Seconds tritonserver may take after its drain to unload its models and exit (measured: 4.5 s on 2 CPU cores,
#: docs/reliability.md), on top of preStop + --exit-timeout-secs in the grace period.
UNLOAD_MARGIN_S = 10


def test_graceful_termination(container, deployment):
    spec = deployment["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and len(pre_stop) == 2
    drain = int(pre_stop[1]) + int(SERVER_FLAGS["--exit-timeout-secs"]) + UNLOAD_MARGIN_S
    assert spec["terminationGracePeriodSeconds"] >= drain, "SIGKILL would cut in-flight requests short"
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    # a rollout starts a new pod before it stops an old one, and there is always another pod to retry on
    assert rolling["maxSurge"] >= 1 and deployment["spec"]["replicas"] >= 2


def test_pre_stop_waits_as_long_as_readiness_takes_to_fail(container):
    # Whatever routes by the readiness probe stops sending within period x failure threshold; SIGTERM (and the
    # refusals of the drain) comes only after that.
    readiness = container["readinessProbe"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert int(pre_stop[1]) == readiness["periodSeconds"] * readiness["failureThreshold"]
    # the image stops with SIGTERM (Docker's default; a STOPSIGNAL would change what the supervisor receives)
    assert not SERVER.all("STOPSIGNAL")


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


# -- network policy -------------------------------------------------------------------------------------------

#: The Secret that holds the keys (created by `kubectl create secret`, never part of the manifests).
SECRET = "ofa-triton-keys"
GATEWAY_LABEL = {"ofa-captioning/gateway": "true"}


@pytest.fixture(scope="module")
def policy():
    return one("NetworkPolicy", "ofa-triton")


def rule_ports(rule: dict, container: dict) -> set[int]:
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    out = set()
    for port in rule["ports"]:
        assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port, port
        out.add(named[port["port"]] if isinstance(port["port"], str) else port["port"])
    return out


def admitted_to_inference(pod_labels: dict, namespace_labels: dict | None = None) -> bool:
    """Whether the policy's inference rule admits a pod with these labels (in this namespace, or in a namespace
    with ``namespace_labels``)."""
    policy = one("NetworkPolicy", "ofa-triton")
    (rule,) = [
        r
        for r in policy["spec"]["ingress"]
        if int(SERVER_FLAGS["--http-port"]) in {p["port"] for p in r["ports"]}
    ]
    for peer in rule["from"]:
        pods = matches(peer.get("podSelector", {}).get("matchLabels", {}), pod_labels)
        if "namespaceSelector" in peer:
            # another namespace: its labels must match (and the pod's, if the peer also selects pods)
            labels = peer["namespaceSelector"]["matchLabels"]
            if namespace_labels is not None and pods and matches(labels, namespace_labels):
                return True
        elif namespace_labels is None and pods:  # a podSelector alone: pods of the policy's own namespace
            return True
    return False


def test_network_policy_selects_the_server_pods(policy, deployment):
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(spec["podSelector"]["matchLabels"], pod_labels)
    # Ingress and egress are both policed: what no rule allows is denied.
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec.get("egress", []) == [], "the server needs no outgoing connection"


def test_network_policy_ports_and_peers(policy, container):
    http, grpc, metrics = (int(SERVER_FLAGS[f"--{k}-port"]) for k in ("http", "grpc", "metrics"))
    rules = policy["spec"]["ingress"]
    assert len(rules) == 2
    by_ports = {frozenset(rule_ports(r, container)): r for r in rules}
    assert set(by_ports) == {frozenset({http, grpc}), frozenset({metrics})}, "nothing else is reachable"
    inference, monitoring = by_ports[frozenset({http, grpc})], by_ports[frozenset({metrics})]
    # Inference: a labelled gateway namespace, or labelled pods of this namespace; never an empty selector
    # (which would admit everyone) and never an ipBlock.
    peers = inference["from"]
    assert peers and all(set(p) <= {"namespaceSelector", "podSelector"} for p in peers)
    for peer in peers:
        for selector in peer.values():
            assert selector.get("matchLabels") == GATEWAY_LABEL, peer
    # Metrics: the monitoring namespace only.
    (peer,) = monitoring["from"]
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_network_policy_decisions(deployment):
    # The rule as evaluated for typical clients.
    assert admitted_to_inference(GATEWAY_LABEL)
    assert admitted_to_inference({"app": "ingress-nginx"}, namespace_labels={**GATEWAY_LABEL, "x": "y"})
    assert not admitted_to_inference({"app": "something-else"})
    assert not admitted_to_inference(GATEWAY_LABEL, namespace_labels={"kubernetes.io/metadata.name": "other"})
    assert not admitted_to_inference(deployment["spec"]["template"]["metadata"]["labels"])


def test_network_policy_monitoring_namespace_matches_the_adapter():
    # The Prometheus the adapter queries lives in the namespace the metrics rule admits.
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert re.fullmatch(r"http://[\w-]+\.monitoring\.svc", values["prometheus"]["url"])


# -- keys -----------------------------------------------------------------------------------------------------


def test_admin_key_is_a_mounted_secret_file(deployment, container):
    env = {e["name"]: e for e in container["env"]}
    path = Path(env["OFA_ADMIN_KEY_FILE"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert mount.get("readOnly") is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == SECRET and not secret.get("optional"), "the admin key is required"
    items = {i["key"]: i["path"] for i in secret["items"]}
    assert Path(mount["mountPath"]) / items["admin-key"] == path
    # Readable by the server's group (fsGroup), by nobody else; the server user is not root.
    mode = secret["defaultMode"]
    assert mode & 0o040 and not mode & 0o007, oct(mode)
    assert deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == IMAGE_USER
    assert "OFA_ADMIN_KEY" not in env, "one source for the admin key"


def test_api_key_is_an_optional_secret_reference(container):
    env = {e["name"]: e for e in container["env"]}
    ref = env["OFA_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": SECRET, "key": "api-key", "optional": True}, "absent key = inference open"
    assert "OFA_API_KEY_FILE" not in env, "a _FILE pointing at a missing file fails the start"


def literal_secrets(obj: dict) -> list[str]:
    """Places where a manifest object writes a secret value: Secret data, secret-looking env with a value."""
    found = []
    if obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData")):
        found.append(f"Secret {obj['metadata']['name']}")

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            if "name" in node and "value" in node and isinstance(node["name"], str):
                name = node["name"]
                if re.search(r"KEY|PASSWORD|PASSWD|TOKEN|SECRET", name, re.I) and not name.endswith("_FILE"):
                    found.append(f"{where}: env {name}")
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(obj, f"{obj['kind']} {obj['metadata']['name']}")
    return found


def test_no_literal_secret_in_manifests():
    found = [f for obj in objects() for f in literal_secrets(obj)]
    assert not found, found
    # The checker sees one.
    bad = yaml.safe_load(yaml.safe_dump(one("Deployment", "ofa-triton")))
    bad["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "OFA_API_KEY", "value": "k" * 32})
    assert literal_secrets(bad) and literal_secrets(
        {"kind": "Secret", "metadata": {"name": "x"}, "stringData": {"admin-key": "k"}}
    )
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "secretGenerator" not in kustomization, "the keys are created with kubectl, not from files in git"


def test_probes_stay_open(container):
    # The kubelet's httpGet probes send no key: the health endpoints must never be in a restricted group.
    from ofa_serving.security import ADMIN_APIS, INFERENCE_APIS

    assert "health" not in ADMIN_APIS + INFERENCE_APIS
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/v2/health/")
        assert "httpHeaders" not in container[probe]["httpGet"]


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
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["TRITON_HOST"] == "ofa-triton"
        assert int(env["GRPC_PORT"]) == triton["grpc"] and int(env["HTTP_PORT"]) == triton["http"]
        assert c["image"] == f"ofa-captioning-locust:{pyproject()['project']['version']}"
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        # Admitted to the inference ports by the NetworkPolicy, with the server's inference key if it has one.
        assert admitted_to_inference(job["spec"]["template"]["metadata"]["labels"])
        (api_key,) = [e for e in c["env"] if e["name"] == "CAPTION_API_KEY"]
        assert api_key["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "api-key", "optional": True}


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
