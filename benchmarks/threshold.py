"""Global-threshold cost: radix select vs jnp.sort and lax.top_k on ResNet-18/50-sized score sets.

    python -m benchmarks.threshold [--density 0.1] [--repeats 5] [--fast] [--iteration]

Score sets have the real kernel shapes of the project's ResNet-18 (11.68 M prunable entries) and
ResNet-50 (25.5 M), from `jax.eval_shape` (no weights needed), filled with scaled-init-like values.
Every method is jitted, warmed up once, then timed `repeats` times (median, ms). `--iteration` also
times one ResNet-50 mask-finding pass pair (2 × forward+backward, 224 px, batch 8) to put the
threshold in proportion (one iteration recomputes the threshold twice). Prints a table and a final
JSON line. The CPU may be shared: treat differences under ~20% as noise.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vpns_jax import cpu_malloc, models, sparsity


def kernel_shapes(arch: str) -> list[tuple[int, ...]]:
    """Shapes of the prunable kernels of `arch` (1000 classes, 224 px), computing no weights."""
    model = models.create(arch)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    flat = sparsity.flatten_params(abstract["params"])
    return [tuple(flat[p].shape) for p in sparsity.prunable_paths(abstract["params"])]


def score_set(shapes: list[tuple[int, ...]], seed: int = 0) -> list[jax.Array]:
    """Per-layer scores like the scaled init: sqrt(6/fan_in)·W/max|W| with Gaussian W."""
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    out = []
    for key, shape in zip(keys, shapes, strict=True):
        w = jax.random.normal(key, shape)
        out.append(math.sqrt(6.0 / math.prod(shape[:-1])) * w / jnp.max(jnp.abs(w)))
    return out


def _radix(bits: int):
    return lambda xs, k: sparsity.kth_smallest([jnp.abs(x) for x in xs], k, radix_bits=bits)


def _radix_concat(xs, k):
    return sparsity.kth_smallest(jnp.concatenate([jnp.abs(x).ravel() for x in xs]), k)


def _concat_only(xs, k):
    return jnp.concatenate([jnp.abs(x).ravel() for x in xs])


def _sort(xs, k):
    return jnp.sort(jnp.concatenate([jnp.abs(x).ravel() for x in xs]))[k - 1]


def _top_k(n: int):
    def fn(xs, k):  # k-th smallest = (n − k + 1)-th largest: top_k on the smaller side
        mags = jnp.concatenate([jnp.abs(x).ravel() for x in xs])
        if k <= n - k + 1:
            return -lax.top_k(-mags, k)[0][-1]
        return lax.top_k(mags, n - k + 1)[0][-1]

    return fn


def time_ms(fn, args, repeats: int) -> float:
    """Median wall time in ms of a jitted call after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def iteration_ms(repeats: int) -> float:
    """Median ms of 2 × (forward + backward) of ResNet-50 in train mode, batch 8 at 224 px."""
    model = models.create("resnet50")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    x = jax.random.uniform(jax.random.key(1), (8, 224, 224, 3))

    def loss(params, batch_stats, x):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

    step = jax.jit(jax.grad(loss))
    args = (variables["params"], variables["batch_stats"], x)
    return 2.0 * time_ms(step, args, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-repeats", type=int, default=3, help="repeats for sort / top_k")
    parser.add_argument("--fast", action="store_true", help="skip sort and top_k (tens of seconds)")
    parser.add_argument("--iteration", action="store_true", help="also time a ResNet-50 iteration")
    args = parser.parse_args()
    cpu_malloc.keep_freed_memory()  # as vpns_jax.main does

    results = {"device": str(jax.devices()[0]), "density": args.density, "models": {}}
    print(f"device {results['device']}, density {args.density} (k = floor((1-d)·N)), median ms")
    print(f"{'model':<9} {'N':>11} {'method':<16} {'ms':>9}  exact")
    for arch in ("resnet18", "resnet50"):
        xs = score_set(kernel_shapes(arch))
        n = sum(int(x.size) for x in xs)
        k = sparsity.num_pruned(n, args.density)
        methods = {
            "radix16_list": (_radix(16), args.repeats),
            "radix8_list": (_radix(8), args.repeats),
            "radix16_concat": (_radix_concat, args.repeats),
            "concat_only": (_concat_only, args.repeats),
            "sort": (_sort, args.slow_repeats),
            "top_k": (_top_k(n), args.slow_repeats),
        }
        if args.fast:
            del methods["sort"], methods["top_k"]
        truth = np.sort(np.concatenate([np.abs(np.asarray(x)).ravel() for x in xs]))[k - 1]
        row = {"n": n, "k": k}
        for name, (fn, repeats) in methods.items():
            jitted = jax.jit(fn, static_argnums=1)
            ms = time_ms(jitted, (xs, k), repeats)
            exact = "" if name == "concat_only" else str(bool(jitted(xs, k) == truth))
            row[name] = round(ms, 1)
            print(f"{arch:<9} {n:>11,} {name:<16} {ms:>9.1f}  {exact}", flush=True)
        results["models"][arch] = row
    if args.iteration:
        it = iteration_ms(max(1, args.slow_repeats))
        share = 2 * results["models"]["resnet50"]["radix16_list"] / it
        results["resnet50_iteration_ms"] = round(it, 1)
        results["threshold_share_of_iteration"] = round(share, 4)
        print(f"resnet50 iteration (2 × fwd+bwd, batch 8, 224 px): {it:.0f} ms; "
              f"2 thresholds = {100 * share:.1f}% of it")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
