"""docker/grafana/dashboards/*.json: valid dashboards whose every PromQL query parses and uses only metrics and
labels Triton 2.51 exports, for models this repository serves."""

from __future__ import annotations

import json

import pytest

from .deploylib import (
    DOCKER,
    SCRAPE_LABELS,
    TRITON_GPU_METRICS,
    TRITON_LABELS,
    TRITON_METRICS,
    TRITON_MODEL_METRICS,
    TRITON_SUMMARY_METRICS,
    label_values,
    promql_facts,
    served_models,
)

DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))


def panels_of(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    return [
        (p["title"], t["expr"]) for p in panels_of(dashboard) for t in p.get("targets", []) if "expr" in t
    ]


def check_query(expr: str, models: set[str]) -> list[str]:
    """Problems of one query: unknown metrics or labels, models that are not served."""
    problems = []
    facts = promql_facts(expr)
    if not facts.selectors:
        problems.append("no metric")
    for selector in facts.selectors:
        if selector.metric in TRITON_SUMMARY_METRICS:
            problems.append(
                f"{selector.metric} needs --metrics-config=summary_latencies=true, which is not set"
            )
        elif selector.metric not in TRITON_METRICS:
            problems.append(f"{selector.metric} is not a Triton 2.51 metric")
        for label, _, _ in selector.matchers:
            if label not in TRITON_LABELS | SCRAPE_LABELS:
                problems.append(f"label {label} does not exist on {selector.metric}")
        # Without a model matcher or grouping, the ensemble and its steps are summed together (counted twice).
        by_model = any(m[0] == "model" for m in selector.matchers) or "model" in facts.grouping_labels
        if selector.metric in TRITON_MODEL_METRICS and not by_model:
            problems.append(f"{selector.metric}: select or group by model")
    for label in facts.grouping_labels - TRITON_LABELS - SCRAPE_LABELS:
        problems.append(f"grouping by unknown label {label}")
    unknown_models = label_values(facts, "model") - models
    if unknown_models:
        problems.append(f"models {sorted(unknown_models)} are not in model_repository/")
    return problems


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request):
    return json.loads(request.param.read_text())


def test_there_is_a_dashboard():
    assert [p.name for p in DASHBOARDS] == ["ofa-triton.json"]


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in panels_of(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels_of(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"{panel['title']}: no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_every_query_uses_real_triton_metrics(dashboard):
    models = served_models()
    assert {"caption", "preprocess", "ofa"} <= models
    problems = {f"{title}: {expr}": check_query(expr, models) for title, expr in queries(dashboard)}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, json.dumps(problems, indent=2)


def test_dashboard_shows_what_operators_need(dashboard):
    """Requests/s, latency, queue time, executed batch size of `ofa`, cache hits, GPU utilisation."""
    used = {s.metric for _, expr in queries(dashboard) for s in promql_facts(expr).selectors}
    for metric in (
        "nv_inference_request_success",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_cache_num_hits_per_model",
        "nv_gpu_utilization",
    ):
        assert metric in used, f"no panel shows {metric}"
    # Executed batch size of ofa = delta nv_inference_count / delta nv_inference_exec_count.
    batch = [
        expr
        for _, expr in queries(dashboard)
        if {s.metric for s in promql_facts(expr).selectors}
        == {"nv_inference_count", "nv_inference_exec_count"}
        and "ofa" in label_values(promql_facts(expr), "model")
    ]
    assert batch, "no panel shows the executed batch size of ofa"
    assert (
        batch[0].index("nv_inference_count") < batch[0].index("/") < batch[0].index("nv_inference_exec_count")
    )


def test_checker_rejects_what_triton_does_not_export():
    models = {"caption", "preprocess", "ofa"}
    assert check_query('rate(nv_inference_request_success{model="ofa"}[1m])', models) == []
    assert check_query("nv_gpu_utilization", models) == []
    assert check_query('rate(nv_inference_requests_total{model="ofa"}[1m])', models)  # made-up name
    assert check_query('rate(nv_inference_count{model="resnet"}[1m])', models)  # model not served
    assert check_query('sum by (modle) (rate(nv_inference_count{model="ofa"}[1m]))', models)  # typo
    assert check_query('nv_inference_queue_summary_us{model="ofa",quantile="0.99"}', models)  # needs a flag
    assert check_query("sum(rate(nv_inference_count[1m]))", models)  # ensemble and steps mixed
    with pytest.raises(ValueError):
        check_query("sum(rate(nv_inference_count[1m])", models)  # syntax error
    assert TRITON_GPU_METRICS <= TRITON_METRICS
