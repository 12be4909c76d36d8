"""Scale-out helpers, jit-first: multi-process init, a 1-D data mesh, shardings, global batches.

The model is data parallelism with `jax.jit` over global arrays: the batch is sharded along the
mesh's `data` axis, the state is replicated. Because the batch is one global array, anything
reduced over the batch inside a jitted step (the loss mean, BatchNorm's batch statistics) is
reduced over the *whole* global batch, exactly as on one device; XLA inserts the collectives.

Multi-process (several hosts, or one process per GPU): every process runs the same program, calls
`initialize_distributed` before anything touches a device, reads its own shard of the data (size
`global_batch // process_count`) and turns it into global arrays with `host_to_global`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vpns_jax.errors import ConfigError

DATA_AXIS = "data"

# Environment variables that say "this process is one of several of a multi-process job".
# SLURM: the variables jax's own SlurmCluster needs (it is not used unless all of them are set).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_HOSTS_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def multiprocess_env(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process launcher the environment shows, or None for a single process.

    - ``'explicit'``: `JAX_COORDINATOR_ADDRESS` and `JAX_NUM_PROCESSES` > 1 (set them and
      `JAX_PROCESS_ID` yourself on any cluster);
    - ``'slurm'``: inside `srun` with `SLURM_NTASKS` > 1 and every variable jax's SLURM detection
      reads (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_PROCID`, `SLURM_LOCALID`);
    - ``'tpu'``: a TPU VM whose `TPU_WORKER_HOSTNAMES`/`TPU_PROCESS_ADDRESSES` lists > 1 worker.
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return "explicit"
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    for var in _TPU_HOSTS_VARS:
        if len([h for h in env.get(var, "").split(",") if h.strip()]) > 1:
            return "tpu"
    return None


def local_device_ids_from_env(env: Mapping[str, str] | None = None) -> list[int] | None:
    """`VPNS_LOCAL_DEVICE_IDS` ('0' or '0,1,2,3'): the local devices this process drives, or None.

    Under SLURM, JAX assumes one process per GPU and gives process `SLURM_LOCALID` that GPU. Set
    this when the layout differs: one process per node (`0,1,...,7`), or a cluster that already
    binds one GPU per task so each task sees only its GPU as device 0 (`0`).
    """
    env = os.environ if env is None else env
    value = env.get("VPNS_LOCAL_DEVICE_IDS", "").strip()
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(
            f"VPNS_LOCAL_DEVICE_IDS={value!r} must be comma-separated integers, "
            "e.g. '0' or '0,1,2,3'"
        ) from e


def initialize_distributed(enabled: bool | None = None, *, timeout_s: float = 300,
                           **kwargs: Any) -> bool:
    """Start JAX's multi-process runtime when asked to; returns whether it is running.

    `enabled=True` calls `jax.distributed.initialize(**kwargs)`, which finds the coordinator,
    process count and id itself on SLURM (one process per GPU: it takes GPU `SLURM_LOCALID`), on
    Cloud TPU VMs, and from `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`;
    `kwargs` (e.g. `local_device_ids`, default from `VPNS_LOCAL_DEVICE_IDS`) override that.
    `enabled=False` does nothing.
    `enabled=None` initializes only when `multiprocess_env()` sees a multi-process job, so a plain
    single-process run never waits for a coordinator. Must run before the first use of a device
    (`jax.devices()`, any array). A coordinator not reached within `timeout_s` seconds raises
    `ConfigError` naming its address (instead of waiting forever).
    """
    if enabled is None:
        kind = multiprocess_env()
        enabled = kind is not None
        if enabled:
            logging.info("multi-process job detected (%s): initializing jax.distributed", kind)
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    if "local_device_ids" not in kwargs and (ids := local_device_ids_from_env()) is not None:
        kwargs["local_device_ids"] = ids
    if multiprocess_env() == "explicit":  # this jax reads the address but not the count or the id
        kwargs.setdefault("coordinator_address", os.environ["JAX_COORDINATOR_ADDRESS"])
        kwargs.setdefault("num_processes", int(os.environ["JAX_NUM_PROCESSES"]))
        if "JAX_PROCESS_ID" not in os.environ and "process_id" not in kwargs:
            raise ConfigError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but "
                              "JAX_PROCESS_ID is not: set it to this process's index (0..N-1).")
        kwargs.setdefault("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")))
    kwargs.setdefault("initialization_timeout", int(timeout_s))
    address = kwargs.get("coordinator_address")
    if address and kwargs.get("process_id", 0) != 0:
        # jax aborts the process (no Python exception) when the coordinator never answers.
        wait_for_coordinator(address, kwargs["initialization_timeout"])
    elif address:
        logging.info("serving the coordinator at %s; waiting up to %d s for %s processes",
                     address, kwargs["initialization_timeout"], kwargs.get("num_processes"))
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        where = f"the coordinator at {address}" if address else "the job's coordinator"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"multi-process start failed: could not join {where} within "
            f"{kwargs['initialization_timeout']} s ({first}). Check that every process of the job "
            "was started (process 0 serves the coordinator), that the address and port are "
            "reachable from this host, and that all processes got the same process count; "
            "config.distributed_timeout_s sets the wait."
        ) from e
    return True


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until something listens at `address` ('host:port'); `ConfigError` naming the address
    after `timeout_s` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator address {address!r} is not 'host:port'")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"the coordinator at {address} cannot be reached ({e.strerror or e}) after "
                    f"{timeout_s:g} s: start process 0 of the job (it serves the coordinator), check "
                    "that this host can reach that address and port, or raise "
                    "config.distributed_timeout_s.") from e
            time.sleep(0.25)


class ProcessInfo(NamedTuple):
    """Where this process sits in the job."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str

    @property
    def is_primary(self) -> bool:
        """Process 0 writes files (metrics, results, config); the others only log."""
        return self.process_index == 0


def process_info() -> ProcessInfo:
    """This process's index, the process count, device counts and platform ('cpu', 'gpu', 'tpu')."""
    return ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
        platform=jax.devices()[0].platform,
    )


def make_mesh(axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over every device of every process, devices in an order that suits collectives."""
    return jax.make_mesh(
        (jax.device_count(),), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the mesh's single axis; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (params, optimizer state, scores, prompt)."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch_size_check(global_batch: int, mesh: Mesh) -> int:
    """Check that `global_batch` splits evenly over the mesh; returns this process's batch size.

    Raises `ConfigError` (naming `batch_size` and the nearest valid sizes) otherwise.
    """
    devices, processes = mesh.size, jax.process_count()
    if global_batch < 1 or global_batch % devices:
        lower = max(devices, global_batch // devices * devices)
        raise ConfigError(
            f"batch_size={global_batch} does not split over {devices} devices ({processes} "
            f"process(es)); use a multiple of {devices}, e.g. {lower} or {lower + devices}"
        )
    return global_batch // processes


def host_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of a batch (numpy, leading dim = local batch) → global jax.Arrays.

    Every process passes its own rows; the global batch is their concatenation in process order,
    sharded along the mesh's data axis. The local batch must split over this process's devices.
    """
    sharding = data_sharding(mesh)
    local_devices = len(mesh.local_devices)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_devices:
            raise ConfigError(
                f"batch field {name!r} has shape {value.shape}: its leading (batch) dimension must "
                f"split over this process's {local_devices} devices; make batch_size a multiple of "
                f"{mesh.size}"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def gather_to_host(tree: Any) -> Any:
    """Global arrays (sharded or replicated) → numpy arrays with the full global value, everywhere.

    Single process: `jax.device_get`. Multi-process: an all-gather, so call it on every process.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def check_same_on_all_processes(what: str, text: str) -> None:
    """Refuse a job whose processes disagree on `text` (e.g. the config): every process hashes it,
    the hashes are all-gathered, and any difference raises `ConfigError` on every process naming
    the processes that differ. No-op with one process."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))  # [processes, 32]
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ConfigError(
            f"the processes of this job disagree on {what}: process(es) {differ} differ from "
            "process 0. Start every process with the same command (--config, --config.* flags, "
            "--workdir) and the same files.")


def from_process_0(values: Sequence[float | None]) -> list[float | None]:
    """Process 0's `values` on every process, exactly (float64 bits sent as uint32 pairs; None
    as NaN): for numbers only process 0 knows (wall times, rows it read back). No-op with one
    process; call it on every process."""
    if jax.process_count() == 1:
        return list(values)
    f64 = np.asarray([np.nan if v is None else v for v in values], np.float64)
    bits = np.asarray(multihost_utils.broadcast_one_to_all(f64.view(np.uint32)), np.uint32)
    return [None if np.isnan(v) else float(v) for v in bits.view(np.float64)]


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op with one process): e.g. after process 0
    wrote a file the others read next."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every leaf as a global array replicated over `mesh` (every process passes the same values).

    One process: `jax.device_put`. Several: leaves already replicated stay; global arrays with
    another sharding are resharded by a jitted identity; host or process-local values are placed
    shard by shard (`device_put` of a process-local jax.Array onto a multi-process sharding gives
    arrays whose shards cannot be read, e.g. by orbax).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.jit(lambda a: a, out_shardings=sharding)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)
