#!/usr/bin/env bash
# Installs everything the agent and its demo need, on Debian 12+ as root (or with
# sudo); `setup.sh --test` adds what only the tests need (a headless browser).
# Safe to re-run: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc   # the agent's virtual environment
  mosquitto mosquitto-clients            # the embedded default broker and the test broker
  portaudio19-dev                        # PyAudio (microphones)
  openssl                                # device certificates
  systemd                                # systemd-analyze, to check the service unit
  fonts-noto-cjk                         # Chinese text on the panel, kiosk and dashboard pages
  espeak-ng                              # speech: the demo's spoken lesson, the tests' simulated rooms
)
if [ "${1:-}" = "--test" ]; then
  APT_PACKAGES+=(chromium coturn)        # headless browser for the web pages' tests; TURN relay test
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
