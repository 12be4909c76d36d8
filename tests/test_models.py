"""Models: parameter counts, names, PyTorch BatchNorm and adaptive pooling, options, dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import models
from vpns_jax.models.layers import BatchNorm, adaptive_avg_pool

TORCHVISION_PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
}


def _abstract(name: str, size: int = 64, **kwargs):
    model = models.create(name, **kwargs)
    return jax.eval_shape(lambda r: models.init_variables(model, r, size), jax.random.key(0))


def _numpy_variables(name: str, size: int = 32, seed: int = 0, **kwargs):
    """Random variables made with numpy (no RNG compile: XLA takes ~0.3 s per random op on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) / 8,
                        _abstract(name, size, **kwargs))


@pytest.mark.parametrize("name", models.ARCHS)
def test_param_counts_equal_torchvision(name):
    variables = _abstract(name)
    assert models.param_count(variables["params"]) == TORCHVISION_PARAM_COUNTS[name]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_archs_and_unknown_name():
    assert set(models.ARCHS) == set(TORCHVISION_PARAM_COUNTS)
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, vgg16, vgg16_bn"):
        models.create("resnet101")


def test_names_and_v15_stride_on_3x3():
    p = traverse_util.flatten_dict(_abstract("resnet50")["params"], sep="/")
    assert p["conv1/kernel"].shape == (7, 7, 3, 64)
    assert p["layer2_0/conv2/kernel"].shape == (3, 3, 128, 128)
    assert p["layer2_0/downsample_0/kernel"].shape == (1, 1, 256, 512)
    assert p["fc/kernel"].shape == (2048, 1000)
    v = traverse_util.flatten_dict(_abstract("vgg16_bn", 32)["params"], sep="/")
    assert v["features_0/kernel"].shape == (3, 3, 3, 64) and v["features_1/scale"].shape == (64,)
    assert v["features_40/kernel"].shape == (3, 3, 512, 512) and "features_43" not in v
    assert v["classifier_0/kernel"].shape == (512 * 49, 4096)
    assert v["classifier_6/bias"].shape == (1000,)
    # stride 2 sits on the 3x3 conv (v1.5): 64x64 → 16 (stem) → 16, 8, 4, 2 per stage.
    model = models.create("resnet50", width=0.125)
    variables = _abstract("resnet50", width=0.125)
    _, inter = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    conv1_out = inter["intermediates"]["layer2_0"]["conv1"]["__call__"][0]
    conv2_out = inter["intermediates"]["layer2_0"]["conv2"]["__call__"][0]
    assert conv1_out.shape[1] == 16 and conv2_out.shape[1] == 8


def test_width_and_small_input():
    p = traverse_util.flatten_dict(
        _abstract("resnet18", 32, width=0.25, small_input=True, num_classes=10)["params"], sep="/")
    assert p["conv1/kernel"].shape == (3, 3, 3, 16)
    assert p["layer4_1/conv2/kernel"].shape == (3, 3, 128, 128)
    assert p["fc/kernel"].shape == (128, 10)
    v = traverse_util.flatten_dict(_abstract("vgg16", 32, width=0.1)["params"], sep="/")
    assert v["features_0/kernel"].shape == (3, 3, 3, 6)
    assert v["classifier_0/kernel"].shape == (51 * 49, 410)
    model = models.create("resnet18", 10, width=0.25, small_input=True)
    out = jax.eval_shape(model.apply, _abstract("resnet18", 32, width=0.25, small_input=True,
                                                num_classes=10), jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 10)


def test_bfloat16_compute_keeps_float32_params():
    model = models.create("resnet18", 10, width=0.125, small_input=True, dtype=jnp.bfloat16)
    variables = _numpy_variables("resnet18", 16, num_classes=10, width=0.125, small_input=True)
    logits, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, jnp.ones((2, 16, 16, 3)))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(upd))


def test_batchnorm_matches_pytorch_formulas():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (4, 3, 5, 6)).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 6), rng.normal(size=6)
    old_mean, old_var = rng.normal(size=6), rng.uniform(0.5, 2, 6)
    variables = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                            "bias": jnp.asarray(bias, jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(old_mean, jnp.float32),
                                 "var": jnp.asarray(old_var, jnp.float32)}}
    bn = BatchNorm()
    y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    xd = x.astype(np.float64).reshape(-1, 6)
    mu, var_b, var_u = xd.mean(0), xd.var(0), xd.var(0, ddof=1)
    want = (x - mu) / np.sqrt(var_b + 1e-5) * scale + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * old_mean + 0.1 * mu, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * old_var + 0.1 * var_u, rtol=1e-6)
    y_eval = bn.apply(variables, x, train=False)
    want_eval = (x - old_mean) / np.sqrt(old_var + 1e-5) * scale + bias
    np.testing.assert_allclose(y_eval, want_eval, rtol=1e-5, atol=1e-5)


def test_batchnorm_train_gradients_match_torch():
    """The hand-written train-mode VJP (layers.batch_norm_train) equals torch's BatchNorm2d
    backward for x, scale and bias."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, (3, 5, 4, 6)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    scale, bias = rng.uniform(0.5, 1.5, 6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    bn_t = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn_t.weight.copy_(torch.from_numpy(scale))
        bn_t.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    (bn_t(xt) * torch.from_numpy(g.transpose(0, 3, 1, 2).copy())).sum().backward()
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
                 "batch_stats": {"mean": jnp.zeros(6), "var": jnp.ones(6)}}

    def loss(x, params):
        y, _ = BatchNorm().apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
        return jnp.sum(y * g)

    dx, dp = jax.grad(loss, (0, 1))(jnp.asarray(x), variables["params"])
    np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp["scale"], bn_t.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp["bias"], bn_t.bias.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_batch_norm_train_vjp_includes_mean_and_var():
    """Cotangents on the returned batch mean and variance flow to x as autodiff of the plain
    formula says (float64 reference)."""
    from vpns_jax.models.layers import batch_norm_train

    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3, 2, 5))
    scale, bias = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    gy, gm, gv = rng.normal(size=x.shape), rng.normal(size=5), rng.normal(size=5)

    def plain(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = ((x - mean) ** 2).mean((0, 1, 2))
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias, mean, var

    def total(fn, x, scale, bias):
        y, m, v = fn(x, scale, bias)
        return jnp.sum(y * gy) + jnp.sum(m * gm) + jnp.sum(v * gv)

    with jax.enable_x64(True):
        want = jax.grad(lambda *a: total(plain, *a), (0, 1, 2))(x, scale, bias)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    got = jax.grad(lambda *a: total(lambda *b: batch_norm_train(*b, 1e-5), *a), (0, 1, 2))(*f32)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 5, 7, 10, 13, 14])
def test_adaptive_avg_pool_matches_torch(size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(size).normal(size=(2, size, size + 3, 4)).astype(np.float32)
    want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), (7, 7))
    got = adaptive_avg_pool(jnp.asarray(x), (7, 7))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)


def test_vgg_dropout_only_with_rng_in_train_mode():
    model = models.create("vgg16", 10, width=1 / 16)
    variables = _numpy_variables("vgg16", num_classes=10, width=1 / 16)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    apply = jax.jit(model.apply, static_argnames="train")
    eval_out = apply(variables, x, train=False)
    assert np.array_equal(apply(variables, x, train=True), eval_out)
    drop = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"dropout": k}))
    a, b = drop(variables, x, jax.random.key(2)), drop(variables, x, jax.random.key(3))
    assert not np.allclose(a, eval_out) and not np.allclose(a, b)


def test_init_variables_jit_and_eval_shape():
    model = models.create("vgg16", 10, width=1 / 16)  # the fewest random initializers
    init = jax.jit(models.init_variables, static_argnums=(0, 2))  # nests in an outer jit
    variables = init(model, jax.random.key(0), 32)
    shapes = jax.eval_shape(lambda r: models.init_variables(model, r, 32), jax.random.key(0))
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    assert set(variables) == {"params", "batch_stats"}
    # torchvision's init: conv kaiming-normal fan_out (std sqrt(2/(9·out))), zero biases.
    k = np.asarray(variables["params"]["features_28"]["kernel"])
    assert abs(k.std() / np.sqrt(2 / (9 * 32)) - 1) < 0.15
    assert not np.asarray(variables["params"]["features_28"]["bias"]).any()
    assert _abstract("vgg16", 32, width=1 / 16)["batch_stats"] == {}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16_bn"])
def test_conv_lowerings_agree_in_values_and_gradients(arch):
    """conv_impl changes how convolutions are lowered, never the parameters or the function.

    Gradients are compared in eval mode: train-mode BatchNorm over a 1x1 map of a tiny batch is
    ill-conditioned and amplifies rounding differences of any two float32 summation orders.
    """
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    outs = {}
    for impl in ("xla", "auto", "im2col"):
        model = models.create(arch, 10, width=0.125, conv_impl=impl)
        variables = models.init_variables(model, jax.random.PRNGKey(0), 32)
        eval_logits = jax.jit(lambda v, model=model: model.apply(v, x, train=False))(variables)

        def loss(params, model=model, variables=variables):
            return jnp.sum(model.apply({**variables, "params": params}, x, train=False) ** 2)

        # jitted (and so in the persistent compilation cache): eager op-by-op dispatch took 12-17 s
        outs[impl] = (eval_logits, jax.jit(jax.grad(loss))(variables["params"]))
    for impl in ("auto", "im2col"):
        scale = float(np.abs(outs["xla"][0]).max())
        np.testing.assert_allclose(outs[impl][0], outs["xla"][0], rtol=1e-5, atol=1e-5 * scale)
        for a, b in zip(jax.tree.leaves(outs[impl][1]), jax.tree.leaves(outs["xla"][1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-7)
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        models.create("resnet18", conv_impl="winograd")
    assert models.default_conv_impl() == "auto"  # the tests run on the CPU backend
