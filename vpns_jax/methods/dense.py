"""Dense fine-tuning: the reference point, and the shared first step of OMP, LTH and the pilot.

Reference §5.0: SGD(0.01, momentum 0.9, L2 1e-4), cosine per epoch, one un-prompted pass on the
augmented batch per iteration, 120 epochs, label mapping of the pretrained network.
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.methods.plan import LabelMap, Options, Run, train_block
from vpns_jax.train.stages import UNPROMPTED, Stage

NAME = 'dense'
MASKLESS = True  # with config.mask_from it runs as usual: the dense reference of a transfer (Fig. 6)


def default_config() -> mlc.ConfigDict:
    return train_block(120, 'sgd', 0.01)


def finetune_stage(config: mlc.ConfigDict) -> Stage:
    """The dense fine-tune (one stage; its result is shared by every run that starts with it)."""
    opts = Options.of(config, NAME)
    return Stage('finetune', opts.integer('epochs'), params=opts.optimizer(), passes=UNPROMPTED,
                 mask_mode='none', start=(LabelMap(),))


def plan(config: mlc.ConfigDict) -> list[Run]:
    return [Run(NAME, 0.0, (finetune_stage(config),))]


def research(dataset: str) -> dict:
    return {'optimizer': 'adam', 'lr': 1e-3} if dataset == 'stanford_cars' else {}
