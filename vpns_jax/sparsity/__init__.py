"""Unstructured learned-score sparsity: prunable paths, score init, thresholds, masks, summaries."""
from vpns_jax.sparsity.masks import (
    apply_masks,
    hard_masks,
    keep_top,
    masks_from_params_magnitude,
    ste_mask,
    ste_masks,
)
from vpns_jax.sparsity.scores import (
    PRUNABLE_PATTERN,
    fan_in,
    flatten_params,
    prunable_paths,
    scaled_score_init,
)
from vpns_jax.sparsity.summary import sparsity_summary
from vpns_jax.sparsity.threshold import (
    global_threshold,
    kth_smallest,
    layerwise_thresholds,
    num_pruned,
)

__all__ = [
    "PRUNABLE_PATTERN",
    "apply_masks",
    "fan_in",
    "flatten_params",
    "global_threshold",
    "hard_masks",
    "keep_top",
    "kth_smallest",
    "layerwise_thresholds",
    "masks_from_params_magnitude",
    "num_pruned",
    "prunable_paths",
    "scaled_score_init",
    "sparsity_summary",
    "ste_mask",
    "ste_masks",
]
