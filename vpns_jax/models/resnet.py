"""torchvision ResNet-18/34/50 in Flax Linen, NHWC (v1.5: bottleneck stride on its 3×3 conv).

Module names follow torchvision's state-dict keys with '.' → '_' before an index (`layer1_0`,
`downsample_0`), so `vpns_jax.weights.torch_key` maps every parameter one-to-one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vpns_jax import ops
from vpns_jax.models.layers import BatchNorm, conv, linear_init, scaled, uniform_init

Dtype = Any


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual; `downsample_0/1` (1×1 conv + BN) when the shape changes."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x [B, H, W, Cin] → [B, H/stride, W/stride, planes]."""
        out = conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype, impl=self.conv_impl)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(self.planes, 3, name="conv2", dtype=self.dtype, impl=self.conv_impl)(out)
        out = BatchNorm(dtype=self.dtype, name="bn2")(out, train)
        return nn.relu(out + _shortcut(x, self.planes, self.stride, self.dtype, train, self.conv_impl))


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride here, v1.5) → 1×1 ×4 expansion, with a residual."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x [B, H, W, Cin] → [B, H/stride, W/stride, 4·planes]."""
        out = conv(self.planes, 1, name="conv1", dtype=self.dtype, impl=self.conv_impl)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(self.planes, 3, self.stride, name="conv2", dtype=self.dtype, impl=self.conv_impl)(out)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train))
        out = conv(self.planes * 4, 1, name="conv3", dtype=self.dtype, impl=self.conv_impl)(out)
        out = BatchNorm(dtype=self.dtype, name="bn3")(out, train)
        return nn.relu(out + _shortcut(x, self.planes * 4, self.stride, self.dtype, train, self.conv_impl))


def _shortcut(x: jnp.ndarray, features: int, stride: int, dtype: Dtype, train: bool,
              conv_impl: str) -> jnp.ndarray:
    """Identity, or torchvision's `downsample` (1×1 conv with stride, then BN) when shapes differ.

    Called inside a compact block's `__call__`, so the submodules attach to that block.
    """
    if stride == 1 and x.shape[-1] == features:
        return x
    y = conv(features, 1, stride, name="downsample_0", dtype=dtype, impl=conv_impl)(x)
    return BatchNorm(dtype=dtype, name="downsample_1")(y, train)


class ResNet(nn.Module):
    """torchvision ResNet. Input x f32[B, H, W, 3] (normalized), output logits f32[B, num_classes].

    `width` scales every conv width (round, ≥1); `small_input` swaps the 7×7/2 stem + max-pool for a
    3×3/1 conv without pool (for 32×32-scale inputs). `dtype` is the computation dtype; params are
    float32 and logits are returned in float32.
    """

    block: type[nn.Module]
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width: float = 1.0
    small_input: bool = False
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = jnp.asarray(x, self.dtype)
        stem = scaled(64, self.width)
        if self.small_input:
            x = conv(stem, 3, 1, name="conv1", dtype=self.dtype, impl=self.conv_impl)(x)
        else:
            x = conv(stem, 7, 2, name="conv1", dtype=self.dtype, impl=self.conv_impl)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        if not self.small_input:
            x = ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=self.conv_impl)
        for i, blocks in enumerate(self.stage_sizes):
            planes = scaled(64 * 2**i, self.width)
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                x = self.block(planes, stride, dtype=self.dtype, conv_impl=self.conv_impl,
                               name=f"layer{i + 1}_{j}")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=linear_init, bias_init=uniform_init(x.shape[-1] ** -0.5),
                     name="fc")(x)  # torch.nn.Linear's init
        return x.astype(jnp.float32)


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (Bottleneck, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)
