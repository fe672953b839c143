"""The Kubernetes manifests (``deploy/k8s``, a kustomize base with CPU and GPU overlays) stay in step with
the code: every setting they set is a real one and valid, the probes are the service's routes, the port,
grace period and resources fit ``clickrank serve``, and the rendered overlays pass the schemas of a pinned
Kubernetes version (``kubectl kustomize`` renders; CI has kubectl, and runs the same checks in
``scripts/lint-deploy.sh``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_contract import PREFIX, is_get_route, setting_names, settings_from, tool

from clickrank.cli import build_parser
from service.app import create_app
from service.server import GRACEFUL_SHUTDOWN_S
from service.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
"""The schemas the manifests are validated against (also in scripts/lint-deploy.sh)."""
OVERLAYS = ("cpu", "gpu")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base(kind: str) -> dict[str, Any]:
    (doc,) = [d for f in sorted((K8S / "base").glob("*.yaml")) for d in documents(f) if d["kind"] == kind]
    return doc


def overlay_patch(overlay: str, kind: str) -> dict[str, Any]:
    """The overlay's strategic-merge patch of ``kind`` ({} when it has none)."""
    kustomization = documents(K8S / "overlays" / overlay / "kustomization.yaml")[0]
    patches = [documents(K8S / "overlays" / overlay / p["path"])[0] for p in kustomization.get("patches", [])]
    return next((p for p in patches if p["kind"] == kind), {})


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def environment(overlay: str) -> dict[str, str]:
    """The container's CLICKRANK_* environment in ``overlay``: the ConfigMap (base, then the overlay's
    patch of its data) and the Secret."""
    settings = base("ConfigMap")["data"] | overlay_patch(overlay, "ConfigMap").get("data", {})
    return settings | base("Secret")["stringData"]


def resources(overlay: str) -> dict[str, dict[str, str]]:
    patched = overlay_patch(overlay, "Deployment")
    if patched:
        return container(patched)["resources"]
    return container(base("Deployment"))["resources"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_and_valid(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(overlay)
    assert set(env) <= setting_names(), f"unknown settings: {set(env) - setting_names()}"
    settings = settings_from(env, monkeypatch)  # raises on an invalid value or combination
    cpus = float(resources(overlay)["limits"]["cpu"])
    assert 1 <= settings.intra_op_threads <= cpus and settings.workers <= cpus
    if overlay == "gpu":
        # One worker per CPU of the pod, all sharing the GPU (docs/benchmarks.md, "GPU check": 3.4x one).
        assert settings.device == "cuda" and settings.workers == cpus
        assert resources("gpu")["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert settings.device == "cpu" and "nvidia.com/gpu" not in resources(overlay)["limits"]
    secret = base("Secret")["stringData"]
    assert set(secret) == {f"{PREFIX}API_KEYS", f"{PREFIX}LOG_HASH_KEY"}, "the secrets, and only them"
    assert not set(secret) & set(base("ConfigMap")["data"]), "a secret in the ConfigMap"


def test_probes_port_and_shutdown_fit_the_code() -> None:
    app = create_app(Settings())
    deployment = base("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    probes = {name: main[f"{name}Probe"]["httpGet"] for name in ("startup", "readiness", "liveness")}
    assert {name: probe["path"] for name, probe in probes.items()} == {
        "startup": "/healthz",
        # A Redis outage must not take every replica out of the Service: they answer `degraded`.
        "readiness": "/readyz?exclude=redis",
        "liveness": "/healthz",
    }
    assert all(is_get_route(app, probe["path"].partition("?")[0]) for probe in probes.values())
    readyz = app.openapi()["paths"]["/readyz"]["get"]
    assert "exclude" in {parameter["name"] for parameter in readyz["parameters"]}
    assert not is_get_route(app, "/no-such-probe")
    args = build_parser().parse_args(main["args"][1:])
    assert main["args"][0] == "clickrank" and args.command == "serve"
    (port,) = main["ports"]
    assert port["containerPort"] == args.port and port["name"] == "http"
    assert all(probe["port"] == "http" for probe in probes.values())
    assert base("Service")["spec"]["ports"][0]["targetPort"] == "http"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.port) and is_get_route(app, "/metrics")
    pre_stop_s = float(main["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + GRACEFUL_SHUTDOWN_S + 5, "no time to drain"
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert mounts["models"]["mountPath"] == base("ConfigMap")["data"][f"{PREFIX}MODEL_DIR"]
    assert mounts["models"]["readOnly"] is True and main["securityContext"]["readOnlyRootFilesystem"]
    assert base("ConfigMap")["data"][f"{PREFIX}METRICS_DIR"].startswith(mounts["tmp"]["mountPath"] + "/")
    env_from = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in main["envFrom"]}
    assert env_from == {
        "configMapRef": base("ConfigMap")["metadata"]["name"],
        "secretRef": base("Secret")["metadata"]["name"],
    }


def test_disruption_budget_and_autoscaler_select_the_deployment() -> None:
    kustomization = documents(K8S / "base" / "kustomization.yaml")[0]
    common = {k: v for entry in kustomization["labels"] for k, v in entry["pairs"].items()}
    assert all(entry["includeSelectors"] for entry in kustomization["labels"])
    assert base("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= common.items()
    target = base("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", base("Deployment")["metadata"]["name"])
    assert (
        base("HorizontalPodAutoscaler")["spec"]["minReplicas"]
        > base("PodDisruptionBudget")["spec"]["minAvailable"]
    ), "a drain would block forever"
    listed = set(kustomization["resources"])
    assert listed == {f.name for f in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_passes_the_pinned_schemas(overlay: str, tmp_path: Path) -> None:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (it renders the kustomization); CI runs it")
    import kubernetes_validate

    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget"}
    assert sorted(d["kind"] for d in docs) == sorted(kinds | {"HorizontalPodAutoscaler"})
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert container(deployment)["image"] == f"clickrank:{overlay}"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for doc in docs:
        selector = doc.get("spec", {}).get("selector", {})
        selector = selector.get("matchLabels", selector) if doc["kind"] != "Deployment" else selector
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            assert selector and selector.items() <= pod_labels.items(), doc["kind"]
    # Replicas spread over nodes: the constraint must select the deployment's own pods.
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway", "a replica must never stay pending for it"
    assert spread["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    rendered = {d["kind"]: d for d in docs}
    assert rendered["ConfigMap"]["data"] | rendered["Secret"]["stringData"] == environment(overlay)
    bad = dict(deployment, spec={**deployment["spec"], "replicas": "two"})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
