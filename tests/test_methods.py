"""Method recipes: defaults equal the reference sheet, switches, registry, end-to-end smoke."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_train_support import LABEL_MAP, SPEC, TinyNet, batch, init_variables, snapshot

from vpns_jax import methods, prompts
from vpns_jax.errors import ConfigError
from vpns_jax.train import loop, steps
from vpns_jax.train.stages import (
    FROZEN,
    PROMPTED_ONLY,
    TWO_PASSES,
    UNPROMPTED,
    GroupOptimizer,
)
from vpns_jax.train.state import begin_stage, create_state

ADAM_1E4 = GroupOptimizer('adam', 1e-4, 0.0, 1e-4, 'cosine')
SGD_001 = GroupOptimizer('sgd', 0.01, 0.9, 1e-4, 'cosine')


def test_registry():
    assert methods.names() == ['dense', 'hydra', 'vpns']
    with pytest.raises(ConfigError, match='dense, hydra, vpns'):
        methods.get('omp_typo')
    with pytest.raises(ConfigError, match='no option'):
        methods.make_config('vpns', {'lr': 1.0})


def test_vpns_defaults_are_the_released_code():
    mf, tune = methods.stages('vpns', {'density': 0.3})
    assert (mf.name, mf.epochs, tune.name, tune.epochs) == ('mask_finding', 30, 'tuning', 30)
    assert (mf.params, mf.scores, mf.prompt) == (FROZEN, ADAM_1E4, ADAM_1E4)
    assert (tune.params, tune.scores, tune.prompt) == (SGD_001, FROZEN, SGD_001)
    assert mf.passes == tune.passes == TWO_PASSES
    assert (mf.mask_mode, tune.mask_mode) == ('learned', 'fixed')
    assert mf.density == tune.density == 0.3
    assert mf.threshold_scope == 'global'
    assert methods.make_config('vpns').prompt_at_test is False
    assert mf.steps_per_iteration == 2


def test_vpns_switches():
    mf, tune = methods.stages('vpns', {'passes': 'prompted_only'})
    assert mf.passes == tune.passes == PROMPTED_ONLY
    mf, tune = methods.stages('vpns', {'prompt_in': 'mask_finding'})
    assert mf.passes == TWO_PASSES and tune.passes == UNPROMPTED and tune.prompt == FROZEN
    mf, tune = methods.stages('vpns', {'prompt_in': 'tuning', 'prompt_mask_finding_lr': 1e-3})
    assert mf.passes == UNPROMPTED and mf.prompt == FROZEN and tune.prompt == SGD_001
    mf, _ = methods.stages('vpns', {'prompt_mask_finding_lr': 1e-3,
                                    'prompt_mask_finding_schedule': 'multistep'})
    assert (mf.prompt.lr, mf.prompt.schedule, mf.scores.lr) == (1e-3, 'multistep', 1e-4)
    with pytest.raises(ConfigError):
        methods.make_config('vpns', {'passes': 'three'})


def test_hydra_defaults_and_paper_switch():
    mf, tune = methods.stages('hydra')
    assert (mf.epochs, tune.epochs) == (60, 60)
    assert mf.scores == SGD_001 and mf.prompt == FROZEN and mf.params == FROZEN
    assert tune.params == SGD_001 and tune.prompt == FROZEN
    assert mf.passes == tune.passes == UNPROMPTED
    mf, _ = methods.stages('hydra', {'score_optimizer': 'adam', 'score_lr': 1e-4,
                                     'threshold_scope': 'layer'})
    assert mf.scores == ADAM_1E4 and mf.threshold_scope == 'layer'
    assert not methods.get('hydra').USES_PROMPT


def test_dense_recipe():
    (ft,) = methods.stages('dense')
    assert ft.epochs == 120 and ft.params == SGD_001 and ft.mask_mode == 'none'
    assert ft.passes == UNPROMPTED and ft.scores == FROZEN and ft.prompt == FROZEN
    assert methods.get('dense').init_scores({'w': jnp.ones(2)}) == {}


def _loaders(n_iter: int = 2):
    return {'prompt': lambda e: [batch(10 * e + i) for i in range(n_iter)],
            'train': lambda e: [batch(10 * e + 5 + i) for i in range(n_iter)]}


@pytest.mark.parametrize('name', ['vpns', 'hydra', 'dense'])
def test_recipe_end_to_end(name):
    """Orchestrator path: state from variables, every stage of the recipe, evaluation, export."""
    method = methods.get(name)
    epochs = {'epochs': 1} if name == 'dense' else {'mask_finding_epochs': 1, 'tuning_epochs': 1}
    density = {} if name == 'dense' else {'density': 0.4}
    config = methods.make_config(name, {**epochs, **density})
    variables = init_variables(0)
    state = create_state(
        variables, rng=jax.random.PRNGKey(0),
        scores=method.init_scores(variables['params']),
        prompt=prompts.init_prompt(SPEC) if method.USES_PROMPT else None)
    results = []
    scores_before_tuning = None
    for stage in method.recipe(config):
        state = begin_stage(stage, state)
        if stage.mask_mode == 'fixed':
            scores_before_tuning = snapshot(state.scores)
        state, result = loop.run_stage(stage, state, TinyNet(), _loaders(), prompt_spec=SPEC,
                                       label_map=jnp.asarray(LABEL_MAP), log_every=0)
        results.append(result)
    assert [r.gradient_steps for r in results] == [
        2 * s.steps_per_iteration for s in method.recipe(config)]
    ev = loop.evaluate(methods_eval(stage, method, config), state, [batch(99)],
                       jnp.asarray(LABEL_MAP))
    assert ev['count'] == 6 and 0 <= ev['accuracy'] <= 1
    if name == 'dense':
        return
    flat = traverse_util.flatten_dict(snapshot(state.params), sep='/')
    total = sum(flat[p].size for p in state.scores)
    zeros = sum(int(np.sum(flat[p] == 0)) for p in state.scores)
    assert zeros == math.floor(0.6 * total)  # exported weights exactly sparse
    for p, s in snapshot(state.scores).items():
        np.testing.assert_array_equal(s, scores_before_tuning[p])


def methods_eval(stage, method, config):
    prompted = method.USES_PROMPT and getattr(config, 'prompt_at_test', False)
    return steps.make_eval_step(stage, TinyNet(), SPEC, prompted=prompted)
