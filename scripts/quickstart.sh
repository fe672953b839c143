#!/usr/bin/env bash
# From a fresh machine to a running service with real histories loaded:
#   venv + install → train + export the model if ./artifacts has none → a local redis-server if none
#   answers → load MovieLens histories → serve on http://127.0.0.1:8000.
# Environment: CLICKRANK_DATA_DIR (default ../shared/data/ml-100k; clickrank reads it), CLICKRANK_MODEL_DIR
# (./artifacts), CLICKRANK_REDIS_URL (redis://127.0.0.1:6379/0), PORT (8000).
set -euo pipefail
cd "$(dirname "$0")/.."
export CLICKRANK_MODEL_DIR=${CLICKRANK_MODEL_DIR:-./artifacts}
export CLICKRANK_REDIS_URL=${CLICKRANK_REDIS_URL:-redis://127.0.0.1:6379/0}
PORT=${PORT:-8000}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server missing: installing it (needs root)"; apt-get update -qq && apt-get install -y -qq redis-server
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --constraint constraints.txt -e ".[cpu,train,dev]"

if [ ! -f "$CLICKRANK_MODEL_DIR/manifest.json" ] && [ ! -f "$CLICKRANK_MODEL_DIR/current" ]; then
  echo "no model in $CLICKRANK_MODEL_DIR: training one (6 to 13 minutes on 2 cores)"
  clickrank train --model-dir "$CLICKRANK_MODEL_DIR"
fi

hostport=${CLICKRANK_REDIS_URL#redis://}; hostport=${hostport%%/*}
if ! redis-cli -h "${hostport%%:*}" -p "${hostport##*:}" ping >/dev/null 2>&1; then
  echo "no Redis answers at $CLICKRANK_REDIS_URL: starting a local redis-server"
  redis-server --daemonize yes --port "${hostport##*:}" --bind 127.0.0.1 --appendonly yes --dir "$(mktemp -d)"
  sleep 0.5
fi

clickrank load-history
exec clickrank serve --host 127.0.0.1 --port "$PORT"
