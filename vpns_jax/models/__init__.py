"""Model registry: torchvision-compatible ResNet and VGG in Flax Linen (NHWC, pure, no pruning)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax import ops
from vpns_jax.models.resnet import resnet18, resnet34, resnet50
from vpns_jax.models.vgg import vgg16, vgg16_bn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
}
ARCHS: tuple[str, ...] = tuple(_BUILDERS)


CONV_IMPLS = ops.IMPLS  # ("auto", "xla", "im2col", "rows")
# The computation dtypes by name: config.model.dtype and benchmarks/step.py --dtype both map through
# `compute_dtype`. Parameters, BatchNorm statistics and logits are float32 either way.
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """The jnp dtype named `name` ('float32' | 'bfloat16'); ValueError listing the names otherwise."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown computation dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def default_conv_impl(dtype: Any = jnp.float32) -> str:
    """'auto' (matmul lowering where XLA's CPU convolution is slow) on CPU in float32; XLA's conv
    elsewhere and for bfloat16 on CPU: XLA's CPU dot has no fast bfloat16 path on hosts without
    bf16 instructions (a VPNs mask-finding step of a width-0.25 ResNet-18 at 32 px, batch 64, on
    2 AVX2 cores: 321 ms with the matmul lowerings in bf16, 124 ms with XLA's conv in bf16, 124 ms
    with the matmul lowerings in float32)."""
    if jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32:
        return "xla"
    return "auto"


def with_dtype(model: nn.Module, dtype: Any) -> nn.Module:
    """`model` computing in `dtype` (a clone; the same parameters). A model on its dtype's default
    conv_impl gets the new dtype's default (as `create` would pick). Modules without a `dtype`
    field (or with dtype None: inferred from the inputs) are returned unchanged."""
    current = getattr(model, "dtype", None)
    if current is None or jnp.dtype(current) == jnp.dtype(dtype):
        return model
    changes: dict[str, Any] = {"dtype": dtype}
    if getattr(model, "conv_impl", None) == default_conv_impl(current):
        changes["conv_impl"] = default_conv_impl(dtype)
    return model.clone(**changes)


def create(name: str, num_classes: int = 1000, *, width: float = 1.0, small_input: bool = False,
           dtype: Any = jnp.float32, conv_impl: str | None = None,
           widths: Mapping[str, int] | None = None) -> nn.Module:
    """Build architecture `name` (one of `ARCHS`); defaults are exactly torchvision's.

    width: multiplier on every conv/hidden width (rounded, ≥1). small_input: ResNet 3×3/1 stem
    without max-pool (VGG unchanged). dtype: computation dtype (params stay float32).
    conv_impl: convolution lowering, 'auto' | 'xla' | 'im2col' | 'rows' (`vpns_jax.ops`); None picks
    `default_conv_impl()` for the current backend. Parameters and results do not depend on it.
    widths: a slimmed network's output channels per conv module path ({'layer1_0/conv1': 9, ...};
    `vpns_jax.structured.slim` makes them); None or {} is the default network.
    Call: `model.apply(v, x, train=False)`, or in train mode
    `model.apply(v, x, train=True, mutable=['batch_stats'])`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(ARCHS)}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    conv_impl = default_conv_impl(dtype) if conv_impl is None else conv_impl
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    extra: dict[str, Any] = {}
    if widths:
        bad = {k: v for k, v in widths.items() if not (isinstance(v, int | np.integer) and v >= 1)}
        if bad:
            raise ValueError(f"widths must be integers >= 1, got {bad}")
        extra["widths"] = tuple(sorted((str(k), int(v)) for k, v in widths.items()))
    return _BUILDERS[name](num_classes=int(num_classes), width=float(width),
                           small_input=bool(small_input), dtype=dtype, conv_impl=conv_impl,
                           **extra)


def init_variables(model: nn.Module, rng: jax.Array, input_size: int) -> dict[str, Any]:
    """Initialize `{'params', 'batch_stats'}` with a [1, input_size, input_size, 3] dummy input.

    Jitted (one compile per model and size; op-by-op init is slow on CPU), and usable inside
    `jax.jit` / `jax.eval_shape`. Models without BN get `batch_stats = {}`.
    """
    return _init_jit(model, rng, int(input_size))


@partial(jax.jit, static_argnums=(0, 2))
def _init_jit(model: nn.Module, rng: jax.Array, input_size: int) -> dict[str, Any]:
    x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    variables = model.init({"params": rng}, x, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def param_count(params: Any) -> int:
    """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["ARCHS", "COMPUTE_DTYPES", "CONV_IMPLS", "compute_dtype", "create", "default_conv_impl",
           "init_variables", "param_count", "with_dtype"]
