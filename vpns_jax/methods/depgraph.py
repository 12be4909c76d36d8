"""DepGraph-style group pruning (Fang et al. 2023, Torch-Pruning's MagnitudePruner recipe).

1. warm-up: dense fine-tuning of the pretrained network on the downstream task (SGD 0.01, momentum
   0.9, L2 1e-4, cosine, un-prompted; 10 epochs, `warmup.epochs=0` prunes the pretrained weights
   directly);
2. channel selection (`channel_select`): group importance by magnitude, Torch-Pruning's
   GroupMagnitudeImportance defaults: p = 2 (sum of squares over each parameter slice of a channel:
   producer kernels' output slices, the group's BN gamma, consumer kernels' input slices), mean over
   the group's slices, normalised by the group's mean, biases and BN beta left out (`bias=True`
   adds them); the same global threshold and 25% cap as channel VPNs (`scope='layer'`: every group
   at its own fraction, Torch-Pruning's global_pruning=False); label mapping of the pruned network;
3. fine-tuning with the channel mask fixed (SGD 0.01, cosine, 30 epochs: 40 in all, as channel
   VPNs' 5 + 5 + 30).
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods import channel_select
from vpns_jax.methods.plan import (
    LabelMap,
    Options,
    Run,
    train_block,
)
from vpns_jax.train.stages import UNPROMPTED, Stage

NAME = 'depgraph'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'warmup': train_block(10, 'sgd', 0.01),
        'tuning': train_block(30, 'sgd', 0.01),
        'cap': 0.25,
        'scope': 'global',  # global | layer
        'p': 2.0,  # importance of a slice: sum |w|^p
        'reduction': 'mean',  # over the group's parameter slices: mean | sum
        'normalizer': 'mean',  # per group: mean | max | sum | none
        'bias': False,  # add producer biases and BN beta to their layer's entry
    })


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    channel_select.check_arch(config.arch, NAME)
    options = (('bias', opts.flag('bias')),
               ('normalizer', opts.one_of('normalizer', channel_select.NORMALIZERS)),
               ('p', opts.number('p', minimum=0.0, strict=True)),
               ('reduction', opts.one_of('reduction', channel_select.REDUCTIONS)))
    before: tuple[Stage, ...] = ()
    if opts.epochs('warmup'):
        before = (Stage('depgraph_warmup', opts.epochs('warmup'), params=opts.optimizer('warmup'),
                        passes=UNPROMPTED, mask_mode='none', start=(LabelMap(),)),)
    return channel_select.select_then_tune_runs(NAME, config, opts, 'magnitude', options, before)
