"""Offline proxy source model: trained from scratch here, saved exactly like converted ImageNet weights.

No ImageNet weights can be downloaded offline, so the quickstart (and the tests) train a small network on a
source dataset (Fashion-MNIST from Debian's `dataset-fashion-mnist`) and save it with `weights.save`. Every
later stage loads it through `weights.load`, the same path converted torchvision weights take.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import ml_collections as mlc
from absl import logging

from vpns_jax import checkpoint, data, models, parallel, preemption, runner, train
from vpns_jax import weights as weights_lib
from vpns_jax.errors import Diverged


def training_dir(out_path: str) -> str:
    """Where the proxy's checkpoints live while it trains (removed once the weights are written)."""
    return f"{out_path}.training"


def input_size(config: mlc.ConfigDict) -> int:
    """The image size (pixels) the proxy trains at: config.proxy.input_size, 0 = config.input_size."""
    return int(config.proxy.input_size or config.input_size)


def train_proxy(config: mlc.ConfigDict, out_path: str, *, data_dir: str | None = None,
                stops: preemption.StopRequests | None = None) -> dict:
    """Train `config.arch` (with `config.model` width/small_input, in float32) on
    `config.proxy.dataset` from scratch.

    Dense SGD (momentum 0.9, L2 1e-4, cosine per epoch) at `input_size(config)`, the dataset's own classes
    as the head. Checkpointed like a run's stages (every `config.checkpoint_every_epochs` epochs and
    `checkpoint_every_steps` iterations, and on a stop request) in `training_dir(out_path)`, so an
    interrupted proxy resumes. Writes `out_path` in the project weights format and returns its
    metadata.
    """
    p = config.proxy
    data.ensure_prepared(p.dataset, data_dir=data_dir, manual_dir=config.manual_dir or None)
    num_classes = data.registry.get(p.dataset).num_classes
    options = {"num_classes": num_classes, "width": config.model.width,
               "small_input": config.model.small_input}
    # Always float32, whatever config.model.dtype: the proxy stands in for downloaded ImageNet
    # weights, made once and shared, so float32 and bfloat16 runs start from the same weights.
    model = models.create(config.arch, **options)
    rng = jax.random.PRNGKey(config.seed)
    variables = jax.device_get(models.init_variables(model, rng, input_size(config)))
    mesh = parallel.make_mesh()
    info = parallel.process_info()
    loader = data.train_loader(p.dataset, view="train", input_size=input_size(config),
                               batch_size=p.batch_size, seed=config.seed, data_dir=data_dir,
                               shard_index=info.process_index, shard_count=info.process_count,
                               max_steps_per_epoch=p.steps_per_epoch,
                               worker_count=config.data.worker_count,
                               num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    # Plain SGD training from scratch (momentum 0.9, L2 1e-4, cosine), one pass per batch.
    stage = train.Stage("proxy", p.epochs, params=train.sgd(p.lr, 0.9, 1e-4),
                        passes=train.UNPROMPTED)
    state = train.begin_stage(stage, train.create_state(variables, rng=rng))
    state = jax.device_put(state, parallel.replicated(mesh))
    spe = len(loader)
    progress: dict = {"epoch": 0, "iteration": 0, "seconds": 0.0, "metrics": {}}
    with checkpoint.RunCheckpointer(training_dir(out_path)) as ckpt:
        latest = ckpt.latest_step()
        if latest is not None:
            state, meta = ckpt.restore(abstract_state=jax.eval_shape(lambda: state))
            progress.update(meta)
            loader.check_state(progress["data"])  # DataError: other proxy settings
            logging.info("proxy: resuming %s", runner.position(stage, progress["epoch"],
                                                               progress["iteration"], spe))
        else:
            logging.info("proxy: training %s (width %g) on %s for %d epochs", config.arch,
                         config.model.width, p.dataset, p.epochs)
        state = _train(config, stage, state, model, loader, mesh, ckpt, progress, stops)
    source = {"proxy": p.dataset, "epochs": p.epochs, "steps": p.epochs * spe,
              "train_loss": progress["metrics"].get("pass0/loss"),
              "train_accuracy": progress["metrics"].get("pass0/accuracy"),
              "seconds": round(progress["seconds"], 1)}
    variables = jax.device_get(state.variables())
    if info.is_primary:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        meta = weights_lib.save(out_path, config.arch, variables, options=options, source=source)
        shutil.rmtree(training_dir(out_path), ignore_errors=True)
    else:
        meta = {"source": source}
    logging.info("proxy: saved %s (train accuracy %.3f, %.0f s)", out_path,
                 source["train_accuracy"] or 0.0, source["seconds"])
    return meta


def _train(config: mlc.ConfigDict, stage: train.Stage, state: train.TrainState, model, loader,
           mesh, ckpt: checkpoint.RunCheckpointer, progress: dict,
           stops: preemption.StopRequests | None) -> train.TrainState:
    """The proxy's epochs from `progress` on, saving into `ckpt` as the runner saves a stage."""
    started, before = time.perf_counter(), float(progress["seconds"])

    def save(state: train.TrainState, epoch: int, iteration: int, metrics: dict) -> None:
        runner.check_finite(state, stage, epoch, iteration)
        progress.update(epoch=epoch, iteration=iteration, metrics=metrics or progress["metrics"],
                        seconds=before + time.perf_counter() - started,
                        data=loader.state_at(epoch, iteration))
        ckpt.save(epoch * len(loader) + iteration, state, progress)

    def epoch_hook(end: train.EpochEnd) -> None:
        if (end.epoch + 1) % config.checkpoint_every_epochs == 0 or end.epoch + 1 == stage.epochs:
            save(end.state, end.epoch + 1, 0, end.metrics)

    def save_now(end: train.StepEnd) -> None:
        save(end.state, end.epoch, end.iteration, {})
        ckpt.wait()

    try:
        state, _ = train.run_stage(
            stage, state, model, {"train": loader}, hooks=[epoch_hook],
            start_epoch=progress["epoch"], start_iteration=progress["iteration"],
            log_every=config.log_every_steps,
            put_batch=lambda b: parallel.host_to_global(b, mesh),
            step_hook=lambda end: save(end.state, end.epoch, end.iteration, {}),
            step_hook_every=config.checkpoint_every_steps, stops=stops, stop_hook=save_now,
            on_nonfinite="stop")
    except train.NonFinite as e:
        ckpt.wait()
        raise Diverged(f"the proxy source model diverged ({e}); lower config.proxy.lr "
                       f"(now {config.proxy.lr:g}) and rerun") from None
    except preemption.Stopped as e:
        raise preemption.Stopped(
            f"{e}: the proxy's training saved {ckpt.directory}/{ckpt.latest_step()} "
            f"({runner.position(stage, progress['epoch'], progress['iteration'], len(loader))}); "
            "rerun the same command to resume from there") from None
    ckpt.wait()
    return state
