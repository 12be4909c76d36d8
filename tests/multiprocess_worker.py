"""One process of a small multi-process run (used by test_multiprocess.py; not a test module).

Usage: python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR WEIGHTS
"""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    pid, count, port, workdir, weights = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                          sys.argv[4], sys.argv[5])
    # The documented explicit launch: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    os.environ.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(pid))
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vpns_jax import parallel

    # None: detected from the environment (one process: no jax.distributed at all).
    assert parallel.initialize_distributed(None, initialization_timeout=120) == (count > 1)
    from test_experiment import small_config

    from vpns_jax import experiment

    c = small_config(weights)
    c.methods, c.steps_per_epoch, c.plots = "dense,vpns", 3, False
    c.dense.epochs = c.vpns.mask_finding.epochs = c.vpns.tuning.epochs = 1
    results = experiment.run(c, workdir)
    print("RESULT", json.dumps(results["runs"]), flush=True)
