"""End to end: the main command on real offline data (a Fashion-MNIST proxy source model, digits).

One small VPNs run is shared by several tests: results.json format, exact sparsity, accuracy far above
chance, resume after an interruption (same result, stages not re-run), eval mode, export to PyTorch.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
from unittest import mock

import jax
import ml_collections as mlc
import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import checkpoint, data, experiment, methods, models, runner, sparsity, weights
from vpns_jax import workdir as workdir_lib
from vpns_jax.config import default_config
from vpns_jax.errors import CheckpointError, ConfigError

FASHION = "/usr/share/datasets/fashion-mnist"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")


def small_config(weights: str) -> object:
    """VPNs at 50% on digits with a width-0.25 ResNet-18 at 32 px, 2 + 2 epochs."""
    c = default_config()
    c.methods = "vpns"
    c.arch = "resnet18"
    c.model.width = 0.25
    c.weights = weights
    c.proxy.dataset = "fashion_mnist"
    c.proxy.epochs = 1
    c.proxy.steps_per_epoch = 40
    c.dataset = "digits"
    c.input_size = 32
    c.prompt.output_size = 32
    c.prompt.pad_size = 4
    c.batch_size = 64
    c.sparsities = (0.5,)
    c.vpns.mask_finding.update(epochs=2, lr=1e-2, prompt_lr=1e-2)
    c.vpns.tuning.update(epochs=2, lr=0.05, prompt_lr=0.05)
    c.log_every_steps = 1000
    c.eval_every_epochs = -1  # test accuracy only at the end (tests/test_metrics.py tests the others)
    c.plots = True
    return c


class ConfigReads:
    """Every leaf field of `config` read while active: dotted name -> the vpns_jax functions that
    read it ('module.qualname' of the innermost vpns_jax frame). Reads that only validate or
    fingerprint the config (they read every field) are left out."""

    SKIP = {"vpns_jax.config.validate", "vpns_jax.experiment.config_fingerprint",
            "vpns_jax.experiment._config_without", "vpns_jax.experiment._job_text",
            "vpns_jax.experiment._write_config", "vpns_jax.experiment._differences"}

    def __init__(self, config):
        self.reads: dict[str, set[str]] = collections.defaultdict(set)
        self._prefix: dict[int, str] = {}
        stack = [(config, "")]
        while stack:
            node, prefix = stack.pop()
            self._prefix[id(node)] = prefix
            stack += [(v, f"{prefix}{k}.") for k, v in node._fields.items()
                      if isinstance(v, mlc.ConfigDict)]

    def _reader(self) -> str | None:
        frame, reader = sys._getframe(2), None
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.startswith("vpns_jax."):
                name = f"{module}.{frame.f_code.co_qualname}"
                if name in self.SKIP:
                    return None
                reader = reader or name
            frame = frame.f_back
        return reader

    def __enter__(self):
        original = mlc.ConfigDict.__getitem__

        def getitem(node, key):
            value = original(node, key)
            prefix = self._prefix.get(id(node))
            if prefix is not None and isinstance(key, str) and "." not in key and not isinstance(
                    value, mlc.ConfigDict):
                reader = self._reader()
                if reader:
                    self.reads[prefix + key].add(reader)
            return value

        self._patch = mock.patch.object(mlc.ConfigDict, "__getitem__", getitem)
        self._patch.start()
        return self

    def __exit__(self, *exc):
        self._patch.stop()


FINISHED_READS: dict[str, set[str]] = {}  # what the `finished` run read of its config


@pytest.fixture(scope="module")
def finished(tmp_path_factory, proxy_weights):
    """(config, workdir, results) of one uninterrupted run from the session's proxy weights.
    Every config field the run reads, and where, is recorded in FINISHED_READS."""
    base = tmp_path_factory.mktemp("e2e")
    config = small_config(proxy_weights)
    workdir = str(base / "run")
    with ConfigReads(config) as recorder:
        results = experiment.run(config, workdir)
    FINISHED_READS.update(recorder.reads)
    return config, workdir, results


def test_results_json_and_exact_sparsity(finished):
    config, workdir, results = finished
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    (run,) = saved["runs"]
    assert set(run) >= {"method", "arch", "dataset", "seed", "sparsity", "actual_sparsity", "accuracy",
                        "accuracy_with_prompt", "epochs", "gradient_steps", "seconds"}
    assert (run["method"], run["arch"], run["dataset"], run["seed"]) == ("vpns", "resnet18", "digits", 7)
    assert run["epochs"] == [2, 2]
    # digits: 1,438 training images, batch 64 -> 22 iterations per epoch, two optimizer steps each.
    assert run["gradient_steps"] == 4 * 22 * 2
    # Global threshold: exactly floor(0.5 N) prunable weights removed.
    model = models.create("resnet18", 10, width=0.25)

    params = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), 32))["params"]
    n = sum(int(np.prod(params_leaf.shape)) for path, params_leaf in
            sparsity.flatten_params(params).items() if path in sparsity.prunable_paths(params))
    assert run["actual_sparsity"] == math.floor(0.5 * n) / n
    # Released-code default: accuracy is reported without the prompt; both are recorded.
    assert run["accuracy"] == run["accuracy_without_prompt"]
    assert 0.0 <= run["accuracy_with_prompt"] <= 1.0
    assert run["accuracy"] > 0.5, "VPNs at 50% sparsity should be far above chance (0.1) on digits"
    layers = json.load(open(os.path.join(workdir, "sparsity", "vpns_0.5.json")))
    assert layers["total"]["size"] == n and len(layers["layers"]) == 21
    assert os.path.exists(os.path.join(workdir, "accuracy_vs_sparsity.png"))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if r.get("kind", "epoch") == "epoch"]  # step and test rows: test_metrics
    assert [(r["stage"], r["epoch"]) for r in rows] == [
        ("mask_finding", 1), ("mask_finding", 2), ("tuning", 1), ("tuning", 2)]


def _snapshot(workdir: str) -> dict[str, tuple[int, int, int]]:
    return {os.path.join(d, n): (s.st_ino, s.st_size, s.st_mtime_ns)
            for d, _, names in os.walk(workdir) for n in names
            for s in [os.stat(os.path.join(d, n))]}


def test_eval_mode_restores_the_final_state(finished, monkeypatch):
    """Also in a read-only workdir (the lock cannot be made there): nothing in it is written."""
    config, workdir, results = finished
    config = config.copy_and_resolve_references()
    config.mode = "eval"
    config.log_every_steps += 1  # a harmless change: eval still leaves config.json alone
    before = _snapshot(workdir)

    def read_only(self):
        raise OSError(30, "Read-only file system", self.path)
    monkeypatch.setattr(workdir_lib.WorkdirLock, "_create", read_only)
    again = experiment.run(config, workdir)
    assert _snapshot(workdir) == before
    assert again["runs"][0]["accuracy"] == results["runs"][0]["accuracy"]
    assert again["runs"][0]["accuracy_with_prompt"] == results["runs"][0]["accuracy_with_prompt"]
    config.mode = "train"
    with pytest.raises(ConfigError, match=f"^{re.escape(workdir)} is not writable"):
        experiment.run(config, workdir)


def test_resuming_under_another_config_is_refused(finished):
    config, workdir, _ = finished
    config = config.copy_and_resolve_references()
    config.vpns.tuning.lr = 0.5
    with pytest.raises(experiment.CheckpointError, match=r"different config.*vpns\.tuning\.lr"):
        experiment.run(config, workdir)


def test_other_methods_options_may_change(finished):
    """Only a run's own chain decides whether its row is current: another method's options can
    change in the same workdir (its rows will be computed with them)."""
    config, workdir, results = finished
    config = config.copy_and_resolve_references()
    config.omp.tuning.lr = 0.5
    again = experiment.run(config, workdir)
    assert again["runs"] == results["runs"]


def test_export_runs_in_pytorch_with_the_same_accuracy(finished, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file

    from benchmarks import torch_reference
    from vpns_jax import data
    from vpns_jax.export import export_run

    _, workdir, results = finished
    out = str(tmp_path / "vpns.safetensors")
    written = export_run(workdir, "vpns_s0.5", out)
    state = {k: torch.from_numpy(v) for k, v in load_file(out).items()}
    extras = load_file(written[1])
    net = torch_reference.build("resnet18", num_classes=10, width=0.25, small_input=False)
    net.load_state_dict(state)
    net.eval()
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= results["runs"][0]["actual_sparsity"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    correct = count = 0
    for batch in data.eval_loader("digits", input_size=32, batch_size=64):
        x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
        with torch.no_grad():
            logits = net((x - mean) / std)[:, torch.from_numpy(extras["label_map"]).long()]
        hit = (logits.argmax(1).numpy() == batch["label"]) & batch["mask"]
        correct, count = correct + int(hit.sum()), count + int(batch["mask"].sum())
    assert count == 359
    assert abs(correct / count - results["runs"][0]["accuracy"]) <= 1 / 359


@pytest.mark.parametrize("flags, message", [
    (["--config.sparsities=(0.5,1.0)"], "config.sparsities"),
    (["--config.dataset=cifar11"], "config.dataset = 'cifar11'"),
    (["--config.weights=/nonexistent/resnet18.safetensors"], "/nonexistent/resnet18.safetensors"),
    (["--config.omp.foo=1"], "config.omp has no option 'foo' (from --config.omp.foo); its options: scope,"),
    (["--config.methods=omp,omp2"], "('omp2' is unknown)"),
    (["--config.methods=lth", "--config.lth.rounds=0", "--config.sparsities=(0.5,)"],
     "nearest rounds are 3 (0.4880) and 4 (0.5904)"),
])
def test_cli_bad_input_is_one_clear_line(flags, message, tmp_path):
    cmd = [sys.executable, "-m", "vpns_jax.main", "--config", os.path.join(ROOT, "configs/cifar10.py"),
           "--workdir", str(tmp_path / "w"), "--config.weights=w.safetensors", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_switches_end_to_end(finished, tmp_path):
    """new_head + dense + HYDRA, and VPNs with ILM, prompted-only passes and the prompt at test time."""
    config, _, _ = finished
    c = config.copy_and_resolve_references()
    c.methods = "dense,hydra"
    c.label_mapping = "new_head"
    c.dense.epochs = 1
    c.hydra.mask_finding.epochs = c.hydra.tuning.epochs = 1
    c.steps_per_epoch = 5
    results = experiment.run(c, str(tmp_path / "a"))
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"dense", "hydra"}
    assert results["dense"]["accuracy"] == runs["dense"]["accuracy"]
    assert runs["dense"]["actual_sparsity"] == 0.0 and runs["dense"]["accuracy_with_prompt"] is None
    assert runs["hydra"]["gradient_steps"] == 2 * 5  # one un-prompted pass per iteration
    from vpns_jax import checkpoint

    tree, meta = checkpoint.load_final(str(tmp_path / "a" / "final" / "hydra_s0.5"))
    assert tree["params"]["fc"]["kernel"].shape[-1] == 10 and "label_map" not in tree

    c = config.copy_and_resolve_references()
    c.label_mapping = "ilm"
    c.vpns.passes = "prompted_only"
    c.vpns.at_test = True
    c.vpns.mask_finding.epochs = c.vpns.tuning.epochs = 1
    c.steps_per_epoch = 5
    results = experiment.run(c, str(tmp_path / "b"))
    (run,) = results["runs"]
    assert run["accuracy"] == run["accuracy_with_prompt"]
    assert run["gradient_steps"] == 2 * 5  # one prompted pass per iteration


def test_run_interrupted_mid_epoch_resumes_from_the_step_checkpoint(finished, tmp_path, monkeypatch,
                                                                    caplog):
    """checkpoint_every_steps: a run stopped inside an epoch restarts from a step checkpoint; when
    the newest one is corrupt (a truncated file) it is set aside and the previous one is used, and
    the run still ends bit-identical to the uninterrupted one."""
    import glob
    import logging

    from jax import tree_util
    from tensorboard.backend.event_processing import event_accumulator

    from vpns_jax import tb
    from vpns_jax.checkpoint import load_final

    config, finished_workdir, results = finished
    config = config.copy_and_resolve_references()
    config.checkpoint_every_steps = 7  # not a semantic field: results must equal the plain run's
    config.log_every_steps = 5  # step rows at iterations 5, 10, ...: 10 is logged again on resume
    real_run_stage = experiment.train.run_stage
    starts = []

    def stop_after_second_step_checkpoint(stage, *args, **kwargs):
        save, saved = kwargs["step_hook"], []

        def save_then_stop(end):
            save(end)
            saved.append(end.iteration)
            if len(saved) == 2:
                raise KeyboardInterrupt

        return real_run_stage(stage, *args, **{**kwargs, "step_hook": save_then_stop})

    workdir = str(tmp_path / "run")
    monkeypatch.setattr(experiment.train, "run_stage", stop_after_second_step_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(config, workdir)
    (latest,) = glob.glob(os.path.join(workdir, "stages", "*", "14"))
    stage_dir = os.path.dirname(latest)
    assert sorted(os.listdir(stage_dir)) == ["14", "7"]
    data_files = glob.glob(os.path.join(latest, "state", "**", "d", "*"), recursive=True)
    assert data_files
    for f in data_files:
        os.truncate(f, os.path.getsize(f) // 2)

    def record_start(stage, *args, **kwargs):
        starts.append((stage.name, kwargs["start_epoch"], kwargs["start_iteration"]))
        return real_run_stage(stage, *args, **kwargs)

    monkeypatch.setattr(experiment.train, "run_stage", record_start)
    with caplog.at_level(logging.WARNING):
        resumed = experiment.run(config, workdir)
    assert starts == [("mask_finding", 0, 7), ("tuning", 0, 0)]
    # The resumed session repeats iterations 8-14: each global step is kept once (metrics.jsonl
    # rows after the resume point dropped, TensorBoard's purge of later events).
    want = [22 * epoch + i for epoch in range(4) for i in (5, 10, 15, 20)]
    assert [r["step"] for r in tb.rows_of(workdir, "step", "vpns_s0.5")] == want
    events = event_accumulator.EventAccumulator(tb.event_dir(workdir, "vpns_s0.5"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/pass0/loss")] == want
    (aside,) = glob.glob(os.path.join(stage_dir, "14.unreadable-*"))
    assert len(glob.glob(os.path.join(aside, "state", "**", "d", "*"), recursive=True)) == len(
        data_files)  # set aside, not deleted
    warnings = [r.getMessage() for r in caplog.records if "set it aside" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"checkpoint 14 in {stage_dir} cannot be read (")
    assert warnings[0].endswith(f"set it aside as {aside} (rename it back to retry it) and using "
                                f"checkpoint 7 ({stage_dir}/7) instead")
    (a,), (b,) = results["runs"], resumed["runs"]
    for key in ("accuracy", "accuracy_with_prompt", "actual_sparsity", "gradient_steps"):
        assert a[key] == b[key], key
    want, _ = load_final(os.path.join(finished_workdir, "final", "vpns_s0.5"))
    got, _ = load_final(os.path.join(workdir, "final", "vpns_s0.5"))
    assert tree_util.tree_structure(want) == tree_util.tree_structure(got)
    for x, y in zip(tree_util.tree_leaves(want), tree_util.tree_leaves(got), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical final state


# ----------------------------------------------------------------------------------------------------
# Rebuilding outputs (final/, results.json, plots) from the checkpoints; the resume check's fields


def _copy_of(finished, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[1], workdir)
    return workdir


def _never_train(monkeypatch) -> None:
    def fail(stage, *args, **kwargs):
        raise AssertionError(f"stage {stage.name} trained")

    monkeypatch.setattr(experiment.train, "run_stage", fail)


_ROW_FIELDS = ("method", "sparsity", "seed", "key", "accuracy", "accuracy_with_prompt",
               "accuracy_without_prompt", "actual_sparsity", "epochs", "gradient_steps")


def _same_rows(a: dict, b: dict) -> None:
    assert [{k: r[k] for k in _ROW_FIELDS} for r in a["runs"]] == [
        {k: r[k] for k in _ROW_FIELDS} for r in b["runs"]]


def _same_final(a: str, b: str) -> None:
    (ta, ma), (tb, mb) = checkpoint.load_final(a), checkpoint.load_final(b)
    assert ma == mb
    fa, fb = traverse_util.flatten_dict(ta, sep="/"), traverse_util.flatten_dict(tb, sep="/")
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_missing_or_truncated_final_is_rebuilt_without_training(finished, tmp_path, monkeypatch):
    config, original, results = finished
    workdir = _copy_of(finished, tmp_path)
    _never_train(monkeypatch)
    final = os.path.join(workdir, "final", "vpns_s0.5")
    shutil.rmtree(final)
    again = experiment.run(config, workdir)
    assert "train_step" not in again["compiles"]
    _same_rows(again, results)
    _same_final(final, os.path.join(original, "final", "vpns_s0.5"))
    files = [os.path.join(d, n) for d, _, names in os.walk(final) for n in names]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    with pytest.raises(CheckpointError):
        checkpoint.load_final(final)
    again = experiment.run(config, workdir)
    _same_rows(again, results)
    _same_final(final, os.path.join(original, "final", "vpns_s0.5"))


def test_finalize_rebuilds_results_never_trains(finished, tmp_path, monkeypatch, capsys):
    """mode=finalize on a workdir without results.json: an unfinished run gets one line, a
    finished one its row, final/ state and plot back; a garbled results.json is set aside."""
    config, _, results = finished
    workdir = _copy_of(finished, tmp_path)
    _never_train(monkeypatch)
    for name in ("results.json", "accuracy_vs_sparsity.png"):
        os.remove(os.path.join(workdir, name))
    shutil.rmtree(os.path.join(workdir, "final"))
    c = config.copy_and_resolve_references()
    c.mode = "finalize"
    (run,) = experiment.plan(c)
    last = os.path.join(workdir, "stages", runner.stage_keys(experiment.base_key(c), run.stages)[-1])
    os.rename(last, last + ".away")
    assert experiment.run(c, workdir)["runs"] == []
    assert ("vpns_s0.5: stage 2/2 (tuning) is not finished; run with --config.mode=train to "
            "finish it") in capsys.readouterr().out
    os.rename(last + ".away", last)
    _same_rows(experiment.run(c, workdir), results)
    _same_rows(json.load(open(os.path.join(workdir, "results.json"))), results)
    assert os.path.exists(os.path.join(workdir, "accuracy_vs_sparsity.png"))
    assert checkpoint.load_final(os.path.join(workdir, "final", "vpns_s0.5"))[1]["method"] == "vpns"
    with open(os.path.join(workdir, "results.json"), "w") as f:
        f.write('{"runs": [{"meth')
    _same_rows(experiment.run(config, workdir), results)  # train mode: set aside, rebuilt
    (aside,) = [n for n in os.listdir(workdir) if n.startswith("results.json.unreadable-")]
    assert open(os.path.join(workdir, aside)).read() == '{"runs": [{"meth'


def test_config_json_is_written_only_once_weights_and_data_are_valid(finished, tmp_path):
    """A first run with weights of another arch (or none) is refused and records nothing, so the
    rerun with the right --config.weights is not refused as 'a different config'."""
    config, _, _ = finished
    c = config.copy_and_resolve_references()
    c.proxy.dataset = ""
    workdir = str(tmp_path / "run")
    wrong = str(tmp_path / "resnet34.safetensors")
    model = models.create("resnet34", 10, width=0.0625)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), 32))
    weights.save(wrong, "resnet34", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                 options={"width": 0.0625, "num_classes": 10})
    for path, message in ((str(tmp_path / "missing.safetensors"), "missing.safetensors"),
                          (wrong, "config.arch = 'resnet18' but the weights file")):
        c.weights = path
        with pytest.raises(Exception, match=re.escape(message)):
            experiment.setup(c, workdir)
        assert not os.path.exists(os.path.join(workdir, "config.json"))
    c.weights = config.weights
    experiment.setup(c, workdir)
    assert json.load(open(os.path.join(workdir, "config.json")))["weights"] == config.weights


def test_config_json_is_written_before_a_proxy_trains(finished, tmp_path, monkeypatch):
    """A proxy interrupted while it trains resumes only under the config that started it."""
    from vpns_jax import proxy

    config, _, _ = finished
    c = config.copy_and_resolve_references()
    c.weights = str(tmp_path / "proxy.safetensors")  # not there yet: setup trains it

    def interrupted(*args, **kwargs):
        assert os.path.exists(os.path.join(workdir, "config.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(proxy, "train_proxy", interrupted)
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        experiment.setup(c, workdir)
    c.proxy.lr *= 2
    with pytest.raises(CheckpointError, match=r"different config \(proxy\.lr: 0\.05 -> 0\.1\)"):
        experiment.setup(c, workdir)


def test_capped_label_mapping_split_does_not_depend_on_eval_batch_size(finished, tmp_path):
    """With steps_per_epoch, label mapping reads steps_per_epoch x batch_size training examples
    (as many as an epoch trains on) whatever eval_batch_size; a criterion's batch is a training
    batch. Before: steps_per_epoch batches of eval_batch_size (a 3-step run's 69.6% accuracy
    became 73.8% with eval_batch_size=16 and 62.7% with 256)."""
    config, _, _ = finished
    c = config.copy_and_resolve_references()
    c.steps_per_epoch, c.eval_batch_size = 3, 40  # 3 x 64 = 192 examples = 4.8 batches of 40
    ctx = experiment.setup(c, str(tmp_path / "run"))
    batches = list(ctx.env.label_map_batches(1))
    assert [b["image"].shape[0] for b in batches] == [40] * 5  # ceil(3 * 64 / 40)
    valid = np.concatenate([b["mask"] for b in batches])
    assert valid.sum() == 3 * 64 and valid[:192].all()
    reference = data.eval_loader("digits", split="train", augment_seed=c.seed + 1, input_size=32,
                                 batch_size=64)
    expected = [b for _, b in zip(range(3), reference, strict=False)]
    for key in ("image", "label"):
        got = np.concatenate([b[key] for b in batches])[valid]
        assert np.array_equal(got, np.concatenate([b[key] for b in expected]))
    assert next(iter(ctx.env.criterion_batches()))["image"].shape[0] == 64


def test_prompt_at_test_is_part_of_the_row_key(finished):
    config, _, _ = finished
    c = config.copy_and_resolve_references()
    base = experiment.base_key(c)
    (plain,) = experiment.plan(c)
    c.vpns.at_test = True
    (at_test,) = experiment.plan(c)
    assert plain.stages == at_test.stages and at_test.prompt_at_test
    assert experiment.row_key(base, plain) == runner.stage_keys(base, plain.stages)[-1]
    assert experiment.row_key(base, at_test) != experiment.row_key(base, plain)


def test_fields_left_out_of_the_resume_check_are_read_only_by_speed_and_logging_code(finished):
    """Derived from what the finished run read: a field outside the fingerprint may only be read
    by the functions NON_SEMANTIC names for it; a method's options only by the method's plan
    (its runs' stages and prompt_at_test make the row key)."""
    config, _, _ = finished
    assert FINISHED_READS, "the finished run recorded no config reads"
    every = set(traverse_util.flatten_dict(config.to_dict(), sep="."))
    checked = set(traverse_util.flatten_dict(experiment.config_fingerprint(config, with_methods=True),
                                             sep="."))
    # exactly these are left out (and the fields at their NEUTRAL value, read anywhere: at any
    # other value they are in the fingerprint)
    assert set(experiment.NON_SEMANTIC) == every - checked - set(experiment.NEUTRAL)
    wrong = {}
    for field, readers in sorted(FINISHED_READS.items()):
        if field.split(".")[0] in methods.names():
            wrong[field] = {r for r in readers if not r.startswith("vpns_jax.methods.")}
        elif field not in checked and field not in experiment.NEUTRAL:
            wrong[field] = readers - set(experiment.NON_SEMANTIC[field])
    wrong = {field: sorted(readers) for field, readers in wrong.items() if readers}
    assert not wrong, f"left out of the resume check but read by other code: {wrong}"
    for field in ("batch_size", "seed", "dataset", "label_mapping", "input_size", "prompt.pad_size",
                  "steps_per_epoch", "eval_batch_size", "log_every_steps"):
        assert field in FINISHED_READS, field  # the recording sees the run's reads


def test_eval_every_epochs_minus_one_measures_only_the_end(finished):
    """small_config sets eval_every_epochs=-1: the one test row is the run's own final evaluation."""
    from vpns_jax import tb

    _, workdir, results = finished
    rows = tb.rows_of(workdir, "test")
    assert [r["stage"] for r in rows] == ["tuning"]
    assert rows[0]["accuracy"] == results["runs"][0]["accuracy"]
