"""GraSP (reference §5.5): −θ ⊙ Hg on per-class samples at temperature 200, pretrained network in eval
mode; the reference keeps only the per-layer densities and draws random masks with them (default,
`mask_mode='ratios'`; the GraSP mask itself: `mask_mode='grasp'`); then 120 epochs of SGD."""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods.plan import (
    MaskSource,
    Options,
    Run,
    criterion_source,
    finetuned_runs,
    finetuned_transfer,
    train_block,
)

NAME = 'grasp'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'tuning': train_block(120, 'sgd', 0.01),
        'mask_mode': 'ratios',  # ratios (the authors' baseline) | grasp
        'temperature': 200.0,
        'samples_per_class': 0,  # 0 = min(floor(512 / classes), 25), as GraSP's code
        'scope': 'global',
    })


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    opts = Options.of(config, NAME)
    options = {'mask_mode': opts.one_of('mask_mode', ('ratios', 'grasp')),
               'temperature': opts.number('temperature', strict=True),
               'samples_per_class': opts.integer('samples_per_class')}
    return criterion_source(config, NAME, 'grasp', options, sparsity)


def plan(config: mlc.ConfigDict) -> list[Run]:
    return finetuned_runs(config, NAME, mask_source)


# its tuning stage on a given mask (config.mask_from, vpns_jax.transfer)
transfer = finetuned_transfer(NAME)


def research(dataset: str) -> dict:
    return {'tuning.optimizer': 'adam', 'tuning.lr': 1e-3} if dataset == 'stanford_cars' else {}
