"""torchvision VGG-16 and VGG-16-BN in Flax Linen, NHWC.

Names follow torchvision's indices: `features_<i>` (conv, and BN at i+1 with batch norm) and
`classifier_0/3/6`. The 7×7 adaptive average pool is PyTorch's (exact bins), and the pooled map is
flattened in C,H,W order, so `classifier_0`'s kernel is a plain transpose of torch's weight.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vpns_jax import ops
from vpns_jax.models.layers import BatchNorm, adaptive_avg_pool, conv, normal_init, scaled
from vpns_jax.models.resnet import _check_width_paths

Dtype = Any

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")

# torchvision VGG init: Linear ~ N(0, 0.01²), bias 0.
_linear_init = normal_init(0.01)


class VGG(nn.Module):
    """torchvision VGG. x f32[B, H, W, 3] (normalized, H, W ≥ 32) → logits f32[B, num_classes].

    `width` scales every conv width and the two 4096 hidden widths (round, ≥1). `small_input` has
    no effect (the adaptive pool handles small inputs). Dropout (p=0.5) is active only when
    `train=True` AND a 'dropout' rng is passed (`rngs={'dropout': key}`); otherwise it is the
    identity, as in eval mode.
    `widths`: a slimmed network's conv output widths, ((module path, channels), ...), e.g.
    (('features_0', 10),); convs not named keep their default width; an unknown path is a
    ValueError listing the conv paths.
    """

    cfg: tuple[int | str, ...] = VGG16_CFG
    batch_norm: bool = False
    num_classes: int = 1000
    width: float = 1.0
    small_input: bool = False
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    widths: tuple[tuple[str, int], ...] = ()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = jnp.asarray(x, self.dtype)
        widths = dict(self.widths)
        known = []
        idx = 0
        for v in self.cfg:
            if v == "M":
                x = ops.max_pool(x, (2, 2), (2, 2), impl=self.conv_impl)
                idx += 1
                continue
            name = f"features_{idx}"
            known.append(name)
            x = conv(widths.get(name, scaled(int(v), self.width)), 3, name=name, dtype=self.dtype,
                     use_bias=True, impl=self.conv_impl)(x)
            if self.batch_norm:
                x = BatchNorm(dtype=self.dtype, name=f"features_{idx + 1}")(x, train)
                idx += 1
            x = nn.relu(x)
            idx += 2
        _check_width_paths(widths, known)
        x = adaptive_avg_pool(x, (7, 7))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch.flatten of NCHW
        hidden = scaled(4096, self.width)
        use_dropout = train and self.dropout_rate > 0 and self.has_rng("dropout")
        for i, feats in ((0, hidden), (3, hidden)):
            x = nn.relu(self._dense(feats, f"classifier_{i}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not use_dropout)(x)
        x = self._dense(self.num_classes, "classifier_6")(x)
        return x.astype(jnp.float32)

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=_linear_init, bias_init=nn.initializers.zeros, name=name)


def vgg16(**kwargs: Any) -> VGG:
    """VGG-16 (configuration D), no batch norm."""
    return VGG(VGG16_CFG, batch_norm=False, **kwargs)


def vgg16_bn(**kwargs: Any) -> VGG:
    """VGG-16 with batch norm after every conv."""
    return VGG(VGG16_CFG, batch_norm=True, **kwargs)
