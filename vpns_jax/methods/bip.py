"""BiP as ported in the VPNs comparison (reference §5.9): bi-level mask and weight learning, 60 epochs.

Each iteration: (1) lower level: one SGD step of the weights on a batch of a second augmented loader;
(2) the "bilevel" backward: the gradient of every group on a batch of the first loader (kept, no
step); (3) upper level: the score gradient on the same batch plus the implicit term
−bilevel_lr·(G_mask ⊙ G_param) (the port multiplies the score gradient by the collected score gradient,
BiP issue #3), one Adam step of the scores, τ refreshed. No tuning stage by default (`tuning.epochs`
adds one). `implicit='algorithm'` uses the gradient w.r.t. the weights instead (the paper's Algorithm).
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods.plan import (
    InitScores,
    LabelMap,
    MaskFrom,
    Options,
    Run,
    sparsity_levels,
    train_block,
    tuning_stage,
)
from vpns_jax.train.stages import UNPROMPTED, Pass, Stage

NAME = 'bip'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'epochs': 60,
        'scores': train_block(None, 'adam', 1e-4),
        'weights': train_block(None, 'sgd', 0.01),
        'bilevel_lr': 1e-4,
        'implicit': 'port',  # port (the authors' code) | algorithm (BiP's Algorithm)
        'threshold': 'global',
        'tuning': train_block(0, 'sgd', 0.01),
    })


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    bilevel = dict(bilevel_lr=opts.number('bilevel_lr'),
                   implicit=opts.one_of('implicit', ('port', 'algorithm')))
    passes = (Pass('train_b', False, update=('params',)),
              Pass('train', False, rule='collect'),
              Pass('train', False, update=('scores',), rule='bilevel', **bilevel))
    scope = opts.one_of('threshold', ('global', 'layer'))
    runs = []
    for s in sparsity_levels(config):
        joint = Stage('bip', opts.integer('epochs'), params=opts.optimizer('weights'),
                      scores=opts.optimizer('scores'), passes=passes, mask_mode='learned',
                      density=1.0 - s, threshold_scope=scope, start=(InitScores(), LabelMap()))
        stages = (joint,)
        if opts.epochs('tuning'):
            stages += (tuning_stage(opts, 'tuning', start=(MaskFrom('scores', 1.0 - s, scope),),
                                    passes=UNPROMPTED),)
        runs.append(Run(NAME, s, stages))
    return runs


def research(dataset: str) -> dict:
    table = {'oxford_flowers102': {'scores.optimizer': 'sgd', 'scores.lr': 0.01},
             'stanford_cars': {'scores.lr': 1e-3}}
    return table.get(dataset, {})
