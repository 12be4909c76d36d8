"""Metrics while training: step / epoch / test rows in metrics.jsonl, the same scalars in TensorBoard
event files (read back with the `tensorboard` package's reader, no TensorFlow), test accuracy every N
epochs without changing training, `accuracy_best_on_test`, and the cost table.

Two tiny VPNs runs on digits (2 + 2 epochs of 2 iterations) from the session's proxy weights: one
evaluating every epoch and logging every iteration, one with the defaults.
"""

from __future__ import annotations

import os
from unittest import mock

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from test_experiment import FASHION, small_config

from vpns_jax import checkpoint, experiment, report, runner, tb
from vpns_jax.train import optim

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")

SPE, BATCH = 2, 32


def _config(weights: str, **overrides):
    c = small_config(weights)
    c.steps_per_epoch, c.batch_size, c.plots = SPE, BATCH, False
    for name, value in overrides.items():
        c[name] = value
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, proxy_weights):
    """{'every': (config, workdir, results) with eval_every_epochs=1 and log_every_steps=1,
    'default': the same run with the defaults (eval at stage ends, no step rows)}. The second
    run reuses the first one's jitted steps (the same model and prompt geometry; tracing them
    is most of a tiny run's time), so both train with the very same compiled functions."""
    base = tmp_path_factory.mktemp("metrics")
    out, caches, make = {}, [], runner.StepCache

    def shared(*args, **kwargs):
        caches.append(caches[0] if caches else make(*args, **kwargs))
        return caches[-1]

    with mock.patch.object(experiment.runner, "StepCache", shared):
        for name, overrides in (("every", {"eval_every_epochs": 1, "log_every_steps": 1}),
                                ("default", {"eval_every_epochs": 0})):
            config = _config(proxy_weights, checkpoint_every_epochs=2, **overrides)
            workdir = str(base / name)
            out[name] = config, workdir, experiment.run(config, workdir)
    return out


def _scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_jsonl_scalars_at_the_global_steps(runs):
    config, workdir, _ = runs["every"]
    (run,) = experiment.plan(config)
    events = _scalars(tb.event_dir(workdir, run.name))
    steps = tb.rows_of(workdir, "step", run.name)
    # every iteration of the chain (2 stages x 2 epochs x 2 iterations), global step 1..8
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [(r["stage"], r["epoch"], r["iteration"]) for r in steps[3:5]] == [
        ("mask_finding", 2, 2), ("tuning", 1, 1)]
    expected: dict[str, list[tuple[int, float]]] = {}
    bookkeeping = {"kind", "run", "stage", "stage_key", "epoch", "iteration", "step", "prompted"}
    for kind, prefix in (("step", ""), ("epoch", "epoch/"), ("test", "test/")):
        for r in tb.rows_of(workdir, kind, run.name):
            for k, v in r.items():
                if k not in bookkeeping:
                    expected.setdefault(prefix + k, []).append((r["step"], float(np.float32(v))))
    assert set(events) == set(expected)
    assert {"train/pass0/loss", "train/pass1/accuracy", "lr/params", "lr/prompt", "lr/scores",
            "speed/images_per_second", "epoch/pass0/loss", "test/accuracy"} <= set(events)
    for tag, points in expected.items():
        assert events[tag] == points, tag
    # images/s from the second iteration of each stage on (the first one compiles)
    assert [s for s, _ in events["speed/images_per_second"]] == [2, 3, 4, 6, 7, 8]
    # learning rates: base lr x the stage's schedule at that epoch, per trained group
    for r in steps:
        stage = next(s for s in run.stages if s.name == r["stage"])
        for g in stage.trainable_groups:
            group = stage.group(g)
            want = np.float32(group.lr * optim.lr_factor(group.schedule, r["epoch"] - 1, stage.epochs))
            assert r[f"lr/{g}"] == pytest.approx(float(want), rel=1e-6), (r["step"], g)
        assert set(stage.trainable_groups) == {k[3:] for k in r if k.startswith("lr/")}
    # the epoch rows keep their old fields (readers of per-epoch metrics)
    epochs = tb.rows_of(workdir, "epoch", run.name)
    assert [(r["stage"], r["epoch"], r["step"]) for r in epochs] == [
        ("mask_finding", 1, 2), ("mask_finding", 2, 4), ("tuning", 1, 6), ("tuning", 2, 8)]


def test_eval_every_epochs_rows_and_best_on_test(runs):
    _, every_dir, every = runs["every"]
    _, default_dir, default = runs["default"]
    tests = tb.rows_of(every_dir, "test")
    assert [(r["stage"], r["epoch"], r["step"]) for r in tests] == [
        ("mask_finding", 1, 2), ("mask_finding", 2, 4), ("tuning", 1, 6), ("tuning", 2, 8)]
    plain = tb.rows_of(default_dir, "test")
    assert [(r["stage"], r["step"]) for r in plain] == [("mask_finding", 4), ("tuning", 8)]
    assert not tb.rows_of(default_dir, "step")  # log_every_steps=50 > 2 iterations per epoch
    # the same states measured in both runs
    assert tests[1]["accuracy"] == plain[0]["accuracy"] and tests[3]["accuracy"] == plain[1]["accuracy"]
    (row,) = every["runs"]
    assert tests[-1]["accuracy"] == row["accuracy"] == row["accuracy_without_prompt"]
    assert row["accuracy_best_on_test"] == max(r["accuracy"] for r in tests if r["stage"] == "tuning")
    assert default["runs"][0]["accuracy_best_on_test"] == default["runs"][0]["accuracy"]
    table = report.format_table(every["runs"])
    assert "selected on test" in table.splitlines()[0] and report.BEST_NOTE in table


def test_evaluations_do_not_change_training(runs):
    trees = []
    for name in ("every", "default"):
        config, workdir, _ = runs[name]
        (run,) = experiment.plan(config)
        tree, _ = checkpoint.load_final(os.path.join(workdir, "final", run.name))
        trees.append(tree)
    a, b = (jax.tree_util.tree_leaves_with_path(t) for t in trees)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_cost_fields_and_cost_md(runs):
    config, workdir, results = runs["every"]
    (row,) = results["runs"]
    (run,) = experiment.plan(config)
    assert row["images"] == sum(s.epochs * SPE * BATCH * len(s.views) for s in run.stages)
    assert row["gradient_steps"] == sum(s.epochs * SPE * s.steps_per_iteration for s in run.stages)
    assert 0 < row["compile_seconds"] < row["seconds"]
    text = open(os.path.join(workdir, report.COST_FILE)).read()
    assert f"| digits | resnet18 | vpns | 0.5 | 1 | 2+2 = 4 | {row['gradient_steps']:,} " in text


def test_cost_table_on_hand_made_records(tmp_path):
    def row(method, sparsity, seed, seconds, compile_seconds, **kw):
        return {"method": method, "sparsity": sparsity, "seed": seed, "dataset": "digits",
                "arch": "resnet18", "epochs": [3, 2], "gradient_steps": 400, "images": 12800,
                "seconds": seconds, "compile_seconds": compile_seconds, **kw}

    runs = [row("vpns", 0.9, 0, 10.0, 2.0), row("vpns", 0.9, 1, 14.0, 4.0),
            row("dense", 0.0, 0, 5.0, 1.0, epochs=[4], gradient_steps=100, images=3200),
            row("omp", 0.9, 0, 7.0, None)]  # a row from before compile time was recorded
    costs = report.cost_rows(runs)
    assert [(c["method"], c["n"], c["seconds"], c["compile_seconds"]) for c in costs] == [
        ("dense", 1, 5.0, 1.0), ("omp", 1, 7.0, None), ("vpns", 2, 12.0, 3.0)]
    lines = report.format_cost_table(runs).splitlines()
    assert lines[2] == "| digits | resnet18 | dense | 0 | 1 | 4 = 4 | 100 | 3,200 | 5.0 | 1.0 |"
    assert lines[3] == "| digits | resnet18 | omp | 0.9 | 1 | 3+2 = 5 | 400 | 12,800 | 7.0 | - |"
    assert lines[4] == "| digits | resnet18 | vpns | 0.9 | 2 | 3+2 = 5 | 400 | 12,800 | 12.0 | 3.0 |"
    # over several workdirs (a sweep's seeds): the same table from their results.json files
    dirs = []
    for n, part in enumerate((runs[:1], runs[1:])):
        dirs.append(str(tmp_path / f"seed_{n}"))
        os.makedirs(dirs[-1])
        report.save_results(dirs[-1], {"runs": part, "dense": None})
    assert report.cost_table_for(dirs) == report.format_cost_table(runs)


def test_resumed_logger_drops_later_steps_in_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path)
    with tb.RunLogger(workdir, "r") as log:
        log.resume("k", 0)
        for step in range(1, 5):
            log.log("step", step, {"stage": "s", "stage_key": "k"}, {"train/loss": step})
    with tb.RunLogger(workdir, "r") as log:  # resumed from the checkpoint after step 2
        log.resume("k", 2)
        for step in (3, 4):
            log.log("step", step, {"stage": "s", "stage_key": "k"}, {"train/loss": 10 * step})
    rows = tb.rows_of(workdir, "step", "r")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1), (2, 2), (3, 30), (4, 40)]
    assert _scalars(tb.event_dir(workdir, "r"))["train/loss"] == [(1, 1), (2, 2), (3, 30), (4, 40)]
    assert tb.best_on_test([{"kind": "test", "stage_key": "k", "accuracy": 0.5},
                            {"kind": "test", "stage_key": "j", "accuracy": 0.9},
                            {"stage_key": "k", "accuracy": 0.8}], "k") == 0.5  # epoch rows: no kind
