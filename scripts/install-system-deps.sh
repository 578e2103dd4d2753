#!/usr/bin/env bash
# Installs the Debian packages iotfleet runs on (mosquitto, its clients, influxdb,
# and postgresql, which the registry tests start a throwaway cluster of, and
# chromium with a font, which the dashboard's browser tests drive, and jq, which the
# README's "Connect a device" walk-through uses and a test runs, and what the broker's
# device plugin compiles with at pip install: a C compiler, Mosquitto's plugin headers and OpenSSL's),
# only if something is missing. Idempotent; uses sudo when not root.
set -euo pipefail

DYNSEC=(/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so /usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so)
have_dynsec() { for f in "${DYNSEC[@]}"; do [ -f "$f" ] && return 0; done; return 1; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have_initdb() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

missing=()
have mosquitto && have_dynsec || missing+=(mosquitto)
have mosquitto_pub || missing+=(mosquitto-clients)
have influxd || missing+=(influxdb)
have_initdb || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
have jq || missing+=(jq)
have gcc || missing+=(gcc)
[ -f /usr/include/mosquitto_plugin.h ] || missing+=(mosquitto-dev)
[ -f /usr/include/mosquitto.h ] || missing+=(libmosquitto-dev)
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
[ -f /usr/include/stdio.h ] || missing+=(libc6-dev)

if [ ${#missing[@]} -eq 0 ]; then
  echo "==> system packages: mosquitto, mosquitto-clients, influxdb, postgresql, chromium, jq, the plugin build tools already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "error: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "==> installing system packages: ${missing[*]} (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Installing the packages starts their system services on the default ports
# (1883, 8086, 8088, 5432) where systemd runs. iotfleet starts its own broker,
# InfluxDB and (in tests) PostgreSQL; stop and disable the services this install just started.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for unit in mosquitto influxdb postgresql; do
    if printf '%s\n' "${missing[@]}" | grep -qx "${unit}"; then
      echo "==> disabling the system ${unit} service installed just now (iotfleet runs its own)"
      $SUDO systemctl disable --now "${unit}" >/dev/null 2>&1 || true
    fi
  done
fi
echo "==> system packages installed"
