"""Method plans: defaults equal the reference sheet, switches, shared prefixes, the registry, errors."""
from __future__ import annotations

import numpy as np
import pytest

from vpns_jax import config as config_lib
from vpns_jax import methods
from vpns_jax.errors import ConfigError
from vpns_jax.methods import dense, lth
from vpns_jax.methods.plan import InitPrompt, InitScores, LabelMap, MaskFrom, Rewind
from vpns_jax.runner import stage_keys, stage_rng
from vpns_jax.train.stages import (
    FROZEN,
    PROMPTED_ONLY,
    TWO_PASSES,
    UNPROMPTED,
    GroupOptimizer,
    Pass,
)

ADAM_1E4 = GroupOptimizer('adam', 1e-4, 0.0, 1e-4, 'cosine')
SGD_001 = GroupOptimizer('sgd', 0.01, 0.9, 1e-4, 'cosine')
PAPER_METHODS = ('dense', 'vpns', 'hydra', 'random', 'omp', 'lth', 'snip', 'grasp', 'synflow', 'bip',
                 'vpns_with', 'post_prompt')
STRUCTURED_METHODS = ('channel_vpns', 'slim', 'depgraph')  # tests/test_structured_methods.py


def cfg(**changes):
    c = config_lib.default_config()
    c.weights = 'w.safetensors'
    config_lib.apply_overrides(c, changes)
    return c


def runs(name, **changes):
    return methods.runs(cfg(**changes), name)


def test_registry_has_every_paper_method():
    assert tuple(methods.names()) == PAPER_METHODS + STRUCTURED_METHODS
    with pytest.raises(ConfigError, match='unknown method .omp_typo.*dense, vpns, hydra'):
        methods.get('omp_typo')


def test_vpns_defaults_are_the_released_code():
    (run,) = runs('vpns', sparsities=(0.7,))
    mf, tune = run.stages
    assert (mf.name, mf.epochs, tune.name, tune.epochs) == ('mask_finding', 30, 'tuning', 30)
    assert (mf.params, mf.scores, mf.prompt) == (FROZEN, ADAM_1E4, ADAM_1E4)
    assert (tune.params, tune.scores, tune.prompt) == (SGD_001, FROZEN, SGD_001)
    assert mf.passes == tune.passes == TWO_PASSES
    assert (mf.mask_mode, tune.mask_mode) == ('learned', 'fixed')
    assert mf.density == pytest.approx(0.3) and mf.threshold_scope == 'global'
    # FLM once, after the initial mask, with the zero prompt (reference §2); tuning freezes the mask.
    assert mf.start == (InitScores(), InitPrompt(), LabelMap(prompted=True))
    assert tune.start == (MaskFrom('scores', mf.density, 'global'),)
    assert run.has_prompt and not run.prompt_at_test
    assert mf.steps_per_iteration == 2


def test_vpns_switches():
    (run,) = runs('vpns', sparsities=(0.5,), **{'vpns.passes': 'prompted_only'})
    assert run.stages[0].passes == run.stages[1].passes == PROMPTED_ONLY
    (run,) = runs('vpns', sparsities=(0.5,), **{'vpns.prompt_stages': 'mask_finding'})
    mf, tune = run.stages
    assert mf.passes == TWO_PASSES and tune.passes == UNPROMPTED and tune.prompt == FROZEN
    (run,) = runs('vpns', sparsities=(0.5,), **{'vpns.prompt_stages': 'tuning',
                                                 'vpns.threshold': 'layer', 'vpns.at_test': True})
    mf, tune = run.stages
    assert mf.passes == UNPROMPTED and mf.prompt == FROZEN and tune.prompt == SGD_001
    assert mf.start == (InitScores(), LabelMap(prompted=False))  # no prompt before tuning
    assert mf.threshold_scope == 'layer' and run.prompt_at_test


def test_hydra_defaults_and_paper_switch():
    (run,) = runs('hydra', sparsities=(0.5,))
    mf, tune = run.stages
    assert (mf.epochs, tune.epochs) == (60, 60)
    assert mf.scores == SGD_001 and mf.prompt == FROZEN and mf.params == FROZEN
    assert tune.params == SGD_001 and tune.prompt == FROZEN
    assert mf.passes == tune.passes == UNPROMPTED and not run.has_prompt
    (run,) = runs('hydra', sparsities=(0.5,), **{'hydra.mask_finding.optimizer': 'adam',
                                                  'hydra.mask_finding.lr': 1e-4})
    assert run.stages[0].scores == ADAM_1E4


def test_dense_and_pruning_at_init_recipes():
    (run,) = runs('dense')
    (ft,) = run.stages
    assert ft.epochs == 120 and ft.params == SGD_001 and ft.mask_mode == 'none'
    assert ft.passes == UNPROMPTED and ft.start == (LabelMap(),) and run.sparsity == 0.0
    for name, options in [('random', (('mode', 'bernoulli'),)), ('snip', ()),
                          ('grasp', (('mask_mode', 'ratios'), ('samples_per_class', 0),
                                     ('temperature', 200.0))),
                          ('synflow', (('input', 'batch'), ('iterations', 100)))]:
        (run,) = runs(name, sparsities=(0.9,))
        (tune,) = run.stages  # on the pretrained weights, then fine-tuning (§5.7)
        assert tune.start[0] == MaskFrom(name, pytest.approx(0.1), 'global', options), name
        assert tune.start[1:] == (LabelMap(),)
        assert (tune.epochs, tune.params, tune.mask_mode, tune.passes) == (
            120, SGD_001, 'fixed', UNPROMPTED)


def test_omp_fine_tunes_dense_then_rewinds():
    a, b = runs('omp', sparsities=(0.5, 0.9))
    assert a.stages[0] == b.stages[0] == dense.finetune_stage(cfg())
    assert b.stages[1].start == (MaskFrom('magnitude', pytest.approx(0.1)), Rewind(), LabelMap())
    # The shared dense fine-tune has one key whoever needs it: computed once per workdir.
    (d,) = runs('dense')
    keys = {tuple(stage_keys('base', r.stages))[0] for r in (a, b, d)}
    assert len(keys) == 1


def test_lth_rounds_share_prefixes_and_name_their_sparsities():
    r1, r2, r3 = runs('lth', **{'lth.rounds': 3})
    assert [r.sparsity for r in (r1, r2, r3)] == [0.2, 0.36, 0.488]
    assert [len(r.stages) for r in (r1, r2, r3)] == [2, 3, 4]
    k1, k2, k3 = (stage_keys('base', r.stages) for r in (r1, r2, r3))
    assert k2[:2] == k1 and k3[:3] == k2  # round r + 1 starts from round r
    assert r3.stages[3].start == (MaskFrom('magnitude', pytest.approx(0.8), within_current=True),
                                  Rewind(), LabelMap())
    # rounds=0: the rounds config.sparsities names; every round up to the last is a row.
    assert [r.sparsity for r in runs('lth', sparsities=(0.36, 0.2))] == [0.2, 0.36]
    with pytest.raises(ConfigError, match=r'0\.5 is not on LTH.*rounds are 3 \(0\.4880\) and 4 '
                                          r'\(0\.5904\).*lth\.rounds'):
        runs('lth', sparsities=(0.5,))
    assert lth.round_of(cfg(), 0.8926) == 10


def test_bip_is_one_bilevel_stage():
    (run,) = runs('bip', sparsities=(0.6,))
    (stage,) = run.stages
    assert stage.epochs == 60 and stage.mask_mode == 'learned'
    assert (stage.params, stage.scores) == (SGD_001, ADAM_1E4)
    lower, collect, upper = stage.passes
    assert lower == Pass('train_b', False, update=('params',))
    assert collect.rule == 'collect' and collect.view == upper.view == 'train'
    assert (upper.update, upper.rule, upper.bilevel_lr, upper.implicit) == (
        ('scores',), 'bilevel', 1e-4, 'port')
    assert stage.steps_per_iteration == 2
    (run,) = runs('bip', sparsities=(0.6,), **{'bip.tuning.epochs': 5, 'bip.implicit': 'algorithm'})
    assert run.stages[1].epochs == 5 and run.stages[0].passes[2].implicit == 'algorithm'


def test_vpns_with_reuses_the_baselines_masks():
    c = cfg(sparsities=(0.36,), **{'lth.rounds': 2})
    with_runs = {r.method: r for r in methods.runs(c, 'vpns_with')}
    assert set(with_runs) == {'vpns_w_random', 'vpns_w_omp', 'vpns_w_lth'}
    omp_run = methods.runs(c, 'omp')[0]
    lth_runs = methods.runs(c, 'lth')
    vp_omp = [r for r in methods.runs(c, 'vpns_with') if r.method == 'vpns_w_omp'][0]
    assert vp_omp.stages[0] == omp_run.stages[0]  # the same dense fine-tune
    vp_lth = [r for r in methods.runs(c, 'vpns_with') if r.method == 'vpns_w_lth']
    assert [r.sparsity for r in vp_lth] == [0.2, 0.36]
    assert vp_lth[1].stages[:2] == lth_runs[1].stages[:2]  # LTH's round-1 result
    tune = vp_omp.stages[-1]
    assert tune.passes == TWO_PASSES and tune.prompt == SGD_001 and tune.epochs == 30
    assert tune.start[-2:] == (InitPrompt(), LabelMap(prompted=True))
    assert vp_omp.prompt_at_test  # the algorithm-transfer scripts test with the prompt


def test_post_prompt_pilot():
    c = cfg(sparsities=(0.5,), **{'post_prompt.sources': ('omp', 'hydra')})
    got = {r.method: r for r in methods.runs(c, 'post_prompt')}
    assert set(got) == {'vp_after_omp', 'vp_after_omp_ft', 'vp_after_hydra', 'vp_after_hydra_ft'}
    zero_shot = got['vp_after_omp'].stages
    assert [s.name for s in zero_shot] == ['finetune', 'prompt']
    prompt = zero_shot[-1]
    assert prompt.params == FROZEN and prompt.prompt.kind == 'adam' and prompt.remap_every_epoch
    assert prompt.passes == (Pass('prompt', True),) and prompt.mask_mode == 'fixed'
    assert got['vp_after_omp_ft'].stages[:2] == methods.runs(c, 'omp')[0].stages
    assert [s.name for s in got['vp_after_hydra'].stages] == ['mask_finding', 'prompt']


@pytest.mark.parametrize('changes, message', [
    ({'lth.rounds': -1}, r'config\.lth\.rounds = -1'),
    ({'grasp.temperature': 0.0}, r'config\.grasp\.temperature = 0\.0'),
    ({'synflow.input': 'noise'}, r"config\.synflow\.input = 'noise'.*'batch', 'ones'"),
    ({'post_prompt.modes': ('zero_shot', 'later')}, r'config\.post_prompt\.modes'),
    ({'bip.scores.optimizer': 'rmsprop'}, r"config\.bip\.scores\.optimizer = 'rmsprop'"),
    ({'vpns.tuning.epochs': 2, 'prompt.pad_size': 0},
     r"config\.prompt\.pad_size = 0.*method 'vpns' trains a visual prompt"),
])
def test_bad_method_option_is_named(changes, message):
    method = next(iter(changes)).split('.')[0]
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(cfg(methods=method, **changes))


def test_every_run_gets_its_own_random_stream():
    """A real hash of the chain (method, sparsity, round...), not a sum of character codes."""
    a, b = runs('vpns', sparsities=(0.59, 0.95))
    ka, kb = stage_keys('base', a.stages)[0], stage_keys('base', b.stages)[0]
    assert ka != kb
    assert not np.array_equal(np.asarray(stage_rng(7, ka)), np.asarray(stage_rng(7, kb)))
    assert not np.array_equal(np.asarray(stage_rng(7, ka)), np.asarray(stage_rng(9, ka)))
    np.testing.assert_array_equal(np.asarray(stage_rng(7, ka)), np.asarray(stage_rng(7, ka)))
