"""Host cost of the input pipeline with and without on-device augmentation (issue 13 item 5).

    python -m benchmarks.device_augment [--dataset fashion_mnist] [--data_dir DIR] [--sizes 32,224]
        [--batches 20] [--batch_size 64] [--threads 1]

For each input size and view the VPNs iteration consumes ('prompt': resize; 'train': resize to
1.125·S, crop, flip), the loader is iterated twice: host transforms (float32 [B, S, S, 3] out) and
``on_device=True`` (config.data.augment_on_device: the host only reads the records and ships uint8 at
the stored size plus the crop parameters). One batch of warm-up, then ``--batches`` timed; rates are
images per wall-clock second and per CPU-second of this process (all its threads; steadier on a
shared machine). The last column is what the moved work costs where it now runs:
``device_augment.apply`` jitted on JAX's default backend (here the CPU, so it is an upper bound of
what an accelerator spends), images per second. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from vpns_jax.data import device_augment, pipeline, preparation, registry
from vpns_jax.data.builders import fashion_mnist


def host_rates(name: str, data_dir: str | None, input_size: int, view: str, *, on_device: bool,
               batches: int, batch_size: int, threads: int) -> tuple[float, float, dict]:
    """(images per wall-clock second, per CPU-second, last batch) of the host loader."""
    loader = pipeline.train_loader(
        name, view=view, input_size=input_size, batch_size=batch_size, seed=0, data_dir=data_dir,
        worker_count=0, num_threads=threads, prefetch=max(2, threads), on_device=on_device)
    it, epoch, done = loader.epoch(0), 0, 0
    batch = next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            it = loader.epoch(epoch)
            continue
        done += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    loader.close()
    images = batches * batch_size
    return images / wall, images / max(cpu, 1e-9), batch


def device_rate(batch: dict, input_size: int, view: str, repeats: int = 5) -> float:
    """Images per second of the jitted ``device_augment.apply`` on ``batch`` (after one call)."""
    fn = jax.jit(lambda b: device_augment.apply(b, input_size=input_size, view=view))
    arrays = jax.device_put({k: np.asarray(v) for k, v in batch.items()})
    fn(arrays).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(arrays).block_until_ready()
    return repeats * len(batch["label"]) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    manual = fashion_mnist.DEFAULT_MANUAL_DIR if args.dataset == "fashion_mnist" else None
    preparation.prepare(args.dataset, data_dir=args.data_dir, manual_dir=manual)
    shape = registry.get(args.dataset).image_shape
    rows = []
    print(f"{args.dataset} stored {shape}, batch {args.batch_size}, {args.threads} thread(s)")
    print(f"{'input':>5s} {'view':>6s} {'host img/s':>10s} {'host img/CPU-s':>14s} "
          f"{'on-device img/s':>15s} {'img/CPU-s':>9s} {'CPU-s ratio':>11s} {'apply img/s':>11s}")
    for size in (int(s) for s in args.sizes.split(",")):
        for view in ("prompt", "train"):
            kw = dict(batches=args.batches, batch_size=args.batch_size, threads=args.threads)
            host, host_cpu, _ = host_rates(args.dataset, args.data_dir, size, view,
                                           on_device=False, **kw)
            dev, dev_cpu, batch = host_rates(args.dataset, args.data_dir, size, view,
                                             on_device=True, **kw)
            applied = device_rate(batch, size, view)
            print(f"{size:5d} {view:>6s} {host:10.0f} {host_cpu:14.0f} {dev:15.0f} {dev_cpu:9.0f} "
                  f"{dev_cpu / host_cpu:11.1f} {applied:11.0f}")
            rows.append({"input_size": size, "view": view,
                         "host_images_per_s": round(host, 1),
                         "host_images_per_cpu_s": round(host_cpu, 1),
                         "on_device_images_per_s": round(dev, 1),
                         "on_device_images_per_cpu_s": round(dev_cpu, 1),
                         "apply_images_per_s": round(applied, 1),
                         "apply_backend": jax.default_backend()})
    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "dataset": args.dataset, "batch_size": args.batch_size, "threads": args.threads,
              "results": rows}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
