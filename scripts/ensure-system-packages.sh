#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real: AlertManager,
# Prometheus (and amtool), Chromium and its driver, and a PostgreSQL server
# when none is installed.
# Needs root for apt-get; without root it says what is missing and goes on.
set -euo pipefail

need=()
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# The board's browser test drives Debian's Chromium, never a downloaded one.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ -z "${TEST_DATABASE_URL:-}${DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  need+=(postgresql)
fi
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "ensure-system-packages: missing ${need[*]}; install them with: sudo apt-get install -y ${need[*]}" >&2
  exit 0
fi
echo "ensure-system-packages: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
# Services are started by the tests when they need them, never by the package.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.incident-response
had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
[ $had_policy = 0 ] && cp /usr/sbin/policy-rc.d.incident-response /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 || status=$?
[ $had_policy = 0 ] && rm -f /usr/sbin/policy-rc.d
rm -f /usr/sbin/policy-rc.d.incident-response
exit "${status:-0}"
