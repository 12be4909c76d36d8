"""Masks from scores: straight-through float masks, hard bool masks, applying masks to params."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from vpns_jax.sparsity.scores import flatten_params
from vpns_jax.sparsity.threshold import global_threshold

Threshold = jax.Array | float | Mapping[str, jax.Array | float]


def _tau_for(tau: Threshold, path: str) -> jax.Array:
    value = tau[path] if isinstance(tau, Mapping) else tau
    return jnp.asarray(value, jnp.float32)


@jax.custom_vjp
def ste_mask(score: jax.Array, tau: jax.Array) -> jax.Array:
    """Float mask (|score| > tau); backward: ∂L/∂score = sign(score)·∂L/∂mask, no gradient to tau.

    sign(0) = 0, as torch's abs backward (jax.grad(jnp.abs)(0.) would give 1).
    """
    return (jnp.abs(score) > tau).astype(score.dtype)


def _ste_fwd(score, tau):
    return ste_mask(score, tau), (jnp.sign(score), tau)


def _ste_bwd(residual, g):
    sign, tau = residual
    return sign * g, jnp.zeros_like(tau)


ste_mask.defvjp(_ste_fwd, _ste_bwd)


def ste_masks(scores: Mapping[str, jax.Array], tau: Threshold) -> dict[str, jax.Array]:
    """Straight-through float masks per path; `tau` is one scalar or a {path: scalar} dict.

    With W_eff = W·m the score gradient is sign(s)·W·∂L/∂W_eff on every entry, masked ones included.
    """
    return {p: ste_mask(s, _tau_for(tau, p)) for p, s in scores.items()}


def hard_masks(scores: Mapping[str, jax.Array], tau: Threshold) -> dict[str, jax.Array]:
    """Bool masks |s| > tau per path (no gradient)."""
    return {
        p: jax.lax.stop_gradient(jnp.abs(s)) > jax.lax.stop_gradient(_tau_for(tau, p))
        for p, s in scores.items()
    }


def keep_top(scores: Mapping[str, jax.Array], density: float) -> dict[str, jax.Array]:
    """STE masks at `density` with one global threshold computed outside the gradient."""
    return ste_masks(scores, global_threshold(scores, density))


def apply_masks(params: Mapping, masks: Mapping[str, jax.Array]) -> dict:
    """Nested params with each masked kernel times its mask (float or bool); jit/grad-safe."""
    flat = flatten_params(params)
    missing = sorted(set(masks) - set(flat))
    if missing:
        raise KeyError(f"apply_masks: mask paths not found in params: {missing[:5]}")
    for path, mask in masks.items():
        w = flat[path]
        if jnp.shape(mask) != jnp.shape(w):
            raise ValueError(
                f"apply_masks: mask {path} has shape {jnp.shape(mask)}, kernel {jnp.shape(w)}."
            )
        flat[path] = w * jnp.asarray(mask).astype(w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")
