"""One of two processes that restore checkpoints with unreadable newest steps (used by
tests/test_checkpoint.py; not a test module).

    python checkpoint_multiprocess_worker.py PROCESS_ID PORT DIR

In DIR/truncated, process 0 truncates step 2's array files; in DIR/one_process only process 1
fails to read step 2. Either way both processes must restore step 1, and step 2 must be set aside
exactly once (by process 0). Prints `RESULT <json>` per case.
"""

import glob
import json
import os
import sys

process_id, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from vpns_jax import checkpoint, parallel  # noqa: E402

assert parallel.initialize_distributed(None, initialization_timeout=60)
mesh = parallel.make_mesh()


def state(v: float) -> dict:
    return parallel.to_replicated({"w": np.full((4, 3), v, np.float32), "b": np.arange(5) + v}, mesh)


abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state(0))
real_restore_one = checkpoint.RunCheckpointer._restore_one


def fails_on_process_1(self, step, *args):
    if step == 2:
        raise checkpoint._Unreadable("simulated read error on process 1")
    return real_restore_one(self, step, *args)


for case in ("truncated", "one_process"):
    d = os.path.join(root, case)
    with checkpoint.RunCheckpointer(d) as c:
        c.save(1, state(1), {"epoch": 1})
        c.save(2, state(2), {"epoch": 2})
    multihost_utils.sync_global_devices(f"saved {case}")
    if case == "truncated" and process_id == 0:
        for f in glob.glob(os.path.join(d, "2", "state", "**", "d", "*"), recursive=True):
            os.truncate(f, 2)
    checkpoint.RunCheckpointer._restore_one = (
        fails_on_process_1 if case == "one_process" and process_id == 1 else real_restore_one)
    multihost_utils.sync_global_devices(f"damaged {case}")
    with checkpoint.RunCheckpointer(d) as c:
        restored, meta = c.restore(abstract_state=abstract)
        steps = c.all_steps()
    w = float(np.asarray(restored["w"].addressable_data(0))[0, 0])
    print("RESULT " + json.dumps({"case": case, "epoch": meta["epoch"], "w": w, "steps": steps,
                                  "listing": sorted(os.listdir(d))}), flush=True)
