"""The generic loop: zipped views, bookkeeping, hooks (ILM re-mapping), resume, evaluation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_support import (
    LABEL_MAP,
    SPEC,
    TinyNet,
    batch,
    init_variables,
    leaves_equal_bits,
    random_prompt,
    snapshot,
)

from vpns_jax import sparsity
from vpns_jax.train import loop, optim, steps
from vpns_jax.train.stages import TWO_PASSES, Stage, adam
from vpns_jax.train.state import begin_stage, create_state

STAGE = Stage('mask_finding', 3, scores=adam(0.05, 1e-2), prompt=adam(0.05, 1e-2),
              passes=TWO_PASSES, mask_mode='learned', density=0.5)
ITERS = 2


class SeekLoader:
    """Like data.pipeline.TrainLoader: ``epoch(e, start_step=k)`` and ``len``."""

    def __init__(self, make):
        self.make, self.starts = make, []

    def epoch(self, e, start_step=0):
        self.starts.append((e, start_step))
        return iter(self.make(e)[start_step:])

    def __len__(self):
        return ITERS


def loaders():
    """Deterministic per epoch; the two views differ; 'prompt' seeks, 'train' is a callable."""
    return {'prompt': SeekLoader(lambda e: [batch(100 * e + i) for i in range(ITERS)]),
            'train': lambda e: [batch(100 * e + 50 + i) for i in range(ITERS + 1)]}


@pytest.fixture(scope='module')
def variables():
    return init_variables(0)


def fresh(variables):
    scores = sparsity.scaled_score_init(variables['params'])
    state = create_state(variables, rng=jax.random.PRNGKey(3), scores=scores,
                         prompt=random_prompt(2))
    return begin_stage(STAGE, state)


@pytest.fixture(scope='module')
def full_run(variables):
    seen = []

    def hook(end: loop.EpochEnd):
        seen.append((end.epoch, None if end.label_map is None else np.asarray(end.label_map),
                     snapshot(end.state.scores), dict(end.metrics)))
        return np.array([0, 1, 2], np.int32) if end.epoch == 0 else None

    state, result = loop.run_stage(STAGE, fresh(variables), TinyNet(), loaders(), prompt_spec=SPEC,
                                   label_map=jnp.asarray(LABEL_MAP), hooks=[hook], log_every=1)
    return snapshot(state), result, seen


def test_bookkeeping_counts_two_steps_per_iteration(full_run):
    state, result, _ = full_run
    assert result.name == 'mask_finding' and result.epochs == 3
    assert result.iterations == 3 * ITERS  # zip stops at the shorter view
    assert result.gradient_steps == 2 * 3 * ITERS
    assert result.seconds > 0
    assert 0 < result.first_iteration_seconds <= result.seconds  # includes compiling the step
    assert int(state.step) == 3 * ITERS
    assert {'pass0/loss', 'pass1/loss'} <= set(result.metrics)


def test_hooks_run_per_epoch_and_can_replace_the_label_map(full_run):
    _, _, seen = full_run
    assert [s[0] for s in seen] == [0, 1, 2]
    np.testing.assert_array_equal(seen[0][1], LABEL_MAP)
    np.testing.assert_array_equal(seen[1][1], [0, 1, 2])  # ILM: replaced after epoch 0
    assert not leaves_equal_bits(seen[0][2], seen[1][2])


def test_resume_from_epoch_and_mid_epoch_equals_uninterrupted(variables, full_run):
    final, _, seen = full_run
    new_map = jnp.asarray([0, 1, 2], jnp.int32)
    # Stop after epoch 0 + one iteration of epoch 1: run epoch 0, then one step by hand.
    state, _ = loop.run_stage(Stage(**{**STAGE.__dict__, 'epochs': 1}), fresh(variables),
                              TinyNet(), loaders(), prompt_spec=SPEC,
                              label_map=jnp.asarray(LABEL_MAP), log_every=0)
    assert leaves_equal_bits(snapshot(state.scores), seen[0][2])
    step = steps.make_train_step(STAGE, TinyNet(), SPEC)
    first = {'prompt': next(loaders()['prompt'].epoch(1)), 'train': loaders()['train'](1)[0]}
    state, _ = step(state, first, new_map, optim.lr_factors(STAGE, 1))
    assert loop.resume_position(state, ITERS) == (1, 1)
    resumed = loaders()
    state, result = loop.run_stage(STAGE, state, TinyNet(), resumed, prompt_spec=SPEC,
                                   label_map=new_map, start_epoch=1, start_iteration=1,
                                   log_every=0)
    assert resumed['prompt'].starts == [(1, 1), (2, 0)]
    assert result.iterations == 2 * ITERS - 1
    state = snapshot(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nothing_left_to_run_reports_no_first_iteration(variables):
    _, result = loop.run_stage(STAGE, fresh(variables), TinyNet(), loaders(), prompt_spec=SPEC,
                               label_map=jnp.asarray(LABEL_MAP), start_epoch=STAGE.epochs)
    assert result.iterations == 0 and result.first_iteration_seconds is None


def test_missing_view_loader_is_an_error(variables):
    with pytest.raises(ValueError, match='prompt'):
        loop.run_stage(STAGE, fresh(variables), TinyNet(), {'train': loaders()['train']},
                       prompt_spec=SPEC)


def test_evaluate_and_flm_label_map(variables):
    state = fresh(variables)
    ev = steps.make_eval_step(STAGE, TinyNet(), SPEC)
    data = [batch(7, n=5), batch(8, n=5)]
    data[1]['mask'] = np.array([1, 1, 0, 0, 0], bool)
    out = loop.evaluate(ev, state, data, jnp.asarray(LABEL_MAP))
    assert out['count'] == 7
    manual = sum(int(ev(state, b, jnp.asarray(LABEL_MAP))['correct']) for b in data)
    assert out['accuracy'] == pytest.approx(manual / 7)
    predict = steps.make_source_predictions(STAGE, TinyNet(), SPEC, prompted=True)
    mapping = loop.flm_label_map(predict, state, data, 10, 3)
    assert mapping.shape == (3,) and len(set(mapping.tolist())) == 3
    preds = np.concatenate([np.asarray(predict(state, b)) for b in data])
    labels = np.concatenate([b['label'] for b in data])
    valid = np.concatenate([np.ones(5, bool), data[1]['mask']])
    # the most frequent (source, target) pair is assigned first
    counts = np.zeros((10, 3), int)
    np.add.at(counts, (preds[valid], labels[valid]), 1)
    s, c = np.unravel_index(np.argmax(counts), counts.shape)
    assert mapping[c] == s


def test_ilm_hook_remaps_from_the_next_epoch(variables):
    state = fresh(variables)
    predict = steps.make_source_predictions(STAGE, TinyNet(), SPEC, prompted=True)
    asked = []

    def batches(e):
        asked.append(e)
        return [batch(200 + e)]

    hook = loop.make_ilm_hook(predict, batches, 10, 3)
    mapping = hook(loop.EpochEnd(STAGE, 0, state, None, {}))
    assert asked == [1]
    np.testing.assert_array_equal(mapping, loop.flm_label_map(predict, state, [batch(201)], 10, 3))
