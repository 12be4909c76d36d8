"""SNIP (reference §5.4): |g ⊙ w| on one training batch of the pretrained network in eval mode, CE on
the raw source logits with the downstream labels; global top-k, a layer left empty keeps its best
weight; then 120 epochs of SGD fine-tuning."""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods.plan import (
    MaskSource,
    Run,
    criterion_source,
    finetuned_runs,
    finetuned_transfer,
    train_block,
)

NAME = 'snip'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({'tuning': train_block(120, 'sgd', 0.01), 'scope': 'global'})


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    return criterion_source(config, NAME, 'snip', {}, sparsity)


def plan(config: mlc.ConfigDict) -> list[Run]:
    return finetuned_runs(config, NAME, mask_source)


# its tuning stage on a given mask (config.mask_from, vpns_jax.transfer)
transfer = finetuned_transfer(NAME)


def research(dataset: str) -> dict:
    return {'tuning.optimizer': 'adam', 'tuning.lr': 1e-4} if dataset == 'stanford_cars' else {}
