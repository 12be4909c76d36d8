"""The pure steps against hand computations: two-pass order, tau refresh, frozen groups, masks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
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

from vpns_jax import prompts, sparsity
from vpns_jax.train import optim, steps
from vpns_jax.train.stages import PROMPTED_ONLY, TWO_PASSES, UNPROMPTED, Stage, adam, sgd
from vpns_jax.train.state import begin_stage, create_state

DENSITY = 0.5
LR, WD, MOMENTUM = 0.05, 1e-2, 0.9
B1, B2, EPS = 0.9, 0.999, 1e-8
MEAN, STD = np.array(prompts.IMAGENET_MEAN), np.array(prompts.IMAGENET_STD)

MASK_FINDING = Stage('mask_finding', 4, scores=adam(LR, WD), prompt=adam(LR, WD),
                     passes=TWO_PASSES, mask_mode='learned', density=DENSITY)
TUNING = Stage('tuning', 4, params=sgd(LR, MOMENTUM, WD), prompt=sgd(LR, MOMENTUM, WD),
               passes=TWO_PASSES, mask_mode='fixed', density=DENSITY)


# ----------------------------------------------------------------------------- hand reference

def hand_tau(scores: dict, density: float) -> float:
    """k-th smallest |s| over all layers (numpy sort), k = floor((1 - d) N)."""
    flat = np.sort(np.concatenate([np.abs(np.asarray(v)).ravel() for v in scores.values()]))
    k = math.floor((1 - density) * flat.size)
    return float(flat[k - 1]) if k >= 1 else -1.0


def hand_border(size: int = 8, pad: int = 2) -> np.ndarray:
    m = np.ones((size, size, 1), np.float32)
    m[pad:size - pad, pad:size - pad] = 0
    return m


def hand_loss(params, batch_stats, masks, program, data, prompted):
    """CE of FLM(net(normalize(prompt(x)))), masks with a hand-written straight-through on |s|."""
    flat = traverse_util.flatten_dict(params, sep='/')
    for path, m in masks.items():
        flat[path] = flat[path] * m
    x = jnp.asarray(data['image'])
    if prompted:
        x = jnp.clip(x + hand_border() * program, 0.0, 1.0)
    x = (x - MEAN) / STD
    logits, upd = TinyNet().apply({'params': traverse_util.unflatten_dict(flat, sep='/'),
                                   'batch_stats': batch_stats}, x.astype(jnp.float32),
                                  train=True, mutable=['batch_stats'])
    logits = logits[:, LABEL_MAP]
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(data['label'])[:, None], 1))
    return loss, upd['batch_stats']


def ste(scores, tau):
    return {p: jax.lax.stop_gradient((jnp.abs(s) > tau).astype(jnp.float32))
            + jnp.abs(s) - jax.lax.stop_gradient(jnp.abs(s)) for p, s in scores.items()}


def adam_hand(p, g, m, v, t):
    g = g + WD * p
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    return p - LR * (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS), m, v


def sgd_hand(p, g, buf):
    d = g + WD * p
    buf = d if buf is None else MOMENTUM * buf + d
    return p - LR * buf, buf


def tree_np(t):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), t)


def hand_mask_finding(variables, scores, program, b_prompt, b_train, *, refresh=True):
    """Pass 1 (prompted, prompt view) Adam step on scores + prompt; pass 2 (plain, train view) Adam
    step on scores only; tau recomputed after the first step unless refresh=False."""
    params, bs = variables['params'], variables['batch_stats']
    tau0 = hand_tau(scores, DENSITY)

    def loss1(s, prog):
        return hand_loss(params, bs, ste(s, tau0), prog, b_prompt, True)

    (_, bs1), (gs, gp) = jax.value_and_grad(loss1, argnums=(0, 1), has_aux=True)(scores, program)
    s_np, gs = tree_np(scores), tree_np(gs)
    zeros = jax.tree.map(np.zeros_like, s_np)
    step1 = {p: adam_hand(s_np[p], gs[p], zeros[p], zeros[p], 1) for p in s_np}
    s1 = {p: v[0] for p, v in step1.items()}
    prog1, _, _ = adam_hand(np.asarray(program, np.float64), np.asarray(gp, np.float64),
                            0.0, 0.0, 1)
    tau1 = hand_tau(s1, DENSITY) if refresh else tau0
    s1_j = {p: jnp.asarray(v, jnp.float32) for p, v in s1.items()}

    def loss2(s):
        return hand_loss(params, bs1, ste(s, tau1), prog1, b_train, False)

    (_, bs2), gs2 = jax.value_and_grad(loss2, has_aux=True)(s1_j)
    gs2 = tree_np(gs2)
    s2 = {p: adam_hand(s1[p], gs2[p], step1[p][1], step1[p][2], 2)[0] for p in s1}
    return s2, prog1, bs2, (tau0, tau1, s1)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def setup():
    variables = init_variables(0)
    scores = sparsity.scaled_score_init(variables['params'])
    return variables, scores, random_prompt(1), batch(10), batch(11)


def fresh_state(setup, stage):
    variables, scores, program, _, _ = setup
    state = create_state(variables, rng=jax.random.PRNGKey(0), scores=scores, prompt=program)
    return begin_stage(stage, state)


@pytest.fixture(scope='module')
def mask_finding_run(setup):
    _, _, _, bp, bt = setup
    state = fresh_state(setup, MASK_FINDING)
    before = snapshot(state)
    step = steps.make_train_step(MASK_FINDING, TinyNet(), SPEC)
    after, metrics = step(state, {'prompt': bp, 'train': bt}, jnp.asarray(LABEL_MAP),
                          optim.lr_factors(MASK_FINDING, 0))
    return before, snapshot(after), snapshot(metrics)


# ----------------------------------------------------------------------------- tests

def test_one_iteration_equals_pass1_then_pass2_by_hand(setup, mask_finding_run):
    variables, scores, program, bp, bt = setup
    _, after, metrics = mask_finding_run
    s2, prog1, bs2, (tau0, tau1, s1) = hand_mask_finding(variables, scores, program['program'],
                                                        bp, bt)
    for p in s2:
        np.testing.assert_allclose(after.scores[p], s2[p], rtol=2e-4, atol=2e-6)
    # The prompt moved in pass 1 only (ambiguity 3: no update in the un-prompted pass).
    np.testing.assert_allclose(after.prompt['program'], prog1, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(bs2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(metrics) == {'pass0/loss', 'pass0/accuracy', 'pass1/loss', 'pass1/accuracy'}
    assert int(after.step) == 1


def test_tau_is_refreshed_after_the_first_score_step(setup, mask_finding_run):
    variables, scores, program, bp, bt = setup
    _, after, _ = mask_finding_run
    s2, _, _, (tau0, tau1, s1) = hand_mask_finding(variables, scores, program['program'], bp, bt)
    stale, _, _, _ = hand_mask_finding(variables, scores, program['program'], bp, bt,
                                       refresh=False)
    # Sensitivity: the step-1 scores give a different mask than the initial tau would.
    assert any(np.any((np.abs(s1[p]) > tau1) != (np.abs(s1[p]) > tau0)) for p in s1)
    gap = max(float(np.max(np.abs(stale[p] - s2[p]))) for p in s2)
    assert gap > 1e-4
    for p in s2:
        np.testing.assert_allclose(after.scores[p], s2[p], rtol=2e-4, atol=2e-6)


def test_prompt_optimizer_state_untouched_by_unprompted_pass(mask_finding_run):
    _, after, _ = mask_finding_run
    inner = after.opt_state.inner_states

    def adam_count(group):
        found = [x for x in jax.tree.leaves(inner[group], is_leaf=lambda x: isinstance(
            x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)]
        return int(found[0].count)

    assert adam_count('prompt') == 1  # one prompted pass
    assert adam_count('scores') == 2  # two score steps


def test_mask_finding_freezes_weights_and_updates_bn_stats(mask_finding_run):
    before, after, _ = mask_finding_run
    assert leaves_equal_bits(before.params, after.params)  # kernels, biases, BN affine
    assert not leaves_equal_bits(before.batch_stats, after.batch_stats)
    assert not leaves_equal_bits(before.scores, after.scores)
    assert not leaves_equal_bits(before.prompt, after.prompt)


def test_exact_sparsity_of_the_learned_mask(setup, mask_finding_run):
    _, after, _ = mask_finding_run
    masks = steps.current_masks(after, MASK_FINDING)
    total = sum(m.size for m in masks.values())
    kept = sum(int(np.sum(m)) for m in masks.values())
    assert total - kept == math.floor((1 - DENSITY) * total)


def test_tuning_keeps_scores_and_pruned_weights(setup):
    _, _, _, bp, bt = setup
    state = fresh_state(setup, TUNING)
    masks = snapshot(state.masks)
    before = snapshot(state)
    step = steps.make_train_step(TUNING, TinyNet(), SPEC)
    flat0 = traverse_util.flatten_dict(before.params, sep='/')
    for i in range(3):
        state, _ = step(state, {'prompt': batch(20 + i), 'train': batch(30 + i)},
                        jnp.asarray(LABEL_MAP), optim.lr_factors(TUNING, i))
        now = snapshot(state)
        flat = traverse_util.flatten_dict(now.params, sep='/')
        for path, m in masks.items():
            assert np.all(flat[path][~m] == 0.0), path  # exactly zero, momentum included
            assert np.any(flat[path][m] != flat0[path][m]), path
    assert leaves_equal_bits(before.scores, now.scores)
    assert not np.array_equal(flat['bn1/scale'], flat0['bn1/scale'])
    assert not leaves_equal_bits(before.prompt, now.prompt)
    sparsity_kept = sum(int(m.sum()) for m in masks.values())
    assert sparsity_kept == sum(m.size for m in masks.values()) - math.floor(
        (1 - DENSITY) * sum(m.size for m in masks.values()))


def test_tuning_iteration_matches_hand_sgd(setup):
    variables, scores, program, bp, bt = setup
    state = fresh_state(setup, TUNING)
    step = steps.make_train_step(TUNING, TinyNet(), SPEC)
    after = snapshot(step(state, {'prompt': bp, 'train': bt}, jnp.asarray(LABEL_MAP),
                          optim.lr_factors(TUNING, 0))[0])
    tau = hand_tau(scores, DENSITY)
    masks = {p: (np.abs(np.asarray(s)) > tau).astype(np.float32) for p, s in scores.items()}
    flat = traverse_util.flatten_dict(variables['params'], sep='/')
    params0 = traverse_util.unflatten_dict(
        {k: v * masks[k] if k in masks else v for k, v in flat.items()}, sep='/')

    def loss1(p, prog):
        return hand_loss(p, variables['batch_stats'], masks, prog, bp, True)

    (_, bs1), (gp, gprog) = jax.value_and_grad(loss1, argnums=(0, 1), has_aux=True)(
        params0, program['program'])
    step1 = jax.tree.map(lambda p, g: sgd_hand(np.asarray(p, np.float64), np.asarray(g), None),
                         params0, gp)
    p1 = jax.tree.map(lambda t: t[0], step1, is_leaf=lambda x: isinstance(x, tuple))
    buf1 = jax.tree.map(lambda t: t[1], step1, is_leaf=lambda x: isinstance(x, tuple))
    prog1, _ = sgd_hand(np.asarray(program['program'], np.float64), np.asarray(gprog), None)

    def loss2(p):
        return hand_loss(p, bs1, masks, None, bt, False)

    (_, _), gp2 = jax.value_and_grad(loss2, has_aux=True)(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p1))
    p2 = jax.tree.map(lambda p, g, b: sgd_hand(p, np.asarray(g), b)[0], p1, gp2, buf1)
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after.prompt['program'], prog1, rtol=1e-4, atol=1e-6)


def test_eval_step_honours_validity_mask(setup, mask_finding_run):
    _, after, _ = mask_finding_run
    state = jax.tree.map(jnp.asarray, after)
    data = batch(40, n=8)
    data['mask'] = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    ev = steps.make_eval_step(MASK_FINDING, TinyNet(), SPEC, prompted=False)
    out = snapshot(ev(state, data, jnp.asarray(LABEL_MAP)))
    masks = steps.current_masks(state, MASK_FINDING)
    params = sparsity.apply_masks(state.params, masks)
    x = (data['image'] - MEAN) / STD
    logits = TinyNet().apply({'params': params, 'batch_stats': state.batch_stats},
                             jnp.asarray(x, jnp.float32), train=False)
    pred = np.argmax(np.asarray(logits)[:, LABEL_MAP], -1)
    assert int(out['count']) == 5
    assert int(out['correct']) == int(np.sum((pred == data['label']) & data['mask']))
    src = steps.make_source_predictions(MASK_FINDING, TinyNet(), SPEC)(state, data)
    np.testing.assert_array_equal(src, np.argmax(np.asarray(logits), -1))
    with_prompt = ev = steps.make_eval_step(MASK_FINDING, TinyNet(), SPEC, prompted=True)
    assert int(with_prompt(state, data, None)['count']) == 5


def test_unprompted_stage_needs_no_prompt(setup):
    variables, scores, _, _, bt = setup
    stage = Stage('hydra_mf', 2, scores=sgd(0.01, 0.9, 1e-4), passes=UNPROMPTED,
                  mask_mode='learned', density=0.3, threshold_scope='layer')
    state = begin_stage(stage, create_state(variables, rng=jax.random.PRNGKey(0), scores=scores))
    before = snapshot(state)
    state, metrics = steps.make_train_step(stage, TinyNet())(
        state, {'train': bt}, jnp.asarray(LABEL_MAP), optim.lr_factors(stage, 0))
    assert set(metrics) == {'pass0/loss', 'pass0/accuracy'}
    assert leaves_equal_bits(before.params, snapshot(state.params))
    for path, m in steps.current_masks(state, stage).items():  # layer scope: per-layer count
        assert m.size - int(np.sum(m)) == math.floor(0.7 * m.size), path


def test_prompted_only_is_one_prompted_pass_on_the_train_view(setup):
    """Paper reading: one prompted pass per iteration, fed the augmented ('train' view) batch."""
    variables, scores, program, _, bt = setup
    stage = Stage('mf_paper', 2, scores=adam(LR, WD), prompt=adam(LR, WD), passes=PROMPTED_ONLY,
                  mask_mode='learned', density=DENSITY)
    state = fresh_state(setup, stage)
    after, metrics = steps.make_train_step(stage, TinyNet(), SPEC)(
        state, {'train': bt}, jnp.asarray(LABEL_MAP), optim.lr_factors(stage, 0))
    assert set(metrics) == {'pass0/loss', 'pass0/accuracy'}
    tau0 = hand_tau(scores, DENSITY)
    (_, _), (gs, gp) = jax.value_and_grad(
        lambda s, p: hand_loss(variables['params'], variables['batch_stats'], ste(s, tau0), p,
                               bt, True), argnums=(0, 1), has_aux=True)(scores, program['program'])
    prog1 = adam_hand(np.asarray(program['program'], np.float64), np.asarray(gp), 0.0, 0.0, 1)[0]
    np.testing.assert_allclose(after.prompt['program'], prog1, rtol=1e-4, atol=1e-6)
    for p, g in gs.items():
        s1 = adam_hand(np.asarray(scores[p], np.float64), np.asarray(g), 0.0, 0.0, 1)[0]
        np.testing.assert_allclose(after.scores[p], s1, rtol=2e-4, atol=2e-6)


def test_begin_stage_traces_under_eval_shape(setup):
    """The orchestrator builds the abstract restore target with jax.eval_shape(begin_stage)."""
    variables, scores, program, _, _ = setup
    state = create_state(variables, rng=jax.random.PRNGKey(0), scores=scores, prompt=program)
    for stage in (MASK_FINDING, TUNING):
        abstract = jax.eval_shape(lambda s, st=stage: begin_stage(st, s), state)
        concrete = begin_stage(stage, state)
        assert jax.tree.structure(abstract) == jax.tree.structure(concrete)


def test_given_fixed_mask_zeroes_and_keeps_pruned_weights(setup):
    """OMP/LTH-style: a mask from outside; pruned pretrained weights are zeroed and stay zero."""
    variables, _, _, _, bt = setup
    rng = np.random.default_rng(5)
    flat = traverse_util.flatten_dict(variables['params'], sep='/')
    masks = {p: rng.uniform(size=flat[p].shape) > 0.5 for p in sparsity.prunable_paths(
        variables['params'])}
    stage = Stage('omp_tune', 2, params=sgd(LR, MOMENTUM, WD), passes=UNPROMPTED,
                  mask_mode='fixed')
    state = begin_stage(stage, create_state(variables, rng=jax.random.PRNGKey(0)), masks=masks)
    step = steps.make_train_step(stage, TinyNet())
    for i in range(2):
        state, _ = step(state, {'train': batch(60 + i)}, jnp.asarray(LABEL_MAP),
                        optim.lr_factors(stage, i))
    now = traverse_util.flatten_dict(snapshot(state.params), sep='/')
    for p, m in masks.items():
        assert np.all(now[p][~m] == 0.0) and np.all(now[p][m] != flat[p][m]), p


def test_vgg_trains_with_dropout_like_torch_train_mode():
    """The reference trains in model.train(): VGG's classifier dropout is active in every pass."""
    from vpns_jax import config, methods, models, train

    model = models.create('vgg16', 10, width=0.0625)
    variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(0), 32))
    ((stage,),) = [r.stages for r in methods.runs(config.default_config(), 'dense')]
    batch = {'image': np.random.default_rng(0).random((8, 32, 32, 3), np.float32),
             'label': np.arange(8, dtype=np.int32) % 10}
    step = train.make_train_step(stage, model)
    losses = []
    for seed in (1, 2):
        state = train.begin_stage(stage, train.create_state(variables, rng=jax.random.PRNGKey(seed)))
        _, metrics = step(state, {'train': batch}, None, train.lr_factors(stage, 0))
        losses.append(float(metrics['pass0/loss']))
    assert losses[0] != losses[1], 'same params, different step keys: dropout must change the loss'
