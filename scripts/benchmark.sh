#!/usr/bin/env bash
# The offline benchmark of EXPERIMENTS.md: every method x sparsities 0.99/0.995/0.999 x 3 seeds on the
# proxy task (configs/sweeps/benchmark.py), then EXPERIMENTS.md and its figure generated from the runs.
# Resumable: rerun the same command after an interruption. About an hour on 2 CPU cores.
#   bash scripts/benchmark.sh [SWEEPDIR]      (default workdirs/sweeps/benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-workdirs/sweeps/benchmark}"
PY="${PYTHON:-python}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/vpns_jax/jax_cache}"
mkdir -p "$DIR"
start=$(date +%s)
"$PY" -m vpns_jax.sweep --sweep configs/sweeps/benchmark.py --dir "$DIR"
end=$(date +%s)
# Wall time of this session's part of the sweep, added to earlier sessions' (a resumed sweep).
"$PY" - "$DIR" "$((end - start))" <<'PY'
import json, os, sys
path = os.path.join(sys.argv[1], "benchmark_time.json")
seconds = int(sys.argv[2])
if os.path.exists(path):
    with open(path) as f:
        seconds += json.load(f)["seconds"]
with open(path, "w") as f:
    json.dump({"seconds": seconds}, f)
PY
"$PY" -m vpns_jax.experiments_md --dir "$DIR" --out EXPERIMENTS.md
