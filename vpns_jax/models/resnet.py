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
    """Two 3×3 convs with a residual; `downsample_0/1` (1×1 conv + BN) when the shape changes.

    widths: optional per-conv output widths of a slimmed block, ((conv name, channels), ...) over
    `CONVS` (+ 'downsample_0'); absent convs keep their default width. downsample: whether the
    shortcut is the 1×1 projection; None decides from the shapes (the default network).
    """

    CONVS = ("conv1", "conv2")
    EXPANSION = 1
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    widths: tuple[tuple[str, int], ...] = ()
    downsample: bool | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x [B, H, W, Cin] → [B, H/stride, W/stride, planes]."""
        w = dict(self.widths)
        out = conv(w.get("conv1", self.planes), 3, self.stride, name="conv1", dtype=self.dtype,
                   impl=self.conv_impl)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(w.get("conv2", self.planes), 3, name="conv2", dtype=self.dtype,
                   impl=self.conv_impl)(out)
        out = BatchNorm(dtype=self.dtype, name="bn2")(out, train)
        return nn.relu(_residual(self, out, x, train))


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride here, v1.5) → 1×1 ×4 expansion, with a residual."""

    CONVS = ("conv1", "conv2", "conv3")
    EXPANSION = 4
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    widths: tuple[tuple[str, int], ...] = ()  # as BasicBlock's
    downsample: bool | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """x [B, H, W, Cin] → [B, H/stride, W/stride, 4·planes]."""
        w = dict(self.widths)
        out = conv(w.get("conv1", self.planes), 1, name="conv1", dtype=self.dtype,
                   impl=self.conv_impl)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(w.get("conv2", self.planes), 3, self.stride, name="conv2", dtype=self.dtype,
                   impl=self.conv_impl)(out)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, train))
        out = conv(w.get("conv3", self.planes * 4), 1, name="conv3", dtype=self.dtype,
                   impl=self.conv_impl)(out)
        out = BatchNorm(dtype=self.dtype, name="bn3")(out, train)
        return nn.relu(_residual(self, out, x, train))


def _residual(block: BasicBlock | Bottleneck, out: jnp.ndarray, x: jnp.ndarray,
              train: bool) -> jnp.ndarray:
    """out + shortcut(x): identity, or torchvision's `downsample` (1×1 conv with stride, then BN)
    when shapes differ (or when `block.downsample` says so).

    Called inside a compact block's `__call__`, so the submodules attach to that block. A slimmed
    block whose branch and shortcut widths differ is a ValueError naming the block.
    """
    features = out.shape[-1]
    project = block.downsample
    if project is None:
        project = block.stride != 1 or x.shape[-1] != features
    if project:
        y = conv(dict(block.widths).get("downsample_0", features), 1, block.stride,
                 name="downsample_0", dtype=block.dtype, impl=block.conv_impl)(x)
        x = BatchNorm(dtype=block.dtype, name="downsample_1")(y, train)
    if x.shape[-1] != features:
        raise ValueError(f"widths: block {block.name} adds {features} channels of its last conv to "
                         f"{x.shape[-1]} of its shortcut; channels coupled by a residual addition "
                         "need one width")
    return out + x


class ResNet(nn.Module):
    """torchvision ResNet. Input x f32[B, H, W, 3] (normalized), output logits f32[B, num_classes].

    `width` scales every conv width (round, ≥1); `small_input` swaps the 7×7/2 stem + max-pool for a
    3×3/1 conv without pool (for 32×32-scale inputs). `dtype` is the computation dtype; params are
    float32 and logits are returned in float32.
    `widths`: a slimmed network's output widths per conv, ((module path, channels), ...), e.g.
    (('conv1', 12), ('layer1_0/conv1', 9), ('layer2_0/downsample_0', 20)); convs not named keep
    their default width, shortcuts stay where the default network has them
    (`vpns_jax.structured.slim`). An unknown path is a ValueError listing the conv paths.
    """

    block: type[nn.Module]
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    width: float = 1.0
    small_input: bool = False
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    widths: tuple[tuple[str, int], ...] = ()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = jnp.asarray(x, self.dtype)
        widths = dict(self.widths)
        known = ["conv1"]
        stem = widths.get("conv1", scaled(64, self.width))
        if self.small_input:
            x = conv(stem, 3, 1, name="conv1", dtype=self.dtype, impl=self.conv_impl)(x)
        else:
            x = conv(stem, 7, 2, name="conv1", dtype=self.dtype, impl=self.conv_impl)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        if not self.small_input:
            x = ops.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=self.conv_impl)
        expansion = self.block.EXPANSION
        inplanes = scaled(64, self.width)  # the default network's widths decide the shortcuts
        for i, blocks in enumerate(self.stage_sizes):
            planes = scaled(64 * 2**i, self.width)
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                name = f"layer{i + 1}_{j}"
                project = stride != 1 or inplanes != planes * expansion
                local = (*self.block.CONVS, *(("downsample_0",) if project else ()))
                known.extend(f"{name}/{c}" for c in local)
                block_widths = tuple((c, widths[f"{name}/{c}"]) for c in local
                                     if f"{name}/{c}" in widths)
                x = self.block(planes, stride, dtype=self.dtype, conv_impl=self.conv_impl,
                               widths=block_widths, downsample=project if widths else None,
                               name=name)(x, train)
                inplanes = planes * expansion
        _check_width_paths(widths, known)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=linear_init, bias_init=uniform_init(x.shape[-1] ** -0.5),
                     name="fc")(x)  # torch.nn.Linear's init
        return x.astype(jnp.float32)


def _check_width_paths(widths: dict[str, int], known: list[str]) -> None:
    """ValueError naming the `widths` entries that are not conv paths of the network."""
    unknown = sorted(set(widths) - set(known))
    if unknown:
        raise ValueError(f"widths: {', '.join(unknown)} are not conv module paths of this network; "
                         f"its convs are {', '.join(known)}")


def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (Bottleneck, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)
