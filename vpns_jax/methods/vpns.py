"""VPNs recipe: mask finding (scores + prompt, Adam) then subnetwork tuning (weights + prompt, SGD).

Defaults are the released code (reference §4): 30 + 30 epochs; mask finding Adam(1e-4, L2 1e-4) on
scores and on the prompt, weights/biases/BN affine frozen; tuning SGD(0.01, momentum 0.9, L2 1e-4)
on weights, biases, BN affine and the prompt with the mask fixed; cosine per epoch; two passes per
iteration (prompted non-augmented batch, then un-prompted augmented batch); global threshold; no
prompt at test time.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vpns_jax.errors import ConfigError
from vpns_jax.methods import learned_mask
from vpns_jax.train.stages import (
    FROZEN,
    UNPROMPTED,
    Stage,
    make_group_optimizer,
    passes_preset,
)

NAME = 'vpns'
USES_PROMPT = True
PROMPT_IN = ('both', 'mask_finding', 'tuning')


@dataclasses.dataclass(frozen=True)
class Config:
    """VPNs hyperparameters. Prompt optimizer fields left None follow the stage's network optimizer
    (scores in mask finding, weights in tuning), as the released scripts do.

    passes: 'two' (released code) or 'prompted_only' (paper Eq. 5/6: one prompted pass per
    iteration, on the augmented batch). prompt_in: stages that use the prompt; a stage without it
    runs ONE un-prompted pass on the augmented batch per iteration (HYDRA-like). prompt_at_test:
    evaluation switch (released code: False).
    """

    density: float = 0.5
    mask_finding_epochs: int = 30
    tuning_epochs: int = 30
    score_optimizer: str = 'adam'
    score_lr: float = 1e-4
    score_momentum: float = 0.9
    score_weight_decay: float = 1e-4
    weight_optimizer: str = 'sgd'
    weight_lr: float = 0.01
    weight_momentum: float = 0.9
    weight_weight_decay: float = 1e-4
    prompt_mask_finding_optimizer: str | None = None
    prompt_mask_finding_lr: float | None = None
    prompt_mask_finding_weight_decay: float | None = None
    prompt_mask_finding_schedule: str | None = None
    prompt_tuning_optimizer: str | None = None
    prompt_tuning_lr: float | None = None
    prompt_tuning_weight_decay: float | None = None
    schedule: str = 'cosine'
    passes: str = 'two'
    prompt_in: str = 'both'
    threshold_scope: str = 'global'
    prompt_at_test: bool = False

    def __post_init__(self):
        if self.prompt_in not in PROMPT_IN:
            raise ConfigError(f'prompt_in={self.prompt_in!r}; use one of {PROMPT_IN}.')
        if self.passes not in ('two', 'prompted_only'):
            raise ConfigError(f"passes={self.passes!r}; use 'two' or 'prompted_only'.")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


init_scores = learned_mask.init_scores


def recipe(config: Config) -> list[Stage]:
    """[mask_finding, tuning] stages of one sparsity level."""
    c = config
    prompt_mf = make_group_optimizer(
        _or(c.prompt_mask_finding_optimizer, c.score_optimizer),
        _or(c.prompt_mask_finding_lr, c.score_lr), momentum=c.score_momentum,
        weight_decay=_or(c.prompt_mask_finding_weight_decay, c.score_weight_decay),
        schedule=_or(c.prompt_mask_finding_schedule, c.schedule))
    prompt_tune = make_group_optimizer(
        _or(c.prompt_tuning_optimizer, c.weight_optimizer),
        _or(c.prompt_tuning_lr, c.weight_lr), momentum=c.weight_momentum,
        weight_decay=_or(c.prompt_tuning_weight_decay, c.weight_weight_decay), schedule=c.schedule)
    prompted = passes_preset(c.passes)
    mf_prompt = c.prompt_in in ('both', 'mask_finding')
    tune_prompt = c.prompt_in in ('both', 'tuning')
    return learned_mask.mask_then_tune(
        c, mask_finding_passes=prompted if mf_prompt else UNPROMPTED,
        tuning_passes=prompted if tune_prompt else UNPROMPTED,
        mask_finding_prompt=prompt_mf if mf_prompt else FROZEN,
        tuning_prompt=prompt_tune if tune_prompt else FROZEN)
