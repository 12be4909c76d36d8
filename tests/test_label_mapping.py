"""Frequency label mapping: counts, greedy one-to-one assignment (reference tie order), logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vpns_jax import label_mapping as lm


def _torch_greedy(counts: np.ndarray) -> list[int]:
    """Reference FLM restated: T times argmax of the flat [S, T] matrix, retire row and column."""
    dist = torch.tensor(counts, dtype=torch.float32).clone()
    chosen = torch.zeros_like(dist, dtype=torch.bool)
    for _ in range(dist.size(1)):
        loc = int(dist.argmax())
        s, c = loc // dist.size(1), loc % dist.size(1)
        chosen[s, c] = True
        dist[s] = -1
        dist[:, c] = -1
    pairs = torch.nonzero(chosen)
    return pairs[:, 0][torch.sort(pairs[:, 1]).indices].tolist()


def test_greedy_differs_from_column_argmax():
    counts = np.array([[5, 4, 0], [4, 0, 1], [0, 3, 2], [1, 1, 2]])
    mapping = lm.greedy_mapping(counts)
    assert mapping.dtype == np.int32
    assert mapping.tolist() == [0, 2, 3]
    assert counts.argmax(axis=0).tolist() == [0, 0, 2]  # not one-to-one
    assert mapping.tolist() == _torch_greedy(counts)


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([[2, 2], [2, 2]], [0, 1]),  # first in row-major order: (0, 0), then (1, 1)
        ([[0, 3], [3, 0], [0, 0]], [1, 0]),  # (0, 1) comes before (1, 0)
        ([[0, 0], [0, 0], [0, 0]], [0, 1]),  # all zero: still one-to-one
    ],
)
def test_greedy_ties(counts, expected):
    assert lm.greedy_mapping(np.array(counts)).tolist() == expected
    assert expected == _torch_greedy(np.array(counts))


def test_greedy_random_matches_torch_and_is_one_to_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(0, 4, size=(30, 10))  # many ties
        mapping = lm.greedy_mapping(counts)
        assert len(set(mapping.tolist())) == 10
        assert mapping.tolist() == _torch_greedy(counts)


def test_greedy_needs_enough_source_classes():
    with pytest.raises(ValueError, match="source classes"):
        lm.greedy_mapping(np.zeros((2, 3), np.int64))


def test_frequency_counts_and_update_counts():
    rng = np.random.default_rng(1)
    num_source, num_target, n = 7, 3, 50
    logits = rng.normal(size=(n, num_source)).astype(np.float32)
    labels = rng.integers(0, num_target, size=n)
    pred = logits.argmax(axis=1)
    expected = np.zeros((num_source, num_target), np.int64)
    np.add.at(expected, (pred, labels), 1)
    counts = lm.frequency_counts(pred, labels, num_source, num_target)
    np.testing.assert_array_equal(np.asarray(counts), expected)

    # Batched accumulation with a padded last batch (garbage labels where invalid).
    update = jax.jit(lm.update_counts)
    acc = lm.init_counts(num_source, num_target)
    for start in range(0, n, 16):
        batch_logits = np.zeros((16, num_source), np.float32)
        batch_labels = np.full((16,), -1, np.int32)
        valid = np.zeros((16,), bool)
        stop = min(start + 16, n)
        batch_logits[: stop - start] = logits[start:stop]
        batch_labels[: stop - start] = labels[start:stop]
        valid[: stop - start] = True
        batch_labels[stop - start :] = 2  # in range but invalid: must be ignored
        acc = update(acc, jnp.asarray(batch_logits), jnp.asarray(batch_labels), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(acc), expected)


def test_map_logits():
    logits = jnp.arange(12.0).reshape(2, 6)
    out = lm.map_logits(logits, np.array([4, 0, 2], np.int32))
    np.testing.assert_array_equal(np.asarray(out), [[4.0, 0.0, 2.0], [10.0, 6.0, 8.0]])
