"""vpns_jax.ops.conv_general_dilated equals lax.conv_general_dilated (values and gradients)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vpns_jax import ops

# (H, Cin, Cout, k, stride, pad): ResNet-like layers, small enough for a fast test.
CASES = [
    (9, 3, 8, 7, 2, 3),   # stem
    (8, 4, 6, 3, 1, 1),   # 3x3 stride 1
    (8, 4, 6, 3, 2, 1),   # 3x3 stride 2
    (8, 4, 6, 1, 2, 0),   # 1x1 downsample
    (2, 5, 3, 3, 1, 1),   # tiny map, padding wider than the map
    (1, 5, 3, 3, 1, 1),
    (7, 3, 4, 3, 2, 0),   # odd size, no padding
]


def _lax(x, w, s, p):
    return lax.conv_general_dilated(x, w, (s, s), [(p, p)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _ops(x, w, s, p, impl):
    return ops.conv_general_dilated(x, w, (s, s), [(p, p)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST, impl=impl)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["im2col", "auto"])
def test_matches_lax_values_and_grads(case, impl):
    h, cin, cout, k, s, p = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    want = _lax(x, w, s, p)
    got = _ops(x, w, s, p, impl)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    gw = jax.grad(lambda x, w: jnp.sum(_lax(x, w, s, p) * g), (0, 1))(x, w)
    go = jax.grad(lambda x, w: jnp.sum(_ops(x, w, s, p, impl) * g), (0, 1))(x, w)
    for a, b in zip(go, gw, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_choose_impl_rules():
    assert ops.choose_impl(56 * 56, (3, 3), (1, 1), 64) == "xla"
    assert ops.choose_impl(112 * 112, (7, 7), (2, 2), 3) == "xla"
    assert ops.choose_impl(28 * 28, (3, 3), (2, 2), 64) == "im2col"
    assert ops.choose_impl(2 * 2, (3, 3), (1, 1), 256) == "im2col"
    assert ops.choose_impl(56 * 56, (1, 1), (1, 1), 64) == "im2col"


def test_flax_conv_drop_in_and_fallbacks():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 4)), jnp.float32)
    ref = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    new = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                  conv_general_dilated=ops.conv_general_dilated)
    v = ref.init(jax.random.key(0), x)
    np.testing.assert_allclose(new.apply(v, x), ref.apply(v, x), rtol=1e-4, atol=1e-4)
    # SAME padding string, dilation and groups (the last two go to lax).
    for kw in ({"padding": "SAME"}, {"padding": "SAME", "kernel_dilation": (2, 2)},
               {"padding": "SAME", "feature_group_count": 2}):
        a = nn.Conv(4, (3, 3), **kw)
        b = nn.Conv(4, (3, 3), conv_general_dilated=ops.conv_general_dilated, **kw)
        va = a.init(jax.random.key(0), x)
        np.testing.assert_allclose(b.apply(va, x), a.apply(va, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="impl"):
        ops.conv_general_dilated(x, jnp.ones((1, 1, 4, 4)), (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), impl="fast")
