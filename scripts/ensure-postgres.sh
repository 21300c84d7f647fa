#!/usr/bin/env bash
# Makes sure the tests can reach a PostgreSQL server and prints its admin URL
# (postgresql+pg8000://...) on stdout. TEST_DATABASE_URL or DATABASE_URL win;
# otherwise the local server on 127.0.0.1:5432 is used, started if stopped.
set -euo pipefail
PY="${PYTHON:-.venv/bin/python}"

if [ -n "${TEST_DATABASE_URL:-}" ]; then echo "$TEST_DATABASE_URL"; exit 0; fi
if [ -n "${DATABASE_URL:-}" ]; then echo "$DATABASE_URL"; exit 0; fi

try_url() {
  "$PY" - "$1" <<'PYEOF' >/dev/null 2>&1
import sys
from shared.db import create_engine_for
import sqlalchemy as sa
eng = create_engine_for(sys.argv[1], pool_size=1, max_overflow=0, timeout=3)
with eng.connect() as c:
    c.execute(sa.text("SELECT 1"))
PYEOF
}

TRUST_URL="postgresql+pg8000://postgres@127.0.0.1:5432/postgres"
PASSWORD_FILE=".run/test-postgres-password"
password_url() { echo "postgresql+pg8000://postgres:$(cat "$PASSWORD_FILE")@127.0.0.1:5432/postgres"; }

if try_url "$TRUST_URL"; then echo "$TRUST_URL"; exit 0; fi
if [ -s "$PASSWORD_FILE" ] && try_url "$(password_url)"; then password_url; exit 0; fi

if command -v pg_lsclusters >/dev/null 2>&1; then
  cluster=$(pg_lsclusters --no-header 2>/dev/null | awk '$3 == 5432 {print $1" "$2; exit}')
  if [ -z "$cluster" ] && [ "$(id -u)" = 0 ] && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    echo "ensure-postgres: creating cluster $version/main on port 5432" >&2
    pg_createcluster --port 5432 "$version" main >&2
    cluster="$version main"
  fi
  if [ -n "$cluster" ]; then
    echo "ensure-postgres: starting PostgreSQL cluster $cluster" >&2
    pg_ctlcluster --skip-systemctl-redirect $cluster start >&2 || true
    for _ in $(seq 1 30); do
      pg_isready -q -h 127.0.0.1 -p 5432 && break
      sleep 0.5
    done
  fi
fi

if try_url "$TRUST_URL"; then echo "$TRUST_URL"; exit 0; fi
# A fresh Debian cluster wants a password over TCP: give the postgres role a
# random one, kept in .run/ (ignored by git), rather than loosening pg_hba.
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
  mkdir -p .run
  [ -s "$PASSWORD_FILE" ] || "$PY" -c 'import secrets; print(secrets.token_hex(16))' > "$PASSWORD_FILE"
  runuser -u postgres -- psql -q -c "ALTER ROLE postgres PASSWORD '$(cat "$PASSWORD_FILE")'" >&2
  if try_url "$(password_url)"; then password_url; exit 0; fi
fi
echo "ensure-postgres: no PostgreSQL reachable on 127.0.0.1:5432; set TEST_DATABASE_URL" >&2
exit 1
