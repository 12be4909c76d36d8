"""What a structured run's results row adds: channel sparsity, the slimmed network's parameters and
FLOPs, its measured latency speedup over the dense network, and the slimmed export.

`row_fields` is called by the experiment at the end of every structured run (and of the dense run
of an experiment that has structured ones, the speedup's reference, about 1): the run's masked
network is physically slimmed (`structured.slim.slim`), counted from its shapes (`count_params`,
`count_flops`: multiply-adds of one image at the run's input size) and timed against the dense
architecture with the same weights: eval-mode forwards of one batch, jitted, after `WARMUP` calls,
`REPEATS` timed calls of each in rounds whose order flips (so load changes hit both), medians. It
is measured on the run's device at the end of the run, so the number depends on that machine and
its load (the dense run's own "speedup", dense against a copy of itself, shows the noise); the
benchmark (benchmarks/structured.py, BENCHMARKS.md) measures larger inputs.
"""
from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax.methods import channel_select
from vpns_jax.train import state as train_state

WARMUP = 2
REPEATS = 20
SLIM_DIR = 'slim'  # WORKDIR/slim/<run>/: the slimmed export of a structured run


@functools.lru_cache(maxsize=8)
def _forward(model: Any) -> Any:
    """The jitted eval-mode forward of `model` (one trace per model, e.g. the dense one of every
    row of an experiment)."""
    return jax.jit(functools.partial(model.apply, train=False))


def latencies(pairs: Sequence[tuple[Any, Any]], *, batch: int, input_size: int,
              repeats: int = REPEATS, warmup: int = WARMUP) -> list[float]:
    """Median seconds of one eval-mode forward of a [batch, input_size, input_size, 3] input
    through each (model, variables), timed in rounds (the order reversed every other round) after
    `warmup` untimed calls each."""
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, input_size, input_size, 3), jnp.float32)
    fns = []
    for model, variables in pairs:
        fn = _forward(model)
        variables = jax.device_put(variables)
        for _ in range(warmup):
            fn(variables, x).block_until_ready()
        fns.append((fn, variables))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):  # the order flips every round: neither is always first
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            fn, variables = fns[i]
            start = time.perf_counter()
            fn(variables, x).block_until_ready()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def row_fields(model: Any, variables: Mapping[str, Any], masks: Mapping[str, Any], *,
               input_size: int, batch: int, export_dir: str | None = None, arch: str = '',
               options: Mapping[str, Any] | None = None, source: Mapping[str, Any] | None = None,
               repeats: int = REPEATS) -> dict[str, Any]:
    """The structured fields of a results row (plain Python numbers).

    variables: the run's final {'params' (pruned entries zero), 'batch_stats'}; masks: its fixed
    per-parameter masks ({} for the dense run: every channel kept). export_dir: where to write the
    slimmed export (`structured.slim.export_slim`; None: not written). options: the model's
    `models.create` options (num_classes, width, small_input) for the export.
    """
    from vpns_jax.structured import channels, slim

    variables = jax.device_get({'params': variables['params'],
                                'batch_stats': variables.get('batch_stats') or {}})
    groups = train_state.channel_groups_of(model, variables['params'], variables['batch_stats'],
                                           input_size)
    if masks:
        channel_masks = channel_select.channel_masks_of(groups, masks)
    else:
        channel_masks = {g.name: np.ones((g.size,), bool) for g in groups}
    summary = channels.channel_sparsity_summary(groups, channel_masks)['total']
    slim_model, slim_variables, widths = slim.slim(model, variables, groups, channel_masks)
    dense_s, slim_s = latencies([(model, variables), (slim_model, slim_variables)], batch=batch,
                                input_size=input_size, repeats=repeats)
    fields = {
        'channel_sparsity': float(summary['sparsity']), 'channels_kept': int(summary['kept']),
        'channels_total': int(summary['channels']),
        # the same counted per conv (a residual group's channel once per conv producing it)
        'conv_channel_sparsity': float(summary['conv_sparsity']),
        'params': slim.count_params(slim_variables), 'params_dense': slim.count_params(variables),
        'flops': slim.count_flops(slim_model, input_size),
        'flops_dense': slim.count_flops(model, input_size),
        'latency_ms': 1e3 * slim_s, 'latency_dense_ms': 1e3 * dense_s,
        'speedup': dense_s / slim_s,
        'latency_setup': (f'eval forward, batch {batch} at {input_size} px, median of {repeats} '
                          f'calls each (rounds, order flipped) after {WARMUP} warm-up, '
                          f'{jax.devices()[0].platform}, measured at the end of the run'),
    }
    if export_dir is not None:
        opts = dict(options or {})
        slim.export_slim(export_dir, slim_variables, widths, arch,
                         num_classes=int(opts.get('num_classes', model.num_classes)),
                         width=float(opts.get('width', 1.0)),
                         small_input=bool(opts.get('small_input', False)), input_size=input_size,
                         source=dict(source or {}))
        fields['slim_export'] = os.path.join(SLIM_DIR, os.path.basename(export_dir))
    return fields
