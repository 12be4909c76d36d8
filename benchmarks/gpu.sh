#!/usr/bin/env bash
# GPU model-step benchmark: ResNet-18 and ResNet-50 at 224 px, JAX fp32 and bf16 vs PyTorch fp32 eager
# and bf16 autocast, with MFU and peak device memory. One command, from the repository root:
#
#   bash benchmarks/gpu.sh            # batch 256; BATCH=128 bash benchmarks/gpu.sh if it does not fit
#
# Needs jax[cuda12], flax, optax and torch with CUDA (preinstalled on the project's GPU machines;
# `pip install -e .[cuda]` otherwise). Each configuration is one `python -m benchmarks.step` run; its last
# output line is a JSON record (images/s per step, jax_over_torch, mfu, peak_device_bytes,
# torch_peak_device_bytes, compile_s). All records are collected in ${OUT:-.}/gpu_step.jsonl.
# The pair (JAX dtype, torch autocast) is (float32, none) and (bfloat16, bfloat16). JAX fp32 on H100
# uses TF32 matmuls (its default precision), as does torch only with allow_tf32; both are reported as is.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${BATCH:-256}"
ARCHS="${ARCHS:-resnet18 resnet50}"
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_step.jsonl"
: > "$LOG"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/vpns_jax/jax_cache}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"  # leave room for torch
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for arch in $ARCHS; do
  for pair in "float32 none" "bfloat16 bfloat16"; do
    set -- $pair
    echo "=== $arch 224px batch $BATCH jax=$1 torch_autocast=$2"
    python -m benchmarks.step --arch "$arch" --size 224 --batch "$BATCH" --dtype "$1" \
      --torch-autocast "$2" --compare-torch --warmup 3 --repeats 10 | tee "$OUT_DIR/.last_step.txt"
    tail -n 1 "$OUT_DIR/.last_step.txt" >> "$LOG"
  done
done
rm -f "$OUT_DIR/.last_step.txt"
echo "records: $LOG"
