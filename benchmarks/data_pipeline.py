"""Input-pipeline throughput (images/s and images per CPU-second) on this machine's CPU.

    python -m benchmarks.data_pipeline [--data_dir DIR] [--datasets fashion_mnist,stanford_cars]
        [--sizes 32,224] [--views prompt,train] [--settings 0x1,0x2,2x1,2x2] [--batches 20]
        [--batch_size 64] [--repeats 2] [--step_json FILE] [--target 6700]

Datasets: ``fashion_mnist`` (real, 28×28 grey, prepared from Debian's IDX files into DATA_DIR) and
``stanford_cars`` built from a generated class-folder tree (196 classes × 2 images, 500×375 RGB
JPEG, about the size of real car photos); ``digits`` works too (tests). For each (dataset, input
size, view, setting) a fresh ``train_loader`` is read: the first batch is warm-up (it also starts
the worker processes), then ``--batches`` batches are timed. Views: 'prompt' (resize to S²) and
'train' (resize to floor(1.125·S)², random crop S², flip), the two a VPNs iteration reads. A setting
``WxT`` is ``worker_count=W``, ``num_threads=T`` (prefetch auto). Rates: images per wall-clock
second as the consumer sees it (host numpy, no device transfer), best and range over
``--repeats``; and images per CPU-second of this process and its worker processes (all threads;
steadier than wall clock on a shared machine) = the rate one fully used core sustains.

Prints a table; the cores a host needs for ``--target`` images/s at each size (the target divided
by the harmonic mean of the two views' best images/CPU-s, as half the images are each view; the
issue's 6,700 = a 30 + 30-epoch CIFAR-100 ResNet-18 VPNs run, two views per iteration, in 15 min);
what one VPNs iteration consumes at the model step's rate if ``--step_json`` names a file whose
last JSON line is ``benchmarks.step``'s output (mask_finding / tuning images/s, half per view);
and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np
import psutil
from PIL import Image

from vpns_jax.data import pipeline, preparation
from vpns_jax.data.builders import fashion_mnist

VIEWS = ("prompt", "train")


def generated_cars(root: str, per_class: int = 2) -> str:
    """Writes a 196-class train/test tree of 500×375 JPEGs under ``root``; returns ``root``."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 500, dtype=np.float32)[None, :, None]
    for split in ("train", "test"):
        for c in range(196):
            folder = os.path.join(root, split, f"class_{c:03d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class if split == "train" else 1):
                noise = rng.normal(0, 40, (375, 500, 3))
                image = np.clip(base + noise + c, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of this process (all threads, ns resolution) and of its live
    children (grain's worker processes; clock-tick resolution)."""
    total = time.process_time()
    for p in proc.children(recursive=True):
        try:
            t = p.cpu_times()
        except psutil.Error:  # a child that just ended
            continue
        total += t.user + t.system
    return total


def parse_setting(text: str) -> tuple[int, int]:
    """'WxT' → (worker_count, num_threads)."""
    try:
        workers, threads = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r} is not WxT, e.g. 2x1") from None
    if workers < 0 or threads < 1:
        raise argparse.ArgumentTypeError(f"setting {text!r}: workers >= 0 and threads >= 1")
    return workers, threads


def measure(name: str, data_dir: str, input_size: int, view: str, *, batches: int,
            batch_size: int, workers: int, threads: int) -> tuple[float, float]:
    """(images per wall-clock second, per CPU-second) of ``view`` over ``batches`` batches."""
    loader = pipeline.train_loader(
        name, view=view, input_size=input_size, batch_size=batch_size, seed=0,
        data_dir=data_dir, worker_count=workers, num_threads=threads,
    )  # fmt: skip
    proc = psutil.Process()
    try:
        epoch = 0
        it = loader.epoch(epoch)
        next(it)
        done = 0
        start, cpu_start = time.perf_counter(), _cpu_seconds(proc)
        while done < batches:
            try:
                batch = next(it)
            except StopIteration:
                epoch += 1
                it = loader.epoch(epoch)  # continues the same stream
                continue
            assert batch["image"].shape == (batch_size, input_size, input_size, 3)
            done += 1
        wall, cpu = time.perf_counter() - start, _cpu_seconds(proc) - cpu_start
    finally:
        loader.close()
    images = batches * batch_size
    return images / wall, images / max(cpu, 0.01)  # 0.01 s: a clock tick


def step_consumption(path: str) -> dict[str, Any]:
    """Images/s a VPNs iteration consumes per view, from a ``benchmarks.step`` JSON line."""
    with open(path) as f:
        record = json.loads([line for line in f if line.strip().startswith("{")][-1])
    rates = record["images_per_s"]
    out = {"size": record.get("size"), "batch": record.get("batch"),
           "device": record.get("device")}
    for step in ("mask_finding", "tuning"):
        if step in rates:
            out[step] = {"images_per_s": rates[step], "per_view": rates[step] / 2}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: a temporary one)")
    parser.add_argument("--datasets", default="fashion_mnist,stanford_cars")
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--views", default=",".join(VIEWS))
    parser.add_argument("--settings", default="0x1,0x2,2x1,2x2",
                        help="comma-separated WxT: worker_count x num_threads")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--step_json", default=None,
                        help="a file whose last JSON line is benchmarks.step's output")
    parser.add_argument("--target", type=float, default=6700.0,
                        help="images/s (both views together) a host must deliver at each size")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    views = [v for v in args.views.split(",") if v]
    settings = [parse_setting(s) for s in args.settings.split(",") if s]
    tmp = tempfile.mkdtemp(prefix="vpns_data_bench_")
    data_dir = args.data_dir or os.path.join(tmp, "tfds")
    datasets = []
    for name in [d for d in args.datasets.split(",") if d]:
        start = time.perf_counter()
        if name == "stanford_cars":
            preparation.prepare(name, data_dir=data_dir,
                                manual_dir=generated_cars(os.path.join(tmp, "cars")))
        elif name == "fashion_mnist" and not os.path.isdir(fashion_mnist.DEFAULT_MANUAL_DIR):
            print(f"skipping fashion_mnist: no {fashion_mnist.DEFAULT_MANUAL_DIR}")
            continue
        else:
            preparation.prepare(name, data_dir=data_dir)
        print(f"{name} ready in {time.perf_counter() - start:.1f} s")
        datasets.append(name)
    results = []
    header = (f"{'dataset':14s} {'input':>5s} {'view':6s} {'WxT':>4s} {'img/s best':>10s} "
              f"{'[range]':>13s} {'img/CPU-s':>9s}")
    print(header)
    for name in datasets:
        for size in sizes:
            for view in views:
                for workers, threads in settings:
                    runs = [measure(name, data_dir, size, view, batches=args.batches,
                                    batch_size=args.batch_size, workers=workers, threads=threads)
                            for _ in range(args.repeats)]
                    walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
                    row = {"dataset": name, "input_size": size, "view": view,
                           "worker_count": workers, "num_threads": threads,
                           "images_per_s": round(max(walls), 1),
                           "images_per_s_range": [round(min(walls), 1), round(max(walls), 1)],
                           "images_per_cpu_s": round(float(np.median(cpus)), 1)}
                    results.append(row)
                    print(f"{name:14s} {size:5d} {view:6s} {workers:>2d}x{threads:<1d} "
                          f"{max(walls):10.0f} [{min(walls):5.0f}-{max(walls):5.0f}] "
                          f"{row['images_per_cpu_s']:9.0f}")
    cores = {}
    for name in datasets:
        for size in sizes:
            best = {}
            for view in views:
                rows = [r for r in results if (r["dataset"], r["input_size"], r["view"]) ==
                        (name, size, view)]
                best[view] = max(r["images_per_cpu_s"] for r in rows)
            # half the target is each view: CPU-seconds add, so the harmonic mean of the rates
            per_core = 1.0 / float(np.mean([1.0 / r for r in best.values()]))
            cores[f"{name}@{size}"] = {"images_per_cpu_s": round(per_core, 1),
                                       "cores_for_target": round(args.target / per_core, 1)}
            print(f"{name} at {size} px: {per_core:.0f} img/CPU-s (harmonic mean of the views' best) → "
                  f"{args.target / per_core:.1f} cores for {args.target:.0f} img/s")
    record: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
        "target_images_per_s": args.target, "results": results, "cores_for_target": cores,
    }  # fmt: skip
    if args.step_json:
        step = record["step"] = step_consumption(args.step_json)
        for kind in ("mask_finding", "tuning"):
            if kind not in step:
                continue
            rate = step[kind]["images_per_s"]
            need = {key: round(rate / c["images_per_cpu_s"], 2) for key, c in cores.items()
                    if key.endswith(f"@{step['size']}")}
            step[kind]["cores"] = need
            print(f"{kind} step at {step['size']} px, batch {step['batch']} ({step['device']}): "
                  f"{rate:.1f} img/s ({rate / 2:.1f} per view) = cores of this pipeline {need}")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
