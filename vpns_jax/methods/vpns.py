"""VPNs: mask finding (scores + prompt, Adam) then subnetwork tuning (weights + prompt, SGD).

Defaults are the released code (reference §4): 30 + 30 epochs; mask finding Adam(1e-4, L2 1e-4) on
scores and prompt, weights/biases/BN affine frozen; tuning SGD(0.01, momentum 0.9, L2 1e-4) on weights,
biases, BN affine and prompt with the mask fixed; cosine per epoch; two passes per iteration (prompted
non-augmented batch, then un-prompted augmented batch); global threshold; label mapping once after the
initial mask with the zero prompt; no prompt at test time. Switches: `passes='prompted_only'` (paper
Eq. 5/6), `prompt_stages` (Fig. A11), `threshold='layer'` (original HYDRA), `at_test=True`.
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax.errors import ConfigError
from vpns_jax.methods import hydra
from vpns_jax.methods.plan import MaskSource, Options, Run, sparsity_levels, train_block
from vpns_jax.train.stages import FROZEN, UNPROMPTED, passes_preset

NAME = 'vpns'
PROMPT_STAGES = ('both', 'mask_finding', 'tuning')


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'mask_finding': train_block(30, 'adam', 1e-4, prompt_lr=1e-4),
        'tuning': train_block(30, 'sgd', 0.01, prompt_lr=0.01),
        'passes': 'two',  # two (released) | prompted_only (paper Eq. 5/6)
        'prompt_stages': 'both',  # both | mask_finding | tuning
        'threshold': 'global',  # global (released) | layer (original HYDRA)
        'at_test': False,  # the released code evaluates without the prompt
    })


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    prompted = passes_preset(opts.one_of('passes', ('two', 'prompted_only')))
    where = opts.one_of('prompt_stages', PROMPT_STAGES)
    in_mf, in_tune = where in ('both', 'mask_finding'), where in ('both', 'tuning')
    at_test = opts.flag('at_test')
    return [Run(NAME, s, hydra.mask_then_tune(
        opts, 1.0 - s, mask_finding_passes=prompted if in_mf else UNPROMPTED,
        tuning_passes=prompted if in_tune else UNPROMPTED,
        mask_finding_prompt=opts.prompt_optimizer('mask_finding') if in_mf else FROZEN,
        tuning_prompt=opts.prompt_optimizer('tuning') if in_tune else FROZEN),
        has_prompt=True, prompt_at_test=at_test) for s in sparsity_levels(config)]


def transfer(config: mlc.ConfigDict, mask: MaskSource, sparsity: float) -> Run:
    """VPNs' tuning stage on a given mask (config.mask_from): weights + prompt from the zero
    prompt, with its passes, FLM through the zero prompt once the mask is set."""
    opts = Options.of(config, NAME)
    if opts.one_of('prompt_stages', PROMPT_STAGES) == 'mask_finding':
        raise ConfigError("config.vpns.prompt_stages = 'mask_finding' trains the prompt only while "
                          "finding the mask, and with config.mask_from the mask is given: use "
                          "'both' or 'tuning'.")
    passes = passes_preset(opts.one_of('passes', ('two', 'prompted_only')))
    return Run(NAME, sparsity, hydra.tune_given_mask(opts, mask, passes=passes,
                                                     prompt=opts.prompt_optimizer('tuning')),
               has_prompt=True, prompt_at_test=opts.flag('at_test'))


def research(dataset: str) -> dict:
    """The authors' per-dataset scripts (reference §4.3)."""
    adam = {'optimizer': 'adam', 'lr': 1e-3, 'prompt_lr': 1e-3}
    table = {
        'oxford_flowers102': {'tuning': adam, 'mask_finding': adam},
        'stanford_cars': {'tuning': adam, 'mask_finding': adam},
        'oxford_iiit_pet': {'mask_finding': {'optimizer': 'sgd', 'lr': 0.05, 'prompt_lr': 0.05}},
    }
    return {f'{stage}.{k}': v for stage, block in table.get(dataset, {}).items()
            for k, v in block.items()}
