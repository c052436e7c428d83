#!/usr/bin/env bash
# The demo: a small fleet of classroom agents with synthetic media on an embedded
# Mosquitto, with their live capture stats. Extra arguments go to `classroom-agent demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/classroom-agent demo "$@"
