"""SynFlow (reference §5.6): 100 iterations of |θ ⊙ ∂R/∂θ| on the absolute-valued pretrained network
(BN buffers included) with one real training batch, keep ratio density^(e/100), global top-k; then 120
epochs of SGD. `input='ones'` uses the SynFlow paper's all-ones input."""
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

NAME = 'synflow'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({'tuning': train_block(120, 'sgd', 0.01), 'iterations': 100,
                           'input': 'batch', 'scope': 'global'})


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    opts = Options.of(config, NAME)
    options = {'iterations': opts.integer('iterations', minimum=1),
               'input': opts.one_of('input', ('batch', 'ones'))}
    return criterion_source(config, NAME, 'synflow', options, sparsity)


def plan(config: mlc.ConfigDict) -> list[Run]:
    return finetuned_runs(config, NAME, mask_source)


# its tuning stage on a given mask (config.mask_from, vpns_jax.transfer)
transfer = finetuned_transfer(NAME)


def research(dataset: str) -> dict:
    return {'tuning.optimizer': 'adam', 'tuning.lr': 1e-3} if dataset == 'stanford_cars' else {}
