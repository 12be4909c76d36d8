"""Dense fine-tuning (reference point; step 1 of OMP/LTH): SGD on all params, no scores/prompt.

Reference §5.0: SGD(0.01, momentum 0.9, L2 1e-4), cosine per epoch, one un-prompted pass on the
augmented batch per iteration, 120 epochs in the research scripts.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vpns_jax.train.stages import UNPROMPTED, Stage, make_group_optimizer

NAME = 'dense'
USES_PROMPT = False


@dataclasses.dataclass(frozen=True)
class Config:
    """Dense fine-tuning hyperparameters."""

    epochs: int = 120
    weight_optimizer: str = 'sgd'
    weight_lr: float = 0.01
    weight_momentum: float = 0.9
    weight_weight_decay: float = 1e-4
    schedule: str = 'cosine'


def init_scores(params: Any) -> dict:
    """No scores: the dense method has no mask."""
    del params
    return {}


def recipe(config: Config) -> list[Stage]:
    """[finetune] stage."""
    c = config
    weights = make_group_optimizer(c.weight_optimizer, c.weight_lr, momentum=c.weight_momentum,
                                   weight_decay=c.weight_weight_decay, schedule=c.schedule)
    return [Stage('finetune', c.epochs, params=weights, passes=UNPROMPTED, mask_mode='none')]
