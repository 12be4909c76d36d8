"""Faults in whole runs: SIGTERM / SIGINT at chosen points (mid-epoch, during a save, during the
evaluation), a diverging run, and the exit codes of the command line.

Every interrupted run is rerun and must end bit-identical to an uninterrupted one, redoing at most
one iteration. The signals are real (`os.kill` of this process, through the installed handlers),
sent from inside the run at the chosen moment.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_experiment import FASHION, ROOT, small_config

from vpns_jax import checkpoint, experiment, main, preemption, runner, train
from vpns_jax.errors import Diverged

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")

STEPS = 4  # iterations per epoch; VPNs 2 + 2 epochs: 16 iterations


def _config(weights: str):
    c = small_config(weights)
    c.steps_per_epoch = STEPS
    c.checkpoint_every_steps = 3
    c.plots = False
    return c


class _Counted:
    """Counts the training iterations run (all stages, all runs)."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = runner.StepCache.train

        def train_fn(cache, stage):
            fn = original(cache, stage)

            def counted(*args):
                self.n += 1
                return fn(*args)
            return counted

        monkeypatch.setattr(runner.StepCache, "train", train_fn)


def _finals(workdir: str) -> dict:
    out = {}
    for name in sorted(os.listdir(os.path.join(workdir, "final"))):
        tree, _ = checkpoint.load_final(os.path.join(workdir, "final", name))
        out[name] = tree
    return out


def _rows(results: dict) -> list:
    keep = ("method", "sparsity", "accuracy", "accuracy_with_prompt", "accuracy_without_prompt",
            "actual_sparsity", "key")
    return [{k: r[k] for k in keep} for r in results["runs"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, proxy_weights):
    """An uninterrupted run: (config, results, final trees, iterations)."""
    base = tmp_path_factory.mktemp("faults")
    config = _config(proxy_weights)
    with pytest.MonkeyPatch.context() as mp:
        counted = _Counted(mp)
        results = experiment.run(config, str(base / "run"))
    assert counted.n == 4 * STEPS
    return config, results, _finals(str(base / "run")), counted.n


def _assert_same(reference, results, workdir):
    _, ref_results, ref_finals, _ = reference
    assert _rows(results) == _rows(ref_results)
    finals = _finals(workdir)
    assert sorted(finals) == sorted(ref_finals)
    for name, tree in finals.items():
        ref = jax.tree_util.tree_leaves_with_path(ref_finals[name])
        got = jax.tree_util.tree_leaves_with_path(tree)
        assert [p for p, _ in got] == [p for p, _ in ref]
        for (path, a), (_, b) in zip(got, ref, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {jax.tree_util.keystr(path)}")


def _signal_self(sig: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), sig)


def _stopped(run, sig: int) -> str:
    with pytest.raises(preemption.Stopped, match=signal.Signals(sig).name) as stopped:
        run()
    return str(stopped.value)


def test_stops_at_random_points_resume_bit_identical(reference, tmp_path, monkeypatch, caplog):
    """One workdir, three interruptions in a row, each rerun resuming where the last one saved:
    1. SIGTERM after a random iteration -> saved after that iteration;
    2. SIGINT (Ctrl-C) while a checkpoint is being written (the async write in flight) -> saved
       after the next iteration;
    3. SIGTERM during the final evaluation -> the run's evaluation and results still finish (every
       stage is saved; stopping now would only redo the evaluation).
    Together they redo no iteration, and the end is bit-identical to the uninterrupted run."""
    config, workdir = reference[0], str(tmp_path / "run")
    counted = _Counted(monkeypatch)
    at = int(np.random.default_rng(14).integers(1, 2 * STEPS))  # in the first stage
    sent = []

    def send_once(sig: int, key: str) -> None:
        if key not in sent:
            sent.append(key)
            _signal_self(sig)

    original_train = runner.StepCache.train  # counted

    def train_fn(cache, stage):
        fn = original_train(cache, stage)

        def step(*args):
            out = fn(*args)
            if counted.n == at:
                send_once(signal.SIGTERM, "iteration")
            return out
        return step

    with monkeypatch.context() as mp:
        mp.setattr(runner.StepCache, "train", train_fn)
        message = _stopped(lambda: experiment.run(config, workdir), signal.SIGTERM)
    assert counted.n == at, (counted.n, at)  # saved right after the iteration it arrived in
    assert "rerun the same command to resume" in message and f"after iteration {at}/" in message

    original_save = checkpoint.RunCheckpointer.save
    first_save = []

    def save(self, step, *args, **kwargs):
        started = original_save(self, step, *args, **kwargs)
        if started and first_save:  # not the checkpoint the stop itself writes
            send_once(signal.SIGINT, "save")
        first_save.append(step)
        return started

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint.RunCheckpointer, "save", save)
        before = counted.n
        _stopped(lambda: experiment.run(config, workdir), signal.SIGINT)
    assert "save" in sent and counted.n > before

    original_evaluate = train.evaluate

    def evaluate(*args, **kwargs):
        if counted.n == 4 * STEPS:  # the run's final evaluation
            send_once(signal.SIGTERM, "evaluation")
        return original_evaluate(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(train, "evaluate", evaluate)
        results = experiment.run(config, workdir)
    assert sent == ["iteration", "save", "evaluation"]
    assert counted.n == reference[3]  # no iteration redone
    assert "SIGTERM: finishing the current iteration" in caplog.text
    assert "the job is complete" in caplog.text
    _assert_same(reference, results, workdir)


def test_a_diverging_run_stops_and_keeps_a_finite_checkpoint(reference, tmp_path):
    config = reference[0].copy_and_resolve_references()
    config.methods = "dense"
    config.dense.epochs = 2
    config.dense.lr = 1e12  # SGD on the weights: the loss overflows within a few steps
    workdir = str(tmp_path / "run")
    with pytest.raises(Diverged) as err:
        experiment.run(config, workdir)
    message = str(err.value)
    assert "dense_s0 diverged" in message and "in stage finetune" in message
    assert "is kept" in message and "on_nonfinite=skip_batch" in message
    kept = message.split("the last good checkpoint, ")[1].split(" ")[0]
    tree = ocp.StandardCheckpointer().restore(os.path.join(kept, "state"))
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    assert leaves and all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")
    # every checkpoint left in the workdir holds finite values
    for stage_dir in os.listdir(os.path.join(workdir, "stages")):
        d = os.path.join(workdir, "stages", stage_dir)
        for step in os.listdir(d):
            if step.isdigit():
                t = ocp.StandardCheckpointer().restore(os.path.join(d, step, "state"))
                assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(t)
                           if np.asarray(x).dtype.kind == "f"), (stage_dir, step)


@pytest.mark.parametrize("exc, code, prefix", [
    (preemption.Stopped("SIGTERM received: saved"), preemption.EXIT_STOPPED, "stopped: SIGTERM"),
    (Diverged("vpns_s0.5 diverged: pass0/loss nan"), preemption.EXIT_DIVERGED, "error: vpns_s0.5"),
])
def test_exit_codes(exc, code, prefix, monkeypatch, capsys):
    def raise_it(*args, **kwargs):
        raise exc
    monkeypatch.setattr(main.app, "run", raise_it)
    with pytest.raises(SystemExit) as out:
        main.run()
    assert out.value.code == code
    assert capsys.readouterr().err.startswith(prefix)


def test_cli_sigterm_saves_and_exits_75(reference, tmp_path):
    """The real command: SIGTERM while it trains -> one 'stopped:' line, exit code 75, no traceback
    (the resume itself is test_stops_at_random_points_resume_bit_identical's)."""
    config = reference[0]
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vpns_jax.main", "--config",
           os.path.join(ROOT, "configs/quickstart.py:fast"), "--workdir", str(workdir),
           f"--config.weights={config.weights}", "--config.methods=vpns",
           "--config.sparsities=(0.5,)", "--config.steps_per_epoch=0",
           "--config.vpns.tuning.epochs=20", "--config.log_every_steps=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            # wait until it trains (a progress line of the tuning stage), then preempt it
            import time
            deadline = time.monotonic() + 120
            while "tuning epoch 1/20 it 2/" not in (tmp_path / "log").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "log").read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    text = (tmp_path / "log").read_text()
    last = text.strip().splitlines()[-1]
    assert code == preemption.EXIT_STOPPED, text[-3000:]
    assert last.startswith("stopped: SIGTERM received: vpns_s0.5 saved "), last
    assert "Traceback" not in text


def test_proxy_training_stops_and_resumes_bit_identical(reference, tmp_path):
    """The offline source model is checkpointed like a stage: SIGTERM mid-training saves, the rerun
    resumes and writes the same weights as an uninterrupted training."""
    from vpns_jax import proxy
    from vpns_jax import weights as weights_lib

    config = reference[0].copy_and_resolve_references()
    config.proxy.steps_per_epoch, config.proxy.epochs, config.proxy.batch_size = 3, 2, 32
    config.checkpoint_every_steps = 2
    whole = str(tmp_path / "whole.safetensors")
    proxy.train_proxy(config, whole)
    stopped = str(tmp_path / "stopped.safetensors")
    stops = preemption.StopRequests()
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 4:  # epoch 2, iteration 1
            _signal_self()
        return preemption.StopRequests.check(stops)

    stops.check = check
    with stops, pytest.raises(preemption.Stopped, match="the proxy's training saved .*/4 "
                                                        r"\(in epoch 2/2 after iteration 1/3\)"):
        proxy.train_proxy(config, stopped, stops=stops)
    assert not os.path.exists(stopped) and os.path.isdir(proxy.training_dir(stopped))
    proxy.train_proxy(config, stopped)
    assert not os.path.exists(proxy.training_dir(stopped))  # removed once the weights exist
    _, a, meta_a = weights_lib.load(whole)
    _, b, meta_b = weights_lib.load(stopped)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # (the recorded train loss is the last epoch's mean over the iterations this process ran)
    assert np.isfinite(meta_b["source"]["train_loss"]) and meta_b["source"]["steps"] == 6
