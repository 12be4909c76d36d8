"""What every learned-score method shares: scaled score init and the mask-finding → tuning pair.

A method recipe states only what differs (passes, prompt optimizers); HYDRA is VPNs' machinery
without the prompt.
"""
from __future__ import annotations

from typing import Any

from vpns_jax import sparsity
from vpns_jax.train.stages import FROZEN, UNPROMPTED, GroupOptimizer, Pass, Stage, make_group_optimizer


def init_scores(params: Any) -> dict:
    """First mask = scaled scores sqrt(6/fan_in)·W/max|W| (a layer-normalized magnitude mask)."""
    return dict(sparsity.scaled_score_init(params))


def score_optimizer(c: Any) -> GroupOptimizer:
    """The mask-finding optimizer of the scores from a Config's `score_*` fields."""
    return make_group_optimizer(c.score_optimizer, c.score_lr, momentum=c.score_momentum,
                                weight_decay=c.score_weight_decay, schedule=c.schedule)


def weight_optimizer(c: Any) -> GroupOptimizer:
    """The tuning optimizer of the weights, biases and BN affine from a Config's `weight_*` fields."""
    return make_group_optimizer(c.weight_optimizer, c.weight_lr, momentum=c.weight_momentum,
                                weight_decay=c.weight_weight_decay, schedule=c.schedule)


def mask_then_tune(c: Any, *, mask_finding_passes: tuple[Pass, ...] = UNPROMPTED,
                   tuning_passes: tuple[Pass, ...] = UNPROMPTED,
                   mask_finding_prompt: GroupOptimizer = FROZEN,
                   tuning_prompt: GroupOptimizer = FROZEN) -> list[Stage]:
    """[mask_finding (scores learn, weights frozen), tuning (weights learn, mask fixed)]."""
    return [
        Stage('mask_finding', c.mask_finding_epochs, scores=score_optimizer(c),
              prompt=mask_finding_prompt, passes=mask_finding_passes, mask_mode='learned',
              density=c.density, threshold_scope=c.threshold_scope),
        Stage('tuning', c.tuning_epochs, params=weight_optimizer(c), prompt=tuning_prompt,
              passes=tuning_passes, mask_mode='fixed', density=c.density,
              threshold_scope=c.threshold_scope),
    ]
