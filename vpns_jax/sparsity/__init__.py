"""Unstructured learned-score sparsity: prunable paths, score init, thresholds, masks, summaries,
and the baseline pruning criteria (`sparsity.criteria`)."""
from vpns_jax.sparsity import criteria
from vpns_jax.sparsity.criteria import keep_counts, num_kept, top_k_masks
from vpns_jax.sparsity.masks import (
    apply_masks,
    hard_masks,
    keep_top,
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
    threshold_for_count,
)

__all__ = [
    "PRUNABLE_PATTERN",
    "apply_masks",
    "criteria",
    "fan_in",
    "flatten_params",
    "global_threshold",
    "hard_masks",
    "keep_counts",
    "keep_top",
    "kth_smallest",
    "layerwise_thresholds",
    "num_kept",
    "num_pruned",
    "prunable_paths",
    "scaled_score_init",
    "sparsity_summary",
    "ste_mask",
    "ste_masks",
    "threshold_for_count",
    "top_k_masks",
]
