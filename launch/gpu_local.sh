#!/usr/bin/env bash
# One machine, all its GPUs: one process; jit shards each batch over every visible GPU.
#
#   bash launch/gpu_local.sh --config configs/cifar10.py:arch=resnet18 --workdir workdirs/c10_r18
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/gpu_local.sh --config ... --workdir ...   # a subset of GPUs
#   bash launch/gpu_local.sh --dry-run --config ... --workdir ...   # print the commands, run none
#
# Installs the project with its CUDA extra (`pip install -e .[cuda]`) into $VPNS_VENV the first time,
# and again whenever pyproject.toml changes; then runs `python -m vpns_jax.main "$@"` in the directory
# you called it from, so relative paths (--workdir, a --config file) mean what they say there.
# Environment: VPNS_VENV (default ~/.venvs/vpns_jax-cuda), PYTHON (interpreter that creates the venv,
# default python3, needs >= 3.11), DRY_RUN=1 (same as --dry-run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VPNS_VENV:-$HOME/.venvs/vpns_jax-cuda}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.vpns_jax_cuda_install"
DRY_RUN="${DRY_RUN:-0}"
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi

# x CMD ARGS...: run a command, or with DRY_RUN=1 print it (shell-quoted, one line, prefixed '+ ').
x() {
  if [ "$DRY_RUN" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $ROOT"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[gpu_local] installing vpns_jax[cuda] into $VENV" >&2
  x mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || x "$PYTHON" -m venv "$VENV"
  x "$VENV/bin/python" -m pip install -q --upgrade pip
  x "$VENV/bin/python" -m pip install -q -e "${ROOT}[cuda]"
  if [ "$DRY_RUN" = 1 ]; then echo "+ echo '$WANT' > $STAMP"; else echo "$WANT" > "$STAMP"; fi
fi

# Fail early and clearly when JAX cannot see a GPU (driver, CUDA_VISIBLE_DEVICES, wrong wheel).
GPU_CHECK='import jax, sys; sys.exit(jax.default_backend() != "gpu")'
if [ "$DRY_RUN" = 1 ]; then
  x "$VENV/bin/python" -c "$GPU_CHECK"
elif ! "$VENV/bin/python" -c "$GPU_CHECK"; then
  echo "[gpu_local] JAX sees no GPU (backend: $("$VENV/bin/python" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo '?'))." >&2
  echo "[gpu_local] Check nvidia-smi, CUDA_VISIBLE_DEVICES, or reinstall: rm -rf $VENV" >&2
  exit 1
fi

# No cd: the editable install finds the package from any directory, and the caller's relative paths stay
# relative to the caller's directory.
if [ "$DRY_RUN" = 1 ]; then x "$VENV/bin/python" -m vpns_jax.main "$@"; exit 0; fi
exec "$VENV/bin/python" -m vpns_jax.main "$@"
