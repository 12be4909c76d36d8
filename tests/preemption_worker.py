"""One process of a 2-process job that checks stop requests every iteration (test_preemption).

usage: python preemption_worker.py PROCESS_ID PORT SIGNAL_AT  (SIGNAL_AT < 0: never signal itself)
Prints 'stopped at N: REASON' or 'never stopped'. The processes run in lock step (a tiny all-reduce
per iteration), as the data-parallel steps of a real run do.
"""
import os
import signal
import sys
import time

import jax

process_id, port, signal_at = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from vpns_jax import preemption  # noqa: E402

# JAX's preemption service takes a moment (up to seconds) to agree on the step: iterate for up to
# 60 s, 10 ms per iteration, as a training loop would go on until it is told to stop.
with preemption.StopRequests() as stops:
    deadline, n = time.monotonic() + 60, 0
    while time.monotonic() < deadline:
        n += 1
        multihost_utils.process_allgather(jnp.asarray(n))  # lock step, like a collective
        if n == signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        reason = stops.check()
        if reason:
            print(f"stopped at {n}: {reason}", flush=True)
            break
        time.sleep(0.01)
    else:
        print(f"never stopped ({n} iterations)", flush=True)
jax.distributed.shutdown()
