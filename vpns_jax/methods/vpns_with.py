"""The VPNs paradigm on other pruners (paper Fig. 7, reference §5.10): the baseline's mask as usual
(Random, OMP, LTH), then the VPNs two-pass weight + prompt tuning (30 epochs) from the zero prompt;
evaluation applies the prompt. One row per source, method label `vpns_w_<source>`."""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax import methods
from vpns_jax.methods.plan import InitPrompt, LabelMap, Options, Run, train_block, tuning_stage
from vpns_jax.train.stages import passes_preset

NAME = 'vpns_with'
SOURCES = ('random', 'omp', 'lth')


def default_config() -> mlc.ConfigDict:
    return mlc.ConfigDict({
        'sources': SOURCES,
        'tuning': train_block(30, 'sgd', 0.01, prompt_lr=0.01),
        'passes': 'two',
        'at_test': True,  # the algorithm-transfer scripts evaluate with the prompt
    })


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    passes = passes_preset(opts.one_of('passes', ('two', 'prompted_only')))
    at_test = opts.flag('at_test')
    runs = []
    for source in opts.subset('sources', SOURCES):
        for s in methods.levels(config, source):
            mask = methods.mask_source(config, source, s)
            tune = tuning_stage(opts, 'tuning', name='vp_tuning', passes=passes,
                                prompt=opts.prompt_optimizer('tuning'),
                                start=mask.actions + (InitPrompt(), LabelMap(prompted=True)))
            runs.append(Run(f'vpns_w_{source}', s, mask.stages + (tune,), has_prompt=True,
                            prompt_at_test=at_test))
    return runs
