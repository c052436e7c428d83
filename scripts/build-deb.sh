#!/usr/bin/env bash
# Builds dist/classroom-agent_VERSION_ARCH.deb from this checkout, with dpkg-deb alone.
#
#   scripts/build-deb.sh [OUT_DIR]        (default OUT_DIR: dist/)
#
# The agent and every Python dependency are installed at build time into their own
# virtual environment, /opt/classroom-agent/.venv inside the package: installing the .deb
# on a classroom PC then needs no network and no pip (rural links are slow and schools
# filter them), postinst only creates the account, and the bytes that were tested are
# the bytes that run. pip fetches the dependencies through its configured index (or its
# cache) on the build machine only.
#
# Environment:
#   PYTHON       the interpreter the package runs on (default /usr/bin/python3, Debian's):
#                the virtual environment points at it, so it must be the target's.
#   BUILD_PYTHON a Python with pip and setuptools>=77 that builds the wheel and installs
#                into the package (default .venv/bin/python, from scripts/setup.sh).
#   DEB_COMPRESS dpkg-deb compressor (default zstd, fast; xz for the smallest download).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$(realpath -m "${1:-dist}")
PYTHON=${PYTHON:-/usr/bin/python3}
BUILD_PYTHON=${BUILD_PYTHON:-$REPO/.venv/bin/python}
DEB_COMPRESS=${DEB_COMPRESS:-zstd}

PREFIX=/opt/classroom-agent
VENV=$PREFIX/.venv
SHARE=/usr/share/classroom-agent

VERSION=$("$BUILD_PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
PY_VERSION=$("$PYTHON" -c 'import sys; print(f"python{sys.version_info.major}.{sys.version_info.minor}")')
if [ "$PY_VERSION" != python3.11 ]; then
  # The control file's Depends and the compiled wheels are for the target's Python.
  echo "build-deb: $PYTHON is $PY_VERSION; the package is built for Debian 12's python3.11" >&2
  exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

echo "build-deb: wheel"
# From a clean copy: setuptools reuses build/, so a stale tree could leak old files in.
mkdir "$WORK/src"
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
  --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' --exclude=artifacts \
  -cf - . | tar -C "$WORK/src" -xf -
"$BUILD_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --no-index \
  --wheel-dir "$WORK/wheel" "$WORK/src"
WHEEL=$(echo "$WORK"/wheel/classroom_edge_agent-*.whl)

echo "build-deb: virtual environment $VENV"
"$PYTHON" -m venv --without-pip "$ROOT$VENV"
# No pip inside: nothing on the device installs into the agent's environment. Not
# byte-compiled by pip: the .pyc files would record the build directory as their path.
"$BUILD_PYTHON" -m pip --python "$ROOT$VENV/bin/python" install --quiet --no-compile \
  --disable-pip-version-check "$WHEEL"
# The environment was made under $ROOT: its scripts and pyvenv.cfg name that path.
grep -rlI --null -F "$ROOT" "$ROOT$VENV/bin" "$ROOT$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s#$ROOT##g"
rm -f "$ROOT$VENV"/bin/activate.csh "$ROOT$VENV"/bin/activate.fish "$ROOT$VENV"/bin/Activate.ps1
# .pyc files shipped in the package (the service cannot write them: ProtectSystem=strict),
# compiled for the paths they are installed at, with dpkg keeping their timestamps.
"$PYTHON" -m compileall -q -j 0 -s "$ROOT" "$ROOT$VENV/lib" >/dev/null
if leftover=$(grep -rlI -F "$ROOT" "$ROOT$VENV" | head -5) && [ -n "$leftover" ]; then
  echo "build-deb: the build directory is still named in: $leftover" >&2
  exit 1
fi

echo "build-deb: files"
install -d "$ROOT/usr/bin" "$ROOT/usr/sbin" "$ROOT$SHARE" "$ROOT/etc/classroom-agent" \
  "$ROOT/lib/systemd/system" "$ROOT/usr/lib/systemd/user" "$ROOT/var/lib/classroom-agent" \
  "$ROOT$PREFIX/docs" "$ROOT/usr/share/doc/classroom-agent"
ln -s "$VENV/bin/classroom-agent" "$ROOT/usr/bin/classroom-agent"
# Root's way to run the sensing commands with the service's account and key.
install -m 0755 packaging/classroom-agent-admin "$ROOT/usr/sbin/"
# The agent looks here first (agent/config/profiles.py: SYSTEM_PROFILES); a kit added
# to this folder on one PC needs no new package.
cp -r firmware-profiles "$ROOT$SHARE/firmware-profiles"
cp -r schemas broker "$ROOT$SHARE/"
install -m 0644 examples/agent.yaml "$ROOT/etc/classroom-agent/agent.yaml"
install -m 0644 systemd/classroom-agent.service "$ROOT/lib/systemd/system/"
install -m 0644 systemd/classroom-kiosk.service "$ROOT/usr/lib/systemd/user/"
install -m 0644 docs/*.md "$ROOT$PREFIX/docs/"   # the kiosk unit's Documentation=
install -m 0644 README.md "$ROOT/usr/share/doc/classroom-agent/"

install -d "$ROOT/DEBIAN"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" \
  packaging/debian/control.in >"$ROOT/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$ROOT/DEBIAN/"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$ROOT/DEBIAN/"

mkdir -p "$OUT"
DEB=$OUT/classroom-agent_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Z"$DEB_COMPRESS" --build "$ROOT" "$DEB" >/dev/null
echo "build-deb: $DEB ($(du -h "$DEB" | cut -f1), $((SIZE / 1024)) MiB installed)"
