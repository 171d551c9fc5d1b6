#!/usr/bin/env bash
# Debian packages the tests run for real: Prometheus (with promtool), Alertmanager (with amtool),
# and Chromium (headless: tests/experiment opens `karn report` pages in it).
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 && command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The packages' own services are not wanted: the tests start the binaries on loopback.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
