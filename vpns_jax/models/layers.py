"""Layers with PyTorch semantics: BatchNorm, torchvision-initialized conv, adaptive avg pooling."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vpns_jax import ops

Dtype = Any

# Initializers draw a flat vector and reshape it: XLA on CPU compiles random draws of 4-D shapes
# about 7x slower than 1-D ones (ResNet-18 init: ~25 s → ~4 s).


def conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """torchvision conv init, kaiming_normal_(mode='fan_out', relu): N(0, 2/(kh·kw·out)); HWIO."""
    std = math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))
    return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)


def linear_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """torch.nn.Linear's default weight init: U(-1/sqrt(in), 1/sqrt(in)); kernel [in, out]."""
    return uniform_init(1.0 / math.sqrt(shape[0]))(key, shape, dtype)


def uniform_init(bound: float):
    """Initializer U(-bound, bound)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
        return flat.reshape(shape)

    return init


def normal_init(std: float):
    """Initializer N(0, std²)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)

    return init


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier: round(channels·width), at least 1."""
    return max(1, int(round(channels * width)))


def conv(features: int, kernel: int, stride: int = 1, *, name: str, dtype: Dtype,
         use_bias: bool = False, kernel_init=conv_init, impl: str = "xla") -> nn.Conv:
    """A torch-like Conv2d (padding kernel//2); kernel f32[kh, kw, in, out], params float32.

    impl: how the convolution is lowered (`vpns_jax.ops.conv_general_dilated`): 'xla' (lax's
    convolution), 'auto' (per-layer choice, the fast CPU path) or 'im2col'. Same parameters and
    results either way.
    """
    pad = kernel // 2
    lowering = None if impl == "xla" else functools.partial(ops.conv_general_dilated, impl=impl)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=kernel_init,
                   bias_init=nn.initializers.zeros, name=name, conv_general_dilated=lowering)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch norm over the last axis: (y, batch mean, biased batch variance).

    x: f32[..., C]; scale, bias: f32[C]. y = (x - mean) / sqrt(var + eps) * scale + bias. The
    hand-written VJP is the textbook one, dx = a*dy + b*xhat + c with per-channel a, b, c (two
    reductions and one elementwise pass), where autodiff of the two-pass variance reads the
    activations several more times; it includes the cotangents of mean and var, so the function
    is exactly differentiable in all outputs.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    inv = lax.rsqrt(var + epsilon)
    y = (x - mean) * (scale * inv) + bias
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    xhat = (x - mean) * inv
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    # d/dx of y:    scale*inv * (dy - dbias/n - xhat * dscale/n)
    # of mean:      dmean / n;   of var: dvar * 2 (x - mean) / n = xhat * 2 dvar / (inv n)
    a = scale * inv
    b = -a * dscale / n + 2.0 * dvar / (inv * n)
    c = -a * dbias / n + dmean / n
    dx = a * dy + b * xhat + c
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
    """PyTorch BatchNorm over the last (channel) axis.

    Params `scale`, `bias`; batch_stats `mean`, `var` (all f32[C]). Train mode normalizes with the
    batch mean and *biased* batch variance (:func:`batch_norm_train`) and updates running stats as
    new = (1-m)·old + m·batch, using the *unbiased* batch variance (m = momentum = 0.1, PyTorch's
    convention). Eval mode uses the running stats.
    Statistics are computed in float32 whatever the computation dtype.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x: [..., C] → same shape, in `dtype`."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if not train:
            mul = scale / jnp.sqrt(ra_var.value + self.epsilon)
            return ((xf - ra_mean.value) * mul + bias).astype(self.dtype)
        y, mean, var = batch_norm_train(xf, scale, bias, self.epsilon)
        if not self.is_initializing():
            m = self.momentum
            n = math.prod(x.shape[:-1])
            unbiased = lax.stop_gradient(var) * (n / max(n - 1, 1))
            ra_mean.value = (1.0 - m) * ra_mean.value + m * lax.stop_gradient(mean)
            ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
        return y.astype(self.dtype)


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """f32[n_out, n_in] averaging matrix of PyTorch's adaptive pooling bins.

    Bin i spans [floor(i·n_in/n_out), ceil((i+1)·n_in/n_out)).
    """
    mat = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
    """PyTorch AdaptiveAvgPool2d on NHWC: x [B, H, W, C] → [B, oh, ow, C]."""
    _, h, w, _ = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    ph = jnp.asarray(_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", ph, pw, x, precision="highest")
