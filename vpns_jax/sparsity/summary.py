"""Exact sparsity statistics of a set of masks (host-side, Python ints)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _stats(size: int, nonzero: int) -> dict:
    return {"size": size, "nonzero": nonzero, "sparsity": 1.0 - nonzero / size if size else 0.0}


def sparsity_summary(masks: Mapping) -> dict:
    """Exact counts: {'total': {'size', 'nonzero', 'sparsity'}, 'layers': {path: {...}}}.

    sparsity = 1 − nonzero / size. Masks may be bool, integer or float arrays (nonzero: != 0).
    """
    layers = {}
    for path in sorted(masks):
        m = np.asarray(masks[path])
        layers[path] = _stats(int(m.size), int(np.count_nonzero(m)))
    size = sum(v["size"] for v in layers.values())
    nonzero = sum(v["nonzero"] for v in layers.values())
    return {"total": _stats(size, nonzero), "layers": layers}
