#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), start a local PostgreSQL for the storage tests when one can be
# started (Debian package; skipped otherwise, and those tests skip), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# Stop what this script started (the PostgreSQL server), however pytest ends.
stop_started() { if [ -n "${EMPAS_PG_STOP:-}" ]; then eval "$EMPAS_PG_STOP" >/dev/null 2>&1 || true; fi; }
trap stop_started EXIT
if pg_env=$(bash scripts/start_postgres.sh); then
  eval "$pg_env"
else
  echo "PostgreSQL could not be started: its tests will be skipped" >&2
fi
python -m pytest -q "$@"
