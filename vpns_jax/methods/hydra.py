"""HYDRA as compared in VPNs (reference §5.8): VPNs' machinery without the prompt.

Scaled score init, one un-prompted pass on the augmented batch per iteration, 60 mask-finding + 60
tuning epochs, global threshold (original HYDRA: `threshold='layer'`). Score optimizer default = the
comparison's research scripts, SGD(0.01, momentum 0.9, L2 1e-4); the paper's reading is
`--config.hydra.mask_finding.optimizer=adam --config.hydra.mask_finding.lr=1e-4`.
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods.plan import (
    InitPrompt,
    InitScores,
    LabelMap,
    MaskFrom,
    MaskSource,
    Options,
    Run,
    sparsity_levels,
    train_block,
    tuning_stage,
)
from vpns_jax.train.stages import FROZEN, UNPROMPTED, GroupOptimizer, Pass, Stage

NAME = 'hydra'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'mask_finding': train_block(60, 'sgd', 0.01),
        'tuning': train_block(60, 'sgd', 0.01),
        'threshold': 'global',
    })


def mask_finding_stage(opts: Options, density: float, *, passes: tuple[Pass, ...] = UNPROMPTED,
                       prompt: GroupOptimizer = FROZEN) -> Stage:
    """Scores learn (weights frozen) from the scaled init; FLM after the initial mask (§2)."""
    prompted = any(p.prompted for p in passes)
    start = (InitScores(),) + ((InitPrompt(),) if prompted else ()) + (LabelMap(prompted),)
    return Stage('mask_finding', opts.epochs('mask_finding'), scores=opts.optimizer('mask_finding'),
                 prompt=prompt, passes=passes, mask_mode='learned', density=density,
                 threshold_scope=opts.one_of('threshold', ('global', 'layer')), start=start)


def mask_then_tune(opts: Options, density: float, *, mask_finding_passes: tuple[Pass, ...],
                   tuning_passes: tuple[Pass, ...], mask_finding_prompt: GroupOptimizer,
                   tuning_prompt: GroupOptimizer) -> tuple[Stage, ...]:
    """[mask_finding (scores learn), tuning (weights learn under the frozen learned mask)]."""
    mf = mask_finding_stage(opts, density, passes=mask_finding_passes, prompt=mask_finding_prompt)
    freeze = MaskFrom('scores', density, mf.threshold_scope)
    return mf, tuning_stage(opts, 'tuning', start=(freeze,), passes=tuning_passes,
                            prompt=tuning_prompt)


def tune_given_mask(opts: Options, mask: MaskSource, *, passes: tuple[Pass, ...],
                    prompt: GroupOptimizer) -> tuple[Stage, ...]:
    """Transfer (`vpns_jax.transfer`): the tuning stage on a given mask, without mask finding. A
    prompted stage starts from the zero prompt; the label mapping is made once the mask is set
    (through the zero prompt when the passes are prompted), as mask finding's start does (§2)."""
    prompted = any(p.prompted for p in passes)
    start = mask.actions + ((InitPrompt(),) if prompted else ()) + (LabelMap(prompted),)
    return mask.stages + (tuning_stage(opts, 'tuning', start=start, passes=passes, prompt=prompt),)


def transfer(config: mlc.ConfigDict, mask: MaskSource, sparsity: float) -> Run:
    """HYDRA's tuning stage on a given mask (config.mask_from)."""
    return Run(NAME, sparsity, tune_given_mask(Options.of(config, NAME), mask, passes=UNPROMPTED,
                                               prompt=FROZEN))


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    return [Run(NAME, s, mask_then_tune(opts, 1.0 - s, mask_finding_passes=UNPROMPTED,
                                        tuning_passes=UNPROMPTED, mask_finding_prompt=FROZEN,
                                        tuning_prompt=FROZEN)) for s in sparsity_levels(config)]


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    """HYDRA's mask: its mask-finding stage, then the learned scores' top-k."""
    mf = mask_finding_stage(Options.of(config, NAME), 1.0 - sparsity)
    return MaskSource((mf,), (MaskFrom('scores', 1.0 - sparsity, mf.threshold_scope),))


def research(dataset: str) -> dict:
    return {'mask_finding.optimizer': 'adam', 'mask_finding.lr': 1e-4} \
        if dataset == 'stanford_cars' else {}
