"""Structured methods (issue 16): Slim's L1 term, DepGraph's and Slim's importance, the channel stage's
score gradient, the shared selection, channel VPNs + Slim + DepGraph end to end, bad input.

Hand-made channel groups on a tiny conv-BN-dense network test the pieces against numpy re-statements;
one small end-to-end run (digits, the session's proxy source model) tests the recipes, the rows
(channel sparsity, params, FLOPs, speedup) and the slimmed export.
"""
from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vpns_jax import experiment, export, methods, models, report, train
from vpns_jax.errors import ConfigError, VpnsError
from vpns_jax.methods import channel_select
from vpns_jax.methods.plan import ChannelMaskFrom, InitChannelScores
from vpns_jax.models.layers import BatchNorm
from vpns_jax.structured import channels
from vpns_jax.structured.groups import ChannelGroup
from vpns_jax.train import state as train_state
from vpns_jax.train import steps


class Tiny(nn.Module):
    """conv 3x3 (3 -> 4) -> BN -> relu -> global mean -> dense (4 -> 3)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), use_bias=False, name='conv')(x)
        x = nn.relu(BatchNorm(name='bn')(x, train))
        return nn.Dense(3, name='fc')(x.mean(axis=(1, 2)))


TINY_GROUP = ChannelGroup(name='conv', size=4, producers=('conv/kernel',), norms=('bn',),
                          biases=(), consumers=('fc/kernel',), capped=False)


def _tiny_variables(seed=0):
    model = Tiny()
    v = jax.device_get(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6, 6, 3)), train=False))
    rng = np.random.default_rng(seed)
    v['params']['bn']['scale'] = rng.normal(size=4).astype(np.float32)
    v['params']['bn']['bias'] = rng.normal(size=4).astype(np.float32)
    v['batch_stats']['bn']['mean'] = rng.normal(size=4).astype(np.float32)
    v['batch_stats']['bn']['var'] = rng.uniform(0.5, 2, size=4).astype(np.float32)
    return model, v


def _batch(seed=1, n=5):
    rng = np.random.default_rng(seed)
    return {'image': rng.uniform(size=(n, 6, 6, 3)).astype(np.float32),
            'label': rng.integers(0, 3, n).astype(np.int32)}


# ---- Slim's sparsity term ----------------------------------------------------------------------


def test_bn_l1_adds_lambda_sign_gamma_to_bn_scale_gradients_only():
    params = {'bn': {'scale': np.array([0.5, -2.0, 0.0], np.float32),
                     'bias': np.array([1.0, -1.0, 0.0], np.float32)},
              'conv': {'kernel': np.full((1, 1, 2, 3), -1.0, np.float32)}}
    grads = jax.tree.map(lambda x: np.full_like(x, 0.25), params)
    out = steps.with_bn_l1(grads, params, 1e-2)
    np.testing.assert_allclose(out['bn']['scale'], [0.26, 0.24, 0.25], rtol=1e-6)  # sign(0) = 0
    np.testing.assert_array_equal(out['bn']['bias'], grads['bn']['bias'])
    np.testing.assert_array_equal(out['conv']['kernel'], grads['conv']['kernel'])


def test_bn_l1_stage_moves_gamma_by_minus_lr_lambda_sign_gamma_more():
    """One plain-SGD step through train_step: with bn_l1 the BN scales end exactly
    lr * lambda * sign(gamma) lower than without, every other parameter the same."""
    model, v = _tiny_variables()
    lr, lam = 0.1, 0.05
    ends = {}
    for l1 in (0.0, lam):
        stage = train.Stage('sparse', 1, params=train.sgd(lr, momentum=0.0), bn_l1=l1)
        state = train.begin_stage(stage, train.create_state(v, rng=jax.random.PRNGKey(0)))
        state, _ = steps.train_step(state, {'train': _batch()}, None, {'params': lr, 'scores': 0.0,
                                                                       'prompt': 0.0},
                                    stage=stage, model=model)
        ends[l1] = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
    gamma = v['params']['bn']['scale']
    np.testing.assert_allclose(ends[lam]['bn/scale'], ends[0.0]['bn/scale'] - lr * lam * np.sign(gamma),
                               atol=1e-7)
    for path in ('bn/bias', 'conv/kernel', 'fc/kernel', 'fc/bias'):
        np.testing.assert_array_equal(ends[lam][path], ends[0.0][path])


# ---- importance ----------------------------------------------------------------------------


def _hand_group():
    """conv producer (1x1, 2 -> 3, bias), BN, a conv consumer and a dense consumer after a
    channel-major flatten (2 in-features per channel)."""
    rng = np.random.default_rng(3)
    params = {'c1': {'kernel': rng.normal(size=(1, 1, 2, 3)), 'bias': rng.normal(size=3)},
              'bn': {'scale': rng.normal(size=3), 'bias': rng.normal(size=3)},
              'c2': {'kernel': rng.normal(size=(3, 3, 3, 2))},
              'fc': {'kernel': rng.normal(size=(6, 4)), 'bias': rng.normal(size=4)}}
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    group = ChannelGroup(name='c1', size=3, producers=('c1/kernel',), norms=('bn',),
                         biases=('c1/bias',), consumers=('c2/kernel', 'fc/kernel'), capped=False)
    return params, group


@pytest.mark.parametrize('p', [2.0, 1.0])
def test_depgraph_group_magnitude_equals_a_hand_computation(p):
    params, g = _hand_group()
    k1, g_scale, g_bias = params['c1']['kernel'], params['bn']['scale'], params['bn']['bias']
    k2, fc = params['c2']['kernel'], params['fc']['kernel']
    slices = np.zeros((3, 4))
    for c in range(3):
        slices[c] = [np.sum(np.abs(k1[..., c]) ** p), np.abs(g_scale[c]) ** p,
                     np.sum(np.abs(k2[:, :, c, :]) ** p), np.sum(np.abs(fc[2 * c:2 * c + 2]) ** p)]
    got = channel_select.magnitude_importance(params, (g,), p=p)['c1']
    np.testing.assert_allclose(got, slices.mean(axis=1), rtol=1e-5)
    got = channel_select.magnitude_importance(params, (g,), p=p, reduction='sum')['c1']
    np.testing.assert_allclose(got, slices.sum(axis=1), rtol=1e-5)
    with_bias = slices.sum(axis=1) + np.abs(params['c1']['bias']) ** p + np.abs(g_bias) ** p
    got = channel_select.magnitude_importance(params, (g,), p=p, bias=True)['c1']
    np.testing.assert_allclose(got, with_bias / 4, rtol=1e-5)  # biases join their layer's entry
    norm = channel_select.normalized({'c1': jnp.asarray(slices.mean(axis=1))}, 'mean')['c1']
    np.testing.assert_allclose(norm, slices.mean(axis=1) / slices.mean(), rtol=1e-5)


def test_slim_importance_is_the_mean_abs_gamma_over_the_groups_batchnorms():
    g = ChannelGroup(name='a', size=3, producers=('a/kernel',), norms=('bn1', 'bn2'), biases=(),
                     consumers=(), capped=False)
    params = {'bn1': {'scale': np.array([1.0, -2.0, 0.5], np.float32)},
              'bn2': {'scale': np.array([-3.0, 0.0, 0.5], np.float32)}}
    np.testing.assert_allclose(channel_select.bn_scale_importance(params, (g,))['a'], [2, 1, 0.5])
    np.testing.assert_allclose(channel_select.bn_scale_importance(params, (g,), reduction='sum')['a'],
                               [4, 2, 1])


def test_layer_scope_prunes_each_group_at_its_own_fraction_capped_ones_at_the_cap():
    a = ChannelGroup('a', 8, ('a/kernel',), (), (), (), True)
    b = ChannelGroup('b', 4, ('b/kernel',), (), (), (), False)
    imp = {'a': jnp.arange(8.0)[::-1], 'b': jnp.array([3.0, 0.5, 2.0, 0.1])}
    kept = channel_select.select(imp, (a, b), 0.5, 0.25, 'layer')
    np.testing.assert_array_equal(kept['a'], [1, 1, 1, 1, 1, 1, 0, 0])  # floor(0.25 * 8) = 2
    np.testing.assert_array_equal(kept['b'], [1, 0, 1, 0])  # floor(0.5 * 4) = 2
    glob = channel_select.select(imp, (a, b), 0.4, 0.25, 'global')  # floor(0.4 * 12) = 4
    assert sum(int(np.sum(~np.asarray(k))) for k in glob.values()) == 4
    assert int(np.sum(~np.asarray(glob['a']))) == 2  # a's lowest four would go; the cap keeps 6


# ---- the channel stage --------------------------------------------------------------------------


@pytest.mark.parametrize('density', [1.0, 0.5])
def test_channel_score_gradient_is_sign_times_the_mask_derivative_by_finite_differences(density):
    """d loss / d s_c through channel_ste_masks -> expand -> zero_pruned equals sign(s_c) times
    the central difference of the loss in the channel's float mask (all its slices together) at the
    hard mask; compared on the kept channels (at a pruned one the mask multiplies the kernel, BN
    and fc slices, so the derivative there is 0 and a difference quotient only O(eps))."""
    model, v = _tiny_variables()
    batch = _batch()
    scores = {'conv': jnp.array([0.3, -0.8, 0.05, -0.6])}  # density 0.5: channels 0, 2 pruned

    def loss_of(masks):
        params = train_state.zero_pruned(v['params'], masks)
        logits = model.apply({'params': params, 'batch_stats': v['batch_stats']}, batch['image'],
                             train=False)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(5), batch['label']])

    def loss(s):
        return loss_of(train_state.channel_learned_masks((TINY_GROUP,), s, v['params'], density,
                                                         1.0))

    grad = np.asarray(jax.grad(loss)(scores)['conv'])
    hard = np.array([1.0, 1.0, 1.0, 1.0]) if density == 1.0 else np.array([0.0, 1.0, 0.0, 1.0])
    eps = 1e-3
    fd = np.zeros(4)
    for c in range(4):
        step = np.eye(4)[c] * eps
        hi = train_state.expanded_masks((TINY_GROUP,), {'conv': jnp.asarray(hard + step)}, v['params'])
        lo = train_state.expanded_masks((TINY_GROUP,), {'conv': jnp.asarray(hard - step)}, v['params'])
        fd[c] = (loss_of(hi) - loss_of(lo)) / (2 * eps)
    kept = hard == 1
    np.testing.assert_allclose(grad[kept], np.sign(np.asarray(scores['conv']))[kept] * fd[kept],
                               rtol=2e-2, atol=1e-4)
    assert np.sum(np.abs(fd[kept]) > 1e-3) >= 2  # the check is not vacuous
    np.testing.assert_array_equal(grad[~kept], 0.0)


def test_value_clipping_clips_each_score_gradient_entry_before_the_l2_term():
    opt = train.make_group_optimizer('sgd', 1.0, momentum=0.0, weight_decay=0.1, clip=0.25)
    tx = train.optim.group_transform(opt)
    params = jnp.array([1.0, -2.0, 0.5])
    updates, _ = tx.update(jnp.array([3.0, -0.1, -9.0]), tx.init(params), params)
    np.testing.assert_allclose(-updates, [0.25 + 0.1, -0.1 - 0.2, -0.25 + 0.05], rtol=1e-6)


# ---- end to end --------------------------------------------------------------------------------

SPARSITY = 0.3


@pytest.fixture(scope='module')
def structured_run(proxy_weights, tmp_path_factory):
    from test_experiment import small_config

    c = small_config(proxy_weights)
    c.methods = 'dense,channel_vpns,slim,depgraph'
    c.sparsities = (SPARSITY,)
    c.steps_per_epoch = 2
    c.dense.epochs = 1
    for block in ('warmup', 'mask_finding', 'tuning'):
        c.channel_vpns[block].epochs = 1
    c.slim.sparse.epochs = c.slim.tuning.epochs = 1
    c.depgraph.warmup.epochs = c.depgraph.tuning.epochs = 1
    workdir = str(tmp_path_factory.mktemp('structured'))
    results = experiment.run(c, workdir)
    return c, workdir, {r['method']: r for r in results['runs']}


def test_finalize_restores_a_finished_channel_run_from_its_checkpoint(structured_run):
    """mode=finalize restores the channel VPNs tuning stage (its state template has the channel
    scores and the expanded channel masks) and rebuilds the same row without training."""
    config, workdir, rows = structured_run
    c = config.copy_and_resolve_references()
    c.methods, c.mode = 'channel_vpns', 'finalize'
    (row,) = [r for r in experiment.run(c, workdir)['runs'] if r['method'] == 'channel_vpns']
    for key in ('accuracy', 'accuracy_with_prompt', 'actual_sparsity', 'channel_sparsity',
                'params', 'flops'):
        assert row[key] == rows['channel_vpns'][key], key


def _groups(config):
    model = models.create('resnet18', 10, width=config.model.width)
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), 32))
    return model, train_state.channel_groups_of(model, shapes['params'], shapes['batch_stats'], 32)


def test_structured_rows_have_channel_sparsity_params_flops_and_speedup(structured_run):
    config, workdir, rows = structured_run
    _, groups = _groups(config)
    total = sum(g.size for g in groups)
    for name in ('channel_vpns', 'slim', 'depgraph'):
        r = rows[name]
        assert r['channels_total'] == total
        assert r['channels_total'] - r['channels_kept'] == math.floor(SPARSITY * total + 1e-6)
        assert r['params'] < r['params_dense'] and r['flops'] < r['flops_dense']
        assert r['latency_ms'] > 0 and r['speedup'] == pytest.approx(
            r['latency_dense_ms'] / r['latency_ms'])
        # the params of the PyTorch model the export rebuilds, counted by torch
        from vpns_jax.structured import torch_slim

        net = torch_slim.load_slim(os.path.join(workdir, r['slim_export']))
        assert sum(p.numel() for p in net.parameters()) == r['params']
    dense = rows['dense']
    assert dense['channel_sparsity'] == 0 and dense['params'] == dense['params_dense']
    assert dense['params'] == rows['slim']['params_dense'] and 'slim_export' not in dense
    table = report.format_table(list(rows.values()))
    assert 'speedup' in table and f"{rows['slim']['params']:,}" in table and 'MFLOPs' in table


def test_fixed_masks_zero_whole_channels_consistently_across_each_group(structured_run):
    from vpns_jax import checkpoint

    config, workdir, rows = structured_run
    _, groups = _groups(config)
    for name in ('channel_vpns', 'slim', 'depgraph'):
        tree, _ = checkpoint.load_final(os.path.join(workdir, 'final', f'{name}_s{SPARSITY:g}'))
        masks = tree['masks']
        kept = channel_select.channel_masks_of(groups, masks)
        again = train_state.expanded_masks(groups, {k: jnp.asarray(m, jnp.float32)
                                                    for k, m in kept.items()}, tree['params'])
        assert set(again) == set(masks)
        for path, m in masks.items():  # one channel vector per group explains every mask
            np.testing.assert_array_equal(np.asarray(again[path], bool), m, err_msg=path)
        convs = sum(g.size * len(g.producers) for g in groups)  # each conv's channels
        kept_convs = sum(int(np.sum(kept[g.name])) * len(g.producers) for g in groups)
        assert rows[name]['conv_channel_sparsity'] == pytest.approx(1 - kept_convs / convs)
        flat = traverse_util.flatten_dict(tree['params'], sep='/')
        for g in groups:
            off = ~kept[g.name]
            for n in g.norms:  # gamma and beta of pruned channels are exactly zero
                assert not np.any(flat[f'{n}/scale'][off]) and not np.any(flat[f'{n}/bias'][off])
            for p in g.producers:
                assert not np.any(flat[p][..., off])
        if name == 'channel_vpns':  # tuning froze the learned channels
            learned = channels.channel_threshold(tree['scores'], groups, SPARSITY, 0.25)
            for k in kept:
                np.testing.assert_array_equal(kept[k], np.asarray(learned[k]))


def test_slim_export_command_copies_it_and_refuses_unstructured_runs(structured_run, tmp_path):
    config, workdir, rows = structured_run
    out = str(tmp_path / 'slim_out')
    written = export.export_run(workdir, f'depgraph_s{SPARSITY:g}', out, fmt='slim')
    assert sorted(os.path.basename(p) for p in written) == ['slim.safetensors',
                                                            'slim_vpns.safetensors', 'widths.json']
    with open(os.path.join(out, 'widths.json')) as f:
        assert json.load(f)['arch'] == 'resnet18'
    with pytest.raises(VpnsError, match='only structured runs can be slimmed') as e:
        export.export_run(workdir, 'dense_s0', str(tmp_path / 'x'), fmt='slim')
    assert '\n' not in str(e.value)


# ---- plans and bad input ------------------------------------------------------------------


def _config(**changes):
    from vpns_jax import config as config_lib

    c = config_lib.default_config()
    c.weights = 'w.safetensors'
    config_lib.apply_overrides(c, changes)
    return c


def test_channel_vpns_plan_is_the_research_schedule():
    (run,) = methods.runs(_config(sparsities=(0.4,)), 'channel_vpns')
    warm, mf, tune = run.stages
    assert (warm.epochs, mf.epochs, tune.epochs) == (5, 5, 30) and run.structured
    assert warm.mask_mode == 'none' and warm.params.kind == 'sgd' and warm.prompt.trainable
    assert (mf.mask_mode, mf.density, mf.channel_cap) == ('channel', pytest.approx(0.6), 0.25)
    assert (mf.scores.kind, mf.scores.lr, mf.scores.weight_decay, mf.scores.clip) == (
        'adam', 1.0, 0.1, 0.25)
    assert (mf.prompt.kind, mf.prompt.lr) == ('adam', 1e-3) and not mf.params.trainable
    assert InitChannelScores() in mf.start
    assert tune.start[0] == ChannelMaskFrom('scores', pytest.approx(0.6), 0.25)
    assert (tune.params.kind, tune.params.lr, tune.params.weight_decay) == ('sgd', 0.01, 1e-4)


def test_only_structured_runs_and_their_experiments_dense_run_get_the_structured_fields():
    config = _config(methods='dense,vpns,slim', sparsities=(0.5,))
    runs = experiment.plan(config)
    got = {r.method: experiment.measures_channels(runs, r) for r in runs}
    assert got == {'dense': True, 'vpns': False, 'slim': True}
    plain = [r for r in runs if not r.structured]
    assert not any(experiment.measures_channels(plain, r) for r in plain)


def test_old_stage_reprs_do_not_change_with_the_new_fields():
    stage = train.Stage('t', 1, params=train.sgd(0.1))
    assert 'channel_cap' not in repr(stage) and 'bn_l1' not in repr(stage)
    assert 'clip' not in repr(stage.params)
    assert 'bn_l1=1e-05' in repr(train.Stage('t', 1, params=train.sgd(0.1), bn_l1=1e-5))


def test_bad_input_is_one_clear_line():
    cases = [
        (lambda: methods.runs(_config(arch='mobilenet_v2'), 'slim'),
         r"config.arch = 'mobilenet_v2'.*resnet18, resnet34, resnet50, vgg16, vgg16_bn"),
        (lambda: methods.runs(_config(arch='vgg16'), 'slim'), r"'vgg16' has no BatchNorm.*vgg16_bn"),
        (lambda: methods.runs(_config(**{'depgraph.cap': 1.5}), 'depgraph'),
         r'config.depgraph.cap = 1.5'),
        (lambda: methods.runs(_config(**{'slim.scope': 'block'}), 'slim'),
         r"config.slim.scope = 'block'.*'global', 'layer'"),
        (lambda: channel_select.select({'conv': jnp.ones(4)}, (TINY_GROUP,), 1.0, 0.25),
         r'channel sparsity must be in \[0, 1\), got 1.0'),
        (lambda: channel_select.select({'conv': jnp.ones(4)}, (TINY_GROUP,), -0.1, 0.25),
         r'channel sparsity must be in \[0, 1\)'),
        (lambda: channel_select.select({'a': jnp.ones(8), 'b': jnp.ones(4)},
                                       (ChannelGroup('a', 8, ('a/kernel',), (), (), (), True),
                                        ChannelGroup('b', 4, ('b/kernel',), (), (), (), False)),
                                       0.5, 0.25), r'the capped layers a to 2'),
    ]
    for fn, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            fn()
        assert '\n' not in str(e.value)


def test_an_unreachable_channel_sparsity_is_refused_before_anything_trains(proxy_weights, tmp_path,
                                                                          monkeypatch):
    """Width-0.25 ResNet-18: 720 channels in 12 groups; the three capped ones (16 channels each)
    lose at most 4, the nine others all but one: at most 12 + 663 = 675 (93.75%) can go, so 0.95
    (684) is refused at setup, naming the method and the capped layers, not after a warm-up."""
    from test_experiment import small_config

    c = small_config(proxy_weights)
    c.methods, c.sparsities = 'channel_vpns', (0.95,)

    def no_training(*args, **kwargs):
        raise AssertionError('a stage trained before the unreachable sparsity was refused')

    monkeypatch.setattr(experiment.train, 'run_stage', no_training)
    with pytest.raises(ConfigError, match=r'channel_vpns at sparsity 0.95: .*prunes 684 of 720 '
                       r'channels, but at most 675 can go.*conv1') as e:
        experiment.run(c, str(tmp_path / 'w'))
    assert '\n' not in str(e.value)
    assert not os.path.exists(os.path.join(tmp_path, 'w', 'config.json'))
    # 'layer' scope (every group at its own fraction) can always be met: not refused
    c.methods, c.depgraph.scope = 'depgraph', 'layer'
    assert experiment.plan(c) and channel_select.check_reachable(
        experiment.plan(c), _groups(c)[1]) is None


def test_a_structured_run_as_transfer_source_is_one_clear_line(structured_run):
    """config.mask_from takes an unstructured run's mask; a structured run's (whole channels,
    BatchNorm entries included) is refused saying so, not as a mask 'found on another model'."""
    from vpns_jax import transfer

    config, workdir, _ = structured_run
    c = config.copy_and_resolve_references()
    c.methods, c.mask_from = 'vpns', os.path.join(workdir, f'slim_s{SPARSITY:g}')
    with pytest.raises(ConfigError, match=r'slim_s0.3 is a structured run .*unstructured') as e:
        transfer.source(c)
    assert '\n' not in str(e.value)
