"""Frequency label mapping (FLM, VPNs §2): one distinct source class per downstream class.

counts[s, c] = number of samples of downstream class c whose argmax source prediction is s; the
mapping is chosen greedily (largest remaining entry first, row and column then retired), and the
downstream logits are logits[:, mapping].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def init_counts(num_source: int, num_target: int) -> jax.Array:
    """Zero count matrix i32[S, T] for `update_counts`."""
    return jnp.zeros((num_source, num_target), jnp.int32)


def update_counts(
    counts: jax.Array,
    source_logits: jax.Array,
    labels: jax.Array,
    valid_mask: jax.Array | None = None,
) -> jax.Array:
    """Add one batch to i32[S, T] counts (jit-friendly).

    source_logits: f32[B, S]; labels: i32[B] in [0, T); valid_mask: bool[B] (padded eval batches),
    rows with False (or out-of-range labels) are ignored.
    """
    num_source, num_target = counts.shape
    pred = jnp.argmax(source_logits, axis=-1).astype(jnp.int32)
    labels = labels.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_target)
    if valid_mask is not None:
        valid = valid & valid_mask.astype(bool)
    flat = jnp.where(valid, pred * num_target + labels, num_source * num_target)
    return counts.reshape(-1).at[flat].add(1, mode="drop").reshape(counts.shape)


def frequency_counts(
    source_pred: jax.Array, labels: jax.Array, num_source: int, num_target: int
) -> jax.Array:
    """i32[S, T] counts from argmax source predictions i32[N] and downstream labels i32[N].

    (int32, not int64: JAX runs without x64 by default; counts are at most N.)
    """
    source_pred = jnp.asarray(source_pred, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    flat = source_pred * num_target + labels
    return jnp.bincount(flat, length=num_source * num_target).reshape(num_source, num_target)


def greedy_mapping(counts: jax.Array | np.ndarray) -> np.ndarray:
    """i32[T] one-to-one mapping from counts [S, T] (S >= T), host-side.

    T times: take the largest remaining entry (s, c) — ties broken by the first in row-major order,
    as torch.argmax over the flattened matrix — set mapping[c] = s, then row s and column c to −1.
    """
    work = np.array(counts, dtype=np.int64)
    if work.ndim != 2:
        raise ValueError(f"greedy_mapping: counts must be [S, T], got shape {work.shape}.")
    num_source, num_target = work.shape
    if num_source < num_target:
        raise ValueError(
            f"greedy_mapping: {num_source} source classes < {num_target} target classes; "
            "a one-to-one mapping needs at least as many source classes."
        )
    if work.size and work.min() < 0:
        raise ValueError("greedy_mapping: counts must be >= 0.")
    mapping = np.full((num_target,), -1, np.int32)
    for _ in range(num_target):
        s, c = divmod(int(np.argmax(work)), num_target)
        mapping[c] = s
        work[s, :] = -1
        work[:, c] = -1
    return mapping


def map_logits(logits: jax.Array, mapping: jax.Array | np.ndarray) -> jax.Array:
    """Downstream logits f32[B, T] = logits f32[B, S][:, mapping i32[T]]."""
    return jnp.take(logits, jnp.asarray(mapping, jnp.int32), axis=-1)
