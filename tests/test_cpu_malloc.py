"""vpns_jax.cpu_malloc reports the allocator setup, and scripts/fast_malloc.sh sets one up."""
import os
import subprocess
import sys
from pathlib import Path

from vpns_jax import cpu_malloc

ROOT = Path(__file__).resolve().parents[1]
PROBE = "from vpns_jax import cpu_malloc; print(cpu_malloc.malloc_name())"


def _clean_env():
    drop = ("GLIBC_TUNABLES", "LD_PRELOAD", "VPNS_MALLOC")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _probe(*prefix, env=None):
    out = subprocess.run([*prefix, sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env)
    return out.stdout.strip()


def test_plain_process_is_glibc_and_gets_a_hint(monkeypatch):
    assert _probe(env=_clean_env()) == "glibc"
    monkeypatch.setattr(cpu_malloc, "malloc_name", lambda: "glibc")
    assert "fast_malloc.sh" in cpu_malloc.slow_malloc_hint()
    monkeypatch.setattr(cpu_malloc, "malloc_name", lambda: "glibc+hugetlb")
    assert cpu_malloc.slow_malloc_hint() is None


def test_fast_malloc_script_sets_up_a_fast_allocator():
    script = str(ROOT / "scripts" / "fast_malloc.sh")
    assert _probe("bash", script, env={**_clean_env(), "VPNS_MALLOC": "glibc"}) == "glibc+hugetlb"
    # auto: jemalloc where libjemalloc2 is installed, else the glibc tunable.
    assert _probe("bash", script, env=_clean_env()) in ("jemalloc", "glibc+hugetlb")
