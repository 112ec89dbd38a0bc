#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), start a local PostgreSQL for the storage tests when one can be
# started (Debian package; skipped otherwise, and those tests skip), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
if pg_env=$(bash scripts/start_postgres.sh); then
  eval "$pg_env"
else
  echo "PostgreSQL could not be started: its tests will be skipped" >&2
fi
python -m pytest -q "$@"
