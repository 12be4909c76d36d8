"""Channel selection shared by the structured recipes: channel importance, one threshold, masks.

Every structured method ends its search the same way: an importance per channel of every channel
group (`vpns_jax.structured.groups.ChannelGroup`: the convs, BatchNorms and consumers coupled by
residual additions share one mask), one selection (`select`: the global threshold with the
reference's cap, `structured.channels.channel_threshold`, or every group at its own fraction),
and the per-channel masks expanded to per-parameter masks (`structured.channels.expand`), which the
next stage trains under as an ordinary 'fixed' mask. Only the importance differs:

- 'scores' (channel VPNs, reference §6): |s| of the learned channel scores;
- 'bn_scale' (Slim, Liu et al. 2017, as Torch-Pruning's BNScaleImportance): |gamma| of each of the
  group's BatchNorms, reduced over them (mean, as BNScaleImportance's default group_reduction, or
  sum), then normalised per group (Torch-Pruning's default normalizer 'mean': divided by the
  group's mean);
- 'magnitude' (DepGraph, Fang et al. 2023, as Torch-Pruning's GroupMagnitudeImportance with p = 2):
  for every parameter slice of channel c in the group (producer kernels' output slices, the
  group's BN gamma, consumer kernels' input slices, all the in-features of c after a flatten;
  producer biases and BN beta added to their layer's entry with `bias=True`) the sum of |w|^p over
  the slice (p = 2: the squared L2 norm), reduced over the slices (mean: divided by their count,
  or sum), then normalised per group ('mean' by default, 'max', 'sum' or 'none').
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpns_jax.errors import ConfigError
from vpns_jax.methods.plan import ChannelMaskFrom, InitChannelScores
from vpns_jax.train import state as train_state

CRITERIA = ('scores', 'bn_scale', 'magnitude')
REDUCTIONS = ('mean', 'sum')
NORMALIZERS = ('mean', 'max', 'sum', 'none')
SCOPES = ('global', 'layer')

__all__ = ['CRITERIA', 'ChannelMaskFrom', 'InitChannelScores', 'bn_scale_importance',
           'channel_masks_of', 'check_reachable', 'fixed_masks', 'importance', 'init_scores',
           'magnitude_importance', 'normalized', 'read_cap', 'select', 'selection_options',
           'supported_archs']


def supported_archs() -> tuple[str, ...]:
    """The architectures with channel groups (`structured.groups.SUPPORTED_ARCHS`)."""
    from vpns_jax.structured import groups

    return tuple(groups.SUPPORTED_ARCHS)


def check_arch(arch: str, method: str) -> None:
    """ConfigError when `arch` has no channel-group definition, naming the supported ones."""
    archs = supported_archs()
    if arch not in archs:
        raise ConfigError(f'config.arch = {arch!r}: structured method {method!r} needs channel '
                          f'groups, defined for {", ".join(archs)}; use one of these or leave '
                          f'{method!r} out of config.methods.')


def read_cap(opts: Any) -> float:
    """`config.<method>.cap` (a `plan.Options`), validated: a number in (0, 1]."""
    cap = opts.number('cap', minimum=0.0, strict=True)
    if cap > 1:
        opts._fail('cap', cap, 'a number in (0, 1] (the most channel sparsity of a capped group)')
    return cap


def selection_options(opts: Any) -> tuple[float, str]:
    """(cap, scope) of a selection-based method (Slim, DepGraph), validated."""
    return read_cap(opts), opts.one_of('scope', SCOPES)


def select_then_tune_runs(name: str, config: Any, opts: Any, importance: str,
                          options: tuple, before: tuple = ()) -> list[Any]:
    """The runs of a selection-based method (Slim, DepGraph): for each sparsity, the `before`
    stages, then the tuning stage, which starts by selecting channels by `importance` (with the
    method's cap, scope and importance `options`) and mapping labels."""
    from vpns_jax.methods.plan import LabelMap, Run, sparsity_levels, tuning_stage
    from vpns_jax.train.stages import UNPROMPTED

    cap, scope = selection_options(opts)
    runs = []
    for s in sparsity_levels(config):
        select = ChannelMaskFrom(importance, 1.0 - s, cap, scope, options)
        tune = tuning_stage(opts, 'tuning', start=(select, LabelMap()), passes=UNPROMPTED)
        runs.append(Run(name, s, (*before, tune), structured=True))
    return runs


def check_reachable(runs: Sequence[Any], groups: Sequence[Any]) -> None:
    """ConfigError (one line, naming the method and the capped layers) when a structured run's
    global channel threshold cannot prune its target under its cap: checked on the model's groups
    before anything trains (a 'channel' stage would otherwise fail after its warm-up). runs:
    `plan.Run`s (unstructured ones are skipped); groups: the model's channel groups."""
    from vpns_jax.structured import channels

    for run in runs:
        if not run.structured:
            continue
        targets = [(1.0 - st.density, st.channel_cap) for st in run.stages
                   if st.mask_mode == 'channel']
        targets += [(1.0 - a.density, a.cap) for st in run.stages for a in st.start
                    if isinstance(a, ChannelMaskFrom) and a.scope == 'global']
        for sparsity, cap in targets:
            try:
                channels.pruned_channel_count(tuple(groups), sparsity, cap)
            except ConfigError as e:
                raise ConfigError(f'{run.method} at sparsity {run.sparsity:g}: {e}') from None


def init_scores(groups: Sequence[Any], rng: jax.Array) -> dict[str, jax.Array]:
    """{group: f32[C]} ~ U(-1, 1): torch.nn.init.kaiming_uniform_(a=sqrt(5)) of a C x 1 x 1 x 1
    score tensor has bound gain * sqrt(3 / fan_in) = sqrt(2 / (1 + 5)) * sqrt(3 / 1) = 1."""
    return {g.name: jax.random.uniform(jax.random.fold_in(rng, i), (g.size,), jnp.float32, -1.0, 1.0)
            for i, g in enumerate(groups)}


def bn_scale_importance(params: Any, groups: Sequence[Any], *, reduction: str = 'mean',
                        ) -> dict[str, jax.Array]:
    """Slim's importance {group: f32[C]}: |gamma| of the group's BatchNorms, reduced over them."""
    flat = traverse_util.flatten_dict(params, sep='/')
    out = {}
    for g in groups:
        if not g.norms:
            raise ConfigError(f'channel group {g.name!r} has no BatchNorm: Slim needs BN scales '
                              '(use vgg16_bn, not vgg16, or method depgraph).')
        total = sum(jnp.abs(jnp.asarray(flat[f'{n}/scale'], jnp.float32)) for n in g.norms)
        out[g.name] = total / len(g.norms) if reduction == 'mean' else total
    return out


def magnitude_importance(params: Any, groups: Sequence[Any], *, p: float = 2.0,
                         reduction: str = 'mean', bias: bool = False) -> dict[str, jax.Array]:
    """DepGraph's group magnitude {group: f32[C]} (see the module docstring).

    The per-channel sum of |w|^p over each parameter's slice is the gradient of
    sum(|w|^p * expand(v)) with respect to the channel vector v: `expand` broadcasts v[c] onto
    exactly the entries of channel c (the flatten to the classifier included), so the slices
    are the ones the mask removes, whatever the layer type.
    """
    from vpns_jax.structured import channels

    flat = traverse_util.flatten_dict(params, sep='/')
    out = {}
    for g in groups:
        entries = list(g.producers) + [f'{n}/scale' for n in g.norms] + list(g.consumers)
        extra = (list(g.biases) + [f'{n}/bias' for n in g.norms]) if bias else []
        used = set(entries) | set(extra)

        def total(v, g=g, used=used):
            masks = channels.expand((g,), {g.name: v}, params)
            return sum(jnp.sum(jnp.abs(jnp.asarray(flat[k], jnp.float32)) ** p * m)
                       for k, m in masks.items() if k in used)

        summed = jax.grad(total)(jnp.ones((g.size,), jnp.float32))
        out[g.name] = summed / len(entries) if reduction == 'mean' else summed
    return out


def normalized(importance: Mapping[str, jax.Array], how: str) -> dict[str, jax.Array]:
    """Per-group normalisation (Torch-Pruning's `_normalize`): 'mean' / 'max' / 'sum' divide by the
    group's mean / max / sum; 'none' leaves it."""
    if how == 'none':
        return dict(importance)
    reduce = {'mean': jnp.mean, 'max': jnp.max, 'sum': jnp.sum}[how]
    return {k: v / (reduce(v) + 1e-8) for k, v in importance.items()}


def select(importance: Mapping[str, jax.Array], groups: Sequence[Any], sparsity: float,
           cap: float, scope: str = 'global') -> dict[str, np.ndarray]:
    """{group: bool[C]} channels kept. 'global': `channel_threshold` (floor(sparsity x channels)
    pruned in all, capped groups at most `cap`, the rest re-balanced); 'layer': every group at
    its own fraction, capped groups at min(sparsity, cap) (the total is then below the target
    when sparsity > cap; the row's channel_sparsity says what was pruned)."""
    from vpns_jax.structured import channels

    if scope == 'global':
        return channels.channel_threshold(dict(importance), tuple(groups), sparsity, cap)
    out = {}
    for g in groups:
        own = min(sparsity, cap) if g.capped else sparsity
        out.update(channels.channel_threshold({g.name: importance[g.name]}, (g,), own, cap))
    return out


def importance(criterion: str, state: train_state.TrainState, groups: Sequence[Any],
               options: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The importance of `criterion` (CRITERIA) on the current state."""
    opts = dict(options)
    if criterion == 'scores':
        if set(state.scores) != {g.name for g in groups}:
            raise ValueError("criterion 'scores' needs the channel scores of a 'channel' stage")
        return {k: jnp.abs(v) for k, v in state.scores.items()}
    params = jax.device_get(state.params)
    normalizer = opts.pop('normalizer', 'mean')
    if criterion == 'bn_scale':
        values = bn_scale_importance(params, groups, **opts)
    elif criterion == 'magnitude':
        values = magnitude_importance(params, groups, **opts)
    else:
        raise ValueError(f'unknown channel criterion {criterion!r}; known: {", ".join(CRITERIA)}')
    return normalized(values, normalizer)


def fixed_masks(action: ChannelMaskFrom, state: train_state.TrainState,
                groups: Sequence[Any]) -> dict[str, jax.Array]:
    """The per-parameter bool masks `action` asks for (kept channels -> 1 on all their slices)."""
    imp = importance(action.criterion, state, groups, dict(action.options))
    kept = select(imp, groups, 1.0 - action.density, action.cap, action.scope)
    masks = train_state.expanded_masks(tuple(groups), {k: jnp.asarray(v, jnp.float32)
                                                       for k, v in kept.items()}, state.params)
    return {p: jnp.asarray(m, bool) for p, m in masks.items()}


def channel_masks_of(groups: Sequence[Any], masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{group: bool[C]} back from per-parameter masks: channel c is kept when its first producer
    kernel's output slice has any kept entry (a kept channel keeps its slices of every input group,
    each of which keeps >= 1 channel)."""
    out = {}
    for g in groups:
        m = np.asarray(masks[g.producers[0]], bool)
        out[g.name] = m.reshape(-1, m.shape[-1]).any(axis=0)
    return out
