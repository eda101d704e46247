#!/usr/bin/env bash
# Make sure promtool (Prometheus's rule checker) is at hand for the tests of ops/prometheus/.
# Uses one on the PATH; otherwise takes the binary out of Debian's `prometheus` package into the
# venv (apt-get download + dpkg-deb: no Prometheus server is installed or started).
set -euo pipefail
VENV=${VENV:-.venv}

if command -v promtool >/dev/null || [ -x "$VENV/bin/promtool" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "promtool is missing and there is no apt-get here: install Prometheus's promtool on the PATH" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
  # The package lists may be missing (a fresh container): refresh them once, as root.
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
  else
    sudo apt-get update -qq
  fi
  apt-get download prometheus >/dev/null
fi
dpkg-deb -x prometheus_*.deb extracted
cd - >/dev/null
install -m 0755 "$work/extracted/usr/bin/promtool" "$VENV/bin/promtool"
"$VENV/bin/promtool" --version | head -n1
