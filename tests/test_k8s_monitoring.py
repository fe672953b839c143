"""The Prometheus Operator component (``deploy/k8s/components/monitoring``) in step with the rest: its
PrometheusRule holds ``deploy/prometheus/alerts.yaml``'s groups and its dashboard ConfigMap the Grafana
dashboard (both files generated from those, never edited by hand), its ServiceMonitor scrapes the
Service's port at the service's metrics route, and the overlay that uses it renders and passes the
pinned schemas (the built-in kinds; kubernetes-validate has no schema for the operator's).

``python -m tests.test_k8s_monitoring`` rewrites the two generated files after a change to the rules or
the dashboard: run that way, the test helpers are not importable, so the tests import them inside."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPONENT = REPO / "deploy" / "k8s" / "components" / "monitoring"
OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "cpu-monitoring"
RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "clickrank.json"
GENERATED = "# Generated from {source} by `python -m tests.test_k8s_monitoring`: do not edit.\n"
SIDECAR_LABEL = {"grafana_dashboard": "1"}
"""What Grafana's dashboard sidecar (kube-prometheus-stack's default) picks a ConfigMap up by."""


def indented(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


def prometheus_rule() -> str:
    """alerts.yaml's ``groups:`` (comments and layout kept) as the ``spec`` of a PrometheusRule."""
    text = RULES.read_text()
    groups = text[text.index("\ngroups:") + 1 :]
    header = GENERATED.format(source=RULES.relative_to(REPO))
    manifest = "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\n"
    manifest += "metadata:\n  name: clickrank\nspec:\n"
    return header + manifest + indented(groups, 2)


def dashboard_config_map() -> str:
    header = GENERATED.format(source=DASHBOARD.relative_to(REPO))
    labels = "".join(f'    {k}: "{v}"\n' for k, v in SIDECAR_LABEL.items())
    return (
        header
        + "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: clickrank-dashboard\n  labels:\n"
        + labels
        + f"data:\n  {DASHBOARD.name}: |\n"
        + indented(DASHBOARD.read_text(), 4)
    )


GENERATED_FILES = {"prometheusrule.yaml": prometheus_rule, "dashboard.yaml": dashboard_config_map}


@pytest.mark.parametrize("name", sorted(GENERATED_FILES))
def test_generated_files_are_current(name: str) -> None:
    assert (COMPONENT / name).read_text() == GENERATED_FILES[name](), (
        f"{name} is stale: run python -m tests.test_k8s_monitoring"
    )


def rendered() -> dict[str, list[dict[str, Any]]]:
    from deploy_contract import tool

    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (it renders the kustomization); CI runs it")
    text = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True)
    docs: dict[str, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all(text.stdout):
        if doc:
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def test_the_component_renders_the_rules_the_dashboard_and_the_scrape() -> None:
    import kubernetes_validate
    from deploy_contract import is_get_route
    from test_k8s import KUBERNETES_VERSION

    from service.app import create_app
    from service.settings import Settings

    docs = rendered()
    (rule,) = docs["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    (dashboard,) = [c for c in docs["ConfigMap"] if c["metadata"]["name"] == "clickrank-dashboard"]
    assert dashboard["metadata"]["labels"].items() >= SIDECAR_LABEL.items()
    assert json.loads(dashboard["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
    # The scrape: the Service the ServiceMonitor selects, its named port, the service's metrics route.
    (monitor,) = docs["ServiceMonitor"]
    (service,) = docs["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert is_get_route(create_app(Settings()), endpoint["path"])
    # ClickrankDown watches up{job="clickrank"}: the operator names the job after the Service.
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert any(f'up{{job="{service["metadata"]["name"]}"}}' in expr for expr in exprs)
    for kind, found in docs.items():
        if kind not in ("ServiceMonitor", "PrometheusRule"):
            for doc in found:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


if __name__ == "__main__":
    for file_name, generate in GENERATED_FILES.items():
        (COMPONENT / file_name).write_text(generate(), encoding="utf-8")
