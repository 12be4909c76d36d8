"""Module-level pure train/eval steps; one composition for every method.

    x = normalize(prompt(images)) if the pass is prompted else normalize(images)
    logits = head_map(model.apply({'params': params * masks, 'batch_stats': s}, x))

`train_step` runs ALL passes of one iteration inside one jitted function, sequentially and in the
stage's order: each pass is its own forward/backward and optimizer step on the state left by the
previous pass, so a 'learned' mask of pass 2 comes from the scores after step 1 (tau is recomputed
from the current scores at the start of every pass, which is the same as refreshing it after every
score step). Statics (model, prompt spec, stage) are bound with `functools.partial` by the
``make_*`` factories, which jit once per stage.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from vpns_jax import label_mapping, prompts
from vpns_jax.data import device_augment
from vpns_jax.errors import ConfigError
from vpns_jax.train import optim
from vpns_jax.train.stages import GROUPS, Pass, Stage
from vpns_jax.train.state import (
    TrainState,
    all_finite,
    channel_groups_of,
    channel_hard_masks,
    channel_learned_masks,
    frozen_masks,
    learned_masks,
    zero_pruned,
)

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
_EVAL_RNG_SALT = 2**31 - 1  # eval key of a 'random' prompt: fold_in(rng, salt)
_DROPOUT_SALT = 2**31 - 2  # dropout key of a pass: fold_in(pass rng, salt)


def current_masks(state: TrainState, stage: Stage, model: Any = None,
                  input_size: int | None = None) -> dict[str, jax.Array]:
    """Hard (bool) masks to evaluate with: the frozen mask of a 'fixed' stage, the current top-k
    of the scores in a 'learned' stage, the expanded channel threshold of a 'channel' stage (needs
    `model` and the network `input_size` for its channel groups), none for a dense stage."""
    if stage.mask_mode == 'learned':
        return frozen_masks(state.pruned, state.scores)
    if stage.mask_mode == 'channel':
        if model is None or input_size is None:
            raise ValueError("current_masks of a 'channel' stage needs the model and input size")
        groups = channel_groups_of(model, state.params, state.batch_stats, input_size)
        return channel_hard_masks(groups, state.scores, state.params, stage.density,
                                  stage.channel_cap)
    return dict(state.masks)


def bn_scale_paths(params: Any) -> tuple[str, ...]:
    """Flat paths of every BatchNorm scale (gamma) in `params` (Flax BatchNorm's 'scale' leaves)."""
    return tuple(p for p in flatten_dict(params, sep='/') if p.endswith('/scale'))


def with_bn_l1(grads: Any, params: Any, lam: float) -> Any:
    """Nested param gradients plus lam * sign(gamma) on every BatchNorm scale (Network Slimming's
    subgradient of lam * sum|gamma|; sign(0) = 0 as torch.sign)."""
    flat, values = flatten_dict(grads, sep='/'), flatten_dict(params, sep='/')
    for p in bn_scale_paths(params):
        flat[p] = flat[p] + lam * jnp.sign(values[p])
    return unflatten_dict(flat, sep='/')


def batch_images(batch: Batch, *, view: str, prompt_spec: Any) -> jax.Array:
    """The batch's images as f32[B, S, S, 3] in [0, 1]: float images as they are; uint8 images at
    the stored size (on-device augmentation) through `device_augment.apply` for `view` ('train':
    crop and flip from batch['crop'], 'prompt' / 'eval': resize only), S = prompt_spec.input_size."""
    images = batch['image']
    if images.dtype != jnp.uint8:
        return images
    if prompt_spec is None:
        raise ConfigError('uint8 batches (config.data.augment_on_device) need the prompt spec for '
                          'the input size; pass prompt_spec to the step factory.')
    return device_augment.apply(batch, input_size=prompt_spec.input_size, view=view)


def model_inputs(images: jax.Array, prompt: Mapping[str, jax.Array], *, prompted: bool,
                 prompt_spec: Any, rng: jax.Array | None) -> jax.Array:
    """f32[B, H, W, 3] in [0, 1] -> normalized network input, through the prompt when `prompted`."""
    if prompted:
        images = prompts.apply_prompt(dict(prompt), images, prompt_spec, rng)
    return prompts.normalize(images)


def head_logits(logits: jax.Array, label_map: jax.Array | None) -> jax.Array:
    """f32[B, S] source logits -> f32[B, T] via the label mapping (None: identity / new head)."""
    return logits if label_map is None else label_mapping.map_logits(logits, label_map)


def pass_step(state: TrainState, batch: Batch, label_map: jax.Array | None,
              factors: Mapping[str, jax.Array], *, index: int, pass_: Pass, stage: Stage,
              model: Any, prompt_spec: Any, collected: Mapping[str, Any] | None = None,
              ) -> tuple[TrainState, Metrics, dict[str, Any] | None]:
    """One pass: forward (BN in train mode), CE loss, gradient, and the pass's rule.

    'step': one optimizer step of the pass's groups. 'collect': no step; returns the gradient of
    every group of the state (third output). 'bilevel': the gradient of the pass's groups plus
    BiP's implicit term −bilevel_lr · (g ⊙ g_collected) (`collected` = the previous 'collect'
    pass's gradients), then one step. `index` is the pass's position in the iteration (it salts the
    RNG and names the metrics). `train_step` chains the passes of a stage.
    """
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), index)
    images = batch_images(batch, view='prompt' if pass_.view == 'prompt' else 'train',
                          prompt_spec=prompt_spec)
    # The prompt gets no gradient and no update in an un-prompted pass (reference ambiguity 3).
    active = pass_.active_groups(stage.trainable_groups)
    trainables = state.trainables()
    fixed = dict(state.masks)
    # 'collect' differentiates everything the state has (BiP: "everything trainable").
    wrt = tuple(g for g in GROUPS if trainables[g] and (g != 'prompt' or pass_.prompted)) \
        if pass_.rule == 'collect' else active

    def loss_fn(diff):
        tr = {**trainables, **diff}
        if stage.mask_mode == 'learned':
            masks = learned_masks(state.pruned, tr['scores'])
        elif stage.mask_mode == 'channel':  # the channel threshold from the current scores
            groups = channel_groups_of(model, tr['params'], state.batch_stats, images.shape[1])
            masks = channel_learned_masks(groups, tr['scores'], tr['params'], stage.density,
                                          stage.channel_cap)
        else:
            masks = fixed
        params = zero_pruned(tr['params'], masks)
        x = model_inputs(images, tr['prompt'], prompted=pass_.prompted,
                         prompt_spec=prompt_spec, rng=rng)
        # Train mode as torch's model.train(): BN batch statistics and (VGG) dropout active.
        logits, updated = model.apply({'params': params, 'batch_stats': state.batch_stats}, x,
                                      train=True, mutable=['batch_stats'],
                                      rngs={'dropout': jax.random.fold_in(rng, _DROPOUT_SALT)})
        logits = head_logits(logits, label_map)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
        return loss, (updated['batch_stats'], logits)

    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        {g: trainables[g] for g in wrt})
    tag = f'pass{index}'
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32))
    metrics = {f'{tag}/loss': loss, f'{tag}/accuracy': accuracy}
    if pass_.rule == 'collect':
        return state.replace(batch_stats=batch_stats), metrics, grads
    if pass_.rule == 'bilevel':
        grads = _with_implicit_term(grads, collected or {}, pass_, active)
    grads = {g: grads[g] if g in grads and g in active else jax.tree.map(jnp.zeros_like,
                                                                            trainables[g])
             for g in GROUPS}
    if stage.bn_l1 and 'params' in active:  # Slim's sparsity term, before the optimizer
        grads['params'] = with_bn_l1(grads['params'], trainables['params'], stage.bn_l1)
    if fixed:  # pruned weights get no gradient, hence no weight decay and no momentum
        grads['params'] = zero_pruned(grads['params'], fixed)
    new, opt_state = optim.apply_updates(optim.make_optimizer(stage), grads, state.opt_state,
                                         trainables, active=active, factors=factors)
    if fixed and 'params' in active:  # keep the exported model exactly sparse
        new['params'] = zero_pruned(new['params'], fixed)
    state = state.replace(params=new['params'], scores=new['scores'], prompt=new['prompt'],
                          batch_stats=batch_stats, opt_state=opt_state)
    return state, metrics, None


def _with_implicit_term(grads: dict[str, Any], collected: Mapping[str, Any], pass_: Pass,
                        active: tuple[str, ...]) -> dict[str, Any]:
    """BiP's upper-level gradient: g − bilevel_lr · (G ⊙ G_collected) for every active group.

    'port' (the authors' code, BiP issue #3): G = this pass's gradient of the same parameter.
    'algorithm' (BiP's Algorithm): G ⊙ G_collected is the collected gradient w.r.t. the weights,
    squared, aligned with each kernel's scores (same shape, same path).
    """
    out = dict(grads)
    lr = pass_.bilevel_lr
    for g in active:
        if pass_.implicit == 'port':
            term = jax.tree.map(jnp.multiply, grads[g], collected[g]) if g in collected else None
        elif g == 'scores':
            weight_grads = flatten_dict(collected['params'], sep='/')
            term = {p: jnp.square(weight_grads[p]) for p in grads[g]}
        else:
            term = None
        if term is not None:
            out[g] = jax.tree.map(lambda a, t: a - lr * t, grads[g], term)
    return out


def train_step(state: TrainState, batches: Mapping[str, Batch], label_map: jax.Array | None,
               factors: Mapping[str, jax.Array], *, stage: Stage, model: Any,
               prompt_spec: Any = None, skip_nonfinite: bool = False) -> tuple[TrainState, Metrics]:
    """One iteration: every pass of `stage` in order, each with its own optimizer step.

    batches: ``{view: {'image': f32[B,H,W,3] in [0,1], 'label': i32[B]}}`` for the views of the
    stage. label_map: i32[T] FLM index vector into the source logits, or None. factors: per-group
    lr multipliers of the current epoch (`optim.lr_factors`). skip_nonfinite: when a loss or the
    updated state is not finite, the iteration's updates are dropped (the state stays as it was,
    apart from the step count) and metric 'skipped' is 1 (`config.on_nonfinite='skip_batch'`).
    Returns the new state (step + 1) and scalar metrics.
    """
    before = state
    metrics: Metrics = {}
    collected = None
    for index, pass_ in enumerate(stage.passes):
        state, m, grads = pass_step(state, batches[pass_.view], label_map, factors, index=index,
                                    pass_=pass_, stage=stage, model=model,
                                    prompt_spec=prompt_spec, collected=collected)
        collected = grads if grads is not None else collected
        metrics.update(m)
    if skip_nonfinite:
        ok = all_finite(metrics) & all_finite(state)
        state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), state, before)
        metrics['skipped'] = 1.0 - ok.astype(jnp.float32)
    return state.replace(step=before.step + 1), metrics


def _eval_logits(state: TrainState, images: jax.Array, *, stage: Stage, model: Any,
                 prompt_spec: Any, prompted: bool) -> jax.Array:
    masks = current_masks(state, stage, model, images.shape[1])
    x = model_inputs(images, state.prompt, prompted=prompted, prompt_spec=prompt_spec,
                     rng=jax.random.fold_in(state.rng, _EVAL_RNG_SALT))
    return model.apply({'params': zero_pruned(state.params, masks),
                        'batch_stats': state.batch_stats}, x, train=False)


def _eval_images(batch: Batch, prompt_spec: Any) -> jax.Array:
    """Eval batches are resized only, except those with crop parameters (the augmented pass over
    the training split for label mapping)."""
    return batch_images(batch, view='train' if 'crop' in batch else 'eval', prompt_spec=prompt_spec)


def eval_step(state: TrainState, batch: Batch, label_map: jax.Array | None, *, stage: Stage,
              model: Any, prompt_spec: Any = None, prompted: bool = False) -> Metrics:
    """Correct counts of one eval batch: BN in eval mode, hard mask applied, prompt on/off.

    batch: ``{'image', 'label', 'mask': bool[B]}`` ('mask' marks real examples of a padded batch;
    absent means all real). Returns ``{'correct': i32[], 'count': i32[], 'loss_sum': f32[]}`` over
    valid rows.
    """
    images = _eval_images(batch, prompt_spec)
    logits = head_logits(_eval_logits(state, images, stage=stage, model=model,
                                      prompt_spec=prompt_spec, prompted=prompted), label_map)
    valid = batch.get('mask', jnp.ones(batch['label'].shape, bool))
    hit = (jnp.argmax(logits, -1) == batch['label']) & valid
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return {'correct': hit.sum().astype(jnp.int32), 'count': valid.sum().astype(jnp.int32),
            'loss_sum': jnp.where(valid, ce, 0.0).sum()}


def source_predictions(state: TrainState, batch: Batch, *, stage: Stage, model: Any,
                       prompt_spec: Any = None, prompted: bool = False) -> jax.Array:
    """i32[B] argmax over the raw source logits (eval mode, current hard mask), for FLM counts."""
    logits = _eval_logits(state, _eval_images(batch, prompt_spec), stage=stage, model=model,
                          prompt_spec=prompt_spec, prompted=prompted)
    return jnp.argmax(logits, -1).astype(jnp.int32)


def make_train_step(stage: Stage, model: Any, prompt_spec: Any = None, *,
                    skip_nonfinite: bool = False) -> Callable:
    """`train_step` with the statics bound, jitted, state donated:
    ``(state, batches, label_map, factors) -> (state, metrics)``."""
    fn = functools.partial(train_step, stage=stage, model=model, prompt_spec=prompt_spec,
                           skip_nonfinite=skip_nonfinite)
    return jax.jit(fn, donate_argnums=0)


def make_eval_step(stage: Stage, model: Any, prompt_spec: Any = None, *,
                   prompted: bool = False) -> Callable:
    """Jitted ``(state, batch, label_map) -> {'correct', 'count', 'loss_sum'}``."""
    return jax.jit(functools.partial(eval_step, stage=stage, model=model,
                                     prompt_spec=prompt_spec, prompted=prompted))


def make_source_predictions(stage: Stage, model: Any, prompt_spec: Any = None, *,
                            prompted: bool = False) -> Callable:
    """Jitted ``(state, batch) -> i32[B]`` source-class predictions."""
    return jax.jit(functools.partial(source_predictions, stage=stage, model=model,
                                     prompt_spec=prompt_spec, prompted=prompted))
