"""Pruning criteria: exact top-k against numpy, magnitude/LTH against torch.nn.utils.prune, and
SNIP / GraSP / SynFlow against literal PyTorch re-statements of the authors' code (§5.1–5.7).

The model is a small BN convnet defined twice, in Flax and in torch, with the same weights; its
prunable kernels total exactly 1000 entries (216 + 576 + 208).
"""
from __future__ import annotations

import copy
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from vpns_jax.sparsity import criteria as C

H = W = 8
C1 = C2 = 8
K = 26  # raw outputs ("source classes")
NUM_LABELS = 5  # downstream labels, used directly as targets into the K outputs
PATHS = ["conv1/kernel", "conv2/kernel", "fc/kernel"]
TORCH = {"conv1/kernel": "conv1", "conv2/kernel": "conv2", "fc/kernel": "fc"}
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture
def x64():
    """float64 on both sides for the score comparisons: in float32, entries of SNIP/GraSP
    scores that come from cancelling sums differ by up to ~4e-5 relative between jax and torch."""
    with jax.enable_x64(True):
        yield


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, c in ((1, C1), (2, C2)):
            x = nn.Conv(c, (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(K, name="fc")(x.mean(axis=(1, 2)))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, C1, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(C1, eps=1e-5)
        self.conv2 = torch.nn.Conv2d(C1, C2, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(C2, eps=1e-5)
        self.fc = torch.nn.Linear(C2, K)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _variables(seed=0, dtype=jnp.float32):
    model = FlaxNet()
    v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, H, W, 3)))
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    params = {k: dict(v["params"][k]) for k in v["params"]}
    params["fc"]["bias"] = f32(0.1 * rng.standard_normal(K))
    stats = {}
    for bn, c in (("bn1", C1), ("bn2", C2)):
        params[bn] = {"scale": f32(1 + 0.2 * rng.standard_normal(c)),
                      "bias": f32(0.1 * rng.standard_normal(c))}
        stats[bn] = {"mean": f32(0.2 * rng.standard_normal(c)),
                     "var": f32(rng.uniform(0.5, 1.5, c))}
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), (params, stats))


def _torch_layout(a):
    a = np.asarray(a)
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T


def _flax_layout(t):
    a = t.detach().cpu().numpy()
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T


def _torch_net(params, stats):
    dtype = torch.float64 if params["fc"]["kernel"].dtype == jnp.float64 else torch.float32
    net = TorchNet().to(dtype)
    sd = {f"{TORCH[p]}.weight": _torch_layout(params[p.split("/")[0]]["kernel"]) for p in PATHS}
    sd["fc.bias"] = np.asarray(params["fc"]["bias"])
    for bn in ("bn1", "bn2"):
        sd.update({f"{bn}.weight": params[bn]["scale"], f"{bn}.bias": params[bn]["bias"],
                   f"{bn}.running_mean": stats[bn]["mean"], f"{bn}.running_var": stats[bn]["var"]})
    net.load_state_dict({k: torch.tensor(np.array(v)) for k, v in sd.items()}, strict=False)
    return net.eval()


def _batches(n_batches=2, b=8, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(size=(b, H, W, 3)).astype(dtype),
             "label": rng.integers(0, NUM_LABELS, b).astype(np.int32)} for _ in range(n_batches)]


def _normalized(batches):
    images = np.concatenate([b["image"] for b in batches])
    return (images - MEAN.astype(images.dtype)) / STD.astype(images.dtype)


def _torch_input(batches):
    x = _normalized(batches).transpose(0, 3, 1, 2)
    labels = np.concatenate([b["label"] for b in batches]).astype(np.int64)
    return torch.tensor(x), torch.tensor(labels)


def _jax_input(batches):
    return jnp.asarray(_normalized(batches)), jnp.asarray(
        np.concatenate([b["label"] for b in batches]))


def _np_top_k(scores, n_keep, eligible=None):
    """Re-statement: stable ascending argsort over the eligible entries, keep the last n_keep."""
    flat = np.concatenate([np.asarray(scores[p], np.float32).ravel() for p in sorted(scores)])
    elig = (np.ones(flat.size, bool) if eligible is None else
            np.concatenate([np.asarray(eligible[p], bool).ravel() for p in sorted(scores)]))
    idx = np.flatnonzero(elig)
    order = idx[np.argsort(flat[idx], kind="stable")]
    keep = np.zeros(flat.size, bool)
    keep[order[len(order) - min(n_keep, len(order)):]] = True
    out, start = {}, 0
    for p in sorted(scores):
        size = np.size(scores[p])
        out[p] = keep[start:start + size].reshape(np.shape(scores[p]))
        start += size
    return out


def _np_top_k_layer(scores, counts, eligible=None):
    out = {}
    for p in scores:
        out.update(_np_top_k({p: scores[p]}, counts[p],
                             None if eligible is None else {p: eligible[p]}))
    return out


def _assert_masks_equal(got, want):
    assert sorted(got) == sorted(want)
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)


def _assert_scores_close(got, want, rtol=1e-5):
    for p in want:
        np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=rtol, atol=0, err_msg=p)


def _jit_scores(fn, params, stats, *args):
    """A score function on FlaxNet, jitted (eager op-by-op grads compile far more programs)."""
    return jax.jit(lambda p, s, *a: fn(p, s, FlaxNet(), *a))(params, stats, *args)


def _kernels(params):
    return {p: np.asarray(params[p.split("/")[0]]["kernel"]) for p in PATHS}


def _count(masks):
    return int(sum(np.asarray(m).sum() for m in masks.values()))


# --------------------------------------------------------------------------------------------
# Counts and the exact top-k
# --------------------------------------------------------------------------------------------


def test_num_kept_and_keep_counts():
    assert C.num_kept(1000, 0.3) == 300  # floor(0.7 * 1000) would be 699.999... without 1e-6
    assert [C.num_kept(1000, d) for d in (0.8, 0.64, 0.512, 1.0)] == [800, 640, 512, 1000]
    assert C.num_kept(7, 0.5) == 4
    assert C.keep_counts({"a": 10, "b": 30}, 0.5, "global") == 20
    assert C.keep_counts({"a": 7, "b": 3}, 0.5, "layer") == {"a": 4, "b": 2}
    with pytest.raises(ValueError, match="scope"):
        C.keep_counts({"a": 7}, 0.5, "per-layer")
    with pytest.raises(ValueError, match="density"):
        C.num_kept(7, 0.0)


def _tie_scores(kind, rng):
    shapes = {"b/kernel": (3, 3, 2, 4), "a/kernel": (5, 7), "c/kernel": (1, 1, 4, 6)}
    if kind == "equal":
        return {p: np.full(s, 0.5, np.float32) for p, s in shapes.items()}
    if kind == "zeros":  # mostly zeros, a few discrete values, both signed zeros
        vals = np.array([0.0, -0.0, 0.0, 0.0, 0.0, 1.0, 2.0, -1.0], np.float32)
        return {p: rng.choice(vals, size=s) for p, s in shapes.items()}
    return {p: rng.standard_normal(s).astype(np.float32) for p, s in shapes.items()}


@pytest.mark.parametrize("kind", ["equal", "zeros", "normal"])
@pytest.mark.parametrize("with_eligible", [False, True])
def test_top_k_masks_matches_stable_argsort(kind, with_eligible):
    rng = np.random.default_rng(["equal", "zeros", "normal"].index(kind))
    scores = _tie_scores(kind, rng)
    eligible = ({p: rng.uniform(size=s.shape) < 0.6 for p, s in scores.items()}
                if with_eligible else None)
    n = sum(s.size for s in scores.values())
    n_elig = n if eligible is None else sum(e.sum() for e in eligible.values())
    traces = []

    @jax.jit
    def f(s, k, e):
        traces.append(1)
        return C.top_k_masks(s, k, eligible=e)

    js = {p: jnp.asarray(s) for p, s in scores.items()}
    je = None if eligible is None else {p: jnp.asarray(e) for p, e in eligible.items()}
    for k in [0, 1, 2, n // 3, n // 2, n - 1, n, *rng.integers(0, n + 1, size=4)]:
        got = f(js, jnp.int32(k), je)  # traced n_keep: one trace for all k
        assert _count(got) == min(k, n_elig), k
        _assert_masks_equal(got, _np_top_k(scores, int(k), eligible))
        if eligible is not None:
            assert not any(np.any(np.asarray(got[p]) & ~eligible[p]) for p in scores)
    assert len(traces) == 1
    # per-layer counts (Python ints, eager)
    counts = {p: int(rng.integers(0, s.size + 1)) for p, s in scores.items()}
    _assert_masks_equal(C.top_k_masks(js, counts, eligible=je),
                        _np_top_k_layer(scores, counts, eligible))


def test_top_k_masks_tie_rule_keeps_later_entries():
    scores = {"a": jnp.array([1.0, 1.0, 3.0]), "b": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
    got = C.top_k_masks(scores, 3)  # 3.0, then the last two of the five 1.0s
    np.testing.assert_array_equal(got["a"], [False, False, True])
    np.testing.assert_array_equal(got["b"], [[False, False], [True, True]])
    got = C.top_k_masks(scores, {"a": 2, "b": 1})
    np.testing.assert_array_equal(got["a"], [False, True, True])
    np.testing.assert_array_equal(got["b"], [[False, False], [False, True]])


# --------------------------------------------------------------------------------------------
# Magnitude and LTH against torch.nn.utils.prune
# --------------------------------------------------------------------------------------------


def _torch_modules(net):
    return [(getattr(net, TORCH[p]), "weight") for p in PATHS]


def _torch_masks(net):
    return {p: _flax_layout(getattr(net, TORCH[p]).weight_mask).astype(bool) for p in PATHS}


@pytest.mark.parametrize("amount", [1, 137, 500, 999])
def test_magnitude_equals_torch_global_unstructured(amount):
    params, stats = _variables(seed=amount)
    net = _torch_net(params, stats)
    prune.global_unstructured(_torch_modules(net), pruning_method=prune.L1Unstructured,
                              amount=amount)
    got = C.magnitude(params, stats, None, [], None, (1000 - amount) / 1000)
    _assert_masks_equal(got, _torch_masks(net))
    assert _count(got) == 1000 - amount


def test_lth_rounds_equal_torch_round_by_round():
    params, stats = _variables(seed=3)
    net = _torch_net(params, stats)
    assert C.imp_kept_counts(1000, 3) == [800, 640, 512]
    rng = np.random.default_rng(0)
    within, counts = None, C.imp_kept_counts(1000, 3)
    for r, n_keep in enumerate(counts):
        # "fine-tune" between rounds: the same weight change on both sides
        for p in PATHS:
            delta = 0.05 * rng.standard_normal(np.shape(params[p.split("/")[0]]["kernel"]))
            layer = p.split("/")[0]
            params[layer]["kernel"] = params[layer]["kernel"] + jnp.asarray(delta, jnp.float32)
            module = getattr(net, TORCH[p])
            orig = module.weight_orig if hasattr(module, "weight_orig") else module.weight
            with torch.no_grad():
                orig.copy_(torch.tensor(_torch_layout(np.asarray(params[layer]["kernel"]))))
        with torch.no_grad():  # a forward refreshes weight = weight_orig * mask (as training does)
            net(torch.zeros(1, 3, H, W))
        prune.global_unstructured(_torch_modules(net), pruning_method=prune.L1Unstructured,
                                  amount=0.2)
        by_count = C.magnitude(params, stats, None, [], None, 1.0, within=within, n_keep=n_keep)
        by_density = C.magnitude(params, stats, None, [], None, [0.8, 0.64, 0.512][r],
                                 within=within)
        _assert_masks_equal(by_count, _torch_masks(net))
        _assert_masks_equal(by_density, by_count)
        if within is not None:  # survivors only
            assert not any(np.any(np.asarray(by_count[p]) & ~np.asarray(within[p])) for p in PATHS)
        within = by_count
    assert _count(within) == 512


@pytest.mark.parametrize("n_total", [1003, 37, 5])
def test_imp_kept_counts_equal_torch(n_total):
    module = torch.nn.Linear(n_total, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.randn(1, n_total, generator=torch.Generator().manual_seed(0)))
    kept = []
    for _ in range(8):
        prune.global_unstructured([(module, "weight")], pruning_method=prune.L1Unstructured,
                                  amount=0.2)
        kept.append(int(module.weight_mask.sum()))
    assert C.imp_kept_counts(n_total, 8) == kept


def test_magnitude_layer_scope():
    params, stats = _variables(seed=5)
    w = _kernels(params)
    got = C.magnitude(params, stats, None, [], None, 0.3, "layer")
    counts = {p: C.num_kept(w[p].size, 0.3) for p in PATHS}
    _assert_masks_equal(got, _np_top_k_layer({p: np.abs(w[p]) for p in PATHS}, counts))
    assert {p: int(np.sum(got[p])) for p in PATHS} == counts == {
        "conv1/kernel": 65, "conv2/kernel": 173, "fc/kernel": 63}


# --------------------------------------------------------------------------------------------
# SNIP (§5.4)
# --------------------------------------------------------------------------------------------


def _snip_forward_conv2d(self, x):
    return F.conv2d(x, self.weight * self.weight_mask, self.bias, self.stride, self.padding,
                    self.dilation, self.groups)


def _snip_forward_linear(self, x):
    return F.linear(x, self.weight * self.weight_mask, self.bias)


def _torch_snip_scores(params, stats, batches):
    net = copy.deepcopy(_torch_net(params, stats))
    for layer in net.modules():
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
            layer.weight_mask = torch.nn.Parameter(torch.ones_like(layer.weight))
            layer.weight.requires_grad = False
        if isinstance(layer, torch.nn.Conv2d):
            layer.forward = types.MethodType(_snip_forward_conv2d, layer)
        if isinstance(layer, torch.nn.Linear):
            layer.forward = types.MethodType(_snip_forward_linear, layer)
    x, y = _torch_input(batches)
    F.cross_entropy(net(x), y).backward()
    scores = {p: torch.abs(getattr(net, TORCH[p]).weight_mask.grad) for p in PATHS}
    norm = torch.sum(torch.cat([s.flatten() for s in scores.values()]))
    return {p: _flax_layout(s / norm) for p, s in scores.items()}


def _snip_rule(scores, density, scope):
    sizes = {p: s.size for p, s in scores.items()}
    masks = (_np_top_k(scores, C.num_kept(1000, density)) if scope == "global"
             else _np_top_k_layer(scores, C.keep_counts(sizes, density, "layer")))
    for p, m in masks.items():
        if not m.any():
            m.flat[np.argmax(scores[p])] = True
    return masks


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_snip_scores_and_masks_equal_torch(scope, x64):
    params, stats = _variables(seed=7, dtype=jnp.float64)
    batches = _batches(dtype=np.float64)
    want = _torch_snip_scores(params, stats, batches)
    x, y = _jax_input(batches)
    got = _jit_scores(C.snip_scores, params, stats, x, y)
    _assert_scores_close(got, want)
    assert abs(float(sum(jnp.sum(s) for s in got.values())) - 1.0) < 1e-5  # normalised
    masks = C.snip(params, stats, FlaxNet(), batches, None, 0.3, scope)
    _assert_masks_equal(masks, _snip_rule(want, 0.3, scope))
    assert _count(masks) == (300 if scope == "global" else 65 + 173 + 63)


def test_snip_empty_layers_keep_their_best_entry(x64):
    params, stats = _variables(seed=8, dtype=jnp.float64)
    batches = _batches(dtype=np.float64)
    want = _torch_snip_scores(params, stats, batches)
    masks = C.snip(params, stats, FlaxNet(), batches, None, 0.001)  # global top-1: 2 layers empty
    for p in PATHS:  # every layer ends with exactly its best entry
        assert int(np.sum(masks[p])) == 1
        assert np.asarray(masks[p]).ravel()[np.argmax(want[p])]
    _assert_masks_equal(masks, _snip_rule(want, 0.001, "global"))


# --------------------------------------------------------------------------------------------
# GraSP (§5.5)
# --------------------------------------------------------------------------------------------


def _torch_grasp_scores(params, stats, batches, T=200.0):
    net = copy.deepcopy(_torch_net(params, stats))
    weights = [getattr(net, TORCH[p]).weight for p in PATHS]
    inputs, targets = _torch_input(batches)
    n = inputs.shape[0]
    halves = [(inputs[: n // 2], targets[: n // 2]), (inputs[n // 2:], targets[n // 2:])]
    grad_w = None
    for xs, ys in halves:
        g = torch.autograd.grad(F.cross_entropy(net(xs) / T, ys), weights)
        grad_w = list(g) if grad_w is None else [a + b for a, b in zip(grad_w, g, strict=True)]
    for xs, ys in halves:
        grad_f = torch.autograd.grad(F.cross_entropy(net(xs) / T, ys), weights, create_graph=True)
        z = sum((gw.data * gf).sum() for gw, gf in zip(grad_w, grad_f, strict=True))
        z.backward()
    scores = {p: -w.data * w.grad for p, w in zip(PATHS, weights, strict=True)}
    norm = torch.abs(torch.sum(torch.cat([s.flatten() for s in scores.values()]))) + 1e-10
    return {p: _flax_layout(s / norm) for p, s in scores.items()}


def test_grasp_scores_and_mask_equal_torch(x64):
    params, stats = _variables(seed=9, dtype=jnp.float64)
    batches = _batches(dtype=np.float64)
    want = _torch_grasp_scores(params, stats, batches)
    x, y = _jax_input(batches)
    got = _jit_scores(C.grasp_scores, params, stats, x, y)
    _assert_scores_close(got, want)
    masks = C.grasp(params, stats, FlaxNet(), batches, None, 0.3, mask_mode="grasp")
    # keeps the 300 smallest scores == removes the 700 largest
    _assert_masks_equal(masks, _np_top_k({p: -s for p, s in want.items()}, 300))
    assert _count(masks) == 300
    layer = C.grasp(params, stats, FlaxNet(), batches, None, 0.3, "layer", mask_mode="grasp")
    counts = {"conv1/kernel": 65, "conv2/kernel": 173, "fc/kernel": 63}
    _assert_masks_equal(layer, _np_top_k_layer({p: -s for p, s in want.items()}, counts))


def test_grasp_ratios_draw_bernoulli_with_grasp_layer_densities():
    params, stats = _variables(seed=9)
    batches = _batches()
    exact = C.grasp(params, stats, FlaxNet(), batches, None, 0.3, mask_mode="grasp")
    densities = C.layer_densities(exact)
    rng = jax.random.PRNGKey(4)
    got = C.grasp(params, stats, FlaxNet(), batches, rng, 0.3)  # default mask_mode='ratios'
    _assert_masks_equal(got, C.bernoulli_masks(rng, exact, densities))
    for p in PATHS:
        n, d = exact[p].size, densities[p]
        kept = int(np.sum(got[p]))
        assert abs(kept - n * d) <= 5 * np.sqrt(n * d * (1 - d)) + 1e-9, p
    assert not all(np.array_equal(got[p], exact[p]) for p in PATHS)
    with pytest.raises(ValueError, match="mask_mode"):
        C.grasp(params, stats, FlaxNet(), batches, rng, 0.3, mask_mode="random")


def test_grasp_batch_exact_per_class_counts_and_error():
    rng = np.random.default_rng(0)
    stream = [{"image": rng.uniform(size=(10, H, W, 3)).astype(np.float32),
               "label": rng.integers(0, 3, 10).astype(np.int32)} for _ in range(20)]
    consumed = []

    def batches():
        for b in stream:
            consumed.append(1)
            yield b

    out = C.grasp_batch(batches(), 3, per_class=4)
    np.testing.assert_array_equal(out["label"], [0] * 4 + [1] * 4 + [2] * 4)
    flat_img = np.concatenate([b["image"] for b in stream])
    flat_lab = np.concatenate([b["label"] for b in stream])
    for c in range(3):  # the first 4 examples of each class, in stream order
        np.testing.assert_array_equal(out["image"][out["label"] == c],
                                      flat_img[flat_lab == c][:4])
    assert len(consumed) < len(stream)  # stopped once every class was full
    collected = C.grasp_batch(iter(stream), 3, per_class=4, order="collected")
    first = np.sort(np.concatenate([np.flatnonzero(flat_lab == c)[:4] for c in range(3)]))
    np.testing.assert_array_equal(collected["label"], flat_lab[first])
    # default per_class = min(512 // C, 25)
    assert C.grasp_batch(iter(stream), 3)["label"].size == 3 * 25
    big = [{"image": np.zeros((600, 1, 1, 3), np.float32),
            "label": np.arange(600, dtype=np.int32) % 100}]
    assert C.grasp_batch(iter(big), 100)["label"].size == 100 * 5
    short = [{"image": np.zeros((5, 1, 1, 3), np.float32),
              "label": np.array([0, 0, 0, 1, 2], np.int32)}]
    with pytest.raises(ValueError, match=r"class 1: 1, class 2: 1 found, 3 needed.*per_class.*split"):
        C.grasp_batch(iter(short), 3, per_class=3)


# --------------------------------------------------------------------------------------------
# SynFlow (§5.6)
# --------------------------------------------------------------------------------------------


def _torch_synflow(params, stats, batches, density, iterations, masks=None, use_ones=False):
    """The authors' SynFlow loop, with the exact-count top-k re-stated in numpy."""
    net = copy.deepcopy(_torch_net(params, stats))
    inputs, _ = _torch_input(batches)
    if use_ones:
        inputs = torch.ones([1] + list(inputs.shape[1:]), dtype=inputs.dtype)
    masks = {p: np.ones(_kernels(params)[p].shape, bool) for p in PATHS} if masks is None else masks
    history = []
    for epoch in range(iterations):
        for p in PATHS:  # zero the pruned weights in the copy
            weight = getattr(net, TORCH[p]).weight
            weight.data.mul_(torch.tensor(_torch_layout(masks[p])).to(weight.dtype))
        signs = {}
        for name, param in net.state_dict().items():
            signs[name] = torch.sign(param)
            param.abs_()
        net.zero_grad()
        torch.sum(net(inputs)).backward()
        scores = {p: _flax_layout((getattr(net, TORCH[p]).weight.grad
                                   * getattr(net, TORCH[p]).weight).abs()) for p in PATHS}
        for name, param in net.state_dict().items():
            param.mul_(signs[name])
        history.append(scores)
        ratio = density ** ((epoch + 1) / iterations)
        masks = _np_top_k(scores, C.num_kept(1000, ratio), masks)
    return masks, history


def test_synflow_scores_equal_torch_with_a_mask(x64):
    params, stats = _variables(seed=11, dtype=jnp.float64)
    batches = _batches(dtype=np.float64)
    prev = C.magnitude(params, stats, None, [], None, 0.6)
    _, history = _torch_synflow(params, stats, batches, 1.0, 1,
                                masks={p: np.asarray(m) for p, m in prev.items()})
    x, _ = _jax_input(batches)
    got = _jit_scores(C.synflow_scores, params, stats, x, prev)
    _assert_scores_close(got, history[0])
    for p in PATHS:  # pruned entries score exactly 0, survivors not
        assert np.all(np.asarray(got[p])[~np.asarray(prev[p])] == 0)
        assert np.all(np.asarray(got[p])[np.asarray(prev[p])] > 0)


@pytest.mark.parametrize("use_ones", [False, True])
def test_synflow_masks_equal_torch(use_ones, x64):
    params, stats = _variables(seed=12, dtype=jnp.float64)
    batches = _batches(dtype=np.float64)
    want, _ = _torch_synflow(params, stats, batches, 0.2, 100, use_ones=use_ones)
    got = C.synflow(params, stats, FlaxNet(), batches, None, 0.2,
                    input="ones" if use_ones else "batch")
    _assert_masks_equal(got, want)
    assert _count(got) == 200


def test_synflow_layer_scope_and_iterations():
    params, stats = _variables(seed=13)
    got = C.synflow(params, stats, FlaxNet(), _batches(), None, 0.3, "layer", iterations=3)
    sizes = {p: s.size for p, s in _kernels(params).items()}
    assert {p: int(np.sum(got[p])) for p in PATHS} == C.keep_counts(sizes, 0.3, "layer")


# --------------------------------------------------------------------------------------------
# Random (§5.1) and ERK
# --------------------------------------------------------------------------------------------


def test_random_bernoulli_exact_and_rngs():
    params, stats = _variables(seed=1)
    sizes = {p: s.size for p, s in _kernels(params).items()}
    a = C.random(params, stats, None, [], jax.random.PRNGKey(0), 0.3)
    b = C.random(params, stats, None, [], jax.random.PRNGKey(1), 0.3)
    for p in PATHS:
        n = sizes[p]
        assert abs(int(np.sum(a[p])) - 0.3 * n) <= 5 * np.sqrt(n * 0.3 * 0.7), p
    assert not all(np.array_equal(a[p], b[p]) for p in PATHS)
    _assert_masks_equal(a, C.random(params, stats, None, [], jax.random.PRNGKey(0), 0.3))
    e1 = C.random(params, stats, None, [], jax.random.PRNGKey(0), 0.3, mode="exact")
    e2 = C.random(params, stats, None, [], jax.random.PRNGKey(1), 0.3, mode="exact")
    assert {p: int(np.sum(e1[p])) for p in PATHS} == C.keep_counts(sizes, 0.3, "layer")
    assert not all(np.array_equal(e1[p], e2[p]) for p in PATHS)
    with pytest.raises(ValueError, match="bernoulli, exact, erk"):
        C.random(params, stats, None, [], jax.random.PRNGKey(0), 0.3, mode="uniform")


def _np_erk(shapes, density):
    """RigL's loop (sparse_utils.get_sparsities_erdos_renyi) with the kept target num_kept."""
    target = C.num_kept(sum(int(np.prod(s)) for s in shapes.values()), density)
    dense = set()
    while True:
        raw = {p: np.sum(s) / np.prod(s) for p, s in shapes.items() if p not in dense}
        eps = (target - sum(np.prod(shapes[p]) for p in dense)) / sum(
            raw[p] * np.prod(shapes[p]) for p in raw)
        if max(raw.values()) * eps <= 1:
            return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}
        dense |= {p for p, r in raw.items() if r == max(raw.values())}


@pytest.mark.parametrize("density", [0.3, 0.5, 0.05])
def test_random_erk(density):
    params, stats = _variables(seed=2)
    shapes = {p: s.shape for p, s in _kernels(params).items()}
    got = C.random(params, stats, None, [], jax.random.PRNGKey(0), density, mode="erk")
    kept = {p: int(np.sum(got[p])) for p in PATHS}
    assert sum(kept.values()) == C.num_kept(1000, density)
    ref = _np_erk(shapes, density)
    for p in PATHS:
        assert abs(kept[p] - ref[p] * np.prod(shapes[p])) < 1.0, p
    dens = {p: kept[p] / np.prod(shapes[p]) for p in PATHS}
    # larger layers are sparser: conv2 (576) < conv1 (216) < fc (208)
    assert dens["conv2/kernel"] < dens["conv1/kernel"] < dens["fc/kernel"]
    if density == 0.5:  # fc would exceed 1: capped dense, the rest rescaled
        assert kept["fc/kernel"] == 208
    other = C.random(params, stats, None, [], jax.random.PRNGKey(1), density, mode="erk")
    assert {p: int(np.sum(other[p])) for p in PATHS} == kept
    assert not all(np.array_equal(got[p], other[p]) for p in PATHS)


def test_registry():
    assert set(C.CRITERIA) == {"magnitude", "random", "snip", "grasp", "synflow"}
    assert C.get("snip") is C.snip
    with pytest.raises(ValueError, match="grasp, magnitude, random, snip, synflow"):
        C.get("hydra")
