"""Faster CPU convolution: a drop-in for ``lax.conv_general_dilated`` that lowers to a matmul.

XLA's CPU convolution (Eigen spatial convolution, jaxlib 0.10) is slow on three kinds of ResNet
layers, measured here on a 2-core AVX2 EPYC (see ``BENCHMARKS.md``, "Model step"):

- small spatial maps with a padded 3x3 kernel (4x4, 2x2, 1x1 outputs at 32 px input): 10-70x slower
  than the same arithmetic as one matmul, in forward and input-gradient alike;
- strided 3x3 and 1x1 (downsample) convolutions, whose weight gradient runs at 10-30 GFLOP/s;
- weight gradients in general (2-3x the forward time).

Large stride-1 maps (56x56, 28x28 at 224 px) are fine in XLA and bad as im2col (the patch matrix is
memory-bound on 2 cores), so :func:`conv_general_dilated` picks per layer, from static shapes:
``'xla'`` keeps ``lax.conv_general_dilated``; ``'im2col'`` gathers the k*k shifted views into one
``[B*Ho*Wo, k*k*Cin]`` patch matrix and calls one ``dot`` (1x1: a strided slice and a dot). Autodiff
of the im2col form is two more dots plus the transpose of the slicing, i.e. matmul speed.

Use it with Flax: ``nn.Conv(..., conv_general_dilated=vpns_jax.ops.conv_general_dilated)``. It only
takes the im2col route for 2-D NHWC/HWIO convolutions without dilation or groups; anything else goes
to ``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Output maps at least this large (Ho*Wo) stay on XLA's convolution for stride-1 k>1 layers.
XLA_MIN_OUTPUT_PIXELS = 28 * 28
IMPLS = ("auto", "xla", "im2col")


def choose_impl(out_pixels: int, kernel: tuple[int, int], stride: tuple[int, int],
                in_channels: int) -> str:
    """'xla' or 'im2col' for one 2-D convolution, from its static shape.

    out_pixels: Ho*Wo. kernel: (kh, kw). stride: (sh, sw). in_channels: Cin.
    """
    if kernel == (1, 1):
        return "im2col"
    large = out_pixels >= XLA_MIN_OUTPUT_PIXELS
    if large and (stride == (1, 1) or in_channels <= 4):  # big stride-1 maps and the RGB stem
        return "xla"
    return "im2col"


def _is_nhwc_hwio(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    got = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return tuple(got) == tuple(want)


def _pads(padding: str | Sequence[tuple[int, int]], lhs: jax.Array, rhs: jax.Array,
          strides: Sequence[int]) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return list(lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding))
    return [(int(lo), int(hi)) for lo, hi in padding]


def im2col_conv(x: jax.Array, w: jax.Array, strides: Sequence[int],
                pads: Sequence[tuple[int, int]], *, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
    """NHWC x HWIO convolution as patches @ kernel.

    x: [B, H, W, Cin]; w: [kh, kw, Cin, Cout]; strides (sh, sw); pads ((lo, hi), (lo, hi)).
    Returns [B, Ho, Wo, Cout]. The patch matrix is materialized (an optimization barrier keeps XLA
    from fusing the gather into the dot, which would leave the fast matmul path).
    """
    kh, kw, cin, cout = w.shape
    sh, sw = strides
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    # Materialize the input once: otherwise XLA fuses its producer (BatchNorm, ReLU) into each of
    # the k*k views and recomputes it k*k times.
    x = lax.optimization_barrier(x)
    b, h, wd, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
    views = [
        lax.slice(x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                  (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    patches = lax.optimization_barrier(patches.reshape(b * ho * wo, kh * kw * cin))
    y = lax.dot_general(patches, w.reshape(kh * kw * cin, cout), (((1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(b, ho, wo, cout)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    impl: str = "auto",
) -> jax.Array:
    """``lax.conv_general_dilated`` with a per-layer choice of lowering (same signature + `impl`).

    impl: 'auto' (:func:`choose_impl` per layer), 'xla' (always lax) or 'im2col' (always the
    matmul form where supported). Unsupported cases (not 2-D NHWC/HWIO, dilation, groups) always
    use lax.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}; use one of {IMPLS}")
    lax_call = lambda: lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
    plain = (
        impl != "xla"
        and feature_group_count == 1 and batch_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and _is_nhwc_hwio(lhs, rhs, dimension_numbers)
    )
    if not plain:
        return lax_call()
    strides = tuple(int(s) for s in window_strides)
    pads = _pads(padding, lhs, rhs, strides)
    kh, kw = rhs.shape[:2]
    ho = (lhs.shape[1] + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    wo = (lhs.shape[2] + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    if impl == "auto" and choose_impl(ho * wo, (kh, kw), strides, lhs.shape[3]) == "xla":
        return lax_call()
    return im2col_conv(lhs, rhs, strides, pads, precision=precision,
                       preferred_element_type=preferred_element_type)
