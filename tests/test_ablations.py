"""The ablation configs (configs/ablations/*.py) and their sweeps (configs/sweeps/ablation_*.py).

No training: every variant of every ablation loads through its config file, validates, differs from
the default variant in exactly the fields it names, and those fields reach what runs (the prompt's
geometry, the planned stages' passes and prompt optimizers, the source model's input size); an
unknown variant is one line naming the known ones; every sweep file plans one cell per variant and
seed.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import ablations, data, experiment, models, prompts, proxy, sweep
from vpns_jax import config as config_lib
from vpns_jax.errors import ConfigError
from vpns_jax.train.stages import PROMPTED_ONLY, TWO_PASSES, UNPROMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, variant: str | None = None):
    arg = "" if variant is None else f":{ablations.ABLATIONS[name].arg}={variant}"
    return sweep.load_config(f"configs/ablations/{name}.py{arg}")


def _flat(c) -> dict:
    return traverse_util.flatten_dict(c.to_dict(), sep=".")


def test_every_ablation_has_a_config_file_and_a_sweep_file():
    shipped = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs/ablations/*.py"))}
    sweeps = {os.path.basename(p)[len("ablation_"):-3]
              for p in glob.glob(os.path.join(ROOT, "configs/sweeps/ablation_*.py"))}
    assert shipped == sweeps == set(ablations.ABLATIONS) == {
        "prompt_type", "pad_size", "input_size", "prompt_stages", "passes", "label_mapping"}


@pytest.mark.parametrize("name", sorted(ablations.ABLATIONS))
def test_variants_differ_from_the_default_in_exactly_their_fields(name):
    ablation = ablations.ABLATIONS[name]
    default = _flat(_load(name))
    assert default == _flat(_load(name, ablation.default))
    assert default == _flat(ablations.get_config(name))
    for variant, fields in ablation.variants.items():
        c = _load(name, variant)
        config_lib.validate(c, known_archs=models.ARCHS, known_datasets=data.registry.names())
        flat = _flat(c)
        changed = {k for k in flat if flat[k] != default[k]}
        named = {k for k, v in fields.items() if v != default[k]}
        assert changed == named, (variant, changed)
        assert all(flat[k] == v for k, v in fields.items())
        # every variant: VPNs on the proxy task, one source model at 32 px
        assert (c.methods, c.dataset, c.proxy.dataset, proxy.input_size(c)) == (
            "vpns", "digits", "fashion_mnist", 32)


def test_prompt_geometry_variants_reach_the_prompt():
    region = {}
    for variant in ablations.variants("prompt_type"):
        spec = experiment.prompt_spec(_load("prompt_type", variant))
        assert spec.method == variant
        region[variant] = np.asarray(prompts.region_mask(spec, _rng(0)))[..., 0]
    frame = np.ones((32, 32), bool)
    frame[4:28, 4:28] = False  # pad 4: a 4-pixel frame, 448 pixels
    assert np.array_equal(region["pad"] > 0, frame)
    square = np.zeros((32, 32), bool)
    square[:21, :21] = True  # fix: the top-left 21 x 21 square, 441 pixels
    assert np.array_equal(region["fix"] > 0, square)
    spec = experiment.prompt_spec(_load("prompt_type", "random"))
    draws = [np.asarray(prompts.region_mask(spec, _rng(k)))[..., 0] > 0 for k in range(4)]
    assert all(d.sum() == 441 for d in draws) and len({d.tobytes() for d in draws}) > 1
    for variant in ablations.variants("pad_size"):
        spec = experiment.prompt_spec(_load("pad_size", variant))
        p = int(variant)
        assert spec.pad_size == p and prompts.tunable_count(spec) == 32**2 - (32 - 2 * p) ** 2
    for variant in ablations.variants("input_size"):
        spec = experiment.prompt_spec(_load("input_size", variant))
        s = int(variant)
        assert (spec.input_size, spec.output_size) == (s, 32)
        assert spec.padding == ((32 - s + 1) // 2, (32 - s) // 2)  # the reference's zero padding


def _rng(k: int):
    import jax

    return jax.random.PRNGKey(k)


def _stages(c) -> dict:
    (run, *_) = experiment.plan(c)
    return {s.name: s for s in run.stages}


def test_prompt_stage_and_passes_variants_reach_the_planned_stages():
    expected = {"both": (True, True), "mask_finding": (True, False), "tuning": (False, True)}
    for variant, (in_mf, in_tune) in expected.items():
        stages = _stages(_load("prompt_stages", variant))
        for stage, prompted in ((stages["mask_finding"], in_mf), (stages["tuning"], in_tune)):
            assert stage.prompt.trainable == prompted, (variant, stage.name)
            assert stage.passes == (TWO_PASSES if prompted else UNPROMPTED), (variant, stage.name)
    for variant, passes in (("two", TWO_PASSES), ("prompted_only", PROMPTED_ONLY)):
        stages = _stages(_load("passes", variant))
        assert stages["mask_finding"].passes == stages["tuning"].passes == passes
    assert len(TWO_PASSES) == 2 and len(PROMPTED_ONLY) == 1


def test_label_mapping_variants_reach_the_run():
    for variant in ablations.variants("label_mapping"):
        c = _load("label_mapping", variant)
        assert c.label_mapping == variant
        # the runs are the same; the mapping is the experiment's (flm, ilm: FLM on the 10 source
        # classes, re-made every epoch for ilm; new_head: a fresh 10-way head, no mapping)
        assert _stages(c) == _stages(_load("label_mapping", "flm"))


def test_unknown_variant_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as e:
        _load("prompt_type", "frame")
    assert str(e.value) == ("configs/ablations/prompt_type.py: unknown type 'frame'; known: pad, fix, "
                            "random (e.g. configs/ablations/prompt_type.py:type=pad).")
    with pytest.raises(ConfigError, match=r"unknown size '64'; known: 18, 23, 27, 32"):
        ablations.get_config("input_size", "size=64")
    with pytest.raises(ConfigError, match=r"Unknown config argument 'kind'; allowed: type"):
        ablations.get_config("prompt_type", "kind=fix")
    with pytest.raises(ConfigError, match=r"unknown ablation 'prompt'; known: prompt_type, "):
        ablations.variants("prompt")


@pytest.mark.parametrize("name", sorted(ablations.ABLATIONS))
def test_every_sweep_file_plans_its_cells(name, tmp_path):
    s = sweep.load_sweep(os.path.join(ROOT, f"configs/sweeps/ablation_{name}.py"))
    plan = sweep.plan_cells(s, str(tmp_path))
    variants = ablations.variants(name)
    assert sorted(c.name for c in plan.cells) == sorted(
        f"{v}/vpns/seed_{seed}" for v in variants for seed in (0, 1, 2))
    for cell in plan.cells:
        for field, value in ablations.ABLATIONS[name].variants[cell.config_name].items():
            assert _flat(cell.config)[field] == value
        assert sorted(cell.keys) == [("vpns", 0.5), ("vpns", 0.9), ("vpns", 0.99)]
    # Every variant's source model trains identically (the input-size variants fix
    # proxy.input_size): one source model for the whole sweep.
    assert len(plan.sources) == 1
    assert {c.config.weights for c in plan.cells} == {plan.sources[0][1]}


def test_proxy_input_size_is_neutral_at_zero():
    c = config_lib.default_config()
    assert proxy.input_size(c) == c.input_size == 224
    assert "input_size" not in experiment.config_fingerprint(c)["proxy"]
    c.proxy.input_size = 32
    assert proxy.input_size(c) == 32 and experiment.config_fingerprint(c)["proxy"]["input_size"] == 32
