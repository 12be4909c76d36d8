"""Structured pruning core: channel groups traced from the models, the capped channel threshold,
straight-through channel masks, their expansion onto the parameters, bad input."""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import models
from vpns_jax.errors import ConfigError
from vpns_jax.structured import channels as ch
from vpns_jax.structured.groups import ChannelGroup, channel_groups, check_arch

SIZE = 32


def _shapes(arch: str, width: float = 0.125):
    model = models.create(arch, 10, width=width, small_input=True)
    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SIZE))
    return model, variables


@pytest.fixture(scope="module")
def resnet18():
    model, variables = _shapes("resnet18")
    return model, variables, channel_groups(model, variables, SIZE)


def _group(name: str, size: int, capped: bool = False) -> ChannelGroup:
    return ChannelGroup(name, size, (f"{name}/kernel",), (), (), (), capped)


# ---- groups -----------------------------------------------------------------------------------


def _conv_paths(variables) -> list[str]:
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return [p for p, v in flat.items() if p.endswith("/kernel") and len(v.shape) == 4]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_groups_follow_the_residual_structure(arch, resnet18):
    """Checked against the parameter names, not a copied list: every block conv but its last is a
    group of its own; each stage's last convs and its downsample conv are one group (the stem joins
    layer1's when layer1_0 has no downsample); the fc consumes the last stage's group."""
    model, variables, groups = resnet18 if arch == "resnet18" else (*_shapes(arch), None)
    groups = groups or channel_groups(model, variables, SIZE)
    convs = _conv_paths(variables)
    blocks: dict[str, list[str]] = {}
    for p in convs:
        m = re.match(r"(layer\d+_\d+)/(conv\d+)/kernel$", p)
        if m:
            blocks.setdefault(m.group(1), []).append(p)
    last = {b: max(ps) for b, ps in blocks.items()}  # conv2 (basic) / conv3 (bottleneck)
    stages = sorted({b.split("_")[0] for b in blocks})
    assert len(groups) == sum(len(ps) - 1 for ps in blocks.values()) + len(stages) + \
        ("layer1_0/downsample_0/kernel" in convs)
    by_producer = {p: g for g in groups for p in g.producers}
    assert sorted(by_producer) == sorted(convs)  # every conv produces exactly one group
    for b, ps in blocks.items():
        for p in ps:
            if p != last[b]:
                assert by_producer[p].producers == (p,)
    for s in stages:
        chain = {last[b] for b in blocks if b.startswith(s + "_")}
        chain |= {p for p in convs if p.startswith(f"{s}_") and "downsample_0" in p}
        if s == "layer1" and "layer1_0/downsample_0/kernel" not in convs:
            chain.add("conv1/kernel")
        assert set(by_producer[last[f"{s}_0"]].producers) == chain
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for g in groups:
        for p in g.producers:  # every producer's BN is a norm of its group, sizes agree
            assert flat[p].shape[-1] == g.size
        for p in g.consumers:
            assert flat[p].shape[-2 if len(flat[p].shape) == 4 else 0] == g.size
        bn = {p.rsplit("/", 1)[0].replace("conv", "bn").replace("downsample_0", "downsample_1")
              for p in g.producers}
        assert set(g.norms) == bn
        assert g.capped == any(p == "conv1/kernel" or p.startswith("layer1_") for p in g.producers)
    assert by_producer[last[f"{stages[-1]}_0"]].consumers[-1] == "fc/kernel"
    # every conv with a group input is a consumer exactly once; the stem reads the image
    consumed = [p for g in groups for p in g.consumers]
    assert sorted(consumed) == sorted([p for p in convs if p != "conv1/kernel"] + ["fc/kernel"])


def test_vgg_groups_one_per_conv_with_bias_bn_and_flatten_consumer():
    model, variables = _shapes("vgg16_bn")
    groups = channel_groups(model, variables, SIZE)
    convs = sorted(_conv_paths(variables), key=lambda p: int(re.findall(r"\d+", p)[0]))
    assert [g.producers for g in groups] == [(p,) for p in convs]
    assert all(g.biases == (g.producers[0].replace("kernel", "bias"),) for g in groups)
    assert all(len(g.norms) == 1 for g in groups)
    assert groups[-1].consumers == ("classifier_0/kernel",)
    # capped: the first stage (before the first max-pool), at the input's resolution
    assert [g.capped for g in groups] == [True, True] + [False] * (len(groups) - 2)
    plain = channel_groups(*_shapes("vgg16"), SIZE)
    assert [g.norms for g in plain] == [()] * len(plain)


def test_unsupported_model_and_arch_are_config_errors():
    class Other(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(x)

    with pytest.raises(ConfigError, match="supported: resnet18, resnet34, resnet50, vgg16"):
        channel_groups(Other(), {"params": {}}, SIZE)
    with pytest.raises(ConfigError, match="mobilenet_v2.*supported: resnet18"):
        check_arch("mobilenet_v2")
    check_arch("resnet34")


# ---- threshold ---------------------------------------------------------------------------------


def _ints(masks):
    return {k: np.asarray(v).astype(int).tolist() for k, v in masks.items()}


def test_threshold_with_cap_matches_hand_computed_case():
    groups = [_group("a", 4, capped=True), _group("b", 4), _group("c", 2)]
    scores = {"a": jnp.array([0.1, 0.2, 0.3, 0.9]), "b": jnp.array([0.5, 0.6, -0.05, 0.7]),
              "c": jnp.array([0.4, 0.45])}
    # sparsity 0.5 of 10 channels: 5 pruned. |s| ascending: b2 .05, a0 .1, a1 .2, a2 .3, c0 .4,
    # c1 .45, b0 .5, b1 .6, ... The global threshold alone would prune b2 a0 a1 a2 c0 (a at 75%).
    # a is capped at floor(0.25·4) = 1: a0 only; the rest re-thresholded for 4 more: b2 c0, then
    # c1 would empty c (every group keeps one) so b0 b1.
    assert _ints(ch.channel_threshold(scores, groups, 0.5)) == {
        "a": [0, 1, 1, 1], "b": [0, 0, 0, 1], "c": [0, 1]}
    # without the cap (cap 1): the global threshold, except that c keeps one channel
    assert _ints(ch.channel_threshold(scores, groups, 0.5, cap=1.0)) == {
        "a": [0, 0, 0, 1], "b": [1, 1, 0, 1], "c": [0, 1]}
    assert _ints(ch.channel_threshold(scores, groups, 0.0)) == {
        "a": [1] * 4, "b": [1] * 4, "c": [1] * 2}
    # ties: equal |scores| prune the earlier channel (group order, then index) first
    tied = {"a": jnp.ones(4), "b": jnp.ones(4), "c": jnp.ones(2)}
    assert _ints(ch.channel_threshold(tied, groups, 0.3)) == {
        "a": [0, 1, 1, 1], "b": [0, 0, 1, 1], "c": [1, 1]}


def _reference_procedure(values: dict[str, np.ndarray], groups, k: int, cap: float):
    """The reference's description, step by step: global threshold over the groups still free;
    a capped group over its cap (or any group losing all channels) gets its own threshold at its
    limit and leaves the pool; repeat until nothing is over. Ties by (group order, index)."""
    limits = {g.name: ch.most_pruned(g, cap) for g in groups}
    fixed: dict[str, int] = {}
    while True:
        pool = [(float(abs(values[g.name][i])), gi, i, g.name) for gi, g in enumerate(groups)
                if g.name not in fixed for i in range(g.size)]
        pool.sort()
        left = k - sum(fixed.values())
        counts = {g.name: 0 for g in groups if g.name not in fixed}
        for _, _, _, name in pool[:left]:
            counts[name] += 1
        over = [n for n, c in counts.items() if c > limits[n]]
        if not over:
            break
        for n in over:
            fixed[n] = limits[n]
    pruned = {g.name: np.zeros(g.size, bool) for g in groups}
    for name, n in fixed.items():
        order = sorted(range(len(values[name])), key=lambda i: (abs(values[name][i]), i))
        pruned[name][order[:n]] = True
    for _, _, i, name in pool[:left]:
        pruned[name][i] = True
    return {n: ~p for n, p in pruned.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_exact_count_cap_and_reference_procedure(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, size=7)
    groups = [_group(f"g{i}", int(s), capped=i < 2) for i, s in enumerate(sizes)]
    total = int(sizes.sum())
    values = {g.name: rng.normal(size=g.size).round(1).astype(np.float32) for g in groups}  # ties
    for sparsity in (0.1, 0.3, 0.45, 0.6):
        try:
            k = ch.pruned_channel_count(groups, sparsity)
        except ConfigError:
            continue
        keep = ch.channel_threshold({n: jnp.asarray(v) for n, v in values.items()}, groups,
                                    sparsity)
        pruned = sum(int((~np.asarray(m)).sum()) for m in keep.values())
        assert pruned == k == math.floor(sparsity * total + 1e-6)
        for g in groups:
            m = np.asarray(keep[g.name])
            assert m.sum() >= 1
            if g.capped:
                assert (~m).sum() <= math.floor(0.25 * g.size)
        expected = _reference_procedure(values, groups, k, 0.25)
        assert _ints(keep) == _ints(expected)
    jitted = jax.jit(lambda s: ch.channel_threshold(s, groups, 0.3))(
        {n: jnp.asarray(v) for n, v in values.items()})
    assert _ints(jitted) == _ints(ch.channel_threshold(values, groups, 0.3))


def test_impossible_cap_and_bad_sparsity_are_one_line_errors(resnet18):
    _, _, groups = resnet18
    scores = {g.name: jnp.ones(g.size) for g in groups}
    with pytest.raises(ConfigError) as e:
        ch.channel_threshold(scores, groups, 0.95)
    msg = str(e.value)
    assert "\n" not in msg and "cap 0.25" in msg
    for layer in ("conv1", "layer1_0/conv1", "layer1_0/conv2", "layer1_1/conv2"):
        assert layer in msg
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"channel sparsity must be in \[0, 1\)"):
            ch.channel_threshold(scores, groups, bad)
    with pytest.raises(ConfigError, match="one entry per channel group"):
        ch.channel_threshold({"conv1": jnp.ones(8)}, groups, 0.2)


# ---- straight-through masks and expansion -------------------------------------------------------


def test_ste_gradient_is_sign_times_mask_gradient():
    """L linear in the masked parameters, L = Σ_p <G_p, W_p ⊙ expand(m)_p>: by hand, ∂L/∂m_c is
    the sum of G·W over every entry channel c touches (producer outputs, bias, BN scale and bias,
    consumer inputs), and ∂L/∂s = sign(s) · ∂L/∂m (sign(0) = 0)."""
    rng = np.random.default_rng(0)
    g1 = ChannelGroup("c1", 3, ("c1/kernel",), ("bn",), ("c1/bias",), ("c2/kernel",), False)
    g2 = ChannelGroup("c2", 2, ("c2/kernel",), (), (), ("fc/kernel",), False)
    shapes = {"c1/kernel": (2, 2, 4, 3), "c1/bias": (3,), "bn/scale": (3,), "bn/bias": (3,),
              "c2/kernel": (3, 3, 3, 2), "fc/kernel": (2 * 5, 7)}
    params = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
    weights = {p: rng.normal(size=s).astype(np.float32) for p, s in shapes.items()}
    scores = {"c1": jnp.array([0.5, -2.0, 0.0]), "c2": jnp.array([-1.0, 0.3])}

    def loss(masks):
        out = ch.expand([g1, g2], masks, params)
        return sum(jnp.sum(weights[p] * params[p] * out.get(p, 1.0)) for p in params)

    grads = jax.jit(jax.grad(lambda s: loss(ch.channel_ste_masks(s, [g1, g2], 0.4))))(scores)
    gw = {p: weights[p] * params[p] for p in params}
    hard = ch.channel_threshold(scores, [g1, g2], 0.4)  # 2 of 5 pruned: c1[2] (0), c2[1] (0.3)
    assert _ints(hard) == {"c1": [1, 1, 0], "c2": [1, 0]}
    m1, m2 = (np.asarray(hard[n], np.float32) for n in ("c1", "c2"))
    d_m1 = (gw["c1/kernel"].sum((0, 1, 2)) + gw["c1/bias"] + gw["bn/scale"] + gw["bn/bias"]
            + np.einsum("hwio,o->i", gw["c2/kernel"], m2))
    d_m2 = (np.einsum("hwio,i->o", gw["c2/kernel"], m1)
            + gw["fc/kernel"].reshape(2, 5, 7).sum((1, 2)))  # channel-major: rows 5c … 5c+4
    np.testing.assert_allclose(grads["c1"], np.sign(scores["c1"]) * d_m1, rtol=1e-5)
    np.testing.assert_allclose(grads["c2"], np.sign(scores["c2"]) * d_m2, rtol=1e-5)
    assert float(grads["c1"][2]) == 0.0


def test_expand_shapes_and_positions():
    model, variables = _shapes("vgg16")
    groups = channel_groups(model, variables, SIZE)
    rng = np.random.default_rng(0)
    masks = {g.name: jnp.asarray(rng.random(g.size) < 0.5) for g in groups}
    out = ch.expand(groups, masks, variables["params"])
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    assert set(out) == {p for p in flat if not p.startswith("classifier_") or
                        p == "classifier_0/kernel"}
    for p, m in out.items():
        assert np.broadcast_shapes(m.shape, flat[p].shape) == flat[p].shape
    first, second, last = groups[0], groups[1], groups[-1]
    k = np.asarray(out[second.producers[0]])  # features_2: in = group 0, out = group 1
    assert k.shape == (1, 1, first.size, second.size)
    np.testing.assert_array_equal(k[0, 0], np.outer(masks[first.name], masks[second.name]))
    fc = np.asarray(out["classifier_0/kernel"])  # [C·49, 1]: channel-major flatten
    assert fc.shape == (last.size * 49, 1)
    np.testing.assert_array_equal(fc[:, 0], np.repeat(np.asarray(masks[last.name]), 49))
    np.testing.assert_array_equal(out["features_0/bias"], masks[first.name])
    summary = ch.channel_sparsity_summary(groups, masks)
    kept = sum(int(np.asarray(m).sum()) for m in masks.values())
    total = sum(g.size for g in groups)
    assert summary["total"] == {"channels": total, "kept": kept, "sparsity": 1 - kept / total,
                                "conv_channels": total, "conv_kept": kept,
                                "conv_sparsity": 1 - kept / total}  # VGG: one conv per group
    assert summary["groups"][first.name]["layers"] == ["features_0"]


def test_summary_counts_residual_channels_per_conv(resnet18):
    _, variables, groups = resnet18
    masks = {g.name: np.arange(g.size) < g.size // 2 for g in groups}  # half of every group
    total = ch.channel_sparsity_summary(groups, masks)["total"]
    convs = _conv_paths(variables)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    conv_channels = sum(flat[p].shape[-1] for p in convs)
    assert (total["channels"], total["kept"]) == (sum(g.size for g in groups),
                                                  sum(g.size // 2 for g in groups))
    assert (total["conv_channels"], total["conv_kept"]) == (conv_channels, conv_channels // 2)
