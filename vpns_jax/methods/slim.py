"""Slim: Network Slimming (Liu et al. 2017) as Torch-Pruning's BNScalePruner recipe (Fang et al. 2023).

1. sparse training: fine-tuning of the pretrained network (SGD 0.01, momentum 0.9, L2 1e-4, cosine,
   un-prompted) with the L1 sparsity term lambda * sum |gamma| on every BatchNorm scale, i.e.
   lambda * sign(gamma) added to gamma's gradient before the step (`Stage.bn_l1`). lambda = 1e-5:
   Network Slimming's value for ResNet (1e-4 for VGG; its code's `--s`) and Torch-Pruning's
   BNScalePruner default `reg=1e-5`;
2. channel selection (`channel_select`): importance |gamma| of the group's BatchNorms, averaged over
   them (BNScaleImportance's group_reduction 'mean'; 'sum' possible), normalised by the group's mean
   (its default normalizer), then the same global threshold and 25% cap as channel VPNs
   (`scope='layer'`: every group at its own fraction); label mapping of the pruned network;
3. fine-tuning with the channel mask fixed (SGD 0.01, cosine).
Epochs 10 + 30: the same 40 as channel VPNs' 5 + 5 + 30. No Slim code is in the VPNs repositories
(reference §6); these are the defaults of the two sources above.
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.errors import ConfigError
from vpns_jax.methods import channel_select
from vpns_jax.methods.plan import (
    LabelMap,
    Options,
    Run,
    train_block,
)
from vpns_jax.train.stages import UNPROMPTED, Stage

NAME = 'slim'


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'sparse': train_block(10, 'sgd', 0.01),
        'l1': 1e-5,  # lambda of lambda * sum |gamma|
        'tuning': train_block(30, 'sgd', 0.01),
        'cap': 0.25,
        'scope': 'global',  # global | layer
        'reduction': 'mean',  # over the group's BatchNorms: mean | sum
        'normalizer': 'mean',  # per group: mean | max | sum | none
    })


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    channel_select.check_arch(config.arch, NAME)
    if config.arch == 'vgg16':
        raise ConfigError("config.arch = 'vgg16' has no BatchNorm, and Slim prunes by BatchNorm "
                          "scales; use vgg16_bn, or method depgraph / channel_vpns.")
    options = (('normalizer', opts.one_of('normalizer', channel_select.NORMALIZERS)),
               ('reduction', opts.one_of('reduction', channel_select.REDUCTIONS)))
    sparse = Stage('slim_sparse', opts.epochs('sparse'), params=opts.optimizer('sparse'),
                   passes=UNPROMPTED, mask_mode='none', bn_l1=opts.number('l1'),
                   start=(LabelMap(),))
    return channel_select.select_then_tune_runs(NAME, config, opts, 'bn_scale', options, (sparse,))
