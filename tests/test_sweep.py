"""Seeds, sweeps and aggregation: mean ± std (n − 1) on hand-made rows, a tiny sweep on digits end to
end (interrupted after a cell and rerun: every cell exactly once), two workers on one sweep directory,
config.seeds, and the bad inputs (unknown config / method / dataset, another grid in the same dir)."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from test_experiment import FASHION, small_config

from vpns_jax import aggregate, experiment, report, sweep
from vpns_jax import config as config_lib
from vpns_jax import workdir as workdir_lib
from vpns_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(method, sparsity, seed, acc, with_prompt=None, actual=None, config=""):
    return {**report.run_record(method=method, arch="resnet18", dataset="digits", seed=seed,
                                sparsity=sparsity, actual_sparsity=sparsity if actual is None else actual,
                                accuracy=acc, accuracy_with_prompt=with_prompt,
                                accuracy_without_prompt=acc, epochs=[1], gradient_steps=2,
                                seconds=1.0), "config": config}


# ----------------------------------------------------------------------------------------------------
# Aggregation on hand-made rows


def test_group_rows_mean_std_n_and_markdown():
    rows = [_row("vpns", 0.9, 0, 0.90, 0.95), _row("vpns", 0.9, 1, 0.80, 0.85),
            _row("vpns", 0.9, 2, 0.70, None), _row("dense", 0.0, 0, 0.97),
            _row("dense", 0.0, 0, 0.10),  # the same (group, seed) from a second cell: counted once
            _row("hydra", 0.9, 5, 0.5, actual=0.9001), _row("hydra", 0.9, 6, 0.6, actual=0.8999)]
    groups = aggregate.group_rows(rows)
    assert [(g["method"], g["sparsity"], g["n"], g["seeds"]) for g in groups] == [
        ("dense", 0.0, 1, [0]), ("hydra", 0.9, 2, [5, 6]), ("vpns", 0.9, 3, [0, 1, 2])]
    dense, hydra, vpns = groups
    assert dense["accuracy"] == {"mean": 0.97, "std": None, "n": 1, "values": [0.97]}
    assert vpns["accuracy"]["mean"] == pytest.approx(0.8)
    assert vpns["accuracy"]["std"] == pytest.approx(0.1)  # sqrt(((.1)^2 + 0 + (.1)^2) / (3 - 1))
    assert vpns["accuracy"]["std"] == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
    assert vpns["accuracy_with_prompt"]["n"] == 2  # seed 2 has no prompted accuracy
    assert vpns["accuracy_with_prompt"]["mean"] == pytest.approx(0.9)
    assert vpns["accuracy_with_prompt"]["std"] == pytest.approx(np.sqrt(2 * 0.05 ** 2))
    assert hydra["actual_sparsity"]["std"] == pytest.approx(np.std([0.9001, 0.8999], ddof=1))
    assert hydra["accuracy_with_prompt"] is None
    assert aggregate.markdown_table(groups).splitlines() == [
        "| dataset | arch | method | sparsity | n | acc % | acc + VP % | actual sparsity |",
        "|---|---|---|---|---|---|---|---|",
        "| digits | resnet18 | dense | 0.000 | 1 | 97.00 | - | 0.0000 |",
        "| digits | resnet18 | hydra | 0.900 | 2 | 55.00 ± 7.07 | - | 0.9000 ± 0.0001 |",
        "| digits | resnet18 | vpns | 0.900 | 3 | 80.00 ± 10.00 | 90.00 ± 7.07 | 0.9000 ± 0.0000 |"]
    # a transferred mask's row (same method, sparsity and seed) is a group of its own
    moved = {**_row("vpns", 0.9, 0, 0.5), "mask_from": "fashion_mnist/vpns_s0.9"}
    groups = aggregate.group_rows(rows + [moved])
    assert [(g["method"], g["mask_from"], g["n"]) for g in groups][-2:] == [
        ("vpns", "", 3), ("vpns", "fashion_mnist/vpns_s0.9", 1)]
    assert "| vpns (mask from fashion_mnist/vpns_s0.9) | 0.900 | 1 | 50.00 |" in \
        aggregate.markdown_table(groups)


def test_summary_lists_missing_rows_and_separates_configs(tmp_path):
    cells = [{"name": "a/vpns/seed_0", "dir": "cells/a/vpns/seed_0", "config": "a", "seed": 0,
              "runs": [["vpns", 0.5], ["vpns", 0.9]]},
             {"name": "b/vpns/seed_0", "dir": "cells/b/vpns/seed_0", "config": "b", "seed": 0,
              "runs": [["vpns", 0.5]]}]
    workdir = tmp_path / "cells/a/vpns/seed_0"
    workdir.mkdir(parents=True)
    report.save_results(str(workdir), {"runs": [_row("vpns", 0.5, 0, 0.75)], "dense": None})
    summary = aggregate.summarize(str(tmp_path), cells)
    assert summary["cells_done"] == 0 and not summary["complete"] and summary["rows"] == 1
    assert [(m["cell"], m["sparsity"]) for m in summary["missing"]] == [
        ("a/vpns/seed_0", 0.9), ("b/vpns/seed_0", 0.5)]
    assert json.load(open(tmp_path / "summary.json"))["groups"][0]["accuracy"]["values"] == [0.75]
    text = open(tmp_path / "summary.md").read()
    assert "| digits | resnet18 | vpns | 0.500 | 1 | 75.00 | - | 0.5000 |" in text
    assert "- a/vpns/seed_0: vpns at sparsity 0.9" in text and "0/2 cells finished" in text
    two = aggregate.group_rows([_row("vpns", 0.5, 0, 0.7, config="a"),
                                _row("vpns", 0.5, 0, 0.9, config="b")])
    assert [g["n"] for g in two] == [1, 1]  # same dataset/arch/method/sparsity, two configs
    assert aggregate.markdown_table(two).splitlines()[0].startswith("| config | dataset |")


def test_configs_with_the_same_source_model_share_it(tmp_path):
    """Ablation variants differ downstream only: one proxy source model for all of them; a config
    whose proxy trains differently gets its own."""
    def proxy(**fields):
        c = config_lib.proxy_task_config(fast=True)
        c.methods = "vpns"
        config_lib.apply_overrides(c, fields)
        return c

    plan = sweep.plan_cells(sweep.Sweep(configs={
        "pad": proxy(**{"prompt.pad_size": 2}),
        "fix": proxy(**{"prompt.method": "fix", "prompt.mask_size": 21}),
        "longer": proxy(**{"proxy.epochs": 3})}, seeds=(0,)), str(tmp_path))
    weights = {c.config_name: c.config.weights for c in plan.cells}
    assert weights["pad"] == weights["fix"] != weights["longer"]
    assert [path for _, path in plan.sources] == [weights["pad"], weights["longer"]]
    assert weights["pad"].endswith("sources/pad/proxy_resnet18.safetensors")


# ----------------------------------------------------------------------------------------------------
# Bad input (no training)


def _tiny(weights: str):
    c = small_config(weights)
    c.steps_per_epoch = 2
    config_lib.set_epochs(c, lambda e: 1)
    c.plots = False
    return c


def test_bad_sweep_inputs_are_one_line_before_anything_starts(tmp_path, capsys):
    c = _tiny(str(tmp_path / "none.safetensors"))
    cases = [
        (sweep.Sweep(configs={"x": c}, methods=("dense,omq",)),
         "sweep: unknown method 'omq' (in methods entry 'dense,omq'); known methods: dense,"),
        (sweep.Sweep(configs={"x": "configs/nope.py"}, methods=("dense",)),
         "sweep config 'x': config file 'configs/nope.py' does not exist; known configs (configs/): "
         "cifar10, cifar100,"),
    ]
    bad = _tiny(str(tmp_path / "none.safetensors"))
    bad.dataset = "digitz"
    cases.append((sweep.Sweep(configs={"x": bad}, methods=("dense",)),
                  "sweep config 'x': unknown dataset 'digitz'; known datasets: "))
    for s, message in cases:
        with pytest.raises(ConfigError) as e:
            sweep.run_sweep(s, str(tmp_path / "d"))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert "digits" in str(e.value) and not os.path.exists(tmp_path / "d")  # nothing written
    # The command: one `error:` line, exit code 2, nothing written.
    assert sweep.main(["--sweep", "nope.py", "--dir", str(tmp_path / "d")]) == 2
    assert sweep.main(["summarize", "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.splitlines()
    shipped = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs", "sweeps"))
                     if f.endswith(".py"))
    assert "proxy_methods" in shipped and "benchmark" in shipped
    assert err == [
        "error: sweep file nope.py does not exist; the shipped sweeps in configs/sweeps/: "
        f"{', '.join(shipped)}.",
        f"error: {tmp_path / 'd'} holds no sweep (sweep.json) and no seeds workdir (seeds.json); "
        "give the --dir of `python -m vpns_jax.sweep --sweep ...` or the --workdir of a run with "
        "--config.seeds."]
    assert not os.path.exists(tmp_path / "d")


def test_another_grid_in_the_same_directory_is_refused(tmp_path):
    c = _tiny(str(tmp_path / "w.safetensors"))
    one = sweep.Sweep(configs={"x": c}, methods=("dense", "random"), sparsities=(0.5,), seeds=(0, 1))
    plan = sweep.plan_cells(one, str(tmp_path))
    sweep.record_grid(str(tmp_path), plan.grid, plan.cells)
    sweep.record_grid(str(tmp_path), plan.grid, plan.cells)  # the same grid: accepted
    other = sweep.Sweep(configs={"x": c}, methods=("dense", "random"), sparsities=(0.5,),
                        seeds=(0, 1, 2))
    plan2 = sweep.plan_cells(other, str(tmp_path))
    with pytest.raises(ConfigError, match=r"holds a sweep with a different grid \(seeds: \[0, 1\] -> "
                                          r"\[0, 1, 2\]\); one directory holds one grid"):
        sweep.record_grid(str(tmp_path), plan2.grid, plan2.cells)
    c.random.tuning.lr = 0.5
    plan3 = sweep.plan_cells(one, str(tmp_path))
    with pytest.raises(ConfigError, match=r"configs\.x\.random\.tuning\.lr: 0\.01 -> 0\.5"):
        sweep.record_grid(str(tmp_path), plan3.grid, plan3.cells)


# ----------------------------------------------------------------------------------------------------
# Two workers (threads: the workdir lock refuses a second holder in the same process too)


def test_two_workers_run_each_cell_once(tmp_path, monkeypatch):
    c = _tiny(str(tmp_path / "w.safetensors"))
    s = sweep.Sweep(configs={"x": c}, methods=("dense", "random", "omp"), sparsities=(0.5, 0.9),
                    seeds=(0, 1))
    plan = sweep.plan_cells(s, str(tmp_path))
    runs: list[str] = []

    def fake_run(directory, cell):
        """What experiment.run does to a cell's workdir: hold its lock, then write its rows."""
        workdir = os.path.join(directory, cell.dir)
        with workdir_lib.claim(workdir, primary=True, read_only_ok=False):
            runs.append(cell.name)
            time.sleep(0.05)
            rows = [{**_row(m, sp, cell.seed, 0.5), "key": k} for (m, sp), k in cell.keys.items()]
            for name in cell.runs:
                os.makedirs(os.path.join(workdir, "final", name))
            report.save_results(workdir, {"runs": rows, "dense": None})

    monkeypatch.setattr(sweep, "_run_cell", fake_run)
    reports = [None, None]

    def worker(i):
        reports[i] = sweep.run_worker(str(tmp_path), plan.cells)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(runs) == sorted(cell.name for cell in plan.cells)  # each exactly once
    assert len(plan.cells) == 6 and all(r.ran for r in reports)  # both did work
    assert all(sweep.cell_done(str(tmp_path), cell) for cell in plan.cells)
    # A cell held by a live run is skipped, not run, and reported as held.
    again = plan.cells[0]
    os.remove(os.path.join(tmp_path, again.dir, "results.json"))
    with workdir_lib.WorkdirLock(os.path.join(tmp_path, again.dir)):
        held = sweep.run_worker(str(tmp_path), plan.cells)
    assert held.held == [again.name] and held.ran == [] and len(held.finished_before) == 5


# ----------------------------------------------------------------------------------------------------
# End to end on digits


pytestmark_e2e = pytest.mark.skipif(
    not os.path.isdir(FASHION),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")


class Interrupt(Exception):
    pass


@pytestmark_e2e
def test_tiny_sweep_interrupted_and_rerun_runs_every_cell_once(tmp_path, proxy_weights, monkeypatch):
    """dense + random at 0.5 / 0.9, seeds 0 and 1: one cell (workdir) per seed, 1 epoch of 2 steps;
    interrupted after the first cell, the rerun skips it and runs the other."""
    c = _tiny(proxy_weights)
    s = sweep.Sweep(configs={"digits": c}, methods=("dense,random",), sparsities=(0.5, 0.9),
                    seeds=(0, 1))
    calls: list[str] = []
    real = sweep._run_cell
    monkeypatch.setattr(sweep, "_run_cell", lambda d, cell: (calls.append(cell.name), real(d, cell))[1])

    def stop(cell):
        raise Interrupt(cell.name)

    directory = str(tmp_path / "sweep")
    with pytest.raises(Interrupt):
        sweep.run_sweep(s, directory, on_cell_done=stop)
    assert calls == ["digits/dense+random/seed_0"]
    partial = sweep.summarize_dir(directory)
    assert partial["cells_done"] == 1 and [m["seed"] for m in partial["missing"]] == [1, 1, 1]
    done, summary = sweep.run_sweep(s, directory)
    assert calls == ["digits/dense+random/seed_0", "digits/dense+random/seed_1"]  # each once
    assert done.finished_before == calls[:1] and done.ran == calls[1:]
    assert summary["complete"] and summary["rows"] == 6 and summary["cells_done"] == 2
    rows = {}
    for name in calls:
        for r in report.load_results(os.path.join(directory, "cells", name))["runs"]:
            rows[(r["method"], r["sparsity"], r["seed"])] = r
    assert sorted(rows) == [("dense", 0.0, 0), ("dense", 0.0, 1)] + [
        ("random", sp, seed) for sp in (0.5, 0.9) for seed in (0, 1)]
    assert rows[("random", 0.5, 0)]["actual_sparsity"] != rows[("random", 0.5, 1)]["actual_sparsity"]
    assert [(g["method"], g["sparsity"]) for g in summary["groups"]] == [
        ("dense", 0.0), ("random", 0.5), ("random", 0.9)]
    for g in summary["groups"]:
        for metric in ("accuracy", "actual_sparsity"):
            values = [rows[(g["method"], g["sparsity"], seed)][metric] for seed in (0, 1)]
            assert g["n"] == 2 and g[metric]["mean"] == pytest.approx(np.mean(values))
            assert g[metric]["std"] == pytest.approx(np.std(values, ddof=1))
    assert sweep.summarize_dir(directory, write=False)["groups"] == summary["groups"]
    assert "2/2 cells finished, 6 results rows" in open(os.path.join(directory, "summary.md")).read()
    assert sweep.run_sweep(s, directory)[0].finished_before == calls  # a third run: nothing to do


def test_config_seeds_one_workdir_per_seed(tmp_path, monkeypatch):
    """--config.seeds: experiment.run runs each seed in WORKDIR/seed_<s> (seed set, seeds empty) and
    summarizes them; a single-seed run in that workdir is refused. (The per-seed runs are stubbed:
    the real path is the sweep's, tested end to end above.)"""
    c = _tiny(str(tmp_path / "w.safetensors"))
    c.methods, c.sparsities, c.seeds = "random", (0.9,), (3, 4)
    c.proxy.dataset = ""  # given weights: no source model to train
    real, seen = experiment.run, []

    def per_seed(config, workdir):
        if tuple(config.seeds):
            return real(config, workdir)
        seen.append((config.seed, tuple(config.seeds), os.path.relpath(workdir, tmp_path)))
        (run,) = experiment.plan(config)
        key = experiment.row_key(experiment.base_key(config), run)
        os.makedirs(os.path.join(workdir, "final", run.name))
        report.save_results(workdir, {"runs": [{**_row("random", 0.9, config.seed,
                                                       0.5 + config.seed / 100), "key": key}]})
        return report.load_results(workdir)

    monkeypatch.setattr(experiment, "run", per_seed)
    results = experiment.run(c, str(tmp_path / "w"))
    assert seen == [(3, (), "w/seed_3"), (4, (), "w/seed_4")]
    (group,) = results["summary"]["groups"]
    assert group["n"] == 2 and group["seeds"] == [3, 4]
    assert group["accuracy"]["mean"] == pytest.approx(0.535)
    assert os.path.exists(tmp_path / "w" / "summary.md")
    assert sweep.summarize_dir(str(tmp_path / "w"), write=False)["complete"]
    c.seeds = ()
    with pytest.raises(ConfigError, match="holds runs for several seeds"):
        real(c, str(tmp_path / "w"))
