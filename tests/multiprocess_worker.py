"""One process of a small run on a chosen topology (used by test_multiprocess.py; not a test module).

    python tests/multiprocess_worker.py --workdir W --weights F [--process_id I --num_processes N
        --port P] [--devices D] [--stop_after_saves K]

`--devices D` forces D host-platform (CPU) devices in this process; `--num_processes N > 1` joins a
job of N processes through the documented explicit variables (JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, loopback coordinator, gloo CPU collectives).
`--last_process_seed S` gives the last process another seed (the job must be refused).
`--stop_after_saves K` stops the run (KeyboardInterrupt, exit code 3) right after its K-th
mid-epoch checkpoint, as a preempted job would; the same command without it resumes.
Prints `RESULT <json of results['runs']>` at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

STOPPED = 3
USER_ERROR = 2


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on (for a coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_run_config(weights: str):
    """dense, hydra and vpns on digits, 4 iterations per epoch, 1 epoch per stage, global batch 64
    (the tests' `small_config`, the released learning rates for VPNs' mask finding)."""
    from test_experiment import small_config

    c = small_config(weights)
    c.methods, c.steps_per_epoch, c.plots = "dense,hydra,vpns", 4, False
    c.dense.epochs = 1
    c.hydra.mask_finding.epochs = c.hydra.tuning.epochs = 1
    c.vpns.mask_finding.epochs = c.vpns.tuning.epochs = 1
    # The released Adam learning rate: with small_config's 1e-2, Adam turns reduction-order noise in
    # near-zero score gradients into full-size +-lr steps (1,852 of 700,976 mask entries flipped
    # between 1 and 2 devices, far from the threshold); at 1e-4 a flip needs a score within ~lr of it.
    c.vpns.mask_finding.update(lr=1e-4, prompt_lr=1e-4)
    return c


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", default="0")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--stop_after_saves", type=int, default=0)
    p.add_argument("--last_process_seed", type=int, default=None,
                   help="another config.seed on the last process (a job that must be refused)")
    args = p.parse_args()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    if args.num_processes > 1:
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
                          JAX_NUM_PROCESSES=str(args.num_processes),
                          JAX_PROCESS_ID=str(args.process_id))
    import jax
    from absl import logging

    logging.set_verbosity(logging.INFO)  # the tests read "resuming stage" / "is done already"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vpns_jax import experiment, parallel
    from vpns_jax.errors import VpnsError

    # None: detected from the environment (one process: no jax.distributed at all).
    joined = parallel.initialize_distributed(None, initialization_timeout=120)
    assert joined == (args.num_processes > 1)
    assert jax.device_count() == args.devices * args.num_processes, jax.devices()
    config = small_run_config(args.weights)
    if args.last_process_seed is not None and args.process_id == args.num_processes - 1:
        config.seed = args.last_process_seed
    if args.stop_after_saves:
        config.checkpoint_every_steps = 2  # not part of the results: a stop inside an epoch
        real_run_stage, saves = experiment.train.run_stage, []

        def stopping(stage, *a, **kw):
            save = kw["step_hook"]

            def save_then_maybe_stop(end):
                save(end)
                saves.append(end.iteration)
                if len(saves) == args.stop_after_saves:
                    raise KeyboardInterrupt

            return real_run_stage(stage, *a, **{**kw, "step_hook": save_then_maybe_stop})

        experiment.train.run_stage = stopping
        try:
            experiment.run(config, args.workdir)
        except KeyboardInterrupt:
            print("STOPPED", flush=True)
            sys.exit(STOPPED)
        raise AssertionError("the run finished before it was stopped")
    try:
        results = experiment.run(config, args.workdir)
    except VpnsError as e:
        print(f"error: {e}", flush=True)
        sys.exit(USER_ERROR)
    print("RESULT", json.dumps(results["runs"]), flush=True)


if __name__ == "__main__":
    main()
