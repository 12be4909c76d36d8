"""Tests of vpns_jax.parallel: launcher detection; a sharded jitted step on 8 fake CPU devices."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from multiprocess_worker import free_port

from vpns_jax import parallel
from vpns_jax.errors import ConfigError

SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({**SLURM, "SLURM_NTASKS": "1"}, None),
        ({**SLURM, "SLURM_NTASKS": "8"}, "slurm"),
        ({"SLURM_NTASKS": "8"}, None),  # salloc shell, not inside srun
        ({**{k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, "SLURM_NTASKS": "8"}, None),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, None),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2"}, "explicit"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "1"}, None),
    ],
)
def test_multiprocess_env(env, expected):
    assert parallel.multiprocess_env(env) == expected


def test_local_device_ids_from_env():
    assert parallel.local_device_ids_from_env({}) is None
    assert parallel.local_device_ids_from_env({"VPNS_LOCAL_DEVICE_IDS": "0"}) == [0]
    assert parallel.local_device_ids_from_env({"VPNS_LOCAL_DEVICE_IDS": "0,1, 2"}) == [0, 1, 2]
    with pytest.raises(ConfigError, match="VPNS_LOCAL_DEVICE_IDS"):
        parallel.local_device_ids_from_env({"VPNS_LOCAL_DEVICE_IDS": "gpu0"})


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", *parallel._TPU_HOSTS_VARS):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed(None) is False
    assert parallel.initialize_distributed(False) is False
    info = parallel.process_info()
    assert info.process_count == 1 and info.is_primary and info.platform == "cpu"
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from vpns_jax import parallel
    from vpns_jax.errors import ConfigError

    info = parallel.process_info()
    assert info.device_count == 8 and info.local_device_count == 8, info
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    assert parallel.global_batch_size_check(32, mesh) == 32
    for bad in (12, 0):
        try:
            parallel.global_batch_size_check(bad, mesh)
            raise AssertionError("no error")
        except ConfigError as e:
            assert "batch_size" in str(e) and "multiple of 8" in str(e), e

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(32, 4, 4, 3)).astype(np.float32),
             "label": rng.integers(0, 5, size=32).astype(np.int32)}
    params = {"w": rng.normal(size=(48, 5)).astype(np.float32) * 0.1,
              "scale": np.ones(5, np.float32), "bias": np.zeros(5, np.float32)}

    def step(params, batch):
        def loss_fn(p):
            h = batch["image"].reshape(batch["image"].shape[0], -1) @ p["w"]
            mean, var = h.mean(0), h.var(0)  # BN batch statistics
            h = (h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]
            logp = jax.nn.log_softmax(h)
            loss = -jnp.take_along_axis(logp, batch["label"][:, None], 1).mean()
            return loss, mean
        (loss, mean), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return new, loss, mean

    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    gbatch = parallel.host_to_global(batch, mesh)
    assert gbatch["image"].shape == (32, 4, 4, 3) and gbatch["image"].sharding == data
    assert {s.data.shape for s in gbatch["image"].addressable_shards} == {(4, 4, 4, 3)}
    np.testing.assert_array_equal(np.asarray(gbatch["label"]), batch["label"])
    gparams = jax.device_put(params, rep)
    sharded_step = jax.jit(step, in_shardings=(rep, data), out_shardings=rep, donate_argnums=0)
    new_s, loss_s, mean_s = sharded_step(gparams, gbatch)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(new_s))

    one = jax.devices()[0]
    new_1, loss_1, mean_1 = jax.jit(step)(jax.device_put(params, one), jax.device_put(batch, one))
    np.testing.assert_allclose(float(loss_s), float(loss_1), rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(np.asarray(new_s[k]), np.asarray(new_1[k]), rtol=1e-5, atol=1e-6)
    full_mean = (batch["image"].reshape(32, -1) @ params["w"]).mean(0)
    np.testing.assert_allclose(np.asarray(mean_s), full_mean, rtol=1e-5, atol=1e-6)
    shard_mean = (batch["image"][:4].reshape(4, -1) @ params["w"]).mean(0)
    assert not np.allclose(shard_mean, full_mean, atol=1e-3)  # per-device stats would differ

    gathered = parallel.gather_to_host({"x": gbatch["label"], "m": mean_s})
    np.testing.assert_array_equal(gathered["x"], batch["label"])
    try:
        parallel.global_batch_size_check(30, mesh)
        raise AssertionError("no error")
    except ConfigError as e:
        assert "batch_size=30 does not split over 8 devices" in str(e), e
        assert "e.g. 24 or 32" in str(e), e
    try:
        parallel.host_to_global({"image": batch["image"][:12]}, mesh)
        raise AssertionError("no error")
    except ConfigError as e:
        assert "'image'" in str(e) and "8 devices" in str(e), e
    print("OK")
""")


def test_sharded_step_matches_single_device():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_batch_check_single_device():
    mesh = parallel.make_mesh()
    assert parallel.global_batch_size_check(7, mesh) == 7
    with pytest.raises(ConfigError):
        parallel.global_batch_size_check(0, mesh)
    out = parallel.host_to_global({"label": np.arange(4, dtype=np.int32)}, mesh)
    np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(4))


def test_unreachable_coordinator_times_out_with_its_address():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ConfigError, match=f"coordinator at {address} cannot be reached"):
        parallel.wait_for_coordinator(address, 0.5)
    with pytest.raises(ConfigError, match="not 'host:port'"):
        parallel.wait_for_coordinator("no-port", 1)
    # Process 1 of 2 fails in the wait, before jax.distributed (which would abort the process).
    with pytest.raises(ConfigError, match=f"coordinator at {address} cannot be reached"):
        parallel.initialize_distributed(True, timeout_s=1, coordinator_address=address,
                                        num_processes=2, process_id=1)
    assert not jax.distributed.is_initialized()


def test_cli_reports_an_unreachable_coordinator_in_one_line(tmp_path):
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vpns_jax.main", "--config", "configs/quickstart.py",
         "--workdir", str(tmp_path / "w"), "--config.distributed_timeout_s=1"],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the coordinator at 127.0.0.1:{port} cannot be reached"), last
    assert "Traceback" not in proc.stderr
