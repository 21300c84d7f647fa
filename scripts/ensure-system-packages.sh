#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real: AlertManager,
# Prometheus (and amtool, promtool), Chromium and its driver, podman, runc
# and mmdebstrap for the image test (unless a docker daemon answers),
# PgBouncer, wrk (for `make bench`), and a PostgreSQL server when none is
# installed.
# Needs root for apt-get. It exits non-zero, naming what is missing, when an
# installation fails or leaves a binary missing; without root it does the
# same under CI=true, and elsewhere only warns (those tests then skip).
set -euo pipefail

missing() {
  local out=()
  command -v prometheus-alertmanager >/dev/null 2>&1 || command -v alertmanager >/dev/null 2>&1 || out+=(prometheus-alertmanager)
  command -v amtool >/dev/null 2>&1 || out+=(prometheus-alertmanager)
  command -v prometheus >/dev/null 2>&1 || out+=(prometheus)
  # promtool checks and unit-tests the shipped alert rules; Debian ships it with prometheus.
  command -v promtool >/dev/null 2>&1 || out+=(prometheus)
  # The image test builds and runs the image: podman (with runc) unless a
  # docker daemon answers, and mmdebstrap for a base image from Debian
  # packages when no registry is reachable.
  if ! { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }; then
    command -v podman >/dev/null 2>&1 || out+=(podman)
    command -v runc >/dev/null 2>&1 || out+=(runc)
    command -v mmdebstrap >/dev/null 2>&1 || out+=(mmdebstrap)
  fi
  # The board's browser test drives Debian's Chromium, never a downloaded one.
  command -v chromium >/dev/null 2>&1 || out+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || out+=(chromium-driver)
  # PgBouncer (transaction pooling) for the tests and the bench's scale-out
  # scenario; wrk, the bench's HTTP load generator.
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || out+=(pgbouncer)
  command -v wrk >/dev/null 2>&1 || out+=(wrk)
  if [ -z "${TEST_DATABASE_URL:-}${DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    out+=(postgresql)
  fi
  [ ${#out[@]} -eq 0 ] || printf '%s\n' "${out[@]}" | sort -u | tr '\n' ' '
}

fail() {
  echo "ensure-system-packages: ERROR: $*" >&2
  exit 1
}

case "${CI:-}" in 1|true|TRUE|True|yes) ci=1 ;; *) ci=0 ;; esac

need=$(missing)
[ -z "$need" ] && exit 0

if [ "$(id -u)" != 0 ]; then
  message="missing $need; install them with: sudo apt-get install -y $need"
  [ $ci = 1 ] && fail "$message(CI=true: a missing dependency is a failure)"
  echo "ensure-system-packages: WARNING: $message(the tests that need them will skip)" >&2
  exit 0
fi
echo "ensure-system-packages: installing $need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || fail "apt-get update failed"
# Services are started by the tests when they need them, never by the package.
policy=${POLICY_RC_D:-/usr/sbin/policy-rc.d}
had_policy=0; [ -e "$policy" ] && had_policy=1
if [ $had_policy = 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
fi
status=0
# shellcheck disable=SC2086 # one word per package
apt-get install -y -qq --no-install-recommends $need >&2 || status=$?
[ $had_policy = 0 ] && rm -f "$policy"
[ $status = 0 ] || fail "apt-get install $need failed with status $status"
still=$(missing)
[ -z "$still" ] || fail "installed, yet still missing: $still"
