"""Transfer (paper Fig. 6): a finished run's mask tuned on another task (`config.mask_from`).

One tiny VPNs source run on digits (session proxy weights, 2 steps per epoch, 1 epoch of mask
finding, 0 of tuning: the mask is what transfers; sparsity 0.9); then VPNs tunes its mask on digits
at another seed (another data order, another label-mapping pass): the tuned mask equals the
source's, layer by layer and bit for bit, the weights it removes are zero, and the row names its
source. Every other method's transfer run is checked as a plan (one tuning stage on the mask). The
bad inputs are one line each, before anything trains.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from test_experiment import FASHION, small_config

from vpns_jax import checkpoint, experiment, methods, models, report, transfer
from vpns_jax import config as config_lib
from vpns_jax.errors import CheckpointError, ConfigError
from vpns_jax.methods.plan import InitPrompt, LabelMap, MaskFromRun

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")

SOURCE_RUN = "vpns_s0.9"


def _tiny(weights: str) -> object:
    c = small_config(weights)
    c.sparsities = (0.9,)
    c.steps_per_epoch = 2
    c.vpns.mask_finding.epochs = c.vpns.tuning.epochs = 1
    c.plots = False
    return c


@pytest.fixture(scope="module")
def source(tmp_path_factory, proxy_weights):
    """(config of the transfer runs, workdir of the finished tiny source run)."""
    c = _tiny(proxy_weights)
    src = c.copy_and_resolve_references()
    src.vpns.tuning.epochs = 0  # the mask is set when tuning begins; its training is not needed
    workdir = str(tmp_path_factory.mktemp("transfer") / "src")
    experiment.run(src, workdir)
    return c, workdir


def _target(source, **fields) -> object:
    c, workdir = source
    t = c.copy_and_resolve_references()
    t.seed = 11
    t.mask_from = os.path.join(workdir, "final", SOURCE_RUN)
    for k, v in fields.items():
        config_lib.apply_overrides(t, {k: v})
    return t


@pytest.fixture(scope="module")
def transferred(source, tmp_path_factory):
    t = _target(source, methods="vpns")
    workdir = str(tmp_path_factory.mktemp("transfer") / "dst")
    return t, workdir, experiment.run(t, workdir)


def _masks(workdir: str, run: str) -> dict[str, np.ndarray]:
    tree, _ = checkpoint.load_final(os.path.join(workdir, "final", run))
    return tree, {p: np.asarray(m, bool) for p, m in tree["masks"].items()}


def test_tuned_masks_equal_the_source_mask(source, transferred):
    _, src_dir = source
    t, dst_dir, results = transferred
    _, src = _masks(src_dir, SOURCE_RUN)
    src_row = report.load_results(src_dir)["runs"][0]
    (row,) = results["runs"]
    assert row["method"] == "vpns"
    tree, tuned = _masks(dst_dir, f"vpns_s0.9_from_digits_{SOURCE_RUN}")
    assert sorted(tuned) == sorted(src) and len(tuned) == 21
    for path in src:  # every layer, bit for bit (and so the exact counts)
        assert tuned[path].shape == src[path].shape, path
        assert np.array_equal(tuned[path], src[path]), path
    assert sum(int(m.sum()) for m in tuned.values()) == sum(int(m.sum()) for m in src.values())
    flat = {p: np.asarray(v) for p, v in _flat(tree["params"]).items()}
    assert all(not flat[p][~src[p]].any() for p in src)  # the removed weights are zero
    assert row["mask_from"] == f"digits/{SOURCE_RUN}" and row["seed"] == 11
    assert row["sparsity"] == 0.9 and row["actual_sparsity"] == src_row["actual_sparsity"]
    assert row["epochs"] == [1]  # the tuning stage only: no mask finding
    # two passes per iteration; the prompt trained from zero
    assert row["gradient_steps"] == 2 * 2 and row["accuracy_with_prompt"] is not None
    assert np.abs(tree["prompt"]["program"]).sum() > 0
    # the surviving weights were tuned here: they are not the pretrained ones the source kept
    src_tree, _ = _masks(src_dir, SOURCE_RUN)
    a, b = _flat(src_tree["params"]), _flat(tree["params"])
    assert not np.array_equal(np.asarray(a["conv1/kernel"]), np.asarray(b["conv1/kernel"]))
    assert np.array_equal(np.asarray(a["conv1/kernel"]) != 0, src["conv1/kernel"])
    table = report.format_table(results["runs"])
    assert f"vpns (mask from digits/{SOURCE_RUN})" in table


def _flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree), sep="/")


def test_transfer_is_part_of_the_resume_check(source, transferred):
    t, dst_dir, _ = transferred
    c, src_dir = source
    # the field changes every key; at '' it is left out, so older workdirs keep their keys
    assert "mask_from" in experiment.config_fingerprint(t)
    assert "mask_from" not in experiment.config_fingerprint(c)
    assert experiment.base_key(t) != experiment.base_key(_target(source, mask_from=""))
    other = _target(source, methods="vpns", mask_from=os.path.join(src_dir, SOURCE_RUN))
    with pytest.raises(CheckpointError, match="mask_from"):
        experiment.run(other, dst_dir)


def test_every_method_with_a_tuning_stage_plans_one_run_on_the_mask(source):
    t = _target(source)
    src = transfer.source(t)
    for name in methods.names():
        method = methods.get(name)
        if not hasattr(method, "transfer"):
            continue
        (run,) = methods.runs(t, name)
        assert (run.sparsity, run.mask_from) == (0.9, f"digits/{SOURCE_RUN}"), name
        (stage,) = run.stages
        assert stage.mask_mode == "fixed" and stage.start[0] == MaskFromRun(
            f"digits/{SOURCE_RUN}", src.digest), name
        prompted = any(p.prompted for p in stage.passes)
        assert stage.start[-1] == LabelMap(prompted), name
        assert (InitPrompt() in stage.start) == prompted == (name == "vpns"), name
    assert {n for n in methods.names() if hasattr(methods.get(n), "transfer")} >= {
        "vpns", "hydra", "omp", "lth", "random", "snip", "grasp", "synflow"}
    (dense,) = methods.runs(t, "dense")  # no mask: the usual dense reference row
    assert dense.mask_from == "" and dense == methods.runs(_target(source, mask_from=""), "dense")[0]


def _error(config) -> str:
    with pytest.raises(ConfigError) as e:
        experiment.plan(config)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_sources_are_one_line_before_training(source, tmp_path):
    c, src_dir = source
    missing = str(tmp_path / "nowhere" / SOURCE_RUN)
    assert "the source workdir" in _error(_target(source, mask_from=missing))
    assert "does not exist" in _error(_target(source, mask_from=missing))
    msg = _error(_target(source, mask_from=os.path.join(src_dir, "vpns_s0.5")))
    assert "has no finished run 'vpns_s0.5'" in msg and f"its finished runs: {SOURCE_RUN}" in msg
    assert "is a workdir; name one of its finished runs" in _error(
        _target(source, mask_from=src_dir))
    broken = tmp_path / "broken"
    os.makedirs(broken / "final" / SOURCE_RUN)
    assert "not finished or its final state is unreadable" in _error(
        _target(source, mask_from=str(broken / "final" / SOURCE_RUN)))
    msg = _error(_target(source, arch="resnet34"))
    assert "the source mask is of a resnet18 and config.arch = 'resnet34'" in msg
    msg = _error(_target(source, **{"model.width": 0.5}))
    assert "width=0.25 and config.model.width = 0.5" in msg
    msg = _error(_target(source, methods="bip"))
    assert "method 'bip' cannot tune a given (unstructured) mask" in msg and "vpns, hydra" in msg
    msg = _error(_target(source, **{"vpns.prompt_stages": "mask_finding"}))
    assert "prompt_stages = 'mask_finding'" in msg


def test_a_mask_of_other_shapes_is_refused_naming_the_layer(source):
    t = _target(source)
    seven = models.create("resnet18", 7, width=0.25)  # another number of source classes: fc differs
    with pytest.raises(ConfigError, match=r"layer fc/kernel has shape \(128, 10\) in the source "
                                          r"mask and \(128, 7\) in this model"):
        experiment._check_transfer(t, seven)
    experiment._check_transfer(t, models.create("resnet18", 10, width=0.25))  # the same model: fine
    src = transfer.source(t)
    fewer = dataclasses.replace(src, masks={p: m for p, m in src.masks.items() if p != "conv1/kernel"})
    with pytest.raises(ConfigError, match="the source mask has no layer conv1/kernel"):
        transfer.check_shapes(fewer, {p: m.shape for p, m in src.masks.items()})


def test_eval_mode_re_evaluates_the_transferred_row(transferred):
    """mode=eval finds the transfer's final state by its run name (with its source) and rewrites
    its row: a spoiled accuracy in results.json comes back exactly."""
    t, dst_dir, results = transferred
    saved = report.load_results(dst_dir)
    (row,) = saved["runs"]
    row["accuracy"] = row["accuracy_with_prompt"] = -1.0
    report.save_results(dst_dir, saved)
    e = t.copy_and_resolve_references()
    e.mode = "eval"
    (again,) = experiment.run(e, dst_dir)["runs"]
    (first,) = results["runs"]
    assert again["accuracy"] == first["accuracy"]
    assert again["accuracy_with_prompt"] == first["accuracy_with_prompt"]
