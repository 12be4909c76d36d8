"""Runs a method's chains of stages, computing each distinct stage once per workdir.

Every stage of a run has a content key: a hash of the experiment's data/model fields and of every
stage of the chain up to it (its optimizers, passes, density, start actions). Its checkpoints live
in `WORKDIR/stages/<key>/`: one after its start actions (mask, rewind, label mapping), one after every
epoch (and every `checkpoint_every_steps` iterations). A run walks its chain, restores the deepest
finished stage, and runs the rest, so OMP and LTH at every sparsity share one dense fine-tune, LTH's
round r + 1 starts from round r, and an interrupted run resumes inside the stage it was in.

Jitted steps are shared through `StepCache` by every stage with the same `Stage.compute_key()`: the
density travels in the state (`TrainState.pruned`), so a sweep compiles each kind of step once.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vpns_jax import checkpoint, parallel, preemption, prompts, sparsity, tb, train, transfer
from vpns_jax.errors import ConfigError, Diverged
from vpns_jax.methods import channel_select
from vpns_jax.methods.plan import (
    InitPrompt,
    InitScores,
    LabelMap,
    MaskFrom,
    MaskFromRun,
    Rewind,
    Run,
)
from vpns_jax.sparsity import criteria
from vpns_jax.train import state as train_state
from vpns_jax.train import steps
from vpns_jax.train.stages import Stage

# ----------------------------------------------------------------------------------------------------
# Compiled steps, shared across stages


class StepCache:
    """Jitted train / eval / source-prediction functions keyed by `Stage.compute_key()`.

    `compiles` counts traces (each is one XLA compilation, or one load from the persistent
    compilation cache) per kind of function.
    """

    def __init__(self, model: Any, prompt_spec: prompts.PromptSpec, *, skip_nonfinite: bool = False):
        self.model, self.prompt_spec, self.skip_nonfinite = model, prompt_spec, skip_nonfinite
        self._fns: dict[Any, Callable] = {}
        self.compiles: collections.Counter = collections.Counter()

    def _get(self, kind: str, stage: Stage, body: Callable, **jit_kwargs: Any) -> Callable:
        key = (kind, stage.compute_key())
        if key not in self._fns:
            def counted(*args, _kind=kind):
                self.compiles[_kind] += 1  # runs once per trace
                return body(*args)

            self._fns[key] = jax.jit(counted, **jit_kwargs)
        return self._fns[key]

    def train(self, stage: Stage) -> Callable:
        fn = functools.partial(steps.train_step, stage=stage.compute_key(), model=self.model,
                               prompt_spec=self.prompt_spec, skip_nonfinite=self.skip_nonfinite)
        return self._get('train_step', stage, fn, donate_argnums=0)

    def eval(self, stage: Stage, *, prompted: bool) -> Callable:
        fn = functools.partial(steps.eval_step, stage=stage.compute_key(), model=self.model,
                               prompt_spec=self.prompt_spec, prompted=prompted)
        return self._get(f'eval_step{"_prompted" if prompted else ""}', stage, fn)

    def predict(self, stage: Stage, *, prompted: bool) -> Callable:
        fn = functools.partial(steps.source_predictions, stage=stage.compute_key(),
                               model=self.model, prompt_spec=self.prompt_spec, prompted=prompted)
        return self._get(f'source_predictions{"_prompted" if prompted else ""}', stage, fn)


# ----------------------------------------------------------------------------------------------------
# What the runner needs from the experiment


@dataclasses.dataclass
class Env:
    """The experiment's shared pieces the runner uses (built by `experiment.setup`)."""

    config: Any
    workdir: str
    base_key: str
    model: Any
    initial: dict[str, Any]  # pretrained variables (+ a fresh head with label_mapping=new_head)
    prompt_spec: prompts.PromptSpec
    loaders: dict[str, Any]
    num_source: int
    num_target: int
    put: Callable[[Mapping[str, Any]], dict[str, jax.Array]]
    replicate: Callable[[Any], Any]
    # epoch -> the training split once, augmented, padded eval-style batches with 'mask'
    label_map_batches: Callable[[int], Iterator[dict[str, np.ndarray]]]
    # the same on every process (the criteria must agree on one mask): the whole augmented split
    criterion_batches: Callable[[], Iterator[dict[str, np.ndarray]]]
    # (state, stage, label_map) -> test accuracy without the prompt (`Stage.report_start`)
    evaluate: Callable[..., float]
    steps: StepCache
    primary: bool = True
    stops: preemption.StopRequests = dataclasses.field(default_factory=preemption.NoStops)
    eval_loader: Any = None  # the test split (config.eval_every_epochs); None: no evaluations

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loaders['train'])


def stage_keys(base_key: str, stages: tuple[Stage, ...]) -> list[str]:
    """Content keys of a chain: key_i = H(key_{i-1}, repr(stage_i)) (frozen dataclasses)."""
    keys, previous = [], base_key
    for stage in stages:
        previous = hashlib.sha256(f'{previous}|{stage!r}'.encode()).hexdigest()[:20]
        keys.append(previous)
    return keys


def stage_rng(seed: int, key: str) -> jax.Array:
    """The stage's PRNG key: a real hash of (seed, the chain up to it), so every (method, sparsity,
    round) gets its own stream and a shared stage gets the same one whoever runs it."""
    digest = int(hashlib.sha256(f'{seed}|{key}'.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.PRNGKey(seed), digest)


# ----------------------------------------------------------------------------------------------------
# Stage-start actions


def _prunable_template(params: Any) -> dict[str, Any]:
    flat = sparsity.flatten_params(params)
    return {p: flat[p] for p in sparsity.prunable_paths(params)}


def _real_rows(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    for b in batches:
        valid = np.asarray(b['mask'], bool)
        yield {'image': np.asarray(b['image'])[valid], 'label': np.asarray(b['label'])[valid]}


def _criterion_batches(env: Env, name: str, options: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """Training examples (augmented, as the reference's train loader) for a data-driven criterion:
    per-class samples for GraSP, one batch otherwise."""
    examples = _real_rows(env.criterion_batches())
    if name == 'grasp':
        per_class = options.pop('samples_per_class', 0) or None
        try:
            return [criteria.grasp_batch(examples, env.num_target, per_class)]
        except ValueError as e:
            raise ConfigError(f'config.grasp.samples_per_class: {e}') from e
    return [next(iter(examples))]


def _mask_from(env: Env, action: MaskFrom, state: train.TrainState, current: dict | None,
               rng: jax.Array) -> dict[str, jax.Array]:
    """The bool masks an action asks for, on the current (unmasked-at-rest) state."""
    if action.criterion == 'scores':
        return train_state.masks_at(state.scores, action.density, action.scope)
    options = dict(action.options)
    density = action.density
    if action.within_current and current:
        survivors = sum(int(np.count_nonzero(m)) for m in jax.device_get(current).values())
        total = sum(int(np.size(m)) for m in current.values())
        kept = survivors - round((1.0 - action.density) * survivors)  # torch's amount rounding
        density = kept / total
        options['within'] = current
    batches = [] if action.criterion in ('magnitude', 'random') else _criterion_batches(
        env, action.criterion, options)
    params = train_state.zero_pruned(state.params, current or {})
    return criteria.get(action.criterion)(params, state.batch_stats, env.model, batches, rng,
                                          density, action.scope, **options)


def begin(env: Env, stage: Stage, state: train.TrainState, rng: jax.Array,
          label_map: np.ndarray | None) -> tuple[train.TrainState, np.ndarray | None]:
    """Run `stage.start` on `state`, make the stage's optimizer state, then the label mapping."""
    masks = None
    current = dict(state.masks) or None
    remap = None
    for index, action in enumerate(stage.start):
        if isinstance(action, InitScores):
            state = state.replace(scores=sparsity.scaled_score_init(state.params))
        elif isinstance(action, InitPrompt):
            state = state.replace(prompt=prompts.init_prompt(env.prompt_spec))
        elif isinstance(action, MaskFrom):
            masks = _mask_from(env, action, state, current, jax.random.fold_in(rng, index))
            current = masks
        elif isinstance(action, MaskFromRun):  # a finished run's mask (vpns_jax.transfer)
            masks = {p: jnp.asarray(m) for p, m in transfer.load_masks(action).items()}
            current = masks
        elif isinstance(action, channel_select.InitChannelScores):
            state = state.replace(scores=channel_select.init_scores(
                channel_groups(env, state), jax.random.fold_in(rng, index)))
        elif isinstance(action, channel_select.ChannelMaskFrom):  # structured methods
            masks = channel_select.fixed_masks(action, state, channel_groups(env, state))
            current = masks
        elif isinstance(action, Rewind):  # copies: the train steps donate the state's buffers
            fresh = train.create_state(env.initial, rng=rng)
            state = state.replace(params=fresh.params, batch_stats=fresh.batch_stats)
        elif isinstance(action, LabelMap):
            remap = action
        else:
            raise TypeError(f'stage {stage.name!r}: unknown start action {action!r}')
    if stage.prompt_in_stage and not state.prompt:
        state = state.replace(prompt=prompts.init_prompt(env.prompt_spec))
    if stage.mask_mode == 'fixed' and masks is None:
        masks = current  # the previous stage's mask (None: from the scores)
    state = train.begin_stage(stage, state.replace(rng=rng), masks if stage.mask_mode == 'fixed'
                              else None)
    state = env.replicate(state)
    if remap is not None:
        label_map = flm(env, state, stage, prompted=remap.prompted)
    return state, label_map


def template(env: Env, stages: tuple[Stage, ...], upto: int, fresh: train.TrainState) -> Any:
    """Shapes and dtypes of the state at stage `upto` (for restoring it), without running any
    criterion or data: the same structural steps as `begin`, under `jax.eval_shape`."""

    def structure(state: train.TrainState) -> train.TrainState:
        for stage in stages[:upto + 1]:
            masks = dict(state.masks) or None
            for action in stage.start:
                if isinstance(action, InitScores):
                    state = state.replace(scores=sparsity.scaled_score_init(state.params))
                elif isinstance(action, InitPrompt):
                    state = state.replace(prompt=prompts.init_prompt(env.prompt_spec))
                elif isinstance(action, channel_select.InitChannelScores):
                    state = state.replace(scores={g.name: jnp.zeros((g.size,), jnp.float32)
                                                  for g in channel_groups(env, state)})
                elif isinstance(action, channel_select.ChannelMaskFrom):
                    groups = channel_groups(env, state)
                    masks = {p: jnp.ones(jnp.shape(m), bool) for p, m in train_state.expanded_masks(
                        groups, {g.name: jnp.ones((g.size,)) for g in groups}, state.params).items()}
                elif isinstance(action, (MaskFrom, MaskFromRun)):
                    masks = {p: jnp.ones(jnp.shape(w), bool)
                             for p, w in _prunable_template(state.params).items()}
            if stage.prompt_in_stage and not state.prompt:
                state = state.replace(prompt=prompts.init_prompt(env.prompt_spec))
            state = train.begin_stage(stage, state, masks if stage.mask_mode == 'fixed' else None)
        return state

    return jax.eval_shape(structure, fresh)


def channel_groups(env: Env, state: train.TrainState) -> tuple:
    """The model's channel groups (`vpns_jax.structured`), from the state's parameter shapes."""
    return train_state.channel_groups_of(env.model, state.params, state.batch_stats,
                                         env.prompt_spec.output_size)


def flm(env: Env, state: train.TrainState, stage: Stage, *, prompted: bool,
        epoch: int = 0) -> np.ndarray | None:
    """Frequency label mapping over the augmented training split (eval mode, current mask)."""
    if env.config.label_mapping == 'new_head':
        return None
    predict = env.steps.predict(stage, prompted=prompted)
    return train.flm_label_map(predict, state, env.label_map_batches(epoch), env.num_source,
                               env.num_target, env.put)


# ----------------------------------------------------------------------------------------------------
# Running a chain


@dataclasses.dataclass
class ChainEnd:
    """A finished run's chain: final state, label mapping (and the last stage's mapping at its
    start), the last stage, and its cost."""

    state: train.TrainState
    label_map: np.ndarray | None
    stage: Stage
    start_label_map: np.ndarray | None  # the last stage's mapping before any re-mapping
    start_accuracy: float | None  # without the prompt, when the last stage began (report_start)
    seconds: float
    gradient_steps: int
    epochs: list[int]
    stage_key: str = ''  # the last stage's content key
    iterations: int = 0  # of the whole chain (the global step of its end)
    images: int = 0  # training images the chain's passes read (iterations x batch x views)
    compile_seconds: float | None = None  # sum of the stages' first iterations (None: not recorded)


def _meta(progress: dict[str, Any]) -> dict[str, Any]:
    lm = progress['label_map']
    return {**progress, 'label_map': None if lm is None else np.asarray(lm).tolist()}


def _label_map(lm: Any) -> np.ndarray | None:
    return None if lm is None else np.asarray(lm, np.int32)


def _finished(meta: Mapping[str, Any], stage: Stage) -> bool:
    return meta.get('epoch') == stage.epochs and meta.get('iteration') == 0


def _done(ckpt: checkpoint.RunCheckpointer, stage: Stage) -> dict[str, Any] | None:
    """The meta of the stage's newest checkpoint whose meta reads (unreadable newer ones are set
    aside) when it holds the stage's end, else None."""
    if ckpt.latest_step() is None:
        return None
    meta = ckpt.read_meta()
    return meta if _finished(meta, stage) else None


class UnfinishedChain(Exception):
    """`run_chain(..., allow_training=False)` found the run's last stage unfinished (nothing was trained)."""


def _plus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def run_chain(env: Env, run: Run, fresh: train.TrainState, *,
              allow_training: bool = True, logger: tb.RunLogger | None = None) -> ChainEnd:
    """Run `run.stages` from `fresh` (the pretrained state), reusing finished stages. With
    `allow_training=False` (mode=finalize) only a finished last stage is used: `UnfinishedChain` otherwise.
    logger: where step / epoch / test metrics go (default: one for `run` in the workdir)."""
    if logger is None:
        with tb.RunLogger(env.workdir, run.name, primary=env.primary) as own:
            return run_chain(env, run, fresh, allow_training=allow_training, logger=own)
    keys = stage_keys(env.base_key, run.stages)
    dirs = [os.path.join(env.workdir, 'stages', k) for k in keys]
    state, label_map, seconds, first = fresh, None, 0.0, 0
    compile_seconds: float | None = 0.0
    start: dict[str, Any] = {}
    for i in reversed(range(len(run.stages))):
        if not os.path.isdir(dirs[i]):
            continue
        with checkpoint.RunCheckpointer(dirs[i]) as ckpt:
            meta = _done(ckpt, run.stages[i])
            if meta is None:
                continue
            # The newest readable checkpoint: if the end state itself is unreadable (set aside),
            # an earlier one of the stage is, and `_run_stage` resumes the stage from it.
            restored, meta = ckpt.restore(abstract_state=template(env, run.stages, i, fresh))
            if not _finished(meta, run.stages[i]):
                continue
        state, label_map = env.replicate(restored), _label_map(meta['label_map'])
        start = meta
        seconds, first = float(meta['chain_seconds']), i + 1
        compile_seconds = meta.get('chain_compile_seconds')  # None: written before it was recorded
        logging.info('%s: stage %d/%d (%s) is done already (%s), reusing it', run.name, i + 1,
                     len(run.stages), run.stages[i].name, keys[i])
        break
    # Every process decided from the same files; only now may the next stage create its directory.
    parallel.barrier(f'chain lookup {keys[-1]}')
    if not allow_training and first < len(run.stages):
        raise UnfinishedChain(f'{run.name}: stage {first + 1}/{len(run.stages)} '
                              f'({run.stages[first].name}) is not finished')
    for i in range(first, len(run.stages)):
        state, start, seconds = _run_stage(env, run, i, keys[i], dirs[i], state, label_map,
                                           seconds, fresh, compile_seconds, logger)
        label_map = _label_map(start['label_map'])
        compile_seconds = start.get('chain_compile_seconds')
    spe = env.steps_per_epoch
    return ChainEnd(state=state, label_map=label_map,
                    start_label_map=_label_map(start.get('start_label_map')),
                    start_accuracy=start.get('start_accuracy'), stage=run.stages[-1],
                    seconds=seconds,
                    gradient_steps=sum(s.epochs * spe * s.steps_per_iteration for s in run.stages),
                    epochs=[s.epochs for s in run.stages], stage_key=keys[-1],
                    iterations=sum(s.epochs * spe for s in run.stages),
                    images=sum(s.epochs * spe * env.config.batch_size * len(s.views)
                               for s in run.stages),
                    compile_seconds=compile_seconds)


def _run_stage(env: Env, run: Run, i: int, key: str, directory: str, state: train.TrainState,
               label_map: np.ndarray | None, seconds_before: float,
               fresh: train.TrainState, compile_before: float | None = 0.0,
               logger: tb.RunLogger | None = None) -> tuple[Any, dict[str, Any], float]:
    config, stage = env.config, run.stages[i]
    ckpt = checkpoint.RunCheckpointer(directory)
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            # The newest readable checkpoint (unreadable newer ones are set aside, with a warning).
            state, meta = ckpt.restore(abstract_state=template(env, run.stages, i, fresh))
            state, progress = env.replicate(state), dict(meta)
            progress['label_map'] = _label_map(progress['label_map'])
            for view, data_state in (progress.get('data') or {}).items():
                env.loaders[view].check_state(data_state)  # DataError: another dataset/seed/batch
            logging.info('%s: resuming stage %s %s', run.name, stage.name,
                         position(stage, progress['epoch'], progress['iteration'],
                                   env.steps_per_epoch))
        else:
            started = time.perf_counter()
            logging.info('%s: stage %d/%d %s (%d epochs; %s)', run.name, i + 1, len(run.stages),
                         stage.name, stage.epochs, key)
            state, label_map = begin(env, stage, state, stage_rng(config.seed, key), label_map)
            progress = {'stage': stage.name, 'epoch': 0, 'iteration': 0, 'label_map': label_map,
                        'start_label_map': None if label_map is None else label_map.tolist(),
                        'start_accuracy': (env.evaluate(state, stage, label_map)
                                           if stage.report_start else None),
                        'stage_seconds': time.perf_counter() - started,
                        'compile_seconds': 0.0, 'chain_compile_seconds': compile_before}
            progress['chain_seconds'] = seconds_before + progress['stage_seconds']
            ckpt.save(0, state, _meta(progress))
        if progress['epoch'] < stage.epochs:
            state = _train(env, run, stage, state, ckpt, progress, seconds_before,
                           index=i, key=key, logger=logger, compile_before=compile_before)
        ckpt.keep_latest_only()  # the stage's end state is all a later run can reuse
        return state, _meta(progress), float(progress['chain_seconds'])
    finally:
        ckpt.close()  # an interrupted run still finishes writing its last checkpoint


def position(stage: Stage, epoch: int, iteration: int, steps_per_epoch: int) -> str:
    """Where a checkpoint of `stage` stands: 'at the start of epoch 2/3', 'in epoch 2/3 after
    iteration 5/16', or 'after its last epoch (3/3)'."""
    if epoch >= stage.epochs:
        return f'after its last epoch ({stage.epochs}/{stage.epochs})'
    if iteration == 0:
        return f'at the start of epoch {epoch + 1}/{stage.epochs}'
    return f'in epoch {epoch + 1}/{stage.epochs} after iteration {iteration}/{steps_per_epoch}'


_finite = jax.jit(train.all_finite)


def check_finite(state: train.TrainState, stage: Stage, epoch: int, iteration: int) -> None:
    """`train.NonFinite` if any float leaf of `state` is NaN or inf (checked before every save,
    so a diverged state is never kept in place of a good one)."""
    if not bool(_finite(state)):
        raise train.NonFinite(stage, epoch, iteration, {'parameters or optimizer state': np.nan})


def _diverged(run: Run, stage: Stage, err: train.NonFinite, ckpt: checkpoint.RunCheckpointer,
              spe: int) -> Diverged:
    latest = ckpt.latest_step()
    if latest is None:
        good = 'no checkpoint of this stage was written'
    else:
        meta = ckpt.read_meta(latest)
        good = (f'the last good checkpoint, {ckpt.directory}/{latest} '
                f'({position(stage, meta["epoch"], meta["iteration"], spe)}), is kept')
    bad = ', '.join(f'{k} {v}' for k, v in sorted(err.metrics.items()) if not np.isfinite(v))
    return Diverged(
        f'{run.name} diverged: {bad} in stage {stage.name} '
        f'{position(stage, err.epoch, err.iteration, spe)}; {good}. Lower that stage\'s learning '
        'rate (a rerun with other method options starts the stage anew), or rerun with '
        '--config.on_nonfinite=skip_batch to drop such batches and resume from that checkpoint.')


def _train(env: Env, run: Run, stage: Stage, state: train.TrainState,
           ckpt: checkpoint.RunCheckpointer, progress: dict[str, Any],
           seconds_before: float, *, index: int | None = None, key: str = '',
           logger: tb.RunLogger | None = None,
           compile_before: float | None = 0.0) -> train.TrainState:
    config, spe = env.config, env.steps_per_epoch
    started, stage_before = time.perf_counter(), float(progress['stage_seconds'])
    stage_compile = progress.get('compile_seconds')  # None: a checkpoint from before it was kept
    index = run.stages.index(stage) if index is None else index
    offset = sum(s.epochs * spe for s in run.stages[:index])  # global step before this stage
    logger = logger or tb.RunLogger(env.workdir, run.name, primary=env.primary)
    logger.resume(key, offset + progress['epoch'] * spe + progress['iteration'])
    info = {'stage': stage.name, 'stage_key': key}
    eval_every, last_stage = config.eval_every_epochs, index == len(run.stages) - 1

    def save(state: train.TrainState, epoch: int, iteration: int, label_map: Any,
             first: float | None = None) -> None:
        check_finite(state, stage, epoch, iteration)
        stage_seconds = stage_before + time.perf_counter() - started
        compile_seconds = _plus(stage_compile, first or 0.0)
        progress.update(epoch=epoch, iteration=iteration, label_map=_label_map(label_map),
                        stage_seconds=stage_seconds, chain_seconds=seconds_before + stage_seconds,
                        compile_seconds=compile_seconds,
                        chain_compile_seconds=_plus(compile_before, compile_seconds),
                        data={v: env.loaders[v].state_at(epoch, iteration) for v in stage.views
                              if hasattr(env.loaders[v], 'state_at')})  # topology-free position
        ckpt.save(epoch * spe + iteration, state, _meta(progress))

    def log_hook(log: train.StepLog) -> None:
        logger.log('step', offset + log.epoch * spe + log.iteration,
                   {**info, 'epoch': log.epoch + 1, 'iteration': log.iteration},
                   tb.step_scalars(log.metrics, log.lr, log.images_per_second))

    def epoch_hook(end: train.EpochEnd) -> None:
        epoch = end.epoch + 1
        logger.log('epoch', offset + epoch * spe, {**info, 'epoch': epoch}, end.metrics)
        if evaluate_now(epoch):
            prompted, accuracy = measure_test(env, run, stage, end.state, end.label_map,
                                               progress.get('start_label_map'))
            logger.log('test', offset + epoch * spe, {**info, 'epoch': epoch, 'prompted': prompted},
                       {'accuracy': accuracy})
        if epoch % config.checkpoint_every_epochs == 0 or epoch == stage.epochs:
            save(end.state, epoch, 0, end.label_map, end.first_iteration_seconds)

    def evaluate_now(epoch: int) -> bool:
        """Every `eval_every` epochs (0: at the stage's end; -1: never); never the run's last
        epoch, whose state the run's own evaluation measures (experiment._finish)."""
        if env.eval_loader is None or eval_every < 0 or (last_stage and epoch == stage.epochs):
            return False
        return epoch % eval_every == 0 if eval_every else epoch == stage.epochs

    hooks: list[Callable] = []
    if stage.remap_every_epoch or config.label_mapping == 'ilm':
        hooks.append(lambda end: flm(env, end.state, end.stage, prompted=end.stage.prompt_in_stage,
                                     epoch=end.epoch + 1))
    hooks.append(epoch_hook)
    def save_now(end: train.StepEnd) -> None:  # a stop request: on disk before the exit
        save(end.state, end.epoch, end.iteration, end.label_map, end.first_iteration_seconds)
        ckpt.wait()

    try:
        state, _ = train.run_stage(
            stage, state, env.model, {v: env.loaders[v] for v in stage.views},
            prompt_spec=env.prompt_spec, label_map=progress['label_map'], hooks=hooks,
            start_epoch=progress['epoch'], start_iteration=progress['iteration'],
            log_every=config.log_every_steps, put_batch=env.put,
            step_hook=lambda end: save(end.state, end.epoch, end.iteration, end.label_map,
                                       end.first_iteration_seconds),
            step_hook_every=config.checkpoint_every_steps, step_fn=env.steps.train(stage),
            stops=env.stops, stop_hook=save_now, on_nonfinite=config.on_nonfinite,
            log_hook=log_hook)
    except train.NonFinite as e:
        ckpt.wait()  # the saves in flight hold finite states (checked before each save)
        raise _diverged(run, stage, e, ckpt, spe) from None
    except preemption.Stopped as e:
        where = position(stage, progress['epoch'], progress['iteration'], spe)
        raise preemption.Stopped(
            f'{e}: {run.name} saved {ckpt.directory}/{ckpt.latest_step()} (stage {stage.name} '
            f'{where}); rerun the same command to resume from there') from None
    return state


def measure_test(env: Env, run: Run, stage: Stage, state: train.TrainState, label_map: Any,
                  start_label_map: Any = None) -> tuple[bool, float]:
    """(prompted, test accuracy) of `state` measured as the run's results row reports it: through
    the prompt when the run reports the prompted accuracy, else without it (with the stage's
    starting label map when the mapping followed the prompt). Eval mode, no rng: training is
    not affected."""
    has_prompt = run.has_prompt and bool(state.prompt)
    prompted = bool(run.prompt_at_test and has_prompt)
    if (not prompted and has_prompt and start_label_map is not None
            and (stage.remap_every_epoch or env.config.label_mapping == 'ilm')):
        label_map = start_label_map
    fn = env.steps.eval(stage, prompted=prompted)
    return prompted, train.evaluate(fn, state, env.eval_loader, _label_map(label_map),
                                    env.put)['accuracy']
