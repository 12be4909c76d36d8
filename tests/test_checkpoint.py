"""Tests of vpns_jax.checkpoint: round trips, resume, corruption, interrupted saves, re-sharding."""

import errno
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath

from vpns_jax.checkpoint import RunCheckpointer, load_final, save_final
from vpns_jax.errors import CheckpointError

# Failed restores and saves must leave no tensorstore task behind (checkpoint._DrainingEventLoop):
# one garbage-collected later would be reported as an unraisable exception.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@flax.struct.dataclass
class _State:
    params: dict
    scores: dict
    opt_state: optax.OptState
    masks: dict
    mapping: jax.Array
    step: jax.Array


def _make_state(seed: int = 0) -> _State:
    rng = np.random.default_rng(seed)
    params = {
        "conv1": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), "bias": jnp.zeros(5)},
    }
    scores = {
        "conv1/kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32),
        "layer1_0/conv1/kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
    }
    trainable = {"params": params, "scores": scores, "prompt": {"program": jnp.zeros((8, 8, 3))}}
    labels = {"params": "sgd", "scores": "adam", "prompt": "frozen"}
    tx = optax.partition(
        {
            "sgd": optax.sgd(0.1, momentum=0.9),
            "adam": optax.adam(1e-3),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
    opt_state = tx.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    _, opt_state = tx.update(grads, opt_state, trainable)  # non-trivial moments
    masks = {k: jnp.abs(v) > 0.5 for k, v in scores.items()}
    return _State(
        params=params,
        scores=scores,
        opt_state=opt_state,
        masks=masks,
        mapping=jnp.asarray(rng.permutation(10)[:5], jnp.int32),
        step=jnp.int32(7),
    )


def _abstract(state):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {
    "stage": "mask_finding",
    "epoch": 1,
    "step_in_epoch": 3,
    "data_state": {"next_index": 96, "seed": 0},
    "label_mapping": [3, 1, 4],
    "config_hash": "abc",
}


def test_round_trip_keeps_types_and_slash_keys(tmp_path):
    state = _make_state()
    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, META)
        # Donating the state right after save must be safe: arrays are on host before save returns.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()
        restored, meta = ckpt.restore(abstract_state=_abstract(_make_state()), config_hash="abc")
    _assert_same(restored, _make_state())
    assert meta == META
    assert isinstance(restored, _State)
    assert isinstance(restored.opt_state, optax.transforms.PartitionState)
    assert isinstance(
        restored.opt_state.inner_states["adam"].inner_state[0], optax.ScaleByAdamState
    )
    assert set(restored.scores) == {"conv1/kernel", "layer1_0/conv1/kernel"}
    assert restored.masks["conv1/kernel"].dtype == jnp.bool_
    assert restored.mapping.dtype == jnp.int32


def test_resume_picks_latest_keeps_max_and_skips_existing(tmp_path):
    d = tmp_path / "ckpt"
    ckpt = RunCheckpointer(d, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _make_state(step), {**META, "epoch": step})
    assert not ckpt.save(3, _make_state(0), META)  # already there, kept
    ckpt.close()
    ckpt = RunCheckpointer(d, max_to_keep=2)
    assert ckpt.all_steps() == [2, 3]
    state, meta = ckpt.restore(abstract_state=_abstract(_make_state()))
    _assert_same(state, _make_state(3))
    assert meta["epoch"] == 3
    state, _ = ckpt.restore(2, abstract_state=_abstract(_make_state()))
    _assert_same(state, _make_state(2))
    assert ckpt.save(3, _make_state(0), {**META, "epoch": 30}, force=True)
    ckpt.wait()
    assert ckpt.read_meta()["epoch"] == 30
    ckpt.close()


def test_leftover_tmp_dir_is_ignored(tmp_path):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, _make_state(1), META)
    # An interrupted save of step 2: orbax's temporary directory, half written.
    shutil.copytree(d / "1", d / "2.orbax-checkpoint-tmp-1700000000")
    os.remove(d / "2.orbax-checkpoint-tmp-1700000000" / "_CHECKPOINT_METADATA")
    with RunCheckpointer(d) as ckpt:
        assert ckpt.latest_step() == 1
        state, _ = ckpt.restore(abstract_state=_abstract(_make_state()))
    _assert_same(state, _make_state(1))


def _corrupt_data(step_dir):
    """Truncate every array data file of a checkpoint to 4 bytes."""
    files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(4)


def _damage(step_dir, damage):
    if damage == "truncate_data":
        _corrupt_data(step_dir)
    elif damage == "delete_manifest":
        os.remove(step_dir / "state" / "manifest.ocdbt")
    elif damage == "delete_state":
        shutil.rmtree(step_dir / "state")
    elif damage == "delete_meta":
        shutil.rmtree(step_dir / "meta")
    elif damage == "garble_meta":
        (step_dir / "meta" / "metadata").write_text('{"stage": "mask_fi')
    else:
        raise ValueError(damage)


DAMAGES = ["truncate_data", "delete_manifest", "delete_state", "delete_meta", "garble_meta"]


def _files(directory):
    return sorted(os.path.relpath(os.path.join(d, n), directory)
                  for d, _, names in os.walk(directory) for n in names)


@pytest.mark.parametrize("damage", DAMAGES)
def test_unreadable_latest_is_set_aside_and_the_previous_one_used(tmp_path, damage, caplog):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, _make_state(1), {**META, "epoch": 1})
        ckpt.save(2, _make_state(2), {**META, "epoch": 2})
    _damage(d / "2", damage)
    damaged_files = _files(d / "2")
    with caplog.at_level(logging.WARNING), RunCheckpointer(d) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        state, meta = ckpt.restore(abstract_state=_abstract(_make_state()), config_hash="abc")
        assert ckpt.all_steps() == [1]
    _assert_same(state, _make_state(1))
    assert meta["epoch"] == 1
    (aside,) = glob.glob(str(d / "2.unreadable-*"))
    assert re.fullmatch(r"2\.unreadable-\d{8}T\d{6}Z", os.path.basename(aside))
    assert not os.path.exists(d / "2") and _files(aside) == damaged_files  # renamed, not deleted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "set it aside" in r.getMessage()]
    assert warnings == [
        f"checkpoint 2 in {d} cannot be read ({warnings[0].split('cannot be read (')[1].split(');')[0]}"
        f"); set it aside as {aside} (rename it back to retry it) and using checkpoint 1 ({d / '1'}) "
        "instead"]
    # Reopening (orbax cleans up tmp directories then) neither lists nor deletes it; step 2 is free
    # again for the resumed run.
    with RunCheckpointer(d) as ckpt:
        assert ckpt.all_steps() == [1] and os.path.isdir(aside)
        ckpt.save(2, _make_state(3), {**META, "epoch": 22})
    with RunCheckpointer(d) as ckpt:
        state, meta = ckpt.restore(abstract_state=_abstract(_make_state()))
    _assert_same(state, _make_state(3))
    assert meta["epoch"] == 22 and os.path.isdir(aside)


def test_read_meta_falls_back_past_a_garbled_meta(tmp_path):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _make_state(step), {**META, "epoch": step})
    _damage(d / "2", "garble_meta")
    with RunCheckpointer(d) as ckpt:
        with pytest.raises(CheckpointError, match=f"checkpoint 2 in {d} has no readable meta"):
            ckpt.read_meta(2)  # an explicit step never falls back
        assert os.path.isdir(d / "2")
        assert ckpt.read_meta()["epoch"] == 1
        assert ckpt.all_steps() == [1] and glob.glob(str(d / "2.unreadable-*"))


@pytest.mark.parametrize("damage", ["truncate_data", "delete_state", "garble_meta"])
def test_no_readable_checkpoint_raises_and_renames_nothing(tmp_path, damage):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, _make_state(1), META)
        ckpt.save(2, _make_state(2), META)
    _damage(d / "1", "truncate_data")
    _damage(d / "2", damage)
    with RunCheckpointer(d) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(abstract_state=_abstract(_make_state()))
    msg = str(err.value)
    assert msg.startswith(f"no checkpoint in {d} is readable, cannot restore it ({d / '2'}: ")
    assert f"; {d / '1'}: " in msg
    assert msg.endswith(f"they are left in place: move {d} aside (or delete it) to recompute "
                        "this stage from its start, or use a new --workdir")
    assert "\n" not in msg and len(msg) < 1500
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_a_checkpoint_of_another_config_is_refused_not_set_aside(tmp_path):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, _make_state(1), META)
        ckpt.save(2, _make_state(2), {**META, "config_hash": "other"})
        with pytest.raises(CheckpointError, match=f"checkpoint 2 in {d} was written by a different"):
            ckpt.restore(abstract_state=_abstract(_make_state()), config_hash="abc")
        wrong = _make_state().replace(mapping=jnp.zeros(6, jnp.int32))
        with pytest.raises(CheckpointError, match="checkpoint 2 .* does not match this run's state"):
            ckpt.restore(abstract_state=_abstract(wrong))
    assert sorted(os.listdir(d)) == ["1", "2"]


def test_corrupt_explicit_step_raises_checkpoint_error(tmp_path):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, _make_state(1), META)
        ckpt.save(5, _make_state(), META)
    _damage(d / "5", "truncate_data")
    with RunCheckpointer(d) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(5, abstract_state=_abstract(_make_state()))
    msg = str(err.value)
    assert msg.startswith(f"checkpoint 5 in {d} cannot be restored (ValueError: ")
    assert str(d / "5") in msg and "--workdir" in msg and len(msg) < 1000
    assert sorted(os.listdir(d)) == ["1", "5"]


def _fail_array_writes_with_enospc(monkeypatch):
    """Every array write of the next saves fails as on a full disk (tensorstore's write layer)."""
    from orbax.checkpoint._src.serialization import serialization

    async def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "async_serialize_from_host", no_space)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    ckpt = RunCheckpointer(d)
    ckpt.save(1, _make_state(1), {**META, "epoch": 1})
    ckpt.wait()
    _fail_array_writes_with_enospc(monkeypatch)
    ckpt.save(2, _make_state(2), {**META, "epoch": 2})
    with pytest.raises(CheckpointError) as err:
        ckpt.wait()
    assert str(err.value) == (
        f"saving checkpoint 2 in {d} failed: the disk is full (No space left on device); "
        f"checkpoint 1 ({d / '1'}) is kept. Free disk space (or move the workdir to a larger disk) "
        "and rerun the same command to resume")
    with pytest.raises(CheckpointError, match="saving checkpoint 2 "):
        ckpt.save(3, _make_state(3), META)  # the same error again, not a new save
    ckpt.close()  # reported once already: closes quietly
    monkeypatch.undo()
    with RunCheckpointer(d) as ckpt:
        assert ckpt.all_steps() == [1]
        state, meta = ckpt.restore(abstract_state=_abstract(_make_state()))
    _assert_same(state, _make_state(1))
    assert meta["epoch"] == 1


def test_incompatible_target_or_config_raises(tmp_path):
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(5, _make_state(), META)
        state = _make_state()
        bad_shape = state.replace(mapping=jnp.zeros(6, jnp.int32))
        with pytest.raises(CheckpointError, match=r"mapping: shape \(5,\) stored, \(6,\) expected"):
            ckpt.restore(abstract_state=_abstract(bad_shape))
        bad_dtype = state.replace(masks={k: v.astype(jnp.float32) for k, v in state.masks.items()})
        with pytest.raises(CheckpointError, match="dtype bool stored"):
            ckpt.restore(abstract_state=_abstract(bad_dtype))
        extra = state.replace(scores={**state.scores, "fc/kernel": jnp.zeros((4, 5))})
        with pytest.raises(CheckpointError, match="scores/fc/kernel: expected by the target"):
            ckpt.restore(abstract_state=_abstract(extra))
        with pytest.raises(CheckpointError, match="different config"):
            ckpt.restore(abstract_state=_abstract(state), config_hash="xyz")
        with pytest.raises(CheckpointError, match="no checkpoint 9"):
            ckpt.restore(9, abstract_state=_abstract(state))
    with RunCheckpointer(tmp_path / "empty") as ckpt, pytest.raises(CheckpointError):
        ckpt.restore(abstract_state=_abstract(state))


def test_scalars_typed_keys_and_empty_groups(tmp_path):
    state = {"w": jnp.ones(3), "epoch": 4, "lr": 0.5, "rng": jax.random.key(3), "scores": {}}
    with RunCheckpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {})
        restored, _ = ckpt.restore(abstract_state=_abstract(state))
    assert restored["epoch"] == 4 and restored["lr"] == 0.5 and restored["scores"] == {}
    np.testing.assert_array_equal(restored["w"], np.ones(3))
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(jax.random.key(3))
    )


def test_meta_must_be_json(tmp_path):
    with RunCheckpointer(tmp_path / "ckpt") as ckpt, pytest.raises(TypeError, match="JSON"):
        ckpt.save(1, _make_state(), {"x": np.float32(1.0)})


def test_final_round_trip_without_target(tmp_path):
    state = _make_state()
    tree = {
        "params": state.params,
        "batch_stats": {"bn1": {"mean": jnp.ones(4)}},
        "scores": state.scores,
        "masks": state.masks,
        "prompt": {"program": jnp.ones((8, 8, 3))},
        "label_mapping": state.mapping,
    }
    meta = {"arch": "resnet18", "density": 0.1}
    save_final(tmp_path / "final", tree, meta)
    save_final(tmp_path / "final", tree, meta)  # overwrites
    loaded, loaded_meta = load_final(tmp_path / "final")
    assert loaded_meta == meta
    _assert_same(loaded, jax.tree.map(np.asarray, tree))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    assert loaded["masks"]["layer1_0/conv1/kernel"].dtype == np.bool_
    with pytest.raises(CheckpointError, match="no final artifacts"):
        load_final(tmp_path / "nothing")


_RESHARD_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from vpns_jax.checkpoint import RunCheckpointer
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    abstract = {"w": jax.ShapeDtypeStruct((16, 3), jnp.float32),
                "m": {"a/b": jax.ShapeDtypeStruct((4,), jnp.bool_)}}
    shardings = {"w": NamedSharding(mesh, P("data")), "m": {"a/b": NamedSharding(mesh, P())}}
    with RunCheckpointer(sys.argv[1]) as ckpt:
        state, meta = ckpt.restore(abstract_state=abstract, shardings=shardings)
        default, _ = ckpt.restore(abstract_state=abstract)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(48.0).reshape(16, 3))
    np.testing.assert_array_equal(np.asarray(state["m"]["a/b"]), [True, False, True, False])
    assert state["w"].sharding == shardings["w"] and len(state["w"].addressable_shards) == 8
    assert state["w"].addressable_shards[0].data.shape == (2, 3)
    assert default["w"].sharding.is_fully_replicated and len(default["w"].sharding.device_set) == 8
    print("OK", meta["stage"])
""")


def test_restore_one_device_checkpoint_on_eight_devices(tmp_path):
    d = tmp_path / "ckpt"
    state = {
        "w": jnp.arange(48.0).reshape(16, 3),
        "m": {"a/b": jnp.array([True, False, True, False])},
    }
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, state, {"stage": "tune"})
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RESHARD_SCRIPT, str(d)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK tune" in proc.stdout


def _tmpfs_command(mountpoint, command):
    """`command` run inside a private mount namespace with a 1 MiB tmpfs on `mountpoint`, or None
    where this machine allows no such mount (unshare missing, user namespaces disabled)."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mountpoint}"],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c",
            f"mount -t tmpfs -o size=1m tmpfs {mountpoint} && exec \"$0\" \"$@\"", *command]


def test_failures_print_one_clear_line_and_no_traceback(tmp_path):
    """Refused checkpoint, Ctrl-C during restores, disk full during a save (a real 1 MiB tmpfs where
    the machine allows the mount, else simulated ENOSPC), nothing readable: each prints its one
    clear line and nothing after it (no "Event loop is closed", no orbax traceback)."""
    full, other = tmp_path / "full", tmp_path / "other"
    full.mkdir()
    other.mkdir()
    worker = os.path.join(os.path.dirname(__file__), "checkpoint_faults_worker.py")
    command = _tmpfs_command(full, [sys.executable, worker, str(full), str(other), "tmpfs"])
    if command is None:
        command = [sys.executable, worker, str(full), str(other), "simulate"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    for noise in ("Traceback", "Event loop is closed", "Task was destroyed", "never retrieved"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert lines == [line for line in lines if line.startswith("error: ")], proc.stderr[-3000:]
    refused, interrupted, disk_full, corrupt = lines
    assert refused.startswith(f"error: checkpoint 2 in {other / 'refused'} was written by a different")
    assert interrupted == "error: interrupted"
    assert disk_full == (
        f"error: saving checkpoint 2 in {full / 'ckpt'} failed: the disk is full (No space left on "
        f"device); checkpoint 1 ({full / 'ckpt' / '1'}) is kept. Free disk space (or move the "
        "workdir to a larger disk) and rerun the same command to resume")
    assert corrupt.startswith(f"error: no checkpoint in {other / 'corrupt'} is readable")


def test_two_processes_agree_on_the_fallback(tmp_path):
    """Truncated on disk, or unreadable on one process only: both processes restore step 1 and
    step 2 is set aside once, by process 0 (which logs the warning)."""
    from multiprocess_worker import free_port

    worker = os.path.join(os.path.dirname(__file__), "checkpoint_multiprocess_worker.py")
    port, logs, procs = str(free_port()), [tmp_path / f"p{i}.log" for i in range(2)], []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, worker, str(i), port, str(tmp_path)],
                                          stdout=out, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            p.kill()
    outputs = [log.read_text() for log in logs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    for case in ("truncated", "one_process"):
        d = tmp_path / case
        (aside,) = glob.glob(str(d / "2.unreadable-*"))
        for out in outputs:
            (row,) = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                      if line.startswith("RESULT ") and f'"case": "{case}"' in line]
            assert row == {"case": case, "epoch": 1, "w": 1.0, "steps": [1],
                           "listing": ["1", os.path.basename(aside)]}
        warning = f"checkpoint 2 in {d} cannot be read ("
        assert outputs[0].count(warning) == 1 and f"set it aside as {aside}" in outputs[0]
    assert "another process could not read it" in outputs[0]
    assert "cannot be read on process 1 (simulated read error on process 1)" in outputs[1]


def test_a_checkpoint_that_cannot_be_renamed_stops_the_run(tmp_path, monkeypatch):
    """Never silently keep an unreadable checkpoint in the step list (a later save of that step
    would be skipped and the good ones rotated out): one clear error instead."""
    d = tmp_path / "ckpt"
    with RunCheckpointer(d) as ckpt:
        ckpt.save(1, _make_state(1), META)
        ckpt.save(2, _make_state(2), META)
    _damage(d / "2", "truncate_data")

    def read_only(self, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(epath.Path(d)), "rename", read_only)
    with RunCheckpointer(d) as ckpt, pytest.raises(CheckpointError) as err:
        ckpt.restore(abstract_state=_abstract(_make_state()))
    assert str(err.value) == (
        f"checkpoint 2 in {d} cannot be read and cannot be set aside (PermissionError: [Errno 13] "
        f"Permission denied: '{d / '2'}'); move {d / '2'} out of {d} yourself, or use a new --workdir")
