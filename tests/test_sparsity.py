"""Prunable paths, scaled score init, STE masks (vs autodiff and torch), apply, summary."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vpns_jax import sparsity
from vpns_jax.sparsity import criteria


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(6, (3, 3), use_bias=False, name="conv1")(x)
        y = nn.BatchNorm(use_running_average=True, name="bn1")(y)
        shortcut = nn.Conv(6, (1, 1), use_bias=False, name="downsample_0")(x)
        return nn.relu(y + shortcut)


class _TinyNet(nn.Module):
    """Stem conv + BN, one residual block with a downsample conv, dense head (ResNet-like names)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
        x = _Block(name="layer1_0")(x)
        return nn.Dense(5, name="fc")(x.mean(axis=(1, 2)))


PATHS = ["conv1/kernel", "fc/kernel", "layer1_0/conv1/kernel", "layer1_0/downsample_0/kernel"]


@pytest.fixture(scope="module")
def net():
    model = _TinyNet()
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(jax.random.key(1), x)
    labels = jnp.array([0, 3, 1, 4])
    return model, variables, x, labels


def test_prunable_paths_rule(net):
    _, variables, _, _ = net
    assert sparsity.prunable_paths(variables["params"]) == PATHS
    # The rule is a regex: e.g. leave the head dense.
    assert sparsity.prunable_paths(variables["params"], r"^(?!fc/).*(^|/)kernel$") == [
        p for p in PATHS if not p.startswith("fc/")
    ]
    # A 'kernel' leaf with ndim < 2 is not prunable.
    assert sparsity.prunable_paths({"odd": {"kernel": jnp.ones((3,))}}) == []


def test_scaled_score_init(net):
    _, variables, _, _ = net
    params = variables["params"]
    scores = sparsity.scaled_score_init(params)
    assert sorted(scores) == PATHS
    flat = sparsity.flatten_params(params)
    fans = {
        "conv1/kernel": 27,
        "fc/kernel": 6,
        "layer1_0/conv1/kernel": 36,
        "layer1_0/downsample_0/kernel": 4,
    }
    for path, s in scores.items():
        w = np.asarray(flat[path])
        assert sparsity.fan_in(w.shape) == fans[path]
        expected = math.sqrt(6.0 / fans[path]) * w / np.abs(w).max()
        np.testing.assert_allclose(np.asarray(s), expected, rtol=1e-6)
        assert np.isclose(np.abs(np.asarray(s)).max(), math.sqrt(6.0 / fans[path]))
    zero = sparsity.scaled_score_init({"d": {"kernel": jnp.zeros((3, 2))}})
    assert not np.asarray(zero["d/kernel"]).any()


def _loss(model, variables, params, x, labels):
    logits = model.apply({**variables, "params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def test_ste_score_gradient_is_sign_times_weight_times_effective_grad(net):
    model, variables, x, labels = net
    params = variables["params"]
    scores = sparsity.scaled_score_init(params)
    scores["fc/kernel"] = scores["fc/kernel"].at[0, 0].set(0.0)  # sign(0) = 0, as in torch
    tau = sparsity.global_threshold(scores, 0.5)

    def score_loss(s):
        return _loss(
            model, variables, sparsity.apply_masks(params, sparsity.ste_masks(s, tau)), x, labels
        )

    grad_s = jax.jit(jax.grad(score_loss))(scores)

    effective = sparsity.apply_masks(params, sparsity.hard_masks(scores, tau))
    grad_eff = sparsity.flatten_params(
        jax.grad(lambda p: _loss(model, variables, p, x, labels))(effective)
    )
    flat = sparsity.flatten_params(params)
    for path in PATHS:
        expected = np.sign(np.asarray(scores[path])) * np.asarray(flat[path]) * grad_eff[path]
        np.testing.assert_allclose(np.asarray(grad_s[path]), expected, rtol=1e-5, atol=1e-8)
    assert grad_s["fc/kernel"][0, 0] == 0.0
    # Masked-out entries receive gradient too (straight through).
    masked = ~np.asarray(sparsity.hard_masks(scores, tau)["layer1_0/conv1/kernel"])
    assert masked.any() and np.any(np.asarray(grad_s["layer1_0/conv1/kernel"])[masked] != 0)


class _GetSubnet(torch.autograd.Function):
    """Reference GetSubnet restated: forward 1[|s| > tau], backward passes the gradient through."""

    @staticmethod
    def forward(ctx, magnitudes, tau):
        return (magnitudes > tau).float()

    @staticmethod
    def backward(ctx, g):
        return g, None


def test_ste_matches_torch_getsubnet():
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(6, 8)), rng.normal(size=(8, 3))
    s1, s2 = rng.normal(size=(6, 8)), rng.normal(size=(8, 3))
    s1[0, 0] = 0.0
    x, b = rng.normal(size=(5, 6)), rng.normal(size=(3,))
    arrays = [a.astype(np.float32) for a in (w1, w2, s1, s2, x, b)]
    w1, w2, s1, s2, x, b = arrays
    density = 0.4

    def jax_loss(scores):
        tau = sparsity.global_threshold(scores, density)
        m = sparsity.ste_masks(scores, tau)
        h = jnp.tanh(x @ (w1 * m["l1"]))
        return jnp.sum(jnp.sin(h @ (w2 * m["l2"]) + b))

    scores = {"l1": jnp.asarray(s1), "l2": jnp.asarray(s2)}
    loss, grads = jax.value_and_grad(jax_loss)(scores)

    ts1, ts2 = (torch.tensor(s, requires_grad=True) for s in (s1, s2))
    all_mags = torch.cat([ts1.detach().abs().flatten(), ts2.detach().abs().flatten()])
    k = math.floor((1 - density) * all_mags.numel())
    tau = torch.kthvalue(all_mags, k).values
    tw1, tw2, tx, tb = (torch.from_numpy(a) for a in (w1, w2, x, b))
    # torch weights are (out, in): F.linear(x, (W^T)) == x @ W.
    h = torch.tanh(torch.nn.functional.linear(tx, (tw1 * _GetSubnet.apply(ts1.abs(), tau)).T))
    out = torch.nn.functional.linear(h, (tw2 * _GetSubnet.apply(ts2.abs(), tau)).T, tb)
    tloss = torch.sin(out).sum()
    tloss.backward()

    np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["l1"]), ts1.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["l2"]), ts2.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert ts1.grad[0, 0] == 0 and grads["l1"][0, 0] == 0


def test_apply_masks_jit_and_grad(net):
    _, variables, _, _ = net
    params = variables["params"]
    masks = criteria.magnitude(params, density=0.3)
    masked = jax.jit(sparsity.apply_masks)(params, masks)
    flat, flat_masked = sparsity.flatten_params(params), sparsity.flatten_params(masked)
    assert sorted(flat) == sorted(flat_masked)
    for path, v in flat.items():
        expected = np.asarray(v) * np.asarray(masks[path]) if path in masks else np.asarray(v)
        np.testing.assert_array_equal(np.asarray(flat_masked[path]), expected)
    # Gradient w.r.t. params flows through the mask: zero where masked.
    grad = jax.grad(
        lambda p: sum(jnp.sum(v) for v in jax.tree.leaves(sparsity.apply_masks(p, masks)))
    )(params)
    g = sparsity.flatten_params(grad)
    np.testing.assert_array_equal(
        np.asarray(g["fc/kernel"]), np.asarray(masks["fc/kernel"], np.float32)
    )
    assert np.all(np.asarray(g["fc/bias"]) == 1)
    with pytest.raises(KeyError, match="not found"):
        sparsity.apply_masks(params, {"nope/kernel": jnp.ones((2, 2))})


def test_magnitude_masks_and_summary(net):
    _, variables, _, _ = net
    params = variables["params"]
    masks = criteria.magnitude(params, density=0.3)
    flat = sparsity.flatten_params(params)
    mags = np.concatenate([np.abs(np.asarray(flat[p])).ravel() for p in PATHS])
    n, k = mags.size, math.floor(0.7 * mags.size)
    summary = sparsity.sparsity_summary(masks)
    assert summary["total"]["size"] == n
    assert summary["total"]["nonzero"] == n - k
    assert summary["total"]["sparsity"] == pytest.approx(k / n)
    for path in PATHS:
        layer = summary["layers"][path]
        assert layer["size"] == flat[path].size
        assert layer["nonzero"] == int(
            np.sum(np.abs(np.asarray(flat[path])) > np.sort(mags)[k - 1])
        )
    assert isinstance(summary["total"]["nonzero"], int)


def test_summary_hand_case():
    summary = sparsity.sparsity_summary(
        {"a": np.array([1.0, 0.0, 0.0, 1.0]), "b": np.array([[True, False, False]])}
    )
    assert summary["layers"]["a"] == {"size": 4, "nonzero": 2, "sparsity": 0.5}
    assert summary["layers"]["b"]["nonzero"] == 1
    assert summary["total"] == {"size": 7, "nonzero": 3, "sparsity": pytest.approx(4 / 7)}


def test_keep_top_density(net):
    _, variables, _, _ = net
    scores = sparsity.scaled_score_init(variables["params"])
    masks = jax.jit(sparsity.keep_top, static_argnums=1)(scores, 0.25)
    n = sum(int(s.size) for s in scores.values())
    assert sparsity.sparsity_summary(masks)["total"]["nonzero"] == n - math.floor(0.75 * n)
    assert all(m.dtype == jnp.float32 for m in masks.values())


def test_keep_top_gradient_is_straight_through():
    scores = {"a": jnp.array([0.5, -0.1, 0.0, -2.0]), "b": jnp.array([[1.0, -0.3]])}
    weights = {"a": jnp.array([1.0, 2.0, 3.0, 4.0]), "b": jnp.array([[5.0, 6.0]])}

    def loss(s):
        m = sparsity.keep_top(s, 0.5)  # k = 3: tau = 0.1, keeps 0.5, -2.0, 1.0
        return sum(jnp.sum(weights[p] * m[p]) for p in m)

    grads = jax.grad(loss)(scores)
    np.testing.assert_array_equal(np.asarray(grads["a"]), [1.0, -2.0, 0.0, -4.0])
    np.testing.assert_array_equal(np.asarray(grads["b"]), [[5.0, -6.0]])
