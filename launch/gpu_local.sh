#!/usr/bin/env bash
# One machine, all its GPUs: one process; jit shards each batch over every visible GPU.
#
#   bash launch/gpu_local.sh --config configs/cifar10.py:arch=resnet18 --workdir workdirs/c10_r18
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/gpu_local.sh --config ... --workdir ...   # a subset of GPUs
#
# Installs the project with its CUDA extra (`pip install -e .[cuda]`) into $VPNS_VENV the first time,
# and again whenever pyproject.toml changes; then runs `python -m vpns_jax.main "$@"`.
# Environment: VPNS_VENV (default ~/.venvs/vpns_jax-cuda), PYTHON (interpreter that creates the venv,
# default python3, needs >= 3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VPNS_VENV:-$HOME/.venvs/vpns_jax-cuda}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.vpns_jax_cuda_install"
WANT="$(cd "$ROOT" && sha256sum pyproject.toml | cut -d' ' -f1) $ROOT"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[gpu_local] installing vpns_jax[cuda] into $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "${ROOT}[cuda]"
  echo "$WANT" > "$STAMP"
fi

# Fail early and clearly when JAX cannot see a GPU (driver, CUDA_VISIBLE_DEVICES, wrong wheel).
if ! "$VENV/bin/python" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "[gpu_local] JAX sees no GPU (backend: $("$VENV/bin/python" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo '?'))." >&2
  echo "[gpu_local] Check nvidia-smi, CUDA_VISIBLE_DEVICES, or reinstall: rm -rf $VENV" >&2
  exit 1
fi

cd "$ROOT"
exec "$VENV/bin/python" -m vpns_jax.main "$@"
