"""bfloat16 compute (`config.model.dtype`): which operations run in bfloat16 and which stay float32,
and the accuracy of a small end-to-end run against float32.

The switch casts the network input to bfloat16 after the (float32) prompt and normalization; every
convolution and matmul runs in bfloat16; parameters (cast where used), BatchNorm statistics and
normalization, logits, loss, gradients, optimizer state and updates stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jax_core

from vpns_jax import checkpoint, experiment, export, models, ops, prompts, sparsity
from vpns_jax import config as config_lib
from vpns_jax.errors import ConfigError
from vpns_jax.methods import vpns as vpns_method
from vpns_jax.models.layers import BatchNorm, conv
from vpns_jax.sparsity import criteria
from vpns_jax.train import optim, steps
from vpns_jax.train import state as state_lib
from vpns_jax.train.stages import Pass

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
SIZE, BATCH, CLASSES = 32, 8, 10
SPEC = prompts.PromptSpec("pad", input_size=SIZE, output_size=SIZE, pad_size=4)


# ------------------------------------------------------------------------------ the switch itself

def test_config_switch_is_validated_and_mapped_in_one_place():
    c = config_lib.default_config()
    c.weights = "w.safetensors"
    assert c.model.dtype == "float32"
    config_lib.validate(c)
    c.model.dtype = "bfloat16"
    config_lib.validate(c)
    c.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"config\.model\.dtype = 'float16'.*'float32', 'bfloat16'"):
        config_lib.validate(c)
    assert models.compute_dtype("bfloat16") == jnp.bfloat16
    assert models.compute_dtype("float32") == jnp.float32
    with pytest.raises(ValueError, match="unknown computation dtype 'fp16'"):
        models.compute_dtype("fp16")
    # benchmarks/step.py --dtype takes the same names (and maps them through compute_dtype).
    from benchmarks import step as step_benchmark

    assert config_lib.MODEL_DTYPES == tuple(models.COMPUTE_DTYPES) == ("float32", "bfloat16")
    assert step_benchmark.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        step_benchmark.parse_args(["--dtype", "float16"])
    # bfloat16 on CPU takes XLA's convolution (the matmul lowerings' bf16 dots are slow there).
    assert models.default_conv_impl(jnp.bfloat16) == "xla"
    model16 = models.create("resnet18", 10, dtype=jnp.bfloat16)
    assert model16.conv_impl == "xla"
    model32 = models.with_dtype(model16, jnp.float32)  # as create would make it in float32
    assert (model32.dtype, model32.conv_impl) == (jnp.float32, "auto")
    assert model32 == models.create("resnet18", 10)
    assert models.with_dtype(model32, jnp.float32) is model32


def test_stage_keys_separate_float32_and_bfloat16_runs():
    """A bf16 run never restores a float32 stage (or results row): the dtype is in the base key of
    every stage and in the workdir's config fingerprint."""
    c32 = config_lib.default_config()
    c16 = c32.copy_and_resolve_references()
    c16.model.dtype = "bfloat16"
    assert experiment.config_fingerprint(c16)["model"]["dtype"] == "bfloat16"
    assert experiment.base_key(c32) != experiment.base_key(c16)
    stages = vpns_method.plan(c32)[0].stages
    from vpns_jax import runner

    k32 = runner.stage_keys(experiment.base_key(c32), stages)
    k16 = runner.stage_keys(experiment.base_key(c16), stages)
    assert not set(k32) & set(k16)


# ------------------------------------------------------------------------------ the ops lowerings

@pytest.mark.parametrize("case", [(9, 3, 8, 7, 2, 3), (8, 4, 6, 3, 1, 1), (8, 4, 6, 1, 2, 0)])
def test_ops_convolutions_in_bfloat16(case):
    """The custom-VJP lowerings (im2col, rows) run in bf16: bf16 values and gradients, against the
    float32 convolution of the same bf16-rounded inputs. Measured (in bf16 ulps of the largest
    entry): value and weight gradient <= 0.9 for xla, im2col and rows alike (the dots accumulate
    in float32); input gradient <= 0.65 for xla, <= 1.2 for rows and <= 2.0 for im2col, whose
    input gradient adds the k*k window contributions in bf16. Bounds: 1, 1 and 3 ulps."""
    h, cin, cout, k, s, p = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, h, h, cin)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(2, (h + 2 * p - k) // s + 1, (h + 2 * p - k) // s + 1, cout)),
                    jnp.bfloat16)

    @jax.jit
    def value_and_grads(x, w, g, impl):
        def conv(a, b):
            if impl == "f32":
                return lax.conv_general_dilated(a.astype(jnp.float32), b.astype(jnp.float32),
                                                (s, s), [(p, p)] * 2,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                precision=lax.Precision.HIGHEST)
            return ops.conv_general_dilated(a, b, (s, s), [(p, p)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), impl=impl)

        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(g.astype(y.dtype)))

    value_and_grads = jax.jit(value_and_grads.__wrapped__, static_argnums=3)
    want = [np.asarray(v, np.float64) for v in value_and_grads(x, w, g, "f32")]
    for impl in ("xla", "im2col", "rows"):
        got = value_and_grads(x, w, g, impl)
        assert all(v.dtype == BF16 for v in got), impl
        for name, a, b, bound in zip(("value", "dx", "dw"), got, want, (1, 3, 1), strict=True):
            ulps = np.abs(np.asarray(a, np.float64) - b).max() / (np.abs(b).max() * 2.0**-8)
            assert ulps <= bound, (impl, name, ulps)


def test_ops_max_pool_in_bfloat16():
    """The masked-sum max-pool VJP in bf16: values equal flax's (lax) max pool exactly; gradients
    (each input sums the dy of the overlapping windows it is the maximum of, in bf16) equal the
    float32 computation within one bf16 ulp of the largest gradient, as lax's own do."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 4)), jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 4)), jnp.bfloat16)

    @functools.partial(jax.jit, static_argnums=2)
    def pool(x, g, impl):
        y, vjp = jax.vjp(lambda a: ops.max_pool(a, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=impl), x)
        return y, vjp(g.astype(y.dtype))[0]

    y32, dx32 = pool(x.astype(jnp.float32), g, "xla")
    out = {impl: pool(x, g, impl) for impl in ("xla", "auto")}
    for y, dx in out.values():
        assert y.dtype == BF16 and dx.dtype == BF16
        np.testing.assert_array_equal(np.asarray(y, np.float32), y32)
        np.testing.assert_allclose(np.asarray(dx, np.float32), dx32, rtol=2.0**-8,
                                   atol=2.0**-8 * float(np.abs(dx32).max()))
    np.testing.assert_array_equal(out["auto"][0], out["xla"][0])


# ------------------------------------------------------------------------------ one train step

def _walk(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (jit, custom_vjp, scan, cond, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _walk(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _walk(sub)


def _stages():
    base = config_lib.default_config()
    base.sparsities = (0.5,)
    return vpns_method.plan(base)[0].stages  # (mask_finding, tuning)


def _batches(size):
    rng = np.random.default_rng(0)
    return {view: {"image": jnp.asarray(rng.uniform(size=(BATCH, size, size, 3)), jnp.float32),
                   "label": jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32)}
            for view in ("prompt", "train")}


def _state(variables, spec):
    return state_lib.create_state(variables, rng=jax.random.PRNGKey(1),
                                  scores=sparsity.scaled_score_init(variables["params"]),
                                  prompt=prompts.init_prompt(spec))


@pytest.fixture(scope="module")
def resnet_variables():
    """Variables of a width-0.125 ResNet-18 (ImageNet stem: max-pool included) at 32 px."""
    return models.init_variables(models.create("resnet18", 1000, width=0.125),
                                 jax.random.PRNGKey(0), SIZE)


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_train_step_runs_convolutions_in_bf16_and_keeps_state_float32(conv_impl, resnet_variables):
    """jaxpr and lowered StableHLO of one VPNs mask-finding iteration (2 passes, forward and
    backward): every convolution and dot_general has bf16 operands; every leaf of the new state
    (params, BN statistics, scores, prompt, Adam moments) is float32, as is the loss; the gradients
    of scores, prompt and weights (BiP's 'collect' pass returns them) are float32."""
    model = models.create("resnet18", 1000, width=0.125, dtype=jnp.bfloat16, conv_impl=conv_impl)
    mask_finding, _ = _stages()
    batches = _batches(SIZE)
    state = state_lib.begin_stage(mask_finding, _state(resnet_variables, SPEC))
    label_map = jnp.arange(CLASSES, dtype=jnp.int32)
    factors = optim.lr_factors(mask_finding, 0)

    def step(state, batches):
        return steps.train_step(state, batches, label_map, factors, stage=mask_finding,
                                model=model, prompt_spec=SPEC)

    traced = jax.jit(step).trace(state, batches)  # one trace: jaxpr, lowering, output types
    contractions = [e for e in _walk(traced.jaxpr.jaxpr)
                    if e.primitive.name in ("conv_general_dilated", "dot_general")]
    # Per pass: 20 convs + fc forward, their 21 weight gradients (the scores' STE gradient goes
    # through the masked weights) and >= 20 input gradients (the prompted pass also needs the
    # stem's); im2col/rows add dots of their own.
    assert len(contractions) >= 2 * (21 + 21 + 20)
    wrong = [(e.primitive.name, [str(v.aval) for v in e.invars]) for e in contractions
             if any(v.aval.dtype != BF16 for v in e.invars)]
    assert not wrong, wrong[:3]
    text = traced.lower().as_text()
    ops_text = re.findall(r"stablehlo\.(convolution|dot_general).*?: \((tensor<[^>]*>), "
                          r"(tensor<[^>]*>)\)", text)
    assert len(ops_text) == len(contractions)
    assert all(a.endswith("bf16>") and b.endswith("bf16>") for _, a, b in ops_text)

    new, metrics = traced.out_info
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(state),
                                     jax.tree.leaves(new), strict=True):
        assert after.dtype == before.dtype, path
        if jnp.issubdtype(before.dtype, jnp.floating):
            assert before.dtype == F32, path
    assert len(jax.tree.leaves(new.opt_state)) > 0
    assert all(v.dtype == F32 for v in jax.tree.leaves(metrics))

    collect = Pass("prompt", True, rule="collect")
    _, _, grads = jax.eval_shape(lambda s, b: steps.pass_step(
        s, b, label_map, factors, index=0, pass_=collect, stage=mask_finding, model=model,
        prompt_spec=SPEC), state, batches["prompt"])
    assert set(grads) == {"params", "scores", "prompt"}
    assert all(g.dtype == F32 for g in jax.tree.leaves(grads))


class _Tiny(nn.Module):
    """The project's conv and BatchNorm and a Dense head, computing in `dtype` (fast to compile)."""

    dtype: object = jnp.bfloat16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.asarray(x, self.dtype)
        x = conv(16, 3, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(CLASSES, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(x)
        return x.astype(jnp.float32)


def _fine_moves(old, new):
    """(fraction changed, fraction of the changed entries that moved by less than half a bf16 ulp
    of their value): a bf16 update rounds such a change to 0, so the second is 0 in bf16."""
    old = np.concatenate([np.ravel(np.asarray(v, np.float32)) for v in old])
    new = np.concatenate([np.ravel(np.asarray(v, np.float32)) for v in new])
    changed = old != new
    fine = changed & (np.abs(new - old) < np.abs(old) * 2.0**-9)
    return changed.mean(), fine.sum() / max(changed.sum(), 1)


def test_updates_are_applied_in_float32():
    """The optimizer adds its steps to float32 values: after one Adam mask-finding step (lr 1e-4;
    measured: 20-25% of the moved scores) and one SGD tuning step (lr 1e-3; measured: most moved
    kernel entries), changes below half a bf16 ulp survive, which a bf16 update cannot produce."""
    spec = prompts.PromptSpec("pad", input_size=8, output_size=8, pad_size=2)
    model = _Tiny()
    variables = jax.tree.map(jnp.asarray, dict(model.init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 8, 8, 3)))))
    mask_finding, tuning = _stages()
    batches, label_map = _batches(8), jnp.arange(CLASSES, dtype=jnp.int32)
    start = state_lib.begin_stage(mask_finding, _state(variables, spec))
    old = jax.device_get(start.scores)
    new, _ = steps.make_train_step(mask_finding, model, spec)(
        start, batches, label_map, optim.lr_factors(mask_finding, 0))
    changed, fine = _fine_moves(old.values(), jax.device_get(new.scores).values())
    assert changed > 0.9 and fine > 0.05, (changed, fine)

    sgd_small = dataclasses.replace(tuning, params=dataclasses.replace(tuning.params, lr=1e-3))
    start = state_lib.begin_stage(sgd_small, new)
    paths = sparsity.prunable_paths(start.params)
    kept = [np.asarray(start.masks[p]) for p in paths]
    old = sparsity.flatten_params(jax.device_get(start.params))
    after, _ = steps.make_train_step(sgd_small, model, spec)(
        start, batches, label_map, optim.lr_factors(sgd_small, 0))
    flat = sparsity.flatten_params(jax.device_get(after.params))
    changed, fine = _fine_moves([old[p][k] for p, k in zip(paths, kept, strict=True)],
                                [flat[p][k] for p, k in zip(paths, kept, strict=True)])
    assert changed > 0.9 and fine > 0.05, (changed, fine)
    assert all(leaf.dtype == F32 for leaf in jax.tree.leaves(after.opt_state)
               if jnp.issubdtype(leaf.dtype, jnp.floating))


def test_criteria_score_in_float32_whatever_the_model_dtype(monkeypatch):
    """SNIP / GraSP / SynFlow scores of a bf16 model are exactly those of the model in float32."""
    model16, model32 = _Tiny(jnp.bfloat16), _Tiny(jnp.float32)
    variables = model32.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(0)
    x = prompts.normalize(jnp.asarray(rng.uniform(size=(4, 8, 8, 3)), jnp.float32))
    labels = jnp.asarray(rng.integers(0, CLASSES, 4), jnp.int32)
    p, bs = variables["params"], variables["batch_stats"]
    b_snip = None
    for fn, args in ((criteria.snip_scores, (labels,)), (criteria.grasp_scores, (labels,)),
                     (criteria.synflow_scores, ())):
        a = jax.jit(fn, static_argnums=2)(p, bs, model16, x, *args)
        b = jax.jit(fn, static_argnums=2)(p, bs, model32, x, *args)
        b_snip = b if fn is criteria.snip_scores else b_snip
        assert set(a) == set(b) == {"conv1/kernel", "fc/kernel"}
        for path in b:
            assert a[path].dtype == F32
            np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    # Without the float32 clone the bf16 forward would give other scores (so the test can fail).
    monkeypatch.setattr(criteria.models, "with_dtype", lambda model, dtype: model)
    a = criteria.snip_scores(p, bs, model16, x, labels)
    assert any(not np.array_equal(a[path], b_snip[path]) for path in a)


# ------------------------------------------------------------------------------ accuracy on CPU

# |bf16 - float32| test accuracy of `_run_config` (digits test split, 359 images: one image = 0.0028),
# measured over seeds 7, 0, 1, 2, 3 (see the test's docstring): at most 0.017 (dense) and 0.036 (VPNs).
ACCURACY_TOLERANCE = 0.05


def _run_config(weights: str, dtype: str, seed: int = 7):
    """Dense fine-tuning and VPNs at 50% on digits (test_experiment's small proxy task), 2 epochs
    per stage of at most 12 iterations, computing in `dtype`."""
    from test_experiment import small_config

    c = small_config(weights)
    c.methods = "dense,vpns"
    c.dense.epochs = 2
    c.steps_per_epoch = 12
    c.model.dtype = dtype
    c.seed = seed
    c.plots = False
    return c


@pytest.fixture(scope="module")
def weights(proxy_weights, tmp_path_factory):
    """The session's Fashion-MNIST proxy source model (small_config's, float32 whatever the run's
    dtype), with the digits dataset prepared."""
    experiment.setup(_run_config(proxy_weights, "float32"), str(tmp_path_factory.mktemp("bf16")))
    return proxy_weights


def _accuracies(results) -> dict[str, float]:
    return {r["method"]: r["accuracy"] for r in results["runs"]}


def test_bfloat16_accuracy_within_tolerance_of_float32(weights, tmp_path):
    """Dense and VPNs on the small digits task, float32 vs bfloat16, from the same proxy weights.

    bf16 - float32 test accuracy measured over seeds 7, 0, 1, 2, 3 (2 CPU cores, jax 0.10.2):
    dense -0.006, +0.017, -0.003, -0.011, +0.014 (float32 0.52-0.61); VPNs +0.020, +0.025, -0.022,
    +0.036, -0.028 (float32 0.86-0.91). These short runs (24 + 48 iterations) amplify rounding
    differences like a change of seed does, and the seeds themselves move float32 by 0.09 (dense)
    and 0.05 (VPNs); the quickstart's longer runs differ by <= 0.008. Tolerance 0.05 (18 images).
    The test runs seed 7. Also: the bf16 run really computed in bf16 (its final weights differ
    from the float32 run's), and its final state and torchvision export are float32.
    """
    acc, finals = {}, {}
    for dtype in ("float32", "bfloat16"):
        workdir = str(tmp_path / dtype)
        acc[dtype] = _accuracies(experiment.run(_run_config(weights, dtype), workdir))
        finals[dtype] = checkpoint.load_final(os.path.join(workdir, "final", "vpns_s0.5"))[0]
    for method in ("dense", "vpns"):
        assert acc["float32"][method] > 0.4, acc  # far above chance (0.1): both runs learned
        assert abs(acc["bfloat16"][method] - acc["float32"][method]) <= ACCURACY_TOLERANCE, acc
    flat16 = sparsity.flatten_params(finals["bfloat16"]["params"])
    flat32 = sparsity.flatten_params(finals["float32"]["params"])
    assert any(not np.array_equal(flat16[p], flat32[p]) for p in flat32)
    assert all(np.asarray(v).dtype == np.float32 for v in flat16.values())
    out = str(tmp_path / "vpns_bf16.safetensors")
    written = export.export_run(str(tmp_path / "bfloat16"), "vpns_s0.5", out)
    from safetensors.numpy import load_file

    state = load_file(written[0])
    floats = [v for v in state.values() if np.issubdtype(v.dtype, np.floating)]
    assert floats and all(v.dtype == np.float32 for v in floats)
