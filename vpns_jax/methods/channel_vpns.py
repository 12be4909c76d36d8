"""Channel VPNs (reference §6): the structured variant of VPNs, whole conv channels pruned.

Three stages, as the authors' research script `vpns/vpns_structured.py`:
1. warm-up: dense fine-tuning WITH the prompt, the two-pass iteration (weights SGD 0.01, momentum
   0.9, L2 1e-4; prompt SGD 0.01, as VPNs' tuning stage), frequency label mapping once at its start
   through the zero prompt (kept for the whole run: the warm-up trains the network to it);
2. channel mask finding: one score per channel of every channel group (`vpns_jax.structured`;
   channels coupled by residual additions share one score), Kaiming-uniform init U(-1, 1), no
   scaled init; Adam with the script's lr 1 and L2 0.1 on the scores, gradient VALUE clipping at
   0.25 before each score step; prompt Adam 1e-3 (L2 1e-4); weights, biases and BN affine frozen
   (BN statistics update); the channel threshold (global, capped groups at most `cap` = 0.25:
   ResNet's stem and layer1) recomputed after every score step;
3. tuning: the learned channels frozen (`ChannelMaskFrom('scores')`: the same threshold), weights and
   prompt SGD 0.01 (L2 1e-4) with the two passes, cosine.
Epochs 5 / 5 / 30 (the script's hard-coded schedule). Tested without the prompt, as VPNs
(`at_test=True` for the prompted accuracy).
"""
from __future__ import annotations

import dataclasses

import ml_collections as mlc

from vpns_jax.methods import channel_select
from vpns_jax.methods.plan import (
    ChannelMaskFrom,
    InitChannelScores,
    InitPrompt,
    LabelMap,
    Options,
    Run,
    sparsity_levels,
    train_block,
    tuning_stage,
)
from vpns_jax.train.stages import Stage, make_group_optimizer, passes_preset

NAME = 'channel_vpns'


def default_config() -> mlc.ConfigDict:
    mask_finding = train_block(5, 'adam', 1.0, weight_decay=0.1)
    mask_finding.update(clip=0.25, prompt_lr=1e-3, prompt_weight_decay=1e-4)
    return mlc.ConfigDict({
        'warmup': train_block(5, 'sgd', 0.01, prompt_lr=0.01),
        'mask_finding': mask_finding,
        'tuning': train_block(30, 'sgd', 0.01, prompt_lr=0.01),
        'cap': 0.25,  # the most channel sparsity of the capped groups (ResNet: stem and layer1)
        'passes': 'two',  # two (the research code) | prompted_only (paper Eq. 5/6)
        'at_test': False,
    })


def warmup_stage(opts: Options, passes: tuple) -> Stage:
    """Dense fine-tuning with the prompt; shared by every channel sparsity."""
    return Stage('warmup', opts.epochs('warmup'), params=opts.optimizer('warmup'),
                 prompt=opts.prompt_optimizer('warmup'), passes=passes, mask_mode='none',
                 start=(InitPrompt(), LabelMap(prompted=True)))


def mask_finding_stage(opts: Options, density: float, passes: tuple, cap: float) -> Stage:
    """Channel scores learn (Adam, value clipping) with the prompt; weights frozen."""
    block = opts.sub('mask_finding')
    scores = dataclasses.replace(opts.optimizer('mask_finding'),
                                 clip=block.number('clip'))
    prompt = make_group_optimizer('adam', block.number('prompt_lr', strict=True),
                                  weight_decay=block.number('prompt_weight_decay'),
                                  schedule=block.one_of('schedule', ('cosine', 'multistep',
                                                                     'constant')))
    return Stage('channel_mask_finding', opts.epochs('mask_finding'), scores=scores, prompt=prompt,
                 passes=passes, mask_mode='channel', density=density, channel_cap=cap,
                 start=(InitChannelScores(),))


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    channel_select.check_arch(config.arch, NAME)
    passes = passes_preset(opts.one_of('passes', ('two', 'prompted_only')))
    cap = channel_select.read_cap(opts)
    at_test = opts.flag('at_test')
    warmup = warmup_stage(opts, passes)
    runs = []
    for s in sparsity_levels(config):
        mf = mask_finding_stage(opts, 1.0 - s, passes, cap)
        tune = tuning_stage(opts, 'tuning', start=(ChannelMaskFrom('scores', 1.0 - s, cap),),
                            passes=passes, prompt=opts.prompt_optimizer('tuning'))
        runs.append(Run(NAME, s, (warmup, mf, tune), has_prompt=True, prompt_at_test=at_test,
                        structured=True))
    return runs
