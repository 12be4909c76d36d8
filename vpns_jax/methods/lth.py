"""LTH (reference §5.3): IMP with rewinding to the pretrained weights. Round r removes 20% of the
survivors by global magnitude of the previous round's weights (round 1: the shared dense fine-tune),
rewinds, and fine-tunes 120 epochs; every round is a result row at sparsity 1 − 0.8^r.

`rounds=0` runs the rounds that config.sparsities name (each must be on the series); `rounds=R` runs
rounds 1..R whatever config.sparsities says.
"""
from __future__ import annotations

import math

import ml_collections as mlc

from vpns_jax.errors import ConfigError
from vpns_jax.methods import dense
from vpns_jax.methods.plan import (
    LabelMap,
    MaskFrom,
    MaskSource,
    Options,
    Rewind,
    Run,
    finetuned_runs,
    finetuned_transfer,
    train_block,
    tuning_stage,
)
from vpns_jax.train.stages import UNPROMPTED

NAME = 'lth'
_TOLERANCE = 5e-4  # a configured sparsity matches round r when within this of 1 − (1 − rate)^r


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({'tuning': train_block(120, 'sgd', 0.01), 'rounds': 0, 'rate': 0.2})


def round_sparsity(rate: float, r: int) -> float:
    """Nominal sparsity after round r: 1 − (1 − rate)^r."""
    return round(1.0 - (1.0 - rate) ** r, 12)


def _rate(config: mlc.ConfigDict) -> float:
    return Options.of(config, NAME).number('rate', strict=True, below=1.0)


def round_of(config: mlc.ConfigDict, sparsity: float) -> int:
    """The round whose sparsity is `sparsity`; a ConfigError naming the nearest rounds otherwise."""
    rate = _rate(config)
    if sparsity <= 0:
        raise ConfigError('config.sparsities: LTH needs a sparsity > 0.')
    r = math.log(1.0 - sparsity) / math.log(1.0 - rate)
    for cand in (math.floor(r), math.ceil(r)):
        if cand >= 1 and abs(round_sparsity(rate, cand) - sparsity) <= _TOLERANCE:
            return cand
    lo, hi = max(math.floor(r), 1), max(math.ceil(r), 2)
    raise ConfigError(f'config.sparsities: {sparsity:g} is not on LTH\'s series (each round removes '
                      f'{rate:g} of the survivors); the nearest rounds are {lo} '
                      f'({round_sparsity(rate, lo):.4f}) and {hi} ({round_sparsity(rate, hi):.4f}). '
                      'Use those sparsities, or --config.lth.rounds=N to run rounds 1..N.')


def levels(config: mlc.ConfigDict) -> tuple[float, ...]:
    rounds = Options.of(config, NAME).integer('rounds')
    if not rounds:
        rounds = max(round_of(config, float(s)) for s in config.sparsities)
    return tuple(round_sparsity(_rate(config), r) for r in range(1, rounds + 1))


def _prune_round(config: mlc.ConfigDict) -> tuple:
    return (MaskFrom('magnitude', 1.0 - _rate(config), within_current=True), Rewind())


def mask_source(config: mlc.ConfigDict, sparsity: float) -> MaskSource:
    """Round r's mask: the dense fine-tune and rounds 1..r−1, then one more pruning round."""
    r = round_of(config, sparsity)
    opts = Options.of(config, NAME)
    stages = (dense.finetune_stage(config),) + tuple(
        tuning_stage(opts, 'tuning', start=_prune_round(config) + (LabelMap(),), passes=UNPROMPTED)
        for _ in range(r - 1))
    return MaskSource(stages, _prune_round(config))


def plan(config: mlc.ConfigDict) -> list[Run]:
    """Every round 1..R is a run; round r's chain is round r−1's plus one round, so the shared
    stages run once and one LTH run gives the whole curve."""
    return finetuned_runs(config, NAME, mask_source, levels(config))


# its tuning stage on a given mask (config.mask_from, vpns_jax.transfer)
transfer = finetuned_transfer(NAME)


def research(dataset: str) -> dict:
    return {'stanford_cars': {'tuning.optimizer': 'adam', 'tuning.lr': 1e-3},
            'oxford_iiit_pet': {'tuning.lr': 1e-3}}.get(dataset, {})
