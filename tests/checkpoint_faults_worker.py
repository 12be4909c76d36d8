"""Checkpoint failures in one process, each ending in a clear `error: ...` line (as the CLI prints).

Run by tests/test_checkpoint.py::test_failures_print_one_clear_line_and_no_traceback:
``python checkpoint_faults_worker.py FULL_DIR OTHER_DIR tmpfs|simulate``. FULL_DIR is a 1 MiB tmpfs
(`tmpfs`) or an ordinary directory where array writes are made to fail with ENOSPC (`simulate`).
The failures: a checkpoint refused after its manager was created, Ctrl-C while restores read, a
full disk during a save (the previous checkpoint must still restore), no readable checkpoint. Each
used to leave tensorstore tasks behind whose tracebacks came after the message.
"""

import errno
import glob
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax.checkpoint import RunCheckpointer
from vpns_jax.errors import CheckpointError


def tree(n: int, size: int, offset: float = 0.0) -> dict:
    return {f"w{i}": jnp.arange(size, dtype=jnp.float32) + i + offset for i in range(n)}


def abstract(t: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)


def error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(full_dir: str, other_dir: str, mode: str) -> int:
    many = tree(24, 20_000)
    d = os.path.join(other_dir, "refused")
    with RunCheckpointer(d) as c:
        c.save(1, many, {"config_hash": "a"})
    try:
        with RunCheckpointer(d) as c:
            c.save(2, tree(24, 20_000, 1.0), {"config_hash": "a"})  # in flight when refused
            c.restore(abstract_state=abstract(many), config_hash="b")
    except CheckpointError as e:
        error(e)

    d = os.path.join(other_dir, "interrupted")
    big = tree(24, 100_000)
    with RunCheckpointer(d) as c:
        c.save(1, big, {})
    # Ctrl-C as in a terminal, also when this process was started with SIGINT ignored (a test run
    # in the background)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        with RunCheckpointer(d) as c:
            signal.setitimer(signal.ITIMER_REAL, 0.02)
            for _ in range(100):
                c.restore(abstract_state=abstract(big))
    except KeyboardInterrupt:
        error("interrupted")
    signal.setitimer(signal.ITIMER_REAL, 0)

    small = {"w": jnp.asarray(np.random.default_rng(0).normal(size=150_000), jnp.float32)}
    if mode == "simulate":  # tensorstore's array writes fail as on a full disk, after the first
        from orbax.checkpoint._src.serialization import serialization

        real, calls = serialization.async_serialize_from_host, []

        async def no_space_after_first(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return await real(*args, **kwargs)

        serialization.async_serialize_from_host = no_space_after_first
    d = os.path.join(full_dir, "ckpt")  # 600 KB each: the second does not fit in 1 MiB
    try:
        with RunCheckpointer(d) as c:
            c.save(1, small, {"epoch": 1})
            c.save(2, jax.tree.map(lambda x: x + 1, small), {"epoch": 2})
    except CheckpointError as e:
        error(e)
    if mode == "simulate":
        serialization.async_serialize_from_host = real
    with RunCheckpointer(d) as c:
        state, meta = c.restore(abstract_state=abstract(small))
        assert meta == {"epoch": 1} and c.all_steps() == [1], (meta, c.all_steps())
    np.testing.assert_array_equal(state["w"], small["w"])

    d = os.path.join(other_dir, "corrupt")
    many = tree(30, 100_000)
    with RunCheckpointer(d) as c:
        c.save(1, many, {})
    for f in glob.glob(os.path.join(d, "1", "state", "**", "d", "*"), recursive=True):
        os.truncate(f, os.path.getsize(f) // 2)
    try:
        with RunCheckpointer(d) as c:
            c.restore(abstract_state=abstract(many))
    except CheckpointError as e:
        error(e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
