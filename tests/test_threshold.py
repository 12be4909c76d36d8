"""Radix-select k-th smallest and the global / per-layer thresholds: exact against numpy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpns_jax.sparsity import (
    global_threshold,
    hard_masks,
    kth_smallest,
    layerwise_thresholds,
    num_pruned,
)

SHAPES = [(3, 3, 4, 8), (17,), (64, 10), (1, 1, 8, 16)]


def _layers(rng, kind="normal"):
    if kind == "normal":
        return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    if kind == "ties":  # few distinct values, lots of ties, both signs and both zeros
        vals = np.array([-0.0, 0.0, 0.5, -0.5, 1.0, 2.0, -3.0], np.float32)
        return [rng.choice(vals, size=s) for s in SHAPES]
    if kind == "equal":
        return [np.full(s, 0.25, np.float32) for s in SHAPES]
    if kind == "wide":  # many exponents, tiny and huge magnitudes, subnormals
        return [
            (rng.standard_normal(s) * 10.0 ** rng.integers(-40, 30, size=s)).astype(np.float32)
            for s in SHAPES
        ]
    raise ValueError(kind)


def _ref(layers, k):
    return np.sort(np.concatenate([x.ravel() for x in layers]))[k - 1]


@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "wide"])
@pytest.mark.parametrize("radix_bits", [8, 16])
def test_kth_smallest_equals_sorted(kind, radix_bits):
    rng = np.random.default_rng(["normal", "ties", "equal", "wide"].index(kind))
    layers = _layers(rng, kind)
    n = sum(x.size for x in layers)
    f = jax.jit(lambda xs, k: kth_smallest(xs, k, radix_bits=radix_bits))
    for k in [1, 2, n // 3, n // 2, n - 1, n, *rng.integers(1, n + 1, size=5)]:
        got = np.asarray(f([jnp.asarray(x) for x in layers], jnp.int32(k)))  # traced k
        assert got == _ref(layers, int(k)), (kind, k)


def test_kth_smallest_single_array_and_static_k():
    x = np.array([3.0, -1.0, 2.0, 2.0, -0.0, 7.0], np.float32)
    assert float(kth_smallest(jnp.asarray(x), 1)) == -1.0
    assert float(kth_smallest(jnp.asarray(x), 3)) == 2.0
    assert float(kth_smallest(jnp.asarray(x), 4)) == 2.0
    assert float(kth_smallest(jnp.asarray(x), 6)) == 7.0
    with pytest.raises(ValueError, match="empty"):
        kth_smallest([jnp.zeros((0,))], 1)


def test_negative_zero_uses_abs_bits():
    # |−0.0| must be +0.0: 3 zeros (two of them negative) are the 3 smallest magnitudes.
    scores = {"a": jnp.array([-0.0, 0.5, -0.0]), "b": jnp.array([0.0, -0.25, 1.0, 2.0])}
    tau = global_threshold(scores, density=1 - 3 / 7)  # k = 3
    assert float(tau) == 0.0 and not np.signbit(np.asarray(tau))
    masks = hard_masks(scores, tau)
    assert np.asarray(masks["a"]).tolist() == [False, True, False]
    assert np.asarray(masks["b"]).tolist() == [False, True, True, True]


def test_hand_computed_small_case():
    scores = {
        "conv/kernel": jnp.array([[0.1, -0.4], [0.3, -0.2]]),
        "fc/kernel": jnp.array([[-0.05, 0.6, 0.35]]),
    }
    # |s| sorted: 0.05 0.1 0.2 0.3 0.35 0.4 0.6; density 0.5 -> k = floor(0.5 * 7) = 3 -> tau = 0.2.
    tau = global_threshold(scores, 0.5)
    assert float(tau) == np.float32(0.2)
    masks = hard_masks(scores, tau)
    assert np.asarray(masks["conv/kernel"]).tolist() == [[False, True], [True, False]]
    assert np.asarray(masks["fc/kernel"]).tolist() == [[False, True, True]]
    taus = layerwise_thresholds(scores, 0.5)  # conv: k = 2 -> 0.2; fc: k = 1 -> 0.05
    assert float(taus["conv/kernel"]) == np.float32(0.2)
    assert float(taus["fc/kernel"]) == np.float32(0.05)


@pytest.mark.parametrize("density", [1.0, 0.9, 0.5, 0.1, 0.013, 1e-4])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_global_threshold_and_exact_kept_count(density, kind):
    rng = np.random.default_rng(7)
    layers = _layers(rng, kind)
    scores = {f"l{i}/kernel": jnp.asarray(x) for i, x in enumerate(layers)}
    mags = np.abs(np.concatenate([x.ravel() for x in layers]))
    n = mags.size
    k = math.floor((1 - density) * n)
    assert num_pruned(n, density) == k
    tau = jax.jit(global_threshold, static_argnums=1)(scores, density)
    if k < 1:
        assert float(tau) == -1.0
        expected_kept = n
    else:
        ref = np.sort(mags)[k - 1]
        assert float(tau) == ref
        # |s| > tau keeps N - k minus the entries tied with tau at ranks above k.
        ties_above = int(np.sum(np.sort(mags)[k:] == ref))
        expected_kept = n - k - ties_above
        assert expected_kept == int(np.sum(mags > ref))
    kept = sum(int(np.asarray(m).sum()) for m in hard_masks(scores, tau).values())
    assert kept == expected_kept
    if kind == "normal" and k >= 1:
        assert kept == n - k  # continuous values: exact count


def test_tiny_density_prunes_all_but_one():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    tau = global_threshold({"w": jnp.asarray(x)}, 1.5e-3)  # k = floor(0.9985 * 1000) = 998
    assert float(tau) == np.sort(np.abs(x))[997]
    assert int(np.sum(np.abs(x) > float(tau))) == 2
    tau = global_threshold({"w": jnp.asarray(x)}, 1e-6)  # k = 999 = N - 1
    assert int(np.sum(np.abs(x) > float(tau))) == 1


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_density_validation(density):
    with pytest.raises(ValueError, match="density"):
        global_threshold({"w": jnp.ones((4,))}, density)


def test_layerwise_thresholds_match_numpy():
    rng = np.random.default_rng(3)
    scores = {f"l{i}": jnp.asarray(x) for i, x in enumerate(_layers(rng))}
    taus = jax.jit(layerwise_thresholds, static_argnums=1)(scores, 0.3)
    for path, s in scores.items():
        mags = np.sort(np.abs(np.asarray(s)).ravel())
        k = math.floor(0.7 * mags.size)
        assert float(taus[path]) == (mags[k - 1] if k >= 1 else -1.0)
