"""Which C allocator setup this process runs on, and a hint when it is the slow one for XLA on CPU.

XLA's CPU runtime allocates a step's temporaries on every execution. glibc's malloc returns large
blocks to the OS, so every step page-faults them in again, 4 KiB at a time: on the 2-core machine of
``BENCHMARKS.md`` that is 10-15% of a 224 px ResNet-18 step. glibc's transparent-huge-page tunable
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``) or jemalloc removes most of it; ``scripts/fast_malloc.sh``
sets either up. Both must be in place before the process starts, so this module only reports.
"""

from __future__ import annotations

import os


def malloc_name() -> str:
    """'jemalloc', 'tcmalloc' (preloaded), 'glibc+hugetlb' (the tunable), 'glibc' or 'unknown'."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("jemalloc", "tcmalloc"):
        if name in maps:
            return name
    if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc+hugetlb"
    return "glibc"


def slow_malloc_hint() -> str | None:
    """A one-line hint when running on plain glibc malloc (Linux), else None."""
    if malloc_name() != "glibc":
        return None
    return ("CPU steps run 5-15% faster when XLA's temporaries stay in memory: prefix the command "
            "with `bash scripts/fast_malloc.sh` (jemalloc if installed, else "
            "GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")
