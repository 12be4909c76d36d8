"""Keep XLA's per-step temporaries in memory on CPU: glibc malloc settings applied in-process.

XLA's CPU runtime allocates a step's temporaries on every execution, from its worker threads. With
glibc's defaults those large blocks are mmap'ed (or come from per-thread arenas that cannot hold
them) and handed back to the OS when freed, so every step page-faults them in again, 4 KiB at a
time: ~100-150 k faults and 10-15% of a 224 px ResNet-18 step on the 2-core machine of
``BENCHMARKS.md``. :func:`keep_freed_memory` makes glibc serve every thread from the main heap
(``M_ARENA_MAX=1``), never mmap (``M_MMAP_MAX=0``) and never trim (``M_TRIM_THRESHOLD``), so after
the first steps the heap holds the step's working set and a step page-faults nothing. It must run
before the backend starts its threads (``vpns_jax.main`` and the benchmarks call it first thing).
A preloaded jemalloc or tcmalloc is left alone; ``VPNS_MALLOC=system`` opts out.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

# Distributions that give JAX a non-CPU backend: their hosts keep glibc's defaults.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


class _State:
    """Whether this process's glibc malloc was reconfigured (a process-wide fact of libc)."""

    kept = False


def malloc_name() -> str:
    """'jemalloc' / 'tcmalloc' (preloaded), 'glibc+kept' (after :func:`keep_freed_memory`),
    'glibc+hugetlb' (glibc's huge-page tunable), 'glibc', or 'unknown' (no /proc)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("jemalloc", "tcmalloc"):
        if name in maps:
            return name
    if _State.kept:
        return "glibc+kept"
    if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc+hugetlb"
    return "glibc"


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def accelerator_plugin_installed() -> bool:
    """True when a CUDA/ROCm/TPU plugin for JAX is installed (the backend may not be the CPU)."""
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    return any(name.startswith(_ACCELERATOR_PLUGINS) for name in names)


def keep_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory (see the module docstring); True if applied.

    No-op (False) when VPNS_MALLOC=system, when the C allocator is not glibc (jemalloc/tcmalloc
    preloaded, musl, macOS), or when a JAX accelerator plugin is installed and JAX_PLATFORMS does not
    ask for the CPU. Call before JAX initialises its backend; threads created earlier keep their arena.
    """
    if _State.kept:
        return True
    if os.environ.get("VPNS_MALLOC", "").lower() == "system":
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if not platforms.startswith("cpu") and (platforms or accelerator_plugin_installed()):
        return False
    if malloc_name() not in ("glibc", "glibc+hugetlb"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
            libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)]
    _State.kept = all(r == 1 for r in done)
    return _State.kept
