#!/usr/bin/env bash
# Install everything nbdqcow needs on a Debian machine (as root): the reference
# tools the tests compare against, and a venv (.venv) with the package + dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS="qemu-utils libnbd-bin python3-libnbd nbd-client nbdkit fio gnutls-bin e2fsprogs fuse3 python3-venv python3-pip python3-numpy"
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing apt packages:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
# Debian's interpreter: PGO build, and it sees python3-libnbd through system site-packages.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
# (re)install when the venv is missing or pyproject.toml changed since the last install
STAMP=.venv/.nbdqcow-pyproject.sha256
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] \
   || ! .venv/bin/python -c 'import nbdqcow, pytest' 2>/dev/null; then
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    $PY -m venv --system-site-packages .venv
  fi
  echo "setup: installing nbdqcow and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$WANT" > "$STAMP"
fi
