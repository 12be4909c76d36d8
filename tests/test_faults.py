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
def reference(tmp_path_factory):
    """An uninterrupted run: (config, results, final trees, iterations)."""
    base = tmp_path_factory.mktemp("faults")
    config = _config(str(base / "proxy.safetensors"))
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


def _interrupt_then_resume(reference, tmp_path, monkeypatch, arm, sig=signal.SIGTERM,
                           arm_rerun=None):
    """`arm(mp, send, counted)` patches the run so that `send()` is called at the chosen moment;
    the run must stop with `Stopped`, and the rerun (patched by `arm_rerun`, if given) must finish
    identical to `reference`."""
    config = reference[0]
    workdir = str(tmp_path / "run")
    counted = _Counted(monkeypatch)
    sent = []

    def send():
        if not sent:
            sent.append(counted.n)
            _signal_self(sig)

    with monkeypatch.context() as mp:
        arm(mp, send, counted)
        with pytest.raises(preemption.Stopped, match=signal.Signals(sig).name) as stopped:
            experiment.run(config, workdir)
    assert sent, "the signal was never sent"
    before = counted.n
    with monkeypatch.context() as mp:
        if arm_rerun is not None:
            arm_rerun(mp, counted)
        results = experiment.run(config, workdir)
    redone = before + (counted.n - before) - reference[3]
    assert 0 <= redone <= 1, (before, counted.n)
    _assert_same(reference, results, workdir)
    return str(stopped.value), sent[0], before


def test_sigterm_mid_epoch_resumes_bit_identical(reference, tmp_path, monkeypatch):
    at = int(np.random.default_rng(14).integers(1, 4 * STEPS))  # a random iteration

    def arm(mp, send, counted):
        original = runner.StepCache.train

        def train_fn(cache, stage):
            fn = original(cache, stage)

            def step(*args):
                out = fn(*args)
                if counted.n == at:
                    send()
                return out
            return step
        mp.setattr(runner.StepCache, "train", train_fn)

    message, sent_at, stopped_after = _interrupt_then_resume(reference, tmp_path, monkeypatch, arm)
    assert stopped_after == sent_at  # saved after the iteration the signal arrived in
    assert "rerun the same command to resume" in message and "saved" in message


def test_sigterm_during_a_save_then_sigint_during_the_evaluation(reference, tmp_path, monkeypatch,
                                                                   caplog):
    """SIGTERM while a checkpoint is being written: stop after the next iteration, resume. In the
    rerun, SIGINT during the final evaluation: the run's evaluation and results still finish (the
    stage checkpoints are complete; a stop now would only redo the evaluation)."""
    def arm(mp, send, counted):
        original = checkpoint.RunCheckpointer.save

        def save(self, step, *args, **kwargs):
            started = original(self, step, *args, **kwargs)
            if counted.n >= 6 and started:  # the async write is in flight
                send()
            return started
        mp.setattr(checkpoint.RunCheckpointer, "save", save)

    def arm_rerun(mp, counted):
        original = train.evaluate
        sent = []

        def evaluate(*args, **kwargs):
            if counted.n == 4 * STEPS and not sent:  # the run's final evaluation (once: a second
                sent.append(True)                    # signal would end the process at once)
                _signal_self(signal.SIGINT)
            return original(*args, **kwargs)
        mp.setattr(train, "evaluate", evaluate)

    _interrupt_then_resume(reference, tmp_path, monkeypatch, arm, arm_rerun=arm_rerun)
    assert "SIGINT: finishing the current iteration" in caplog.text
    assert "the job is complete" in caplog.text


def test_a_diverging_run_stops_and_keeps_a_finite_checkpoint(reference, tmp_path):
    config = reference[0].copy_and_resolve_references()
    config.vpns.mask_finding.epochs = 1
    config.vpns.tuning.lr = 1e12  # SGD on the weights: the loss overflows within a few steps
    workdir = str(tmp_path / "run")
    with pytest.raises(Diverged) as err:
        experiment.run(config, workdir)
    message = str(err.value)
    assert "vpns_s0.5 diverged" in message and "in stage tuning" in message
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


def test_cli_sigterm_exits_75_and_the_rerun_resumes(reference, tmp_path):
    """The real command: SIGTERM while it trains -> one 'stopped:' line, exit code 75, no traceback;
    the same command again resumes and finishes."""
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
    rerun = subprocess.run([*cmd, "--config.vpns.tuning.epochs=20", "--config.max_hours=1e-9"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    # max_hours: the budget is spent at once, so the resumed run stops again after one iteration
    assert rerun.returncode == preemption.EXIT_STOPPED, rerun.stderr[-3000:]
    assert "resuming stage tuning in epoch 1/20 after iteration" in rerun.stderr
    assert "config.max_hours" in rerun.stderr.strip().splitlines()[-1]
