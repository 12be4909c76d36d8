"""Prunable-parameter selection and HYDRA's scaled score initialisation (VPNs §3).

Flat trees are dicts keyed by the '/'-joined Flax parameter path, e.g. 'layer1_0/conv1/kernel'.
Conv kernels are HWIO, dense kernels (in, out).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

# A prunable leaf: a 'kernel' (conv or dense) anywhere in the tree; it must also have ndim >= 2.
PRUNABLE_PATTERN = r"(^|/)kernel$"


def flatten_params(params: Mapping) -> dict[str, jax.Array]:
    """Nested params -> flat {'a/b/kernel': array} dict."""
    return traverse_util.flatten_dict(dict(params), sep="/")


def prunable_paths(params: Mapping, pattern: str = PRUNABLE_PATTERN) -> list[str]:
    """Sorted prunable kernel paths: leaves matching `pattern` (re.search) with ndim >= 2.

    The default selects every conv and dense kernel (stem, downsample and head included).
    """
    regex = re.compile(pattern)
    flat = flatten_params(params)
    return sorted(p for p, v in flat.items() if regex.search(p) and jnp.ndim(v) >= 2)


def fan_in(shape: tuple[int, ...]) -> int:
    """Fan-in of a kernel: H·W·I for HWIO conv kernels, `in` for (in, out) dense kernels."""
    return math.prod(shape[:-1])


def scaled_score_init(
    params: Mapping, paths: list[str] | None = None
) -> dict[str, jax.Array]:
    """HYDRA scaled init per layer: s = sqrt(6 / fan_in) · W / max|W| (flat dict over `paths`).

    `paths` defaults to `prunable_paths(params)`. A layer whose weights are all zero gets zero
    scores (the reference would divide by zero).
    """
    flat = flatten_params(params)
    paths = prunable_paths(params) if paths is None else paths
    scores = {}
    for path in paths:  # eagerly: jitted, XLA reorders c * w / peak and the last bits move (not torch's)
        w = jnp.asarray(flat[path], jnp.float32)
        peak = jnp.max(jnp.abs(w))
        peak = jnp.where(peak > 0, peak, 1.0)
        scores[path] = math.sqrt(6.0 / fan_in(w.shape)) * w / peak
    return scores
