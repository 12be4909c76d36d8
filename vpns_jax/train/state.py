"""TrainState: the separate pytrees of a run, and how a stage begins."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

from vpns_jax import sparsity
from vpns_jax.train import optim
from vpns_jax.train.stages import Stage

Tree = Any


@struct.dataclass
class TrainState:
    """Everything that changes during training (all leaves are arrays; no None leaves).

    params: nested Flax params (kernels, biases, BN scale/bias). batch_stats: BN running mean/var.
    scores: flat ``{path: f32[kernel shape]}`` over the prunable kernels, ``{}`` for dense methods.
    prompt: ``{'program': f32[out, out, 3]}`` or ``{}`` without a prompt.
    masks: flat ``{path: bool[kernel shape]}`` frozen mask of a 'fixed' stage, ``{}`` otherwise.
    opt_state: the stage optimizer's state (`optim.make_optimizer`).
    step: i32[] iterations done in the current stage.
    rng: PRNG key; per-step keys are ``fold_in(rng, step)``.
    pruned: how many scores a 'learned' stage's threshold removes, as traced i32[] values:
    ``{GLOBAL: k}`` (one global threshold) or ``{path: k}`` (per layer); ``{}`` otherwise.
    """

    params: Tree
    batch_stats: Tree
    scores: dict[str, jax.Array]
    prompt: dict[str, jax.Array]
    masks: dict[str, jax.Array]
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    pruned: dict[str, jax.Array] = struct.field(default_factory=dict)

    def trainables(self) -> dict[str, Tree]:
        """The tree the stage optimizer sees: ``{'params', 'scores', 'prompt'}``."""
        return {'params': self.params, 'scores': self.scores, 'prompt': self.prompt}

    def variables(self) -> dict[str, Tree]:
        """Flax variables ``{'params', 'batch_stats'}`` (params unmasked)."""
        return {'params': self.params, 'batch_stats': self.batch_stats}


def all_finite(tree: Tree) -> jax.Array:
    """bool[]: every floating-point leaf of `tree` is free of NaN and inf (True for no leaves)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def create_state(
    variables: Mapping[str, Tree],
    *,
    rng: jax.Array,
    scores: Mapping[str, jax.Array] | None = None,
    prompt: Mapping[str, jax.Array] | None = None,
) -> TrainState:
    """A state from pretrained Flax variables; no optimizer yet (`begin_stage` builds it).

    Every array is copied: train steps donate the state, and the caller's pretrained variables must
    survive (one run per sparsity level starts from them).

    variables: ``{'params', 'batch_stats'}``.
    scores: e.g. ``sparsity.scaled_score_init(params)``, or None for a dense method.
    prompt: ``prompts.init_prompt(spec)``, or None without a prompt.
    """
    def copy(tree):
        return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)

    return TrainState(
        params=copy(variables['params']),
        batch_stats=copy(variables.get('batch_stats', {})),
        scores=copy(dict(scores or {})),
        prompt=copy(dict(prompt or {})),
        masks={},
        opt_state=optax.EmptyState(),
        step=jnp.zeros((), jnp.int32),
        rng=copy(rng),
    )


GLOBAL = '*'  # key of the one global count in TrainState.pruned


def pruned_counts(scores: Mapping[str, Any], density: float,
                  scope: str = 'global') -> dict[str, np.ndarray]:
    """Host i32 counts a threshold at `density` removes (`TrainState.pruned`): ``{GLOBAL: k}`` or,
    for scope 'layer', ``{path: k}``."""
    sizes = {p: int(np.prod(np.shape(s))) for p, s in scores.items()}
    if scope == 'layer':
        return {p: np.int32(sparsity.num_pruned(n, density)) for p, n in sizes.items()}
    return {GLOBAL: np.int32(sparsity.num_pruned(sum(sizes.values()), density))}


def masks_at(scores: Mapping[str, jax.Array], density: float,
             scope: str = 'global') -> dict[str, jax.Array]:
    """Bool masks |s| > tau keeping `density` of the scores (global or per-layer threshold)."""
    counts = pruned_counts(scores, density, scope)
    return frozen_masks({k: jnp.asarray(v) for k, v in counts.items()}, scores)


def threshold(
    pruned: Mapping[str, jax.Array], scores: Mapping[str, jax.Array]
) -> jax.Array | dict[str, jax.Array]:
    """tau removing `pruned` scores: one f32 scalar (global) or ``{path: scalar}`` (layer)."""
    scores = jax.lax.stop_gradient(dict(scores))
    if GLOBAL in pruned:
        return sparsity.threshold_for_count(scores, pruned[GLOBAL])
    return {p: sparsity.threshold_for_count({p: s}, pruned[p]) for p, s in scores.items()}


def learned_masks(pruned: Mapping[str, jax.Array],
                  scores: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Float masks with the straight-through gradient to the scores ('learned' stages)."""
    return dict(sparsity.ste_masks(dict(scores), threshold(pruned, scores)))


@jax.jit  # one compiled program instead of ~13 eager ops per layer (radix select, compares)
def frozen_masks(pruned: Mapping[str, jax.Array],
                 scores: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Bool masks (no gradient) |s| > tau for the `pruned` counts."""
    return dict(sparsity.hard_masks(dict(scores), threshold(pruned, scores)))


@jax.jit
def zero_pruned(params: Tree, masks: Mapping[str, jax.Array]) -> Tree:
    """params times the flat (bool or float) masks: pruned weights exactly zero."""
    return sparsity.apply_masks(params, masks) if masks else params


# ----------------------------------------------------------------------------------------------------
# 'channel' stages: one score per channel of each group of `vpns_jax.structured` (imported lazily:
# the unstructured engine does not need it)


def _shape_key(tree: Tree) -> tuple:
    flat = traverse_util.flatten_dict(tree, sep='/') if tree else {}
    return tuple(sorted((p, tuple(np.shape(v))) for p, v in flat.items()))


@functools.lru_cache(maxsize=16)
def _groups_cached(model: Any, shapes: tuple, stat_shapes: tuple, input_size: int) -> tuple:
    from vpns_jax.structured import groups as groups_lib

    def spec(shapes):
        return traverse_util.unflatten_dict(
            {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes}, sep='/')

    return tuple(groups_lib.channel_groups(
        model, {'params': spec(shapes), 'batch_stats': spec(stat_shapes)}, input_size))


def channel_groups_of(model: Any, params: Tree, batch_stats: Tree, input_size: int) -> tuple:
    """The model's channel groups (`structured.groups.channel_groups`), from the parameter shapes
    only (works on tracers; cached per model and shapes). input_size: the network input's side, px."""
    return _groups_cached(model, _shape_key(params), _shape_key(batch_stats), int(input_size))


def expanded_masks(groups: tuple, channel_masks: Mapping[str, jax.Array],
                   params: Tree) -> dict[str, jax.Array]:
    """Per-channel masks {group: [C]} -> flat per-parameter masks of the parameters' full shapes
    (`structured.channels.expand`, broadcast), for `zero_pruned` and the 'fixed' path."""
    from vpns_jax.structured import channels

    flat = traverse_util.flatten_dict(params, sep='/')
    return {p: jnp.broadcast_to(m, jnp.shape(flat[p]))
            for p, m in channels.expand(groups, dict(channel_masks), params).items()}


def channel_learned_masks(groups: tuple, scores: Mapping[str, jax.Array], params: Tree,
                          density: float, cap: float) -> dict[str, jax.Array]:
    """Float per-parameter masks of a 'channel' stage with the straight-through gradient to the
    channel scores (`channel_ste_masks`: the threshold is outside the gradient)."""
    from vpns_jax.structured import channels

    cm = channels.channel_ste_masks(dict(scores), groups, 1.0 - density, cap)
    return expanded_masks(groups, cm, params)


def channel_hard_masks(groups: tuple, scores: Mapping[str, jax.Array], params: Tree,
                       density: float, cap: float) -> dict[str, jax.Array]:
    """Bool per-parameter masks of the current channel scores (no gradient)."""
    from vpns_jax.structured import channels

    cm = channels.channel_threshold(jax.lax.stop_gradient(dict(scores)), groups, 1.0 - density, cap)
    return {p: jnp.asarray(m, bool) for p, m in expanded_masks(groups, cm, params).items()}


def begin_stage(
    stage: Stage, state: TrainState, masks: Mapping[str, jax.Array] | None = None
) -> TrainState:
    """Prepare `state` for a fresh `stage`: new optimizer state, step 0, and for a 'fixed' stage the
    frozen mask (given `masks`, else derived from the scores) with pruned weights zeroed.

    Not called on resume: a restored state already holds the stage's optimizer state and step.
    """
    pruned = {}
    if stage.mask_mode == 'channel' and not state.scores:
        raise ValueError(f'stage {stage.name!r} needs channel scores (plan.InitChannelScores).')
    if stage.mask_mode == 'learned' or (stage.mask_mode == 'fixed' and masks is None):
        if not state.scores:
            raise ValueError(f'stage {stage.name!r} needs scores (or, fixed, a given mask).')
        pruned = {k: jnp.asarray(v) for k, v in pruned_counts(
            state.scores, stage.density, stage.threshold_scope).items()}
    if stage.mask_mode == 'fixed':
        if masks is None:
            masks = frozen_masks(pruned, state.scores)
        masks = {p: jnp.asarray(m, bool) for p, m in masks.items()}
        state = state.replace(params=zero_pruned(state.params, masks), masks=masks, pruned={})
    else:
        state = state.replace(masks={}, pruned=pruned if stage.mask_mode == 'learned' else {})
    if stage.prompt.trainable and not state.prompt:
        raise ValueError(f'stage {stage.name!r} trains the prompt but the state has none.')
    if stage.scores.trainable and not state.scores:
        raise ValueError(f'stage {stage.name!r} trains scores but the state has none.')
    opt_state = optim.make_optimizer(stage).init(state.trainables())
    return state.replace(opt_state=opt_state, step=jnp.zeros((), jnp.int32))
