"""Train-pipeline throughput (images/s) at input 32 and 224, on this machine's CPU.

    python -m benchmarks.data_pipeline [--data_dir DIR] [--batches 20] [--batch_size 64]
        [--workers 0] [--threads 2]

Datasets: ``fashion_mnist`` (real, 28×28 grey PNG, prepared from Debian's IDX files into DATA_DIR)
and ``stanford_cars`` built from a generated class-folder tree (196 classes × 2 images, 500×375 RGB
JPEG, about the size of real car photos). For each (dataset, input size) the train view (resize to
1.125·S, random crop, flip) is iterated: one batch of warm-up, then ``--batches`` batches timed; the
rate is images / wall-clock second as the consumer sees it (host numpy, no device transfer), and
images per CPU-second of this process (all its threads; steadier than wall clock on a shared
machine). Prints a table and a final JSON line. Treat differences under ~20% as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from vpns_jax.data import pipeline, preparation
from vpns_jax.data.builders import fashion_mnist


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


def measure(
    name: str,
    data_dir: str,
    input_size: int,
    *,
    batches: int,
    batch_size: int,
    workers: int,
    threads: int,
) -> tuple[float, float]:
    """(images per wall-clock second, per CPU-second) of the train view over ``batches`` batches."""
    loader = pipeline.train_loader(
        name, view="train", input_size=input_size, batch_size=batch_size, seed=0,
        data_dir=data_dir, worker_count=workers, num_threads=threads,
    )  # fmt: skip
    done, epoch = 0, 0
    it = loader.epoch(epoch)
    next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    while done < batches:
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            it = loader.epoch(epoch)
            continue
        assert batch["image"].shape == (batch_size, input_size, input_size, 3)
        done += 1
    images = batches * batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: a temporary one)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="vpns_data_bench_")
    data_dir = args.data_dir or os.path.join(tmp, "tfds")
    datasets = []
    if os.path.isdir(fashion_mnist.DEFAULT_MANUAL_DIR):
        start = time.perf_counter()
        preparation.prepare("fashion_mnist", data_dir=data_dir)
        print(f"fashion_mnist ready in {time.perf_counter() - start:.1f} s")
        datasets.append("fashion_mnist")
    start = time.perf_counter()
    preparation.prepare(
        "stanford_cars", data_dir=data_dir, manual_dir=generated_cars(os.path.join(tmp, "cars"))
    )
    print(f"generated stanford_cars ready in {time.perf_counter() - start:.1f} s")
    datasets.append("stanford_cars")
    results = []
    print(f"{'dataset':15s} {'input':>5s} {'images/s':>9s} {'images/CPU-s':>12s}")
    for name in datasets:
        for size in (32, 224):
            rate, cpu_rate = measure(
                name, data_dir, size, batches=args.batches, batch_size=args.batch_size,
                workers=args.workers, threads=args.threads,
            )  # fmt: skip
            print(f"{name:15s} {size:5d} {rate:9.0f} {cpu_rate:12.0f}")
            results.append({
                "dataset": name, "input_size": size, "images_per_s": round(rate, 1),
                "images_per_cpu_s": round(cpu_rate, 1),
            })  # fmt: skip
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
        "results": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
