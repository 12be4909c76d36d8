#!/usr/bin/env bash
# Run a command with a CPU allocator setup that keeps XLA's per-step temporaries in memory:
# 5-15% faster JAX steps on CPU (BENCHMARKS.md, "Allocator"). XLA allocates a step's temporaries on
# every execution; glibc hands large blocks back to the OS, so each step page-faults them in again,
# 4 KiB at a time.
#   VPNS_MALLOC=auto (default): jemalloc if installed (apt-get install libjemalloc2), else glibc
#   VPNS_MALLOC=jemalloc:       jemalloc without decay (the steadiest on the benchmark machine)
#   VPNS_MALLOC=glibc:          glibc's transparent-huge-page tunable (glibc >= 2.35, nothing to install)
# Usage: bash scripts/fast_malloc.sh python -m vpns_jax.main --config ...
set -euo pipefail
mode="${VPNS_MALLOC:-auto}"
if [ "$mode" != glibc ]; then
  for lib in /usr/lib/*-linux-gnu/libjemalloc.so.2 /usr/lib/libjemalloc.so.2; do
    if [ -e "$lib" ]; then
      export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
      export MALLOC_CONF="${MALLOC_CONF:-dirty_decay_ms:-1,muzzy_decay_ms:-1}"
      exec "$@"
    fi
  done
  [ "$mode" = jemalloc ] && echo "fast_malloc.sh: libjemalloc2 is not installed (apt-get install libjemalloc2); using glibc's huge pages" >&2
fi
export GLIBC_TUNABLES="glibc.malloc.hugetlb=1${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
exec "$@"
