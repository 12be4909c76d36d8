"""Every method end to end on the offline proxy task: shared stages run once, one compile per sweep,
exact sparsity, no revived weight, and a method defined here (not in the package) runs unchanged."""

from __future__ import annotations

import os

import ml_collections as mlc
import numpy as np
import pytest
from test_experiment import FASHION, small_config

from vpns_jax import checkpoint, experiment, methods, report, sparsity
from vpns_jax import config as config_lib
from vpns_jax.errors import ConfigError
from vpns_jax.methods.plan import LabelMap, MaskFrom, Options, Run, run_id, train_block, tuning_stage
from vpns_jax.sparsity import criteria
from vpns_jax.train.stages import UNPROMPTED

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)")


def quick(config, methods_: str, sparsities: tuple[float, ...]) -> mlc.ConfigDict:
    c = config_lib.default_config()  # includes every method registered at this point
    for key in ("arch", "model", "weights", "proxy", "dataset", "input_size", "prompt", "batch_size"):
        c[key] = config[key]
    c.methods, c.sparsities = methods_, sparsities
    config_lib.set_epochs(c, lambda e: min(e, 1))
    c.steps_per_epoch = 3
    c.log_every_steps = 1000
    c.plots = False
    c.synflow.iterations = 5
    return c


@pytest.fixture(scope="module")
def weights(proxy_weights, tmp_path_factory):
    """small_config on the session's proxy source weights (Fashion-MNIST), digits prepared."""
    config = small_config(proxy_weights)
    experiment.setup(config, str(tmp_path_factory.mktemp("every") / "setup"))
    return config


def _finals(workdir):
    out = {}
    for name in sorted(os.listdir(os.path.join(workdir, "final"))):
        out[name] = checkpoint.load_final(os.path.join(workdir, "final", name))[0]
    return out


def _prunable_count(tree) -> int:
    return sum(int(np.size(m)) for m in tree["masks"].values())


def _assert_exactly_sparse(tree):
    """Pruned weights are exactly zero in the exported params."""
    flat = sparsity.flatten_params(tree["params"])
    for path, mask in tree["masks"].items():
        assert not np.any(flat[path][~mask]), path


def test_dense_omp_lth_and_vpns_with_share_stages_and_compile_once(weights, tmp_path, monkeypatch):
    c = quick(weights, "dense,omp,lth,vpns_with", (0.2, 0.5, 0.9))
    c.lth.rounds = 3
    c.vpns_with.sources = ("omp", "lth")
    ran = []
    real = experiment.train.run_stage
    monkeypatch.setattr(experiment.train, "run_stage",
                        lambda stage, *a, **k: ran.append(stage.name) or real(stage, *a, **k))
    workdir = str(tmp_path / "w")
    results = experiment.run(c, workdir)
    rows = {run_id(r["method"], r["sparsity"]): r for r in results["runs"]}
    assert len(rows) == 1 + 3 + 3 + 3 + 3
    # One dense fine-tune for dense, OMP x3, LTH's three rounds and VPNs w. OMP/LTH; LTH's round r+1
    # starts from round r: 3 OMP + 3 LTH tuning stages, 3 + 3 VPNs-w tunings.
    assert ran.count("finetune") == 1
    assert ran.count("tuning") == 6 and ran.count("vp_tuning") == 6
    # One compiled train step per kind of stage for the whole sweep (densities are traced values).
    assert results["compiles"]["train_step"] == 3, results["compiles"]
    finals = _finals(workdir)
    n = _prunable_count(finals["omp_s0.5"])
    def kept(name):
        return sum(int(m.sum()) for m in finals[name]["masks"].values())

    for s in (0.2, 0.5, 0.9):  # OMP: exactly floor(s N) weights removed, to the weight
        assert kept(f"omp_s{s:g}") == n - np.floor(s * n + 1e-6)
    survivors = criteria.imp_kept_counts(n, 3)  # torch's round-by-round 20% of the survivors
    for r, s in enumerate((0.2, 0.36, 0.488)):
        assert kept(f"lth_s{s:g}") == kept(f"vpns_w_lth_s{s:g}") == survivors[r]
    # LTH's masks are nested: a pruned weight never comes back in a later round.
    m1, m2, m3 = (finals[f"lth_s{s:g}"]["masks"] for s in (0.2, 0.36, 0.488))
    for path in m1:
        assert not np.any(m2[path] & ~m1[path]) and not np.any(m3[path] & ~m2[path])
    for tree in finals.values():
        _assert_exactly_sparse(tree)
    # VPNs w. X tests with the prompt (reference §5.10) and reports both accuracies.
    vp = rows["vpns_w_omp_s0.9"]
    assert vp["accuracy"] == vp["accuracy_with_prompt"] and vp["accuracy_without_prompt"] is not None
    assert rows["lth_s0.488"]["epochs"] == [1, 1, 1, 1]
    # A rerun finds every row done; a new sparsity reuses the shared dense fine-tune.
    ran.clear()
    c2 = c.copy_and_resolve_references()
    c2.methods, c2.sparsities = "omp", (0.2, 0.5, 0.9, 0.95)
    experiment.run(c2, workdir)
    assert ran == ["tuning"]


# A method defined in this test module, registered at run time: no edit to the package.
class LayerMagnitude:
    """Per-layer magnitude pruning of the pretrained weights, then SGD fine-tuning."""

    NAME = "layer_magnitude"

    @staticmethod
    def default_config():
        return mlc.ConfigDict({"tuning": train_block(2, "sgd", 0.01)})

    @staticmethod
    def plan(config):
        opts = Options.of(config, LayerMagnitude.NAME)
        return [Run(LayerMagnitude.NAME, s, (tuning_stage(
            opts, "tuning", passes=UNPROMPTED,
            start=(MaskFrom("magnitude", 1.0 - s, "layer"), LabelMap())),))
            for s in config.sparsities]


@pytest.fixture
def registered():
    methods.register(LayerMagnitude)
    yield LayerMagnitude
    methods.unregister(LayerMagnitude.NAME)


def test_criteria_methods_bip_pilot_and_a_test_defined_method(weights, registered, tmp_path):
    c = quick(weights, "random,snip,grasp,synflow,bip,hydra,post_prompt,layer_magnitude", (0.9,))
    c.post_prompt.sources = ("hydra",)
    c.grasp.samples_per_class = 4
    workdir = str(tmp_path / "w")
    results = experiment.run(c, workdir)
    rows = {r["method"]: r for r in results["runs"]}
    assert set(rows) == {"random", "snip", "grasp", "synflow", "bip", "hydra", "vp_after_hydra",
                         "vp_after_hydra_ft", "layer_magnitude"}
    finals = _finals(workdir)
    n = _prunable_count(finals["bip_s0.9"])
    exact = n - np.floor(0.9 * n + 1e-6)  # kept weights

    def kept(name):
        return sum(int(m.sum()) for m in finals[f"{name}_s0.9"]["masks"].values())

    for method in ("synflow", "bip", "vp_after_hydra"):
        assert kept(method) == exact, method
    # SNIP: exact, plus one weight for every layer its global top-k would leave empty.
    assert exact <= kept("snip") <= exact + 21
    # Random and GraSP's default draw Bernoulli masks: within 6 sigma of the target.
    for method in ("random", "grasp"):
        assert abs(rows[method]["actual_sparsity"] - 0.9) < 6 * np.sqrt(0.09 / n), method
    layer = finals["layer_magnitude_s0.9"]["masks"]
    for path, mask in layer.items():  # per-layer scope, as the test's own recipe asked
        assert mask.sum() == mask.size - np.floor(0.9 * mask.size + 1e-6), path
    for tree in finals.values():
        _assert_exactly_sparse(tree)
    # BiP: one weight step + one score step per iteration (the collect pass does not step).
    assert rows["bip"]["gradient_steps"] == 2 * 3
    pilot = rows["vp_after_hydra"]
    assert pilot["accuracy"] == pilot["accuracy_with_prompt"]
    # Without the prompt, the pilot reports the network before its prompt trained: after HYDRA's
    # fine-tuning that is exactly HYDRA's own row (same weights, BN statistics and mapping).
    ft = rows["vp_after_hydra_ft"]
    assert ft["accuracy_without_prompt"] == rows["hydra"]["accuracy_without_prompt"]
    assert ft["accuracy"] == ft["accuracy_with_prompt"]  # the pilot reports the prompted one
    assert set(results["compiles"]) >= {"train_step", "eval_step", "eval_step_prompted"}


def test_a_criterion_short_of_examples_is_one_clear_error(weights, tmp_path):
    """GraSP asks for more images per class than the (capped) split has: the run stops at that
    stage's start with the field and the fix named; finished rows stay in results.json."""
    workdir = str(tmp_path / "w")
    c = quick(weights, "random", (0.9,))
    experiment.run(c, workdir)
    c = c.copy_and_resolve_references()
    c.methods, c.grasp.samples_per_class = "random,grasp", 1000
    with pytest.raises(ConfigError, match=r"config\.grasp\.samples_per_class: .*1000 needed.*lower"):
        experiment.run(c, workdir)
    rows = report.load_results(workdir)["runs"]
    assert [r["method"] for r in rows] == ["random"]


def test_eval_mode_keeps_the_pilots_accuracy_before_its_prompt(weights, tmp_path):
    """mode=eval re-evaluates final states; a pilot row's un-prompted accuracy was measured before
    its prompt trained (not in final/), so it is kept, and the prompted one is reproduced."""
    c = quick(weights, "post_prompt", (0.9,))
    c.post_prompt.sources, c.post_prompt.modes = ("random",), ("zero_shot",)
    workdir = str(tmp_path / "w")
    (row,) = experiment.run(c, workdir)["runs"]
    c = c.copy_and_resolve_references()
    c.mode = "eval"
    (again,) = experiment.run(c, workdir)["runs"]
    for key in ("accuracy", "accuracy_with_prompt", "accuracy_without_prompt"):
        assert again[key] == row[key], key
