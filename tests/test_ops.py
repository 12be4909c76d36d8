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


def _rows(x, w, s, p, forward, input_grad):
    """ops.rows_conv with the (forward, input gradient) lowerings forced."""
    return ops.rows_conv(x, w, (s, s), ((p, p), (p, p)), lax.Precision.HIGHEST, None, forward,
                         input_grad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["im2col", "rows", "auto"])
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


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4], CASES[6]])
@pytest.mark.parametrize("forward", ["lax", "matmul"])
@pytest.mark.parametrize("input_grad", ["lax", "matmul"])
def test_rows_plans_match_lax(case, forward, input_grad):
    """Every (forward, input gradient) lowering of rows_conv, forced, equals lax."""
    h, cin, cout, k, s, p = case
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, h, h, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    g = jnp.asarray(rng.normal(size=_lax(x, w, s, p).shape), jnp.float32)

    np.testing.assert_allclose(_rows(x, w, s, p, forward, input_grad), _lax(x, w, s, p),
                               rtol=1e-5, atol=1e-5)
    want = jax.grad(lambda x, w: jnp.sum(_lax(x, w, s, p) * g), (0, 1))(x, w)
    got = jax.grad(lambda x, w: jnp.sum(_rows(x, w, s, p, forward, input_grad) * g), (0, 1))(x, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_rows_plan_rules():
    assert ops.rows_plan(56 * 56, 64) == ("matmul", "matmul")
    assert ops.rows_plan(112 * 112, 64) == ("matmul", "matmul")
    assert ops.rows_plan(28 * 28, 128) == ("lax", "lax")
    assert ops.rows_plan(112 * 112, 3) == ("lax", "matmul")  # the RGB stem
    with pytest.raises(ValueError, match="forward"):
        ops.rows_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), ((1, 1), (1, 1)),
                      None, None, "fast", "auto")


def test_choose_impl_rules():
    assert ops.choose_impl(56 * 56, (3, 3), (1, 1), 64) == "rows"
    assert ops.choose_impl(112 * 112, (7, 7), (2, 2), 3) == "rows"
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


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_rows_chunks_cover_the_batch(batch, monkeypatch):
    """Chunks of 1 and of several images (ROWS_CHUNK_BYTES) give the same values and gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(batch, 10, 10, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, 10, 10, 5)), jnp.float32)
    want = jax.grad(lambda x, w: jnp.sum(_lax(x, w, 1, 1) * g), (0, 1))(x, w)
    for budget in (1, 10 * 12 * 3 * 4 * 4 * 2, 1 << 30):  # one image, two images, whole batch
        monkeypatch.setattr(ops, "ROWS_CHUNK_BYTES", budget)
        got = jax.grad(lambda x, w: jnp.sum(_rows(x, w, 1, 1, "matmul", "matmul") * g), (0, 1))(x, w)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(ops, "ROWS_CHUNK_BYTES", 4 << 20)
    assert [ops._chunk_size(8, n) for n in (1 << 30, 3 << 20, 1 << 20, 1)] == [1, 1, 4, 8]
    assert ops._chunk_size(6, 1 << 20) == 3  # the largest divisor of the batch that fits


def _torch_max_pool(x, g, window, stride, pad):
    torch = pytest.importorskip("torch")
    xt = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, window, stride, pad)
    yt.backward(torch.tensor(np.asarray(g).transpose(0, 3, 1, 2)))
    return yt.detach().numpy().transpose(0, 2, 3, 1), xt.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("window,stride,pad", [(3, 2, 1), (2, 2, 0)])
@pytest.mark.parametrize("impl", ["auto", "xla"])
def test_max_pool_matches_torch_including_ties(window, stride, pad, impl):
    """Values and gradients equal torch's max_pool2d; after a ReLU most windows tie at 0, and the
    gradient must go to the first maximum in row-major order, as torch's CPU kernel does."""
    rng = np.random.default_rng(3)
    x = np.maximum(rng.integers(-2, 3, size=(2, 9, 9, 3)), 0).astype(np.float32)
    ho = (9 + 2 * pad - window) // stride + 1
    g = rng.normal(size=(2, ho, ho, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda x: ops.max_pool(x, (window,) * 2, (stride,) * 2, ((pad, pad),) * 2,
                                            impl=impl), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    want_y, want_dx = _torch_max_pool(x, g, window, stride, pad)
    np.testing.assert_array_equal(np.asarray(y), want_y)
    if impl == "auto":  # lax's reduce_window gradient picks among ties differently
        np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(np.asarray(dx).sum(), want_dx.sum(), rtol=1e-5)
