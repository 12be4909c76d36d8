"""The one generic loop: epochs x iterations of a stage, progress log, per-epoch hooks, resume."""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from vpns_jax import label_mapping, parallel, preemption
from vpns_jax.train import optim, steps
from vpns_jax.train.stages import Stage
from vpns_jax.train.state import TrainState

Batch = Mapping[str, Any]
# Per view, one of: an object with ``epoch(e, start_step=k)`` (`data.pipeline.TrainLoader`: seeks),
# a callable ``e -> iterable`` (deterministic per epoch), or an iterable yielding one epoch per
# ``iter()``. The last two skip resumed batches by consuming them.
EpochSource = Any


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What a per-epoch hook sees; `state` is valid only during the hook (the next step donates
    its buffers)."""

    stage: Stage
    epoch: int
    state: TrainState
    label_map: jax.Array | None
    metrics: dict[str, float]
    first_iteration_seconds: float | None = None  # this call's first iteration (compile), if run


# A hook may return a new label map (ILM re-mapping), used from the next epoch on; None keeps it.
EpochHook = Callable[[EpochEnd], jax.Array | None]


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """What a step hook sees every `step_hook_every` iterations inside an epoch: `iteration` = how
    many iterations of `epoch` are done; `state` is valid only during the hook."""

    stage: Stage
    epoch: int
    iteration: int
    state: TrainState
    label_map: jax.Array | None
    first_iteration_seconds: float | None = None  # this call's first iteration (compile), if run


@dataclasses.dataclass(frozen=True)
class StepLog:
    """What a log hook sees at each progress log line (every `log_every` iterations): `iteration`
    = iterations of `epoch` (0-based) done; `metrics` = that iteration's (host floats, fetched for
    the log line anyway); `lr` = the learning rate of each trained group this epoch;
    `images_per_second` over the iterations since the previous log line (None right after the
    compiling first iteration)."""

    stage: Stage
    epoch: int
    iteration: int
    metrics: dict[str, float]
    lr: dict[str, float]
    images_per_second: float | None


@dataclasses.dataclass(frozen=True)
class StageResult:
    """Bookkeeping of one `run_stage` call: epochs and iterations run, optimizer steps
    (iterations x passes: two per iteration for VPNs), wall seconds, last epoch's mean metrics.

    first_iteration_seconds: wall time of the call's first iteration, which includes tracing and
    compiling the step (or loading it from the persistent compilation cache); None if none ran.
    """

    name: str
    epochs: int
    iterations: int
    gradient_steps: int
    seconds: float
    metrics: dict[str, float]
    first_iteration_seconds: float | None = None


def _epoch_iter(source: EpochSource, epoch: int, skip: int) -> Iterator[Batch]:
    """Iterator over `epoch` of `source`, positioned after `skip` batches."""
    if callable(getattr(source, 'epoch', None)):
        return iter(source.epoch(epoch, start_step=skip))
    batches = source(epoch) if callable(source) else source
    return itertools.islice(iter(batches), skip, None)


def _length(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def resume_position(state: TrainState, steps_per_epoch: int) -> tuple[int, int]:
    """(start_epoch, start_iteration) of a restored state (`state.step` counts stage iterations)."""
    step = int(jax.device_get(state.step))
    return step // steps_per_epoch, step % steps_per_epoch


class NonFinite(Exception):  # noqa: N818 (the runner turns it into errors.Diverged)
    """A non-finite loss or metric in `stage` at `epoch` (0-based), after `iteration` iterations
    of it (1-based: the iteration that produced it)."""

    def __init__(self, stage: Stage, epoch: int, iteration: int, metrics: Mapping[str, float]):
        self.stage, self.epoch, self.iteration, self.metrics = stage, epoch, iteration, dict(metrics)
        bad = ', '.join(f'{k} {v}' for k, v in sorted(self.metrics.items()) if not np.isfinite(v))
        super().__init__(f'{stage.name} epoch {epoch + 1}/{stage.epochs}, iteration {iteration}: '
                         f'{bad}')


def _check_finite(metrics: Mapping[str, Any], stage: Stage, epoch: int, iteration: int) -> None:
    host = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    if not all(np.isfinite(v) for v in host.values()):
        raise NonFinite(stage, epoch, iteration, host)


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Means over the epoch's iterations; with 'skipped' (on_nonfinite='skip_batch'), the other
    metrics average over the iterations that were not skipped and 'skipped' is their count."""
    if not history:
        return {}
    host = jax.device_get(history)
    if 'skipped' not in host[0]:
        return {k: float(np.mean([h[k] for h in host])) for k in host[0]}
    kept = [h for h in host if not h['skipped']] or host
    out = {k: float(np.mean([h[k] for h in kept])) for k in host[0] if k != 'skipped'}
    return {**out, 'skipped': float(sum(h['skipped'] for h in host))}


def run_stage(
    stage: Stage,
    state: TrainState,
    model: Any,
    loaders: Mapping[str, EpochSource],
    *,
    prompt_spec: Any = None,
    label_map: jax.Array | None = None,
    hooks: Sequence[EpochHook] = (),
    start_epoch: int = 0,
    start_iteration: int = 0,
    log_every: int = 50,
    put_batch: Callable[[Batch], Batch] | None = None,
    step_hook: Callable[[StepEnd], None] | None = None,
    step_hook_every: int = 0,
    step_fn: Callable | None = None,
    stops: Any = None,
    stop_hook: Callable[[StepEnd], None] | None = None,
    on_nonfinite: str = 'stop',
    log_hook: Callable[[StepLog], None] | None = None,
) -> tuple[TrainState, StageResult]:
    """Run `stage` from (start_epoch, start_iteration) to its last epoch.

    state: already prepared by `state.begin_stage` (or restored from a checkpoint of this stage).
    loaders: one `EpochSource` per view of the stage ('prompt' and/or 'train'); an iteration zips
    them, so an epoch is as long as the shortest. The first `start_iteration` batches of
    `start_epoch` are skipped (resume mid-epoch). After each epoch every hook runs in order
    (evaluation, checkpoint, ILM re-mapping).
    put_batch: optional host->device transfer (e.g. to a sharded global array).
    step_hook: called every `step_hook_every` iterations inside an epoch (not at its last
    iteration, where the epoch hooks run), e.g. a mid-epoch checkpoint.
    step_fn: the jitted iteration (default `steps.make_train_step(stage, model, prompt_spec)`);
    pass a shared one so that stages with the same `Stage.compute_key()` compile once.
    stops: a `preemption.StopRequests`, asked after every iteration; when it says stop, `stop_hook`
    gets the state after that iteration (at an epoch's last iteration: after the epoch hooks, as
    (epoch + 1, 0)) and `preemption.Stopped` is raised with the reason.
    on_nonfinite: 'stop' raises `NonFinite` at the first non-finite metric (checked one iteration
    late, so the host does not wait for the device); 'skip_batch' expects a step_fn built with
    `skip_nonfinite=True` and raises only when every iteration of an epoch was skipped.
    log_hook: gets a `StepLog` at every progress log line (step-level metrics; no extra syncs).
    Returns the final state and the stage's bookkeeping.
    """
    missing = [v for v in stage.views if v not in loaders]
    if missing:
        raise ValueError(f'stage {stage.name!r} needs loaders for views {missing}.')
    step_fn = step_fn or steps.make_train_step(stage, model, prompt_spec,
                                               skip_nonfinite=on_nonfinite == 'skip_batch')
    guard = on_nonfinite == 'stop'
    stopping: str | None = None
    put = put_batch or (lambda b: b)
    iterations = 0
    images = 0
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    first_iteration_seconds: float | None = None
    steps_per_epoch: int | None = None
    for epoch in range(start_epoch, stage.epochs):
        factors = optim.lr_factors(stage, epoch)
        skip = start_iteration if epoch == start_epoch else 0
        sources = [_epoch_iter(loaders[v], epoch, skip) for v in stage.views]
        lengths = [n for n in (_length(loaders[v]) for v in stage.views) if n is not None]
        steps_per_epoch = min(lengths) if lengths else steps_per_epoch
        zipped = zip(*sources, strict=False)
        history = []
        mark, mark_images, mark_iterations = time.perf_counter(), images, iterations
        for i, views in enumerate(zipped, start=skip):
            batches = {v: put(b) for v, b in zip(stage.views, views, strict=True)}
            state, step_metrics = step_fn(state, batches, label_map, factors)
            if guard and history:  # the previous iteration's metrics: done or nearly
                _check_finite(history[-1], stage, epoch, i)
            history.append(step_metrics)
            iterations += 1
            images += sum(int(np.shape(b['label'])[0]) for b in batches.values())
            if first_iteration_seconds is None:
                jax.block_until_ready(step_metrics)
                first_iteration_seconds = time.perf_counter() - mark
                logging.info('%s: first iteration %.1f s (compiling the step, or loading it from the '
                             'persistent compilation cache, + one iteration)', stage.name,
                             first_iteration_seconds)
                mark, mark_images, mark_iterations = time.perf_counter(), images, iterations
            if (step_hook is not None and step_hook_every and (i + 1) % step_hook_every == 0
                    and (i + 1) != steps_per_epoch):
                step_hook(StepEnd(stage, epoch, i + 1, state, label_map, first_iteration_seconds))
            if log_every and (i + 1) % log_every == 0:
                last = jax.device_get(step_metrics)
                now = time.perf_counter()
                logging.info('%s epoch %d/%d it %d%s: %s | %s', stage.name, epoch + 1,
                             stage.epochs, i + 1, f'/{steps_per_epoch}' if steps_per_epoch else '',
                             ' '.join(f'{k} {float(v):.4f}' for k, v in sorted(last.items())),
                             _speed(iterations - mark_iterations, images - mark_images,
                                    now - mark, _left(stage, epoch, i + 1, steps_per_epoch)))
                if log_hook is not None:
                    seconds = now - mark
                    log_hook(StepLog(
                        stage, epoch, i + 1, {k: float(v) for k, v in last.items()},
                        {g: float(f) for g, f in factors.items() if stage.group(g).trainable},
                        (images - mark_images) / seconds
                        if iterations > mark_iterations and seconds > 0 else None))
                mark, mark_images, mark_iterations = now, images, iterations
            reason = stops.check() if stops is not None else None
            if reason and (i + 1) != steps_per_epoch:
                if guard:
                    _check_finite(step_metrics, stage, epoch, i + 1)
                _stop(stop_hook, StepEnd(stage, epoch, i + 1, state, label_map,
                                         first_iteration_seconds), reason)
            if reason:
                stopping = reason
                break
        if guard and history:
            _check_finite(history[-1], stage, epoch, skip + len(history))
        metrics = _mean_metrics(history)
        if metrics.get('skipped') and metrics['skipped'] == len(history):
            raise NonFinite(stage, epoch, skip + len(history), {'skipped': float('nan')})
        if metrics.get('skipped'):
            logging.warning('%s epoch %d/%d: %d of %d iterations skipped (non-finite loss or '
                            'state; config.on_nonfinite=skip_batch)', stage.name, epoch + 1,
                            stage.epochs, int(metrics['skipped']), len(history))
        logging.info('%s epoch %d/%d done: %s', stage.name, epoch + 1, stage.epochs,
                     ' '.join(f'{k} {v:.4f}' for k, v in sorted(metrics.items())))
        for hook in hooks:
            new_map = hook(EpochEnd(stage, epoch, state, label_map, metrics, first_iteration_seconds))
            if new_map is not None:
                label_map = new_map
        if stopping:
            _stop(stop_hook, StepEnd(stage, epoch + 1, 0, state, label_map,
                                     first_iteration_seconds), stopping)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - started
    return state, StageResult(
        name=stage.name,
        epochs=max(stage.epochs - start_epoch, 0),
        iterations=iterations,
        gradient_steps=iterations * stage.steps_per_iteration,
        seconds=seconds,
        metrics=metrics,
        first_iteration_seconds=first_iteration_seconds,
    )


def _left(stage: Stage, epoch: int, done: int, steps_per_epoch: int | None) -> int | None:
    """Iterations left in the stage after `done` iterations of `epoch` (None: unknown length)."""
    return (stage.epochs - epoch) * steps_per_epoch - done if steps_per_epoch else None


def _speed(iterations: int, images: int, seconds: float, left: int | None) -> str:
    """'2.10 it/s 134 img/s eta 3.2 min' over the iterations since the last log line; before any
    iteration after the first (compiling) one has been timed: no rate yet."""
    if iterations <= 0 or seconds <= 0:
        return 'speed and eta from the next log line (the first iteration compiled the step)'
    rate = iterations / seconds
    eta = f' eta {_duration(left / rate)}' if left is not None else ''
    return f'{rate:.2f} it/s {images / seconds:.0f} img/s{eta}'


def _duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f'{seconds:.0f} s'
    return f'{seconds / 60:.1f} min' if seconds < 5400 else f'{seconds / 3600:.1f} h'


def _stop(stop_hook: Callable[[StepEnd], None] | None, end: StepEnd, reason: str) -> None:
    """Save through `stop_hook`, then raise `preemption.Stopped(reason)`."""
    if stop_hook is not None:
        stop_hook(end)
    raise preemption.Stopped(reason)


def evaluate(
    eval_fn: Callable[..., Mapping[str, jax.Array]],
    state: TrainState,
    batches: Iterable[Batch],
    label_map: jax.Array | None = None,
    put_batch: Callable[[Batch], Batch] | None = None,
) -> dict[str, float]:
    """Accuracy over an eval loader (padded rows excluded through 'mask').

    eval_fn: from `steps.make_eval_step(stage, model, spec, prompted=...)`.
    Returns ``{'accuracy': correct / count, 'loss': mean CE, 'count': count}``.
    """
    put = put_batch or (lambda b: b)
    totals = [eval_fn(state, put(b), label_map) for b in batches]
    host = jax.device_get(totals)
    correct = sum(int(t['correct']) for t in host)
    count = sum(int(t['count']) for t in host)
    loss = sum(float(t['loss_sum']) for t in host)
    return {'accuracy': correct / max(count, 1), 'loss': loss / max(count, 1), 'count': count}


def flm_label_map(
    predict_fn: Callable[[TrainState, Batch], jax.Array],
    state: TrainState,
    batches: Iterable[Batch],
    num_source: int,
    num_target: int,
    put_batch: Callable[[Batch], Batch] | None = None,
) -> np.ndarray:
    """Frequency label mapping i32[T] from one pass over `batches` (reference §2).

    predict_fn: from `steps.make_source_predictions(stage, model, spec, prompted=...)` (eval mode,
    current mask and prompt). Rows with ``mask == False`` are ignored. For ILM, call this from an
    epoch hook and return the result.
    """
    put = put_batch or (lambda b: b)
    preds, labels = [], []
    for b in batches:
        batch = put(b)
        # Global arrays: every process gets the whole global batch's predictions AND labels.
        pred, label = parallel.gather_to_host((predict_fn(state, batch), batch['label']))
        valid = (np.asarray(parallel.gather_to_host(batch['mask']), bool) if 'mask' in batch
                 else np.ones(np.shape(pred), bool))
        preds.append(np.asarray(pred)[valid])
        labels.append(np.asarray(label)[valid])
    counts = label_mapping.frequency_counts(np.concatenate(preds), np.concatenate(labels),
                                            num_source, num_target)
    return np.asarray(label_mapping.greedy_mapping(counts), np.int32)


def make_ilm_hook(
    predict_fn: Callable[[TrainState, Batch], jax.Array],
    batches: Callable[[int], Iterable[Batch]],
    num_source: int,
    num_target: int,
) -> EpochHook:
    """Iterative label mapping (ILM-VP): after every epoch e, re-run FLM over ``batches(e + 1)``
    through the current prompt and mask, and use the new mapping from the next epoch on."""

    def hook(end: EpochEnd) -> np.ndarray:
        return flm_label_map(predict_fn, end.state, batches(end.epoch + 1), num_source, num_target)

    return hook
