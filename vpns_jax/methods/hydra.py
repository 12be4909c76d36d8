"""HYDRA as compared in VPNs (reference §5.8): VPNs' machinery without the prompt.

One un-prompted pass on the augmented batch per iteration; 60 mask-finding + 60 tuning epochs;
global threshold (original HYDRA: threshold_scope='layer'). Score optimizer default = the
comparison's research scripts: SGD(0.01, momentum 0.9, L2 1e-4); the paper's reading (Adam 1e-4) is
``Config(score_optimizer='adam', score_lr=1e-4)``. Tuning: SGD(0.01, momentum 0.9, L2 1e-4),
cosine.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vpns_jax import sparsity
from vpns_jax.train.stages import UNPROMPTED, Stage, make_group_optimizer

NAME = 'hydra'
USES_PROMPT = False


@dataclasses.dataclass(frozen=True)
class Config:
    """HYDRA hyperparameters (defaults: the VPNs comparison scripts)."""

    density: float = 0.5
    mask_finding_epochs: int = 60
    tuning_epochs: int = 60
    score_optimizer: str = 'sgd'
    score_lr: float = 0.01
    score_momentum: float = 0.9
    score_weight_decay: float = 1e-4
    weight_optimizer: str = 'sgd'
    weight_lr: float = 0.01
    weight_momentum: float = 0.9
    weight_weight_decay: float = 1e-4
    schedule: str = 'cosine'
    threshold_scope: str = 'global'


def init_scores(params: Any) -> dict:
    """Scaled score init (same formula as original HYDRA)."""
    return dict(sparsity.scaled_score_init(params))


def recipe(config: Config) -> list[Stage]:
    """[mask_finding, tuning] stages of one sparsity level."""
    c = config
    scores = make_group_optimizer(c.score_optimizer, c.score_lr, momentum=c.score_momentum,
                                  weight_decay=c.score_weight_decay, schedule=c.schedule)
    weights = make_group_optimizer(c.weight_optimizer, c.weight_lr, momentum=c.weight_momentum,
                                   weight_decay=c.weight_weight_decay, schedule=c.schedule)
    return [
        Stage('mask_finding', c.mask_finding_epochs, scores=scores, passes=UNPROMPTED,
              mask_mode='learned', density=c.density, threshold_scope=c.threshold_scope),
        Stage('tuning', c.tuning_epochs, params=weights, passes=UNPROMPTED, mask_mode='fixed',
              density=c.density, threshold_scope=c.threshold_scope),
    ]
