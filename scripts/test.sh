#!/usr/bin/env bash
# The test command: installs what a fresh machine lacks (redis-server, the venv), lints, runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k api`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server (the tests start their own on a free port)"
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --constraint constraints.txt -e ".[cpu,train,dev]"  # the versions CI tested

ruff check .
ruff format --check .
python -m pytest -q "$@"
