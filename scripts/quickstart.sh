#!/usr/bin/env bash
# One command on a fresh machine: set up, get the offline data, run the quickstart, print the table.
# Usage: bash scripts/quickstart.sh [extra --config.x=v flags]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VPNS_VENV:-.venv}"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist
  else
    echo "Fashion-MNIST is missing: install Debian's package as root: apt-get install dataset-fashion-mnist" >&2
    echo "(or put the four IDX .gz files in a folder and pass --config.manual_dir=... )" >&2
    exit 1
  fi
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/python" -m vpns_jax.main --config configs/quickstart.py \
  --workdir "${WORKDIR:-workdirs/quickstart}" "$@"
