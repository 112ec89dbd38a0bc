#!/usr/bin/env bash
# Start a throw-away local PostgreSQL server for the storage tests and print the shell line that
# exports its URL:   eval "$(bash scripts/start_postgres.sh)"
# Installs Debian's postgresql package if the server binaries are missing. Listens on 127.0.0.1 only.
# Everything it prints to stdout is meant for eval; progress goes to stderr. When this call started the
# server, it also exports EMPAS_PG_STOP, the command that stops it again (scripts/test.sh runs it on exit).
set -euo pipefail
PORT=${EMPAS_PG_PORT:-55432}
DATA=${EMPAS_PG_DATA:-/tmp/empas-pg-$PORT}
find_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done
  command -v "$1" || true
}
if [ -z "$(find_bin initdb)" ]; then
  echo "installing postgresql (Debian package)..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
fi
INITDB=$(find_bin initdb); PG_CTL=$(find_bin pg_ctl)
if [ -z "$INITDB" ] || [ -z "$PG_CTL" ]; then
  echo "postgresql server binaries not found; PostgreSQL tests will be skipped" >&2
  exit 0
fi
RUN_AS=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  RUN_AS=(runuser -u postgres --)
fi
if ! "${RUN_AS[@]}" "$PG_CTL" -D "$DATA" status >/dev/null 2>&1; then
  rm -rf "$DATA"; mkdir -p "$DATA"
  if [ "$(id -u)" = 0 ]; then chown postgres "$DATA"; fi
  "${RUN_AS[@]}" "$INITDB" -D "$DATA" -U empas --auth=trust >/dev/null
  "${RUN_AS[@]}" "$PG_CTL" -D "$DATA" -l "$DATA/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $PORT -k /tmp -c max_connections=200 -c fsync=off" start >&2
  echo "export EMPAS_PG_STOP=$(printf %q "${RUN_AS[*]} $PG_CTL -D $DATA -m fast stop")"
fi
echo "export EMPAS_TEST_POSTGRES_URL=postgresql+psycopg://empas@127.0.0.1:$PORT/postgres"
