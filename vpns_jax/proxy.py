"""Offline proxy source model: trained from scratch here, saved exactly like converted ImageNet weights.

No ImageNet weights can be downloaded offline, so the quickstart (and the tests) train a small network on a
source dataset (Fashion-MNIST from Debian's `dataset-fashion-mnist`) and save it with `weights.save`. Every
later stage loads it through `weights.load`, the same path converted torchvision weights take.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections as mlc
from absl import logging

from vpns_jax import data, models, parallel, train
from vpns_jax import weights as weights_lib


def train_proxy(config: mlc.ConfigDict, out_path: str, *, data_dir: str | None = None) -> dict:
    """Train `config.arch` (with `config.model` width/small_input, in float32) on
    `config.proxy.dataset` from scratch.

    Dense SGD (momentum 0.9, L2 1e-4, cosine per epoch) at `config.input_size`, the dataset's own classes
    as the head. Writes `out_path` in the project weights format and returns its metadata.
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
    variables = jax.device_get(models.init_variables(model, rng, config.input_size))
    mesh = parallel.make_mesh()
    info = parallel.process_info()
    loader = data.train_loader(p.dataset, view="train", input_size=config.input_size,
                               batch_size=p.batch_size, seed=config.seed, data_dir=data_dir,
                               shard_index=info.process_index, shard_count=info.process_count,
                               max_steps_per_epoch=p.steps_per_epoch,
                               worker_count=config.data.worker_count,
                               num_threads=config.data.num_threads, prefetch=config.data.prefetch)
    # Plain SGD training from scratch (momentum 0.9, L2 1e-4, cosine), one pass per batch.
    stage = train.Stage("proxy", p.epochs, params=train.sgd(p.lr, 0.9, 1e-4),
                        passes=train.UNPROMPTED)
    state = train.create_state(variables, rng=rng)
    state = jax.device_put(train.begin_stage(stage, state), parallel.replicated(mesh))
    logging.info("proxy: training %s (width %g) on %s for %d epochs", config.arch,
                 config.model.width, p.dataset, p.epochs)
    started = time.perf_counter()
    state, result = train.run_stage(
        stage, state, model, {"train": loader},
        log_every=config.log_every_steps, put_batch=lambda b: parallel.host_to_global(b, mesh))
    source = {"proxy": p.dataset, "epochs": p.epochs, "steps": result.iterations,
              "train_loss": result.metrics.get("pass0/loss"),
              "train_accuracy": result.metrics.get("pass0/accuracy"),
              "seconds": round(time.perf_counter() - started, 1)}
    variables = jax.device_get(state.variables())
    if info.is_primary:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        meta = weights_lib.save(out_path, config.arch, variables, options=options, source=source)
    else:
        meta = {"source": source}
    logging.info("proxy: saved %s (train accuracy %.3f, %.0f s)", out_path,
                 source["train_accuracy"] or 0.0, source["seconds"])
    return meta
