"""Optimizers equal torch.optim with weight_decay; schedules equal torch's schedulers; partition."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vpns_jax.train import optim
from vpns_jax.train.stages import FROZEN, TWO_PASSES, UNPROMPTED, Stage, adam, sgd

EPOCH_FACTORS = [1.0, 1.0, 0.5, 0.5, 0.25]  # lr multiplier applied at each of 5 steps


def _torch_run(make_opt, p0: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = make_opt([p])
    base = opt.param_groups[0]['lr']
    for g, f in zip(grads, EPOCH_FACTORS, strict=True):
        opt.param_groups[0]['lr'] = base * f
        opt.zero_grad()
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().numpy()


def _ours(stage: Stage, group: str, p0: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    tx = optim.make_optimizer(stage)
    tree = {'params': {}, 'scores': {}, 'prompt': {}}
    tree[group] = {'w': jnp.asarray(p0)}
    state = tx.init(tree)
    for g, f in zip(grads, EPOCH_FACTORS, strict=True):
        grad = jax.tree.map(jnp.zeros_like, tree)
        grad[group] = {'w': jnp.asarray(g)}
        factors = {k: jnp.float32(stage.group(k).lr * f) for k in tree}  # the epoch's lr
        tree, state = optim.apply_updates(tx, grad, state, tree, active=(group,), factors=factors)
    return np.asarray(tree[group]['w'])


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in EPOCH_FACTORS]
    return p0, grads


def test_sgd_momentum_l2_equals_torch(problem):
    p0, grads = problem
    stage = Stage('t', 5, params=sgd(0.1, momentum=0.9, weight_decay=0.05), passes=UNPROMPTED,
                  mask_mode='fixed')
    ref = _torch_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
                     p0, grads)
    np.testing.assert_allclose(_ours(stage, 'params', p0, grads), ref, rtol=1e-5, atol=1e-6)
    # Decoupled decay (AdamW-style) or no decay would differ: the test can fail.
    no_wd = _torch_run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), p0, grads)
    assert not np.allclose(no_wd, ref, rtol=1e-5, atol=1e-6)


def test_adam_l2_equals_torch(problem):
    p0, grads = problem
    stage = Stage('t', 5, scores=adam(0.01, weight_decay=0.5), passes=UNPROMPTED,
                  mask_mode='learned')
    ref = _torch_run(lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.5), p0, grads)
    np.testing.assert_allclose(_ours(stage, 'scores', p0, grads), ref, rtol=1e-5, atol=1e-6)
    adamw = _torch_run(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.5), p0, grads)
    assert not np.allclose(adamw, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('epochs', [1, 5, 30, 60])
def test_cosine_equals_torch_per_epoch(epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for e in range(epochs):
        ours = 0.01 * optim.lr_factor('cosine', e, epochs)
        assert opt.param_groups[0]['lr'] == pytest.approx(ours, rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


@pytest.mark.parametrize('epochs', [10, 30, 60])
def test_multistep_equals_torch(epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(0.5 * epochs), int(0.72 * epochs)], gamma=0.1)
    for e in range(epochs):
        assert opt.param_groups[0]['lr'] == pytest.approx(optim.lr_factor('multistep', e, epochs))
        opt.step()
        sched.step()


def test_lr_factors_per_group_schedule():
    stage = Stage('mf', 10, scores=adam(1e-4), prompt=adam(1e-3, schedule='multistep'),
                  passes=TWO_PASSES, mask_mode='learned')
    f = optim.lr_factors(stage, 5)  # the epoch's learning rate per group (base lr x schedule)
    assert float(f['scores']) == pytest.approx(1e-4 * (1 + np.cos(np.pi * 0.5)) / 2)
    assert float(f['prompt']) == pytest.approx(1e-3 * 0.1)
    assert float(f['params']) == 0.0  # frozen


def test_inactive_group_keeps_values_and_moments():
    """A group outside `active` (the prompt in the un-prompted pass) is not touched at all."""
    stage = Stage('mf', 3, scores=adam(0.1), prompt=adam(0.1), passes=TWO_PASSES,
                  mask_mode='learned')
    tx = optim.make_optimizer(stage)
    tree = {'params': {'w': jnp.ones(2)}, 'scores': {'s': jnp.ones(3)},
            'prompt': {'program': jnp.ones(4)}}
    state = tx.init(tree)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), tree)
    ones = {k: jnp.float32(1) for k in tree}
    tree1, state1 = optim.apply_updates(tx, grads, state, tree, active=('scores', 'prompt'),
                                        factors=ones)
    tree2, state2 = optim.apply_updates(tx, grads, state1, tree1, active=('scores',),
                                        factors=ones)
    np.testing.assert_array_equal(tree2['prompt']['program'], tree1['prompt']['program'])
    prompt1 = state1.inner_states['prompt']
    prompt2 = state2.inner_states['prompt']
    for a, b in zip(jax.tree.leaves(prompt1), jax.tree.leaves(prompt2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(tree2['scores']['s'], tree1['scores']['s'])
    np.testing.assert_array_equal(tree2['params']['w'], tree['params']['w'])  # frozen group


def test_frozen_groups_are_set_to_zero():
    stage = Stage('tune', 2, params=sgd(0.1), scores=FROZEN, prompt=FROZEN, mask_mode='fixed')
    tx = optim.make_optimizer(stage)
    tree = {'params': {'w': jnp.ones(2)}, 'scores': {'s': jnp.ones(3)}, 'prompt': {}}
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree), tree)
    np.testing.assert_array_equal(updates['scores']['s'], 0.0)
    assert not np.any(np.asarray(updates['params']['w']) == 0.0)
