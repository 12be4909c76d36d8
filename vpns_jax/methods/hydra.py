"""HYDRA as compared in VPNs (reference §5.8): VPNs' machinery without the prompt.

One un-prompted pass on the augmented batch per iteration; 60 mask-finding + 60 tuning epochs;
global threshold (original HYDRA: threshold_scope='layer'). Score optimizer default = the
comparison's research scripts: SGD(0.01, momentum 0.9, L2 1e-4); the paper's reading (Adam 1e-4) is
``Config(score_optimizer='adam', score_lr=1e-4)``. Tuning: SGD(0.01, momentum 0.9, L2 1e-4),
cosine.
"""
from __future__ import annotations

import dataclasses

from vpns_jax.methods import learned_mask
from vpns_jax.train.stages import Stage

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


init_scores = learned_mask.init_scores


def recipe(config: Config) -> list[Stage]:
    """[mask_finding, tuning] stages of one sparsity level, one un-prompted pass per iteration."""
    return learned_mask.mask_then_tune(config)
