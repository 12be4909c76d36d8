"""The pilot study (paper §2.1, Fig. 1, reference §8): a visual prompt trained AFTER pruning.

zero_shot: the source method's mask on weights that are not fine-tuned (OMP: rewound pretrained;
Random/SNIP/SynFlow: pretrained; HYDRA: its mask-finding stage), then only the prompt trains on
non-augmented batches, label mapping re-run every epoch through the prompt. fine_tune: the source
method's whole run (mask + weight fine-tuning), then the same prompt training. Rows `vp_after_<source>` and
`vp_after_<source>_ft` report the accuracy with the prompt, and without it the pruned network's
before the prompt trains (Fig. 1's two curves; BN statistics move during prompt training, train mode).
"""
from __future__ import annotations

import ml_collections as mlc

from vpns_jax import methods
from vpns_jax.methods.plan import InitPrompt, LabelMap, Options, Run
from vpns_jax.train.stages import Pass, Stage

NAME = 'post_prompt'
SOURCES = ('omp', 'random', 'snip', 'synflow', 'hydra')
MODES = ('zero_shot', 'fine_tune')


def default_config() -> mlc.ConfigDict:
    prompt = mlc.ConfigDict({'epochs': 120, 'optimizer': 'adam', 'lr': 0.01, 'momentum': 0.9,
                             'weight_decay': 0.0, 'schedule': 'cosine'})
    return mlc.ConfigDict({'sources': SOURCES, 'modes': MODES, 'prompt': prompt})


def _prompt_stage(opts: Options, start: tuple) -> Stage:
    """Only the prompt trains (weights frozen under the mask); FLM re-run every epoch."""
    return Stage('prompt', opts.epochs('prompt'), prompt=opts.optimizer('prompt'),
                 passes=(Pass('prompt', True),), mask_mode='fixed', remap_every_epoch=True,
                 report_start=True, start=start + (InitPrompt(),))


def plan(config: mlc.ConfigDict) -> list[Run]:
    opts = Options.of(config, NAME)
    modes = opts.subset('modes', MODES)
    runs = []
    for source in opts.subset('sources', SOURCES):
        for s in methods.levels(config, source):
            if 'zero_shot' in modes:
                mask = methods.mask_source(config, source, s)
                start = mask.actions + (LabelMap(),)  # the pruned network's own mapping
                runs.append(Run(f'vp_after_{source}', s, mask.stages + (_prompt_stage(opts, start),),
                                has_prompt=True, prompt_at_test=True))
            if 'fine_tune' in modes:
                (base,) = [r for r in methods.runs(config, source) if r.sparsity == s]
                # keeps the fine-tuned run's mapping until the first re-mapping
                runs.append(Run(f'vp_after_{source}_ft', s,
                                base.stages + (_prompt_stage(opts, ()),), has_prompt=True,
                                prompt_at_test=True))
    return runs
