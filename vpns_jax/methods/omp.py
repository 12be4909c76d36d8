"""OMP (reference §5.2): dense fine-tune (`config.dense`, shared with every run that needs it), keep
the globally largest |w|, rewind to the pretrained weights under that mask, 120 epochs of SGD."""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods import dense
from vpns_jax.methods.plan import (
    MaskFrom,
    MaskSource,
    Options,
    Rewind,
    Run,
    finetuned_runs,
    finetuned_transfer,
    train_block,
)

NAME = 'omp'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({'tuning': train_block(120, 'sgd', 0.01), 'scope': 'global'})


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    scope = Options.of(config, NAME).one_of('scope', ('global', 'layer'))
    return MaskSource((dense.finetune_stage(config),),
                      (MaskFrom('magnitude', 1.0 - sparsity, scope), Rewind()))


def plan(config: mlc.ConfigDict) -> list[Run]:
    return finetuned_runs(config, NAME, mask_source)


# its tuning stage on a given mask (config.mask_from, vpns_jax.transfer)
transfer = finetuned_transfer(NAME)


def research(dataset: str) -> dict:
    return {'tuning.optimizer': 'adam', 'tuning.lr': 1e-3} if dataset == 'stanford_cars' else {}
