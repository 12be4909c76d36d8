"""The generic training engine: state, stage data, optimizers, pure steps and the one loop."""
from vpns_jax.train.loop import (
    EpochEnd,
    EpochHook,
    NonFinite,
    StageResult,
    StepEnd,
    StepLog,
    evaluate,
    flm_label_map,
    make_ilm_hook,
    resume_position,
    run_stage,
)
from vpns_jax.train.optim import lr_factor, lr_factors, make_optimizer
from vpns_jax.train.stages import (
    FROZEN,
    PROMPTED_ONLY,
    TWO_PASSES,
    UNPROMPTED,
    GroupOptimizer,
    Pass,
    Stage,
    adam,
    make_group_optimizer,
    passes_preset,
    sgd,
)
from vpns_jax.train.state import TrainState, all_finite, begin_stage, create_state
from vpns_jax.train.steps import (
    current_masks,
    eval_step,
    make_eval_step,
    make_source_predictions,
    make_train_step,
    pass_step,
    source_predictions,
    train_step,
)

__all__ = [
    'FROZEN', 'PROMPTED_ONLY', 'TWO_PASSES', 'UNPROMPTED', 'EpochEnd', 'EpochHook',
    'GroupOptimizer', 'NonFinite', 'Pass', 'Stage', 'StageResult', 'StepEnd', 'StepLog', 'TrainState', 'adam',
    'all_finite', 'begin_stage',
    'create_state', 'current_masks', 'eval_step', 'evaluate', 'flm_label_map', 'lr_factor',
    'lr_factors', 'make_eval_step', 'make_ilm_hook', 'resume_position',
    'make_group_optimizer', 'make_optimizer', 'make_source_predictions', 'make_train_step',
    'pass_step', 'passes_preset', 'run_stage', 'sgd', 'source_predictions', 'train_step',
]
