"""Model-step benchmark: the project's jitted steps, optionally against the PyTorch original.

    python -m benchmarks.step --arch resnet18 --size 224 --batch 8 \
        [--compare-torch] [--torch-compile]

Times, after warm-up, the median wall time of

- ``dense``: one dense fine-tune step (``methods.dense`` recipe: SGD on all weights, one un-prompted
  pass);
- ``mask_finding``: one VPNs mask-finding iteration (``methods.vpns`` stage 1: prompted pass + un-
  prompted pass, Adam on scores and prompt, the global threshold recomputed before each pass);
- ``tuning``: one VPNs tuning iteration (stage 2: two passes, SGD on weights and prompt, mask
  fixed);
- ``eval``: one eval step (eval-mode BN, hard mask, FLM logits, correct count);
- ``threshold``: one global threshold over all scores (jitted ``sparsity.global_threshold``; torch:
  ``kthvalue`` on the concatenation, as the original does twice per mask-finding iteration).

JAX times the project's own steps (``vpns_jax.train.steps.make_train_step`` / ``make_eval_step`` on
the ``vpns`` and ``dense`` recipes). ``--compare-torch`` times ``benchmarks.torch_vpns`` (a re-
statement of the original PyTorch iteration) in the same process with the same threads and shapes;
``--torch-compile`` also times it under ``torch.compile``. Images/s count every image a step
consumes: 2 x batch for an iteration of two passes, batch otherwise. Prints a table, then one JSON
line (the last line of output); ratios in ``jax_over_torch`` are torch time / JAX time, so > 1 means
JAX is faster.

The JAX persistent compilation cache is on by default (``~/.cache/vpns_jax/jax_cache``, or
``$JAX_COMPILATION_CACHE_DIR``; ``--compilation-cache off`` disables it); compile time per step is
reported (a cache hit shows as a short compile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax import cpu_malloc
from vpns_jax.models import COMPUTE_DTYPES

STEPS = ("dense", "mask_finding", "tuning", "eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=224, help="network input size (px)")
    p.add_argument("--batch", type=int, default=8, help="batch per pass")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--small-input", action="store_true", help="CIFAR stem (3x3, no max-pool)")
    p.add_argument("--num-classes", type=int, default=10, help="downstream classes (FLM)")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--pad-size", type=int, default=None,
                   help="prompt border (default min(16, size/2))")
    p.add_argument("--dtype", default="float32", choices=tuple(COMPUTE_DTYPES),
                   help="JAX model computation dtype, as config.model.dtype (params stay float32)")
    p.add_argument("--conv-impl", default=None, choices=("auto", "xla", "im2col", "rows"),
                   help="models.create(conv_impl=...) (vpns_jax.ops lowering); default: the "
                        "models' backend default")
    p.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--channels-last", action="store_true", help="torch channels_last")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--torch-device", default=None,
                   help="torch device (default: cuda when JAX runs on a GPU and torch has CUDA)")
    p.add_argument("--torch-autocast", default="none", choices=("none", "bfloat16"),
                   help="run the torch forward under torch.autocast(dtype)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: a table by device kind)")
    p.add_argument("--compilation-cache", default="",
                   help="'' = $JAX_COMPILATION_CACHE_DIR or ~/.cache/vpns_jax/jax_cache; 'off'")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in args.steps if s not in STEPS]
    if bad:
        p.error(f"unknown steps {bad}; use {STEPS}")
    if args.pad_size is None:
        args.pad_size = min(16, args.size // 2)
    return args


def enable_compilation_cache(setting: str) -> str:
    """Turn on JAX's persistent compilation cache; returns the directory ('off' if disabled)."""
    if setting == "off":
        return "off"
    path = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(
        "~/.cache/vpns_jax/jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int,
               stats_out: dict[str, list[float]] | None = None) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` calls; `fn` must block until done.

    stats_out: if given, receives per timed call 'cpu_s', the process CPU seconds (all threads),
    steadier than wall time on a shared machine, and 'minor_faults', the pages the process
    faulted in (0 once the allocator keeps its memory; see vpns_jax.cpu_malloc).
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if stats_out is not None:
            stats_out.setdefault("cpu_s", []).append(time.process_time() - c0)
            stats_out.setdefault("minor_faults", []).append(
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out


def median_stats(per_step: dict[str, dict[str, list[float]]], key: str) -> dict[str, float]:
    """{step: median of `key` over its timed calls} from time_calls' stats_out dicts."""
    return {s: round(statistics.median(v[key]), 4) for s, v in per_step.items() if v.get(key)}


def make_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Two random batches in [0, 1] (NHWC float32) with labels < num_classes."""
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.size, args.size, 3)
    return {
        "x_vp": rng.random(shape, dtype=np.float32),
        "y_vp": rng.integers(0, args.num_classes, args.batch).astype(np.int32),
        "x_train": rng.random(shape, dtype=np.float32),
        "y_train": rng.integers(0, args.num_classes, args.batch).astype(np.int32),
    }


def bench_jax(args: argparse.Namespace, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """Time the project's steps; returns {'seconds': {step: [..]}, 'compile_s': {...}, ...}."""
    from vpns_jax import config as config_lib
    from vpns_jax import models, prompts, sparsity
    from vpns_jax.methods import dense as dense_method
    from vpns_jax.methods import vpns as vpns_method
    from vpns_jax.train import optim, steps
    from vpns_jax.train import state as state_lib

    dtype = models.compute_dtype(args.dtype)  # the same mapping as config.model.dtype
    options = {} if args.conv_impl is None else {"conv_impl": args.conv_impl}
    model = models.create(args.arch, 1000, width=args.width, small_input=args.small_input,
                          dtype=dtype, **options)
    variables = models.init_variables(model, jax.random.key(args.seed), args.size)
    spec = prompts.PromptSpec("pad", input_size=args.size, output_size=args.size,
                              pad_size=args.pad_size)
    label_map = jnp.arange(args.num_classes, dtype=jnp.int32)
    batches = {
        "prompt": {"image": jnp.asarray(data["x_vp"]), "label": jnp.asarray(data["y_vp"])},
        "train": {"image": jnp.asarray(data["x_train"]), "label": jnp.asarray(data["y_train"])},
    }
    base = config_lib.default_config()
    base.sparsities = (1.0 - args.density,)
    ((mask_finding, tuning),) = [r.stages for r in vpns_method.plan(base)]
    ((finetune,),) = [r.stages for r in dense_method.plan(base)]
    rng = jax.random.key(args.seed + 1)

    seconds: dict[str, list[float]] = {}
    compile_s: dict[str, float] = {}
    flops: dict[str, float] = {}
    call_stats: dict[str, dict[str, list[float]]] = {}

    def run_train(name: str, stage: Any, state: Any) -> Any:
        step = steps.make_train_step(stage, model, spec)
        factors = optim.lr_factors(stage, 0)
        t0 = time.perf_counter()
        compiled = step.lower(state, batches, label_map, factors).compile()
        compile_s[name] = time.perf_counter() - t0
        flops[name] = compiled_flops(compiled)
        box = [state]

        def call() -> None:
            box[0], metrics = compiled(box[0], batches, label_map, factors)
            jax.block_until_ready(metrics)

        seconds[name] = time_calls(call, args.warmup, args.repeats, call_stats.setdefault(name, {}))
        return box[0]

    if "dense" in args.steps:
        st = state_lib.create_state(variables, rng=rng)
        run_train("dense", finetune, state_lib.begin_stage(finetune, st))

    scores = sparsity.scaled_score_init(variables["params"])
    st = state_lib.create_state(variables, rng=rng, scores=scores,
                                prompt=prompts.init_prompt(spec))
    if "mask_finding" in args.steps:
        st = run_train("mask_finding", mask_finding, state_lib.begin_stage(mask_finding, st))
    st = state_lib.begin_stage(tuning, st)
    if "tuning" in args.steps:
        st = run_train("tuning", tuning, st)
    if "eval" in args.steps:
        ev = steps.make_eval_step(tuning, model, spec)
        eval_batch = {**batches["train"], "mask": jnp.ones((args.batch,), bool)}
        t0 = time.perf_counter()
        compiled_eval = ev.lower(st, eval_batch, label_map).compile()
        compile_s["eval"] = time.perf_counter() - t0
        flops["eval"] = compiled_flops(compiled_eval)
        seconds["eval"] = time_calls(
            lambda: jax.block_until_ready(compiled_eval(st, eval_batch, label_map)),
            args.warmup, args.repeats, call_stats.setdefault("eval", {}))

    thr = jax.jit(lambda s: sparsity.global_threshold(s, args.density))
    scores = sparsity.scaled_score_init(variables["params"])
    seconds["threshold"] = time_calls(lambda: thr(scores).block_until_ready(), 1, args.repeats)
    n_scores = int(sum(v.size for v in scores.values()))
    stats = jax.devices()[0].memory_stats() or {}
    return {"seconds": seconds, "compile_s": compile_s, "num_scores": n_scores, "flops": flops,
            "peak_bytes": stats.get("peak_bytes_in_use"), "call_stats": call_stats,
            "conv_impl": getattr(model, "conv_impl", "xla")}


def compiled_flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled step (0 when the backend does not report one)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


# Dense peak TFLOP/s per device kind (fp32 column = TF32 tensor cores, JAX's default GPU matmul
# precision for float32), for MFU. Override with --peak-tflops.
PEAK_TFLOPS = {
    "H100": {"float32": 494.7, "bfloat16": 989.4},
    "H200": {"float32": 494.7, "bfloat16": 989.4},
    "A100": {"float32": 156.0, "bfloat16": 312.0},
}


def peak_tflops(args: argparse.Namespace) -> float | None:
    """The MFU denominator: --peak-tflops, else the table entry of the device kind, else None."""
    if args.peak_tflops:
        return args.peak_tflops
    kind = jax.devices()[0].device_kind
    for key, peaks in PEAK_TFLOPS.items():
        if key in kind:
            return peaks[args.dtype]
    return None


def bench_torch(args: argparse.Namespace, data: dict[str, np.ndarray],
                compile_model: bool) -> dict[str, Any]:
    """Time the PyTorch re-statement (benchmarks.torch_vpns) on the same data."""
    import torch

    from benchmarks import torch_reference, torch_vpns

    torch.manual_seed(args.seed)

    def nchw(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    device = args.torch_device or (
        "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if args.torch_autocast == "bfloat16" else None
    batch = torch_vpns.Batch(*(
        t.to(device) for t in (nchw(data["x_vp"]), torch.from_numpy(data["y_vp"]).long(),
                               nchw(data["x_train"]), torch.from_numpy(data["y_train"]).long())))
    cuda = device.startswith("cuda")
    peak: dict[str, int] = {}
    call_stats: dict[str, dict[str, list[float]]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> None:
        def call() -> None:
            fn()
            if cuda:
                torch.cuda.synchronize()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds[name] = time_calls(call, warmup, args.repeats, call_stats.setdefault(name, {}))
        if cuda:
            peak[name] = int(torch.cuda.max_memory_allocated())

    def build() -> Any:
        return torch_reference.build(args.arch, 1000, args.width, args.small_input)

    seconds: dict[str, list[float]] = {}
    warmup = args.warmup + (2 if compile_model else 0)
    if "dense" in args.steps:
        d = torch_vpns.DenseTorch(build(), channels_last=args.channels_last,
                                  compile_model=compile_model, device=device,
                                  autocast_dtype=autocast)
        timed("dense", lambda: d.step(batch.x_train, batch.y_train))
        del d
    v = torch_vpns.VPNsTorch(build(), input_size=args.size, output_size=args.size,
                             pad_size=args.pad_size, num_target=args.num_classes,
                             density=args.density, channels_last=args.channels_last,
                             compile_model=compile_model, device=device, autocast_dtype=autocast)
    if "mask_finding" in args.steps:
        v.set_stage("mask_finding")
        timed("mask_finding", lambda: v.mask_finding_iteration(batch))
    v.set_stage("tuning")
    if "tuning" in args.steps:
        timed("tuning", lambda: v.tuning_iteration(batch))
    if "eval" in args.steps:
        timed("eval", lambda: v.eval_step(batch.x_train, batch.y_train))
    if not compile_model:
        timed("threshold", v.refresh)
    return {"seconds": seconds, "threads": torch.get_num_threads(), "device": device,
            "autocast": args.torch_autocast, "version": torch.__version__, "peak_bytes": peak,
            "call_stats": call_stats}


def images_per_step(name: str, batch: int) -> int:
    """Images consumed by one call of `name`: two passes for the VPNs iterations."""
    return 2 * batch if name in ("mask_finding", "tuning") else batch


def device_name() -> str:
    """'cpu: <model> x N cores' or the accelerator's device kind."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        return f"cpu: {model} x {os.cpu_count()}"
    return f"{dev.platform}: {dev.device_kind}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and the JSON line; returns the JSON record."""
    args = parse_args(argv)
    cpu_malloc.keep_freed_memory()  # as vpns_jax.main does; VPNS_MALLOC=system to compare without
    cache = enable_compilation_cache(args.compilation_cache)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    data = make_data(args)
    results = {"jax": bench_jax(args, data)}
    if args.compare_torch:
        results["torch"] = bench_torch(args, data, compile_model=False)
        if args.torch_compile:
            try:
                results["torch_compile"] = bench_torch(args, data, compile_model=True)
            except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
                results["torch_compile"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}

    med = {k: {s: statistics.median(t) for s, t in r.get("seconds", {}).items()}
           for k, r in results.items()}
    impls = [k for k in ("jax", "torch", "torch_compile") if k in med]
    rows = [name for name in (*STEPS, "threshold") if any(name in med[k] for k in impls)]
    print(f"{args.arch} {args.size}px batch {args.batch} {args.dtype} "
          f"conv_impl={results['jax']['conv_impl']}, malloc={cpu_malloc.malloc_name()}, "
          f"density {args.density}, "
          f"median of {args.repeats} after {args.warmup} warm-up; ms (images/s)")
    print(f"{'step':<14}" + "".join(f"{k:>24}" for k in impls))
    for name in rows:
        cells = []
        for k in impls:
            t = med[k].get(name)
            if t is None:
                cells.append(f"{'-':>24}")
            elif name == "threshold":
                cells.append(f"{t * 1e3:>13.1f}{'':>11}")
            else:
                ips = images_per_step(name, args.batch) / t
                cells.append(f"{t * 1e3:>13.1f} ({ips:>7.1f})")
        print(f"{name:<14}" + "".join(cells))
    if "torch_compile" in results and "error" in results["torch_compile"]:
        print("torch.compile failed:", results["torch_compile"]["error"])
    print("compile (s):", {k: round(v, 2) for k, v in results["jax"]["compile_s"].items()},
          f"cache={cache}")

    def ips_of(k: str) -> dict[str, float]:
        return {s: round(images_per_step(s, args.batch) / t, 3)
                for s, t in med.get(k, {}).items() if s in STEPS}

    record: dict[str, Any] = {
        "images_per_s": ips_of("jax"),
        "jax_over_torch": {},
        "device": device_name(),
        "arch": args.arch, "size": args.size, "batch": args.batch, "dtype": args.dtype,
        "density": args.density, "width": args.width, "small_input": args.small_input,
        "conv_impl": results["jax"]["conv_impl"],
        "threshold_ms": round(med["jax"]["threshold"] * 1e3, 2),
        "num_scores": results["jax"]["num_scores"],
        "compile_s": {k: round(v, 2) for k, v in results["jax"]["compile_s"].items()},
        "compilation_cache": cache,
        "peak_device_bytes": results["jax"]["peak_bytes"],
        "jax": jax.__version__,
        "malloc": cpu_malloc.malloc_name(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_s": median_stats(results["jax"]["call_stats"], "cpu_s"),
        "minor_faults": median_stats(results["jax"]["call_stats"], "minor_faults"),
    }
    peak = peak_tflops(args)
    if peak:
        record["peak_tflops"] = peak
        record["mfu"] = {s: round(results["jax"]["flops"][s] / med["jax"][s] / (peak * 1e12), 4)
                         for s in STEPS if results["jax"]["flops"].get(s) and s in med["jax"]}
    record["xla_flops"] = {s: f for s, f in results["jax"]["flops"].items() if f}
    if "torch" in med:
        record["torch_device"] = results["torch"]["device"]
        record["torch_autocast"] = results["torch"]["autocast"]
        if results["torch"]["peak_bytes"]:
            record["torch_peak_device_bytes"] = results["torch"]["peak_bytes"]
        record["torch_images_per_s"] = ips_of("torch")
        record["torch_threshold_ms"] = round(med["torch"]["threshold"] * 1e3, 2)
        record["torch_threads"] = results["torch"]["threads"]
        record["torch_cpu_s"] = median_stats(results["torch"]["call_stats"], "cpu_s")
        record["torch_minor_faults"] = median_stats(results["torch"]["call_stats"], "minor_faults")
        record["jax_over_torch"] = {s: round(med["torch"][s] / med["jax"][s], 3)
                                    for s in ("mask_finding", "tuning", "dense", "eval")
                                    if s in med["torch"] and s in med["jax"]}
    if "torch_compile" in med and med["torch_compile"]:
        record["torch_compile_images_per_s"] = ips_of("torch_compile")
        record["jax_over_torch_compile"] = {
            s: round(med["torch_compile"][s] / med["jax"][s], 3)
            for s in ("mask_finding", "tuning") if s in med["torch_compile"] and s in med["jax"]}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
