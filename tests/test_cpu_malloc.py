"""vpns_jax.cpu_malloc: glibc keeps freed memory after keep_freed_memory(), in a fresh process each."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vpns_jax import cpu_malloc

ROOT = Path(__file__).resolve().parents[1]

# Allocates and frees a 64 MiB block from a worker thread (as XLA's executor does) ten times,
# touching every page; prints the allocator name and the minor page faults of the last nine rounds.
FAULT_PROBE = """
import ctypes, resource, sys, threading
from vpns_jax import cpu_malloc
applied = cpu_malloc.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
def rounds():
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=rounds); t.start(); t.join()
print(applied, cpu_malloc.malloc_name(), sum(faults[1:]))
"""


def _env(**extra):
    drop = ("GLIBC_TUNABLES", "LD_PRELOAD", "VPNS_MALLOC", "JAX_PLATFORMS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "JAX_PLATFORMS": "cpu", **extra}


def _probe(mode, **env):
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE, mode], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=_env(**env))
    applied, name, faults = out.stdout.split()
    return applied == "True", name, int(faults)


def test_kept_memory_is_not_page_faulted_again():
    pages = (64 << 20) // 4096  # 16384 per round with glibc's defaults (mmap + munmap)
    applied, name, faults = _probe("default")
    assert (applied, name) == (False, "glibc")
    assert faults >= 9 * pages * 0.9, faults
    applied, name, faults = _probe("keep")
    assert (applied, name) == (True, "glibc+kept")
    assert faults < pages, faults  # the heap keeps the block: at most a stray page per round


def test_opt_out_and_other_allocators_are_left_alone(monkeypatch):
    applied, name, _ = _probe("keep", VPNS_MALLOC="system")
    assert (applied, name) == (False, "glibc")
    monkeypatch.setattr(cpu_malloc._State, "kept", False)
    monkeypatch.delenv("VPNS_MALLOC", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(cpu_malloc, "malloc_name", lambda: "jemalloc")
    monkeypatch.setattr(cpu_malloc, "_glibc", lambda: pytest.fail("mallopt must not be called"))
    assert cpu_malloc.keep_freed_memory() is False


def test_accelerator_hosts_keep_glibc_defaults(monkeypatch):
    monkeypatch.setattr(cpu_malloc._State, "kept", False)
    monkeypatch.delenv("VPNS_MALLOC", raising=False)
    monkeypatch.setattr(cpu_malloc, "_glibc", lambda: pytest.fail("mallopt must not be called"))
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert cpu_malloc.keep_freed_memory() is False
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(cpu_malloc, "accelerator_plugin_installed", lambda: True)
    assert cpu_malloc.keep_freed_memory() is False
