"""Physically slimmed models: logits equal the masked network's, shapes agree for every group,
export to PyTorch gives the same logits, parameter and FLOP counts, bad input."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import models
from vpns_jax import weights as weights_lib
from vpns_jax.errors import VpnsError
from vpns_jax.structured import channels as ch
from vpns_jax.structured import slim as sl
from vpns_jax.structured.groups import channel_groups

SIZE = 32


def _random_variables(model, rng):
    """Random weights (fan-in scaled), and BatchNorm scale/bias/mean/var far from identity."""
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), SIZE))
    out = {}
    for col in ("params", "batch_stats"):
        flat = {}
        for path, s in traverse_util.flatten_dict(shapes[col], sep="/").items():
            leaf = path.rsplit("/", 1)[1]
            if leaf == "kernel":
                v = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
            elif leaf == "scale":
                v = rng.normal(1.0, 0.3, size=s.shape)
            elif leaf == "var":
                v = rng.uniform(0.5, 2.0, size=s.shape)
            else:  # bias, mean
                v = rng.normal(0.0, 0.3, size=s.shape)
            flat[path] = v.astype(np.float32)
        out[col] = traverse_util.unflatten_dict(flat, sep="/")
    return out


def _masked(variables, groups, masks):
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for p, m in ch.expand(groups, masks, variables["params"]).items():
        flat[p] = flat[p] * np.asarray(m, np.float32)
    return {"params": traverse_util.unflatten_dict(flat, sep="/"),
            "batch_stats": variables["batch_stats"]}


_apply = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)


class Case:
    def __init__(self, arch: str, seed: int):
        self.rng = np.random.default_rng(seed)
        self.arch = arch
        self.model = models.create(arch, 10, width=0.125, small_input=True, conv_impl="xla")
        self.variables = _random_variables(self.model, self.rng)
        self.groups = channel_groups(self.model, self.variables, SIZE)
        self.x = jnp.asarray(self.rng.uniform(-2, 2, size=(3, SIZE, SIZE, 3)), jnp.float32)

    def random_subsets(self):
        """Every group loses a random, nonempty, not-full subset of its channels."""
        masks = {}
        for g in self.groups:
            keep = self.rng.permutation(g.size)[: self.rng.integers(1, g.size)]
            masks[g.name] = np.isin(np.arange(g.size), keep)
        return masks

    def threshold(self, sparsity):
        scores = {g.name: self.rng.normal(size=g.size).astype(np.float32) for g in self.groups}
        return {k: np.asarray(v) for k, v in ch.channel_threshold(scores, self.groups,
                                                                   sparsity).items()}


@pytest.fixture(scope="module")
def cases():
    return {}


def _case(cases, arch):
    if arch not in cases:
        cases[arch] = Case(arch, seed=len(arch))
    return cases[arch]


def _check_slim(case, masks):
    slim_model, slim_vars, widths = sl.slim(case.model, case.variables, case.groups, masks)
    for g in case.groups:  # every producer of a group has the group's surviving width
        assert {widths[p.rsplit("/", 1)[0]] for p in g.producers} == {int(masks[g.name].sum())}
    masked = np.asarray(_apply(case.model, _masked(case.variables, case.groups, masks), case.x))
    slimmed = np.asarray(_apply(slim_model, slim_vars, case.x))
    scale = np.abs(masked).max()
    assert scale > 0.1
    np.testing.assert_allclose(slimmed, masked, rtol=1e-5, atol=1e-5 * scale)
    # the masks matter: the dense network's logits differ
    dense = np.asarray(_apply(case.model, case.variables, case.x))
    assert np.abs(dense - masked).max() > 1e-3 * scale
    return slim_model, slim_vars, widths


@pytest.mark.parametrize("arch, patterns", [("resnet18", ("subsets", 0.3, 0.6)),
                                            ("resnet50", ("subsets", 0.5)),
                                            ("vgg16_bn", ("subsets", 0.4))])
def test_slimmed_logits_equal_masked_logits(cases, arch, patterns):
    """Eval mode, random BN statistics, rel 1e-5; 'subsets' prunes a random subset of EVERY group
    at once (residual groups included), so a consumer or BN sliced by the wrong group's channels
    breaks the shapes or the logits; the sparsities use the capped threshold."""
    case = _case(cases, arch)
    for pattern in patterns:
        masks = case.random_subsets() if pattern == "subsets" else case.threshold(pattern)
        slim_model, slim_vars, _ = _check_slim(case, masks)
        assert sl.count_params(slim_vars) < sl.count_params(case.variables)
    assert sl.count_flops(slim_model, SIZE) < sl.count_flops(case.model, SIZE)


def test_export_loads_in_pytorch_with_the_same_logits(cases, tmp_path):
    torch = pytest.importorskip("torch")
    from vpns_jax.structured import torch_slim

    for arch in ("resnet18", "vgg16_bn"):
        case = _case(cases, arch)
        masks = case.random_subsets()
        slim_model, slim_vars, widths = sl.slim(case.model, case.variables, case.groups, masks)
        out = tmp_path / arch
        written = sl.export_slim(str(out), slim_vars, widths, arch, num_classes=10, width=0.125,
                                 small_input=True, input_size=SIZE, source={"run": "test"})
        assert sorted(p.rsplit("/", 1)[1] for p in written) == sorted(
            [sl.TORCH_FILE, sl.WIDTHS_FILE, sl.VPNS_FILE])
        net = torch_slim.load_slim(str(out))
        x = np.asarray(case.x)
        with torch.no_grad():
            got = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
        want = np.asarray(_apply(slim_model, slim_vars, case.x))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert sl.count_params(slim_vars) == sum(p.numel() for p in net.parameters())
        if arch != "resnet18":
            continue
        # the project-format copy reloads as the same slimmed architecture
        arch_back, back, meta = weights_lib.load(str(out / sl.VPNS_FILE))
        assert arch_back == arch and meta["options"]["widths"] == widths
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(slim_vars), strict=True):
            np.testing.assert_array_equal(a, b)


def test_flop_counts_match_torchvision_documented_gflops():
    """torchvision's model docs list GFLOPS (multiply-adds of conv + linear layers at 224 px):
    resnet18 1.81, vgg16 15.47."""
    assert round(sl.count_flops(models.create("resnet18"), 224) / 1e9, 2) == 1.81
    assert round(sl.count_flops(models.create("vgg16"), 224) / 1e9, 2) == 15.47
    assert sl.count_params({"params": {"a": np.zeros((3, 4)), "b": {"c": np.zeros(5)}},
                            "batch_stats": {"m": np.zeros(7)}}) == 17


def test_flop_count_equals_xla_cost_analysis_layer_by_layer(cases):
    """count_flops of a slimmed ResNet-18 (standard 7×7/2 stem, max-pool, strided convs) equals
    XLA's own count (HloCostAnalysis, 2 per multiply-add) of each conv / dense layer, run on the
    explicitly zero-padded input so that XLA counts the padded taps as the shape formula does."""
    from jax import lax

    case = _case(cases, "resnet18")
    widths = sl.widths_of(case.groups, case.random_subsets())
    slim_model = models.create("resnet18", 10, width=0.125, widths=widths)
    layers = []

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Conv | nn.Dense):
            layers.append((context.module, args[0].shape,
                           context.module.variables["params"]["kernel"].shape))
        return out

    def forward(v):
        with nn.intercept_methods(capture):
            return slim_model.apply(v, jnp.zeros((1, 64, 64, 3)))

    shapes = jax.eval_shape(lambda: models.init_variables(slim_model, jax.random.key(0), 64))
    jax.eval_shape(forward, shapes)
    xla = 0.0
    for module, x_shape, k_shape in layers:
        if isinstance(module, nn.Conv):
            pads = module.padding
            padded = (x_shape[0], x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1]), x_shape[3])

            def f(x, k, strides=module.strides):
                return lax.conv_general_dilated(x, k, strides, "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

            args = (jnp.zeros(padded), jnp.zeros(k_shape))
        else:
            def f(x, k):
                return x @ k

            args = (jnp.zeros(x_shape), jnp.zeros(k_shape))
        xla += jax.jit(f).lower(*args).cost_analysis()["flops"] / 2
    assert len(layers) == 21  # 20 convs + fc
    assert sl.count_flops(slim_model, 64) == int(xla)


def test_unstructured_runs_and_bad_masks_are_one_line_errors(cases):
    case = _case(cases, "resnet18")
    with pytest.raises(VpnsError, match="only structured runs can be slimmed"):
        sl.ensure_structured("vpns_s0.9", {})
    with pytest.raises(VpnsError, match="only structured runs can be slimmed"):
        sl.slim(case.model, case.variables, case.groups, None)
    masks = case.random_subsets()
    masks[case.groups[3].name] = np.zeros(case.groups[3].size, bool)
    with pytest.raises(VpnsError, match=f"group {case.groups[3].name} prunes every channel"):
        sl.slim(case.model, case.variables, case.groups, masks)
