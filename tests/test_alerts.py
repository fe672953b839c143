"""deploy/prometheus and deploy/alertmanager in step with the service: every metric and label an alert reads
is one a running app exports (real Redis, real exported model), every route it names is a route of the
app, the compose file's Prometheus loads the rules, scrapes the service and sends its alerts to the compose
Alertmanager, which routes each alert's severity to a receiver of its own; config and rules pass
``promtool check config`` and the rules' unit tests (``alerts.test.yaml``), and the Alertmanager's routes
``amtool``, where those are installed (CI installs them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from promql import check_selectors, exported, selectors

from service.middleware import MODEL_ROUTES, SHED_REASONS
from service.model_reload import COUNTED
from service.redis_conn import REDIS_OPS
from service.routes.events import DUPLICATE, STORED

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yaml"
CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_is_documented_and_labelled() -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    doc = (REPO / "docs" / "operations.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is not in docs/operations.md, Alerts"


@pytest.mark.anyio
async def test_alerts_read_what_the_service_exports(
    redis_url: str, model_dir: Path, catalog: list[str]
) -> None:
    exposition, routes = await exported(redis_url, model_dir, catalog)
    names = {name for rule in alert_rules() for name, _ in selectors(rule["expr"])}
    assert names >= {"clickrank_requests_total", "clickrank_request_seconds_bucket"}
    for rule in alert_rules():
        check_selectors(rule["alert"], rule["expr"], exposition, routes)


def test_labelled_counters_an_alert_or_panel_reads_exist_from_start_up() -> None:
    """At 0 in a fresh process that has answered nothing, so that ``increase()`` sees the first one and a
    panel shows 0, not no data: reloads by outcome, degraded answers by route, sheds by reason, events by
    result, Redis errors by operation."""
    code = "import service.app; from service.metrics import exposition; print(exposition().decode())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    expected = [f'clickrank_model_reloads_total{{outcome="{outcome}"}} 0.0' for outcome in COUNTED]
    expected += [f'clickrank_degraded_total{{route="{route}"}} 0.0' for route in sorted(MODEL_ROUTES)]
    expected += [f'clickrank_shed_total{{reason="{reason}"}} 0.0' for reason in SHED_REASONS]
    expected += [f'clickrank_events_total{{result="{result}"}} 0.0' for result in (STORED, DUPLICATE)]
    expected += [f'clickrank_redis_errors_total{{op="{op}"}} 0.0' for op in REDIS_OPS]
    for sample in expected:
        assert sample in done.stdout.splitlines(), sample


def _mounted_config(service: dict) -> Path:
    """The host file a compose service reads as its ``--config.file``."""
    mounted = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    config_path = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    folder, name = config_path.rsplit("/", 1)
    return (REPO / mounted[folder]).resolve() / name


def test_compose_prometheus_scrapes_clickrank_with_the_rules() -> None:
    """The compose file's Prometheus (profile ``monitoring``) reads this folder's config, which loads the
    rules and scrapes the CPU service on its container port."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    prometheus, clickrank = services["prometheus"], services["clickrank"]
    assert prometheus["profiles"] == ["monitoring"] and not clickrank.get("profiles")
    assert _mounted_config(prometheus) == CONFIG
    config = yaml.safe_load(CONFIG.read_text())
    assert [CONFIG.parent / f for f in config["rule_files"]] == [RULES]
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    container_port = clickrank["ports"][0].split(":")[1]
    assert targets == [f"clickrank:{container_port}"]


def test_the_job_an_alert_names_is_the_one_scraped() -> None:
    """``up{job=...}`` names the compose Prometheus's scrape job, which is also the Kubernetes Service's name
    (the Prometheus Operator's default job label)."""
    jobs = {job for rule in alert_rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert jobs, "no alert watches the scrape itself (up)"
    config = yaml.safe_load(CONFIG.read_text())
    service = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "service.yaml").read_text())
    assert jobs == {job["job_name"] for job in config["scrape_configs"]} == {service["metadata"]["name"]}


def test_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); CI runs it")
    for command in (["check", "config", str(CONFIG)], ["test", "rules", str(RULE_TESTS)]):
        done = subprocess.run([promtool, *command], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_compose_prometheus_sends_its_alerts_to_the_compose_alertmanager() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    alertmanager = services["alertmanager"]
    assert alertmanager["profiles"] == ["monitoring"]
    assert _mounted_config(alertmanager) == ALERTMANAGER
    assert "alertmanager" in services["prometheus"]["depends_on"]
    config = yaml.safe_load(CONFIG.read_text())
    targets = [
        t for am in config["alerting"]["alertmanagers"] for c in am["static_configs"] for t in c["targets"]
    ]
    container_port = alertmanager["ports"][0].split(":")[1]
    assert targets == [f"alertmanager:{container_port}"]


def test_inhibitions_name_real_alerts() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    config = yaml.safe_load(ALERTMANAGER.read_text())
    named = [
        re.fullmatch(r'alertname="(\w+)"', matcher)
        for rule in config["inhibit_rules"]
        for matcher in (*rule["source_matchers"], *rule["target_matchers"])
    ]
    assert named and all(m is not None and m.group(1) in names for m in named)


def test_every_alert_reaches_the_receiver_of_its_severity() -> None:
    """Each alert of the rules, with its own labels, is routed to the receiver named after its severity
    (``page`` or ``ticket``), by ``amtool config routes test`` on the compose Alertmanager's file."""
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (apt-get install prometheus-alertmanager); CI runs it")
    done = subprocess.run([amtool, "check-config", str(ALERTMANAGER)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    severities = set()
    for rule in alert_rules():
        severity = rule["labels"]["severity"]
        severities.add(severity)
        labels = [f"alertname={rule['alert']}", *(f"{k}={v}" for k, v in rule["labels"].items())]
        command = [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.split() == [severity], done.stdout + done.stderr
    assert severities == {"page", "ticket"}
