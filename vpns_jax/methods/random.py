"""Random pruning (reference §5.1): each weight kept with probability = density (Bernoulli, the same
density in every layer), on the pretrained weights; then 120 epochs of SGD fine-tuning.

Options: `mode='exact'` (each layer keeps exactly its share) or `'erk'` (Erdős–Rényi-Kernel budgets).
"""
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

NAME = 'random'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({'tuning': train_block(120, 'sgd', 0.01), 'mode': 'bernoulli',
                           'scope': 'global'})


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    mode = Options.of(config, NAME).one_of('mode', ('bernoulli', 'exact', 'erk'))
    return criterion_source(config, NAME, 'random', {'mode': mode}, sparsity)


def plan(config: mlc.ConfigDict) -> list[Run]:
    return finetuned_runs(config, NAME, mask_source)


# its tuning stage on a given mask (config.mask_from, vpns_jax.transfer)
transfer = finetuned_transfer(NAME)


def research(dataset: str) -> dict:
    return {'tuning.optimizer': 'adam', 'tuning.lr': 1e-3} if dataset == 'stanford_cars' else {}
