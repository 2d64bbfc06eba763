"""Helpers of the deployment tests: Dockerfile and .dockerignore parsing, compose interpolation, PromQL metric
extraction, the metric names Triton 2.51 exports, and the NGC releases the image may be built on.

Nothing here needs Docker, Kubernetes or a network: the files under docker/ are read and cross-checked.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"

# ---------------------------------------------------------------------------------------------------------------
# Metric names of Triton Inference Server 2.51.0 (the server of NGC 24.10-py3 and of the nvidia-pytriton 0.7.0
# wheel that the test suite runs).
#
# Sources:
#  * Seen on the metrics endpoint of tritonserver 2.51.0 (nvidia-pytriton 0.7.0 wheel, CPU-only host) serving a
#    Python-backend model with dynamic batching and the response cache on; test_metric_names_live.py repeats that
#    check against the installed binary, so this list cannot drift from the server.
#  * GPU families (not exported on a CPU-only host): triton-inference-server/core src/metrics.cc, the families
#    built under TRITON_ENABLE_METRICS_GPU (DCGM), label `gpu_uuid`; the names are also present as strings in
#    the libtritonserver.so of the 2.51 wheel.
TRITON_MODEL_METRICS = frozenset(
    {
        "nv_inference_request_success",  # counter, labels model, version
        "nv_inference_request_failure",  # counter, labels model, version, reason
        "nv_inference_count",  # counter: inferences (images), cache hits excluded
        "nv_inference_exec_count",  # counter: model executions (batches), cache hits excluded
        "nv_inference_request_duration_us",  # counter, cumulative
        "nv_inference_queue_duration_us",  # counter, cumulative
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_inference_pending_request_count",  # gauge
        "nv_cache_num_hits_per_model",  # counters, models with response_cache enabled
        "nv_cache_hit_duration_per_model",
        "nv_cache_num_misses_per_model",
        "nv_cache_miss_duration_per_model",
    }
)
TRITON_SERVER_METRICS = frozenset(
    {
        "nv_pinned_memory_pool_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
        # response cache (server-wide gauges, with --cache-config)
        "nv_cache_util",
        "nv_cache_num_entries",
        "nv_cache_num_hits",
        "nv_cache_num_misses",
        "nv_cache_num_lookups",
        "nv_cache_num_evictions",
        "nv_cache_lookup_duration",
        "nv_cache_insertion_duration",
    }
)
# Only with --metrics-config=summary_latencies=true (quantile label); seen live on 2.51. Our server does not set
# that flag, so dashboards and autoscaling rules must not use these.
TRITON_SUMMARY_METRICS = frozenset(
    {
        "nv_inference_queue_summary_us",
        "nv_inference_compute_input_summary_us",
        "nv_inference_compute_infer_summary_us",
        "nv_inference_compute_output_summary_us",
        "nv_cache_hit_summary_per_model",
        "nv_cache_miss_summary_per_model",
    }
)
TRITON_GPU_METRICS = frozenset(
    {
        "nv_gpu_utilization",  # gauge 0.0-1.0
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
    }
)
#: Everything our server (no summary flag) exports on a GPU host.
TRITON_METRICS = TRITON_MODEL_METRICS | TRITON_SERVER_METRICS | TRITON_GPU_METRICS

#: Labels a series of those families can carry: Triton's own, Prometheus' target labels, the Kubernetes labels
#: that Prometheus attaches to pod targets (what the adapter maps to objects), and compose's static label.
TRITON_LABELS = frozenset({"model", "version", "reason", "gpu_uuid"})
SCRAPE_LABELS = frozenset({"job", "instance", "namespace", "pod", "service"})

#: NGC container release -> Triton version inside it. Sources: the TRITON_VERSION file and build.py
#: (DEFAULT_TRITON_VERSION_MAP) of the release branches of triton-inference-server/server (r24.10 ... r26.08),
#: the 26.09 version bump on its main branch (2.73.0), and for 26.10 the monthly numbering (its release notes
#: were found, their version line was not read). pytriton 0.5.13-0.7.0 changelogs name 2.51.0 (24.10) as the
#: server of the wheel.
NGC_TRITON_VERSION = {
    "24.10": "2.51.0",
    "25.07": "2.59.1",
    "25.08": "2.60.0",
    "25.10": "2.62.0",
    "26.02": "2.66.0",
    "26.05": "2.69.0",
    "26.07": "2.71.0",
    "26.08": "2.72.0",
    "26.09": "2.73.0",
    "26.10": "2.74.0",
}
#: NGC container release -> its system Python, which the Python backend stub runs (Triton's release compatibility
#: matrix: 24.10 containers ship Python 3.10.12 on Ubuntu 22.04; from 24.12 on, Ubuntu 24.04 with Python 3.12.3,
#: listed up to 26.07; build.py of r26.08 still builds on ubuntu 24.04's python3).
NGC_PYTHON_VERSION = {
    "24.10": "3.10.12",
    "26.07": "3.12.3",
    "26.08": "3.12.3",
    "26.09": "3.12.3",
    "26.10": "3.12.3",
}
#: The Triton server the test suite and `make serve` run: the one bundled in nvidia-pytriton 0.7.0, the newest
#: wheel (no newer server on PyPI).
WHEEL_TRITON_VERSION = "2.51.0"
#: The first NGC release that fixes every Triton CVE published so far (docs/security.md): the image's base must
#: be this release or newer.
MIN_PATCHED_RELEASE = "26.07"


def version_tuple(version: str) -> tuple[int, ...]:
    """``"26.07"`` / ``"2.71.0"`` as a comparable tuple of integers."""
    return tuple(int(part) for part in re.findall(r"\d+", version))


def base_image_release(dockerfile: Dockerfile) -> str:
    """The NGC release (``YY.MM``) of a Dockerfile's ``BASE_IMAGE`` default."""
    base = dockerfile.args()["BASE_IMAGE"] or ""
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", base)
    assert m, (
        f"BASE_IMAGE must be a dated NGC Triton tag (nvcr.io/nvidia/tritonserver:YY.MM-py3), got {base!r}"
    )
    return m.group(1)


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: str | None  # name (or index) of the stage it belongs to; None before the first FROM
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (CMD ["a", "b"]), else None."""
        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        return None


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    stages: list[str] = field(default_factory=list)
    base_images: dict[str, str] = field(default_factory=dict)  # stage -> FROM argument

    def in_stage(self, stage: str, keyword: str | None = None) -> list[Instruction]:
        return [
            i for i in self.instructions if i.stage == stage and (keyword is None or i.keyword == keyword)
        ]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    @property
    def final_stage(self) -> str:
        return self.stages[-1]

    def args(self) -> dict[str, str | None]:
        """Every ARG with its default (global and per stage; a later one with a default wins)."""
        out: dict[str, str | None] = {}
        for ins in self.all("ARG"):
            name, _, default = ins.args.strip().partition("=")
            if default or name not in out:
                out[name] = default.strip().strip('"') if default else None
        return out

    def stage_chain(self, stage: str) -> list[str]:
        """``stage`` and the stages it is built FROM, nearest first."""
        chain = [stage]
        while self.base_images.get(chain[-1]) in self.stages:
            chain.append(self.base_images[chain[-1]])
        return chain

    def env(self, stage: str) -> dict[str, str]:
        """ENV values visible in ``stage`` (inherited from the stages it is built on)."""
        out: dict[str, str] = {}
        for name in reversed(self.stage_chain(stage)):
            for ins in self.in_stage(name, "ENV"):
                for token in shlex.split(ins.args):
                    key, _, value = token.partition("=")
                    out[key] = value
        return out

    def copies(self, stage: str | None = None) -> list[tuple[list[str], str, dict[str, str]]]:
        """(sources, destination, flags) of every COPY (of ``stage``, else of all stages)."""
        out = []
        for ins in self.all("COPY") if stage is None else self.in_stage(stage, "COPY"):
            tokens = shlex.split(ins.args)
            flags = {}
            while tokens and tokens[0].startswith("--"):
                key, _, value = tokens.pop(0)[2:].partition("=")
                flags[key] = value
            out.append((tokens[:-1], tokens[-1], flags))
        return out


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, grouped by build stage."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    instructions, stages, bases = [], [], {}
    stage = None
    for number, text in logical:
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            tokens = args.split()
            stage = tokens[2] if len(tokens) >= 3 and tokens[1].upper() == "AS" else str(len(stages))
            stages.append(stage)
            bases[stage] = tokens[0]
        instructions.append(Instruction(keyword, args.strip(), stage, number))
    return Dockerfile(path, instructions, stages, bases)


def flag_map(argv: list[str]) -> dict[str, str]:
    """``--key=value`` / ``--flag`` arguments as a dict (a bare flag maps to "")."""
    out = {}
    for arg in argv:
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            out[key] = value
    return out


def dockerignore_patterns(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    # A pattern that matches a directory excludes (or re-includes) everything under it, as in Docker.
    return re.compile(f"^{out}(?:/.*)?$")


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``relpath`` (relative to the build context) out of the context."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        if pat and _pattern_regex(pat).match(relpath):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------------------------------------------
# compose

_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value, environ: dict[str, str] | None = None):
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` with ``environ`` (default: empty)."""
    environ = environ or {}
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        if name in environ and (environ[name] or not (op or "").startswith(":")):
            return environ[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"${{{name}}} is required: {arg}")
        return ""

    return _INTERPOLATION.sub(sub, value)


def load_compose(environ: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), environ)


@dataclass(frozen=True)
class PortMapping:
    host_ip: str
    host_port: int
    container_port: int


def parse_ports(entries: list) -> list[PortMapping]:
    """Compose short syntax ``[IP:]HOST:CONTAINER`` (no ranges) into PortMappings."""
    out = []
    for entry in entries:
        assert isinstance(entry, str), f"use the short port syntax: {entry!r}"
        parts = entry.split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            ip, host, container = parts
        elif len(parts) == 2:
            ip, (host, container) = "0.0.0.0", parts
        else:
            ip, host, container = "0.0.0.0", parts[0], parts[0]
        out.append(PortMapping(ip, int(host), int(container)))
    return out


def parse_duration(text: str) -> float:
    """Compose durations ('45s', '1m30s', '500ms') in seconds."""
    total, matched = 0.0, ""
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
        matched += number + unit
    assert matched == text.strip(), f"not a duration: {text!r}"
    return total


# ---------------------------------------------------------------------------------------------------------------
# PromQL

#: Grafana's variables in range vectors, replaced by a plain duration before parsing.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)


@dataclass
class QueryFacts:
    selectors: list[Selector] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)


def require(module: str, distribution: str):
    """Import a test-only dependency; a clear failure (not a collection error) when it is not installed."""
    try:
        return __import__(module)
    except ImportError:
        pytest.fail(f"{distribution} is not installed: run `make setup-dev` (requirements/dev.txt)")


def promql_facts(expr: str) -> QueryFacts:
    """Parse a PromQL expression (promql-parser) and collect its series selectors and grouping labels."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    facts = QueryFacts()
    _walk(require("promql_parser", "promql-parser").parse(expr), facts)
    return facts


def _walk(node, facts: QueryFacts) -> None:
    promql_parser = require("promql_parser", "promql-parser")
    if isinstance(node, promql_parser.VectorSelector):
        matchers = tuple((m.name, str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers)
        name = node.name or next((v for k, _, v in matchers if k == "__name__"), None)
        assert name, f"selector without a metric name: {node}"
        facts.selectors.append(Selector(name, tuple(m for m in matchers if m[0] != "__name__")))
    elif isinstance(node, promql_parser.MatrixSelector):
        _walk(node.vector_selector, facts)
    elif isinstance(node, promql_parser.AggregateExpr):
        if node.modifier is not None:
            facts.grouping_labels.update(node.modifier.labels)
        _walk(node.expr, facts)
        if node.param is not None:
            _walk(node.param, facts)
    elif isinstance(node, promql_parser.BinaryExpr):
        if node.modifier is not None and node.modifier.matching is not None:
            facts.grouping_labels.update(node.modifier.matching.labels)
        _walk(node.lhs, facts)
        _walk(node.rhs, facts)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            _walk(arg, facts)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        _walk(node.expr, facts)
    elif isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
        pass
    else:  # pragma: no cover - a node type this walker does not know yet
        raise TypeError(f"unexpected PromQL node {type(node).__name__}: {node}")


def label_values(facts: QueryFacts, label: str) -> set[str]:
    """Values an expression's matchers give ``label`` (alternatives of a =~ "a|b" split)."""
    out = set()
    for selector in facts.selectors:
        for name, op, value in selector.matchers:
            if name == label and op in ("Equal", "Re"):
                out.update(value.split("|") if op == "Re" else [value])
    return out


# ---------------------------------------------------------------------------------------------------------------
# The project: served models, pins, packages


def served_models() -> set[str]:
    """Model names of model_repository/ (directories with a config.pbtxt)."""
    return {p.parent.name for p in (REPO / "model_repository").glob("*/config.pbtxt")}


def requirement_pins(*files: Path) -> dict[str, str]:
    """``name -> version`` of ``name==version`` lines (names normalised, extras dropped)."""
    pins = {}
    for path in files:
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
            if m:
                pins[normalize(m.group(1))] = m.group(3)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_packages() -> dict[str, Path]:
    """Top-level packages that ``pip install .`` installs -> their source directory."""
    cfg = pyproject()["tool"]["setuptools"]
    dirs = cfg.get("package-dir", {})
    out = {}
    for package in cfg["packages"]:
        top = package.split(".")[0]
        base = dirs.get(top)
        out[top] = REPO / base if base is not None else REPO / dirs.get("", ".") / top
    return out


def module_level_imports(path: Path) -> set[str]:
    """Absolute module names imported at module level of ``path`` (not inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            package = _package_of(path)
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _package_of(path: Path) -> str:
    for top, directory in project_packages().items():
        try:
            rel = path.resolve().relative_to(directory.resolve())
        except ValueError:
            continue
        return ".".join([top, *rel.parent.parts])
    raise ValueError(f"{path} is not in a project package")


def third_party_imports_of(entry_files: list[Path]) -> set[str]:
    """Top-level names of the non-project, non-stdlib modules that importing ``entry_files`` loads, following
    module-level imports through the project's own packages."""
    packages = project_packages()
    seen: set[Path] = set()
    todo = list(entry_files)
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in module_level_imports(path):
            top = module.split(".")[0]
            if top in packages:
                todo.extend(_module_files(module, packages))
            elif top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    return third_party


def _module_files(module: str, packages: dict[str, Path]) -> list[Path]:
    parts = module.split(".")
    base = packages[parts[0]]
    files = [base / "__init__.py"]
    for i in range(1, len(parts)):
        candidate = base.joinpath(*parts[1 : i + 1])
        if (candidate / "__init__.py").is_file():
            files.append(candidate / "__init__.py")
        elif candidate.with_suffix(".py").is_file():
            files.append(candidate.with_suffix(".py"))
            break  # the rest is a name inside that module
    return [f for f in files if f.is_file()]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
