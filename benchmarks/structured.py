"""Structured-pruning benchmark: what physically slimmed networks save, measured.

    python -m benchmarks.structured --arch resnet18 --size 224 --batch 8 --train-batch 4
    python -m benchmarks.structured --width 0.25 --size 32 --batch 64 --train-batch 64   # proxy

For the dense network and one slimmed network per channel sparsity (default 10, 20, 30, 40, 50%):

- ``params``, ``MFLOPs`` (multiply-adds per image at --size, from the shapes:
  `structured.slim.count_params` / `count_flops`);
- ``infer ms``: median wall time of one jitted eval-mode forward of --batch images (after --warmup
  calls), and ``infer x``: the dense time over it;
- ``train img/s``: images per second of the project's jitted dense fine-tune step
  (`vpns_jax.train.steps.make_train_step` of `methods.dense`'s stage: one un-prompted pass,
  SGD(0.9, L2 1e-4), BN in train mode) at --train-batch, and ``train x`` over the dense one;
- ``peak MiB``: XLA's memory analysis of the compiled train step (arguments + outputs + temporaries
  − aliased (donated) buffers), the step's peak device memory as XLA plans it.

Which channels go: DepGraph's group-magnitude importance (`methods.channel_select`) on the model's
random initialisation, the global threshold with the 25% cap on the stem/layer1 groups, so the
per-layer widths are those a run at that sparsity gets (timing depends on the widths, not the
values). Prints a table, then one JSON line (the last line of output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from vpns_jax import cpu_malloc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224, help="input side (px)")
    p.add_argument("--batch", type=int, default=8, help="inference batch")
    p.add_argument("--train-batch", type=int, default=4, help="training batch")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--cap", type=float, default=0.25)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed inference calls")
    p.add_argument("--train-repeats", type=int, default=3, help="timed train steps")
    p.add_argument("--compilation-cache", default="",
                   help="persistent cache dir ('' = ~/.cache/vpns_jax/jax_cache, 'off' = none)")
    return p.parse_args(argv)


def _interleaved_medians(fns: list, repeats: int, warmup: int) -> list[float]:
    """Median seconds of each callable, timed in rounds over all of them (so a change of machine
    load hits every model alike) after `warmup` untimed calls each."""
    for fn in fns:
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def prepare(model: Any, variables: dict, args: argparse.Namespace) -> dict[str, Any]:
    """A model's counts, train-step peak memory and its two timed callables (inference forward,
    one train step)."""
    from vpns_jax import train
    from vpns_jax.structured import slim as slim_lib

    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.size, args.size, 3))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    stage = train.Stage("finetune", 1, params=train.sgd(0.01, 0.9, 1e-4))
    step = train.make_train_step(stage, model)
    batch = {"train": {
        "image": jax.random.uniform(jax.random.PRNGKey(1), (args.train_batch, args.size, args.size, 3)),
        "label": jnp.arange(args.train_batch, dtype=jnp.int32) % args.num_classes}}
    factors = train.lr_factors(stage, 0)
    holder = {"state": train.begin_stage(stage, train.create_state(variables,
                                                                   rng=jax.random.PRNGKey(0)))}
    mem = step.lower(holder["state"], batch, None, factors).compile().memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) if mem is not None else float("nan")

    def one_step():
        holder["state"], metrics = step(holder["state"], batch, None, factors)
        return metrics

    return {"params": slim_lib.count_params(variables),
            "mflops": slim_lib.count_flops(model, args.size) / 1e6, "peak_mib": peak / 2**20,
            "infer": lambda: forward(variables, x), "train": one_step}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cpu_malloc.keep_freed_memory()
    cache = args.compilation_cache or os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/vpns_jax/jax_cache"))
    if cache != "off":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from vpns_jax import models
    from vpns_jax.methods import channel_select
    from vpns_jax.structured import channels
    from vpns_jax.structured import groups as groups_lib
    from vpns_jax.structured import slim as slim_lib

    model = models.create(args.arch, args.num_classes, width=args.width)
    variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(0), args.size))
    groups = groups_lib.channel_groups(model, variables, args.size)
    importance = channel_select.magnitude_importance(variables["params"], groups)
    rows = {"dense": prepare(model, variables, args)}
    rows["dense"]["channel_sparsity"] = 0.0
    for s in [float(v) for v in args.sparsities.split(",") if v.strip()]:
        kept = channel_select.select(importance, groups, s, args.cap)
        slim_model, slim_variables, _ = slim_lib.slim(model, variables, groups, kept)
        row = prepare(slim_model, slim_variables, args)
        row["channel_sparsity"] = channels.channel_sparsity_summary(groups, kept)["total"]["sparsity"]
        rows[f"{s:g}"] = row
    infer = _interleaved_medians([r.pop("infer") for r in rows.values()], args.repeats,
                                 args.warmup + 1)
    train_s = _interleaved_medians([r.pop("train") for r in rows.values()], args.train_repeats,
                                   args.warmup + 1)
    for row, i, t in zip(rows.values(), infer, train_s, strict=True):
        row["infer_ms"], row["train_img_s"] = 1e3 * i, args.train_batch / t
    dense = rows["dense"]
    for row in rows.values():
        row["infer_speedup"] = dense["infer_ms"] / row["infer_ms"]
        row["train_speedup"] = row["train_img_s"] / dense["train_img_s"]
    header = ("model", "channel sp.", "params", "MFLOPs", "infer ms", "infer x", "train img/s",
              "train x", "peak MiB")
    lines = [header]
    for name, r in rows.items():
        lines.append((name, f"{r['channel_sparsity']:.3f}", f"{r['params']:,}", f"{r['mflops']:.1f}",
                      f"{r['infer_ms']:.2f}", f"{r['infer_speedup']:.2f}", f"{r['train_img_s']:.1f}",
                      f"{r['train_speedup']:.2f}", f"{r['peak_mib']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"{args.arch} width {args.width} at {args.size} px: inference batch {args.batch}, training "
          f"batch {args.train_batch}; {jax.devices()[0].device_kind} ({platform.node()}, "
          f"{os.cpu_count()} CPUs); medians of {args.repeats} / {args.train_repeats} calls, "
          f"interleaved; load average {os.getloadavg()[0]:.1f}")
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    record = {"arch": args.arch, "width": args.width, "size": args.size, "batch": args.batch,
              "train_batch": args.train_batch, "device": jax.devices()[0].device_kind,
              "loadavg": os.getloadavg()[0],
              "rows": rows}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
