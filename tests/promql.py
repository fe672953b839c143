"""What the alert rules and the dashboard ask of the service, checked against a running app: the series
their PromQL selects, and the labels and routes it matches on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from helpers import app_settings, running_app
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from service import metrics

SELECTOR = re.compile(r"(clickrank_[a-z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
TARGET_LABELS = frozenset({"instance", "job"})
"""Labels Prometheus adds to every scraped series (the dashboard filters by replica on ``instance``)."""


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(sample name, [(label, operator, value)]) of every clickrank series selector in ``expr``."""
    return [(name, MATCHER.findall(matchers or "")) for name, matchers in SELECTOR.findall(expr)]


def label_names() -> dict[str, tuple[str, ...]]:
    """Each exported family's label names, from the service's metric objects."""
    found = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    return {m._name: tuple(m._labelnames) for m in found}  # where prometheus_client keeps them


async def exported(redis_url: str, model_dir: Path, item_ids: list[str]) -> tuple[str, set[str]]:
    """(``/metrics`` of a running app after one predict, the app's route paths)."""
    async with running_app(app_settings(redis_url, model_dir)) as (client, app):
        answer = await client.post("/v1/predict", json={"user_id": "promql", "candidates": item_ids[:5]})
        assert answer.status_code == 200
        return (await client.get("/metrics")).text, set(app.openapi()["paths"])


def check_selectors(where: str, expr: str, exposition: str, routes: set[str]) -> None:
    """Every series ``expr`` selects is on ``/metrics`` (``exposition``) with the labels it matches on, and
    every route it names matches a route of the app."""
    family_of = {  # sample name → its family's name
        f.name + suffix: f.name
        for f in text_string_to_metric_families(exposition)
        for suffix in SAMPLE_SUFFIXES.get(f.type, ("",))
    }
    labels = label_names()
    for name, matchers in selectors(expr):
        assert name in family_of, f"{where}: {name} is not on /metrics"
        family = family_of[name]
        for label, operator, value in matchers:
            known = label in labels[family] or label == "le" or label in TARGET_LABELS
            assert known, f"{where}: {family} has no label {label}"
            if label == "route":
                regex = value if "~" in operator else re.escape(value)
                matching = {r for r in routes if re.fullmatch(regex, r)}
                assert matching, f"{where}: route {value!r} matches no route of the app"


def promtool_check_expressions(exprs: dict[str, str], tmp_path: Path) -> None:
    """``promtool check rules`` on the expressions as recording rules: each parses as PromQL."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    rules = {"groups": [{"name": "check", "rules": [{"record": r, "expr": e} for r, e in exprs.items()]}]}
    path = tmp_path / "expressions.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
