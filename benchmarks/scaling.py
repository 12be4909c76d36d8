"""Scaling model: what one VPNs iteration all-reduces, from the compiled program, against its FLOPs.

    python -m benchmarks.scaling                        # ResNet-18 and -50, both VPNs stages
    python -m benchmarks.scaling --archs resnet18 --stages mask_finding --json out.json

For each architecture and VPNs stage (``mask_finding``: scores + prompt; ``tuning``: weights + prompt)
it compiles the project's own train step (`vpns_jax.train.steps.make_train_step`, the function the
runner jits) twice:

1. **collectives**: on ``--devices`` forced host devices (a 1-D ``data`` mesh, batch sharded, state
   replicated: what `vpns_jax.parallel` and the runner do), at ``--hlo-size`` px. It reads every
   collective of the optimized HLO (``compiled.as_text()``) with its operand shapes and dtypes, and
   sorts the all-reduced tensors into gradients (matched, by element count, to the leaves of the
   groups each pass differentiates: checked against the expected count), BatchNorm statistics
   (per-channel sums under a BatchNorm module: forward mean and mean of squares, backward the two
   sums BN's gradient needs) and scalars (loss, metrics). Gradient and BN sizes do not depend on the
   image size; the only size-dependent tensor, the prompt, is rescaled to ``--size`` exactly (its
   leaves at ``--size``).
2. **FLOPs**: on one device at ``--size`` px with XLA's convolution (the GPU/TPU lowering), at two
   batch sizes, so ``compiled.cost_analysis()['flops']`` splits into FLOPs per image and a per-
   iteration constant (optimizer, threshold).

Then the cost model (``--chips``, ``--platforms``): per iteration of global batch ``B`` on ``n``
chips, compute = (B/n * FLOPs/image + constant) / (peak * ``--mfu``); communication = sum over the
compiled all-reduces of a ring all-reduce, ``2(n-1)/n * bytes / bandwidth + latency``
(bandwidth: the slowest link a ring over ``n`` chips crosses). Prints the measured table and the
model's table, then one JSON line.

``--width`` and ``--hlo-size`` trade exactness for CPU compile time; the default (full width, 32 px)
keeps every gradient and BN tensor at its real size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from typing import Any

STAGES = ("mask_finding", "tuning")
# The paper's global batches (vpns_jax.config.DATASET_BATCH_SIZE): CIFAR 256, ImageNet 1024.
PAPER_BATCHES = {"cifar": 256, "imagenet": 1024}
DTYPE_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
               "pred": 1, "s64": 8, "u64": 8}
COLLECTIVES = ("all-reduce", "all-reduce-start", "reduce-scatter", "all-gather", "all-gather-start",
               "all-to-all", "collective-permute", "collective-permute-start")

# Platforms of the cost model. peak: dense TFLOP/s per chip; links: (chips up to which the link is
# used, bandwidth GB/s per chip per direction, latency us per collective). Sources and assumptions in
# launch/README.md ("Scaling model").
PLATFORMS: dict[str, dict[str, Any]] = {
    "h100": {"peak_tflops": {"float32": 494.7, "bfloat16": 989.4},
             "links": [(8, 450.0, 10.0), (None, 50.0, 30.0)]},  # NVLink 4 in a node; IB NDR 400G/GPU
    "tpu_v4": {"peak_tflops": {"float32": 275.0, "bfloat16": 275.0},
               "links": [(None, 268.0, 10.0)]},  # ICI: 1.1 PB/s all-reduce per 4096-chip pod
    "tpu_v5e": {"peak_tflops": {"float32": 197.0, "bfloat16": 197.0},
                "links": [(None, 200.0, 10.0)]},  # ICI: 51.2 TB/s all-reduce per 256-chip pod
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--devices", type=int, default=8, help="forced host devices for the HLO")
    p.add_argument("--hlo-size", type=int, default=32, help="image size (px) of the HLO compile")
    p.add_argument("--size", type=int, default=224, help="image size (px) of the model")
    p.add_argument("--width", type=float, default=1.0, help="channel width (1.0: the real model)")
    p.add_argument("--flops-batches", default="1,2",
                   help="two batch sizes for the FLOP split; 'off': collectives only, no cost model")
    p.add_argument("--dtype", default="float32", help="model compute dtype (config.model.dtype)")
    p.add_argument("--chips", default="8,16,32,64,128,256")
    p.add_argument("--platforms", default=",".join(PLATFORMS))
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilization of the peak")
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("--from-json", default="",
                   help="recompute the cost model from a saved --json result (no compiling)")
    args = p.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    args.stages = [s for s in args.stages.split(",") if s]
    args.chips = [int(c) for c in args.chips.split(",") if c]
    args.platforms = [q for q in args.platforms.split(",") if q]
    args.flops_batches = [] if args.flops_batches == "off" else [
        int(b) for b in args.flops_batches.split(",") if b]
    if bad := [s for s in args.stages if s not in STAGES]:
        p.error(f"unknown stages {bad}; use {STAGES}")
    if bad := [q for q in args.platforms if q not in PLATFORMS]:
        p.error(f"unknown platforms {bad}; use {tuple(PLATFORMS)}")
    if args.flops_batches and (len(args.flops_batches) != 2
                               or args.flops_batches[0] == args.flops_batches[1]):
        p.error("--flops-batches takes two different batch sizes, e.g. 1,2 (or 'off')")
    return args


# ---------------------------------------------------------------------------------------- HLO

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>[\w\-]+)\(")
_TENSOR = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Every collective instruction of an optimized HLO module, in program order.

    Returns dicts: ``op`` (opcode), ``tensors`` ([(dtype, shape tuple)], one per tuple element),
    ``op_name`` (the jax name stack of its metadata, '' if none). ``*-done`` halves of async pairs
    are skipped (their ``*-start`` is counted once).
    """
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m or m.group("op") not in COLLECTIVES:
            continue
        shape = m.group("shape")
        tensors = [(dt, tuple(int(d) for d in dims.split(",") if d))
                   for dt, dims in _TENSOR.findall(shape) if dt in DTYPE_BYTES]
        if m.group("op") in ("all-gather-start", "collective-permute-start"):
            tensors = tensors[: len(tensors) // 2]  # shape (operands, results); all-reduce-start's
            # shape is the reduced tensors themselves
        name = _OP_NAME.search(line)
        out.append({"op": m.group("op"), "tensors": tensors, "op_name": name.group(1) if name else ""})
    return out


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def classify(collectives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per all-reduced tensor: kind 'scalar' | 'bn_forward' | 'bn_backward' | 'gradient'.

    BatchNorm statistics are the 1-D all-reduces whose op sits under a BatchNorm module of the jax
    name stack (``.../bn1/...``, ``.../downsample_1/...``); forward (``jvp(``) or backward
    (``transpose(``). Everything else with more than one element is a gradient.
    """
    rows = []
    for index, c in enumerate(collectives):
        name = c["op_name"]
        bn = re.search(r"/(bn\d*|downsample_1)/", name) is not None
        for dt, shape in c["tensors"]:
            n = _size(shape)
            if n == 1:
                kind = "scalar"
            elif bn and len(shape) == 1 and all(len(s) == 1 for _, s in c["tensors"]):
                kind = "bn_backward" if "transpose(" in name else "bn_forward"
            else:
                kind = "gradient"
            rows.append({"collective": index, "op": c["op"], "dtype": dt, "shape": list(shape),
                         "elements": n, "bytes": n * DTYPE_BYTES[dt], "kind": kind})
    return rows


def match_gradients(rows: list[dict[str, Any]], leaves: dict[str, dict[str, int]]) -> list[int]:
    """Give all-reduced tensors a state leaf of the same element count that some pass differentiates
    (a multiset match: each pass's leaves are used once; gradient rows first, then 1-D BN-named rows,
    which may be BN affine gradients). Sets ``row['leaf']`` (and kind 'gradient'); returns the element
    counts of the gradient rows no leaf matched (should be none)."""
    pool = [(n, path) for per_pass in leaves.values() for path, n in per_pass.items()]
    unmatched = []
    # Kernels first (never BN), then the 1-D tensors (BN affine gradients, or BN sums of equal size).
    for row in sorted((r for r in rows if r["kind"] != "scalar"),
                      key=lambda r: (len(r["shape"]) < 2, r["kind"] != "gradient", -r["elements"])):
        hit = next((i for i, (n, _) in enumerate(pool) if n == row["elements"]), None)
        if hit is not None:
            row["leaf"] = pool.pop(hit)[1]
            row["kind"] = "gradient"
        elif row["kind"] == "gradient":
            unmatched.append(row["elements"])
    return unmatched


# ---------------------------------------------------------------------------------------- model


def _paths(tree: Any) -> dict[str, int]:
    import jax

    return {jax.tree_util.keystr(k): int(_size(tuple(v.shape)))
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def build(arch: str, stage_name: str, *, size: int, width: float, dtype: str, conv_impl: str | None):
    """(stage, model, prompt spec, state) for one VPNs stage of `arch` at `size` px."""
    import jax

    from vpns_jax import config as config_lib
    from vpns_jax import models, prompts, sparsity
    from vpns_jax.methods import vpns as vpns_method
    from vpns_jax.train import state as state_lib

    options = {} if conv_impl is None else {"conv_impl": conv_impl}
    model = models.create(arch, 1000, width=width, dtype=models.compute_dtype(dtype), **options)
    variables = models.init_variables(model, jax.random.key(0), size)
    spec = prompts.PromptSpec("pad", input_size=size, output_size=size, pad_size=min(16, size // 2))
    base = config_lib.default_config()
    base.sparsities = (0.5,)
    ((mask_finding, tuning),) = [r.stages for r in vpns_method.plan(base)]
    stage = {"mask_finding": mask_finding, "tuning": tuning}[stage_name]
    st = state_lib.create_state(variables, rng=jax.random.key(1),
                                scores=sparsity.scaled_score_init(variables["params"]),
                                prompt=prompts.init_prompt(spec))
    return stage, model, spec, state_lib.begin_stage(stage, st)


def pass_leaves(stage: Any, state: Any) -> dict[str, dict[str, int]]:
    """``{'pass0 (prompted)': {group/leaf: elements}}``: what each pass differentiates."""
    trainables = state.trainables()
    out = {}
    for i, p in enumerate(stage.passes):
        active = p.active_groups(stage.trainable_groups)
        label = f"pass{i} ({'prompted' if p.prompted else 'unprompted'}, {'+'.join(active)})"
        out[label] = {f"{g}{path}": n for g in active for path, n in _paths(trainables[g]).items()}
    return out


def _abstract(tree: Any, sharding: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def compile_step(stage: Any, model: Any, spec: Any, state: Any, *, batch: int, size: int,
                 mesh: Any) -> tuple[Any, float]:
    """The stage's train step compiled for a global batch over `mesh` (data-sharded batches,
    replicated state, as in a run); (compiled, seconds)."""
    import jax
    import jax.numpy as jnp

    from vpns_jax import parallel
    from vpns_jax.train import optim, steps

    rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
    view = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=dat),
            "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dat)}
    batches = {v: view for v in stage.views}
    label_map = jax.ShapeDtypeStruct((10,), jnp.int32, sharding=rep)
    factors = _abstract(jax.tree.map(jnp.asarray, optim.lr_factors(stage, 0)), rep)
    t0 = time.perf_counter()
    compiled = steps.make_train_step(stage, model, spec).lower(
        _abstract(state, rep), batches, label_map, factors).compile()
    return compiled, time.perf_counter() - t0


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def measure(arch: str, stage_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Collectives (a `--devices` compile) and FLOPs (1-device compiles) of one stage's iteration."""
    import jax
    from jax.sharding import Mesh

    from vpns_jax import parallel

    mesh = parallel.make_mesh()
    stage, model, spec, state = build(arch, stage_name, size=args.hlo_size, width=args.width,
                                      dtype=args.dtype, conv_impl=None)
    compiled, hlo_compile_s = compile_step(stage, model, spec, state, batch=2 * mesh.size,
                                           size=args.hlo_size, mesh=mesh)
    collectives = hlo_collectives(compiled.as_text())
    rows = classify(collectives)
    leaves = pass_leaves(stage, state)
    unmatched = match_gradients(rows, leaves)
    for r in rows:  # 1-D tensors no gradient leaf explains: BN sums of a combined all-reduce
        if r["kind"] == "gradient" and "leaf" not in r and len(r["shape"]) == 1:
            r["kind"] = "bn_backward" if "transpose(" in collectives[r["collective"]]["op_name"] \
                else "bn_forward"
    unmatched = [r["elements"] for r in rows if r["kind"] == "gradient" and "leaf" not in r]
    # At the model's size: the same leaves (only the prompt's size changes), XLA's convolution.
    _, model_full, spec_full, state_full = build(arch, stage_name, size=args.size, width=args.width,
                                                 dtype=args.dtype, conv_impl="xla")
    full = {path: n for per in pass_leaves(stage, state_full).values() for path, n in per.items()}
    for r in rows:
        r["bytes_full"] = (full[r["leaf"]] * DTYPE_BYTES[r["dtype"]] if "leaf" in r else r["bytes"])
    per_collective = Counter()
    for r in rows:
        per_collective[r["collective"]] += r["bytes_full"]
    by_kind = Counter()
    for r in rows:
        by_kind[r["kind"]] += r["bytes_full"]
    one = Mesh(jax.devices()[:1], (parallel.DATA_AXIS,))
    flops, flops_compile_s = [], 0.0
    for b in args.flops_batches:
        c, seconds = compile_step(stage, model_full, spec_full, state_full, batch=b, size=args.size,
                                  mesh=one)
        flops.append(_flops(c))
        flops_compile_s += seconds
    if flops:
        (b1, b2), (f1, f2) = args.flops_batches, flops
        per_image = (f2 - f1) / (b2 - b1)  # per image of each view: every pass sees B images
        constant = f1 - b1 * per_image
    else:
        per_image = constant = 0.0
    return {
        "arch": arch, "stage": stage_name, "passes": list(leaves),
        "collective_ops": dict(Counter(c["op"] for c in collectives)),
        "all_reduce_ops": sum(c["op"].startswith("all-reduce") for c in collectives),
        "bytes_by_kind": dict(by_kind),
        "bn_tensors": sum(r["kind"].startswith("bn") for r in rows),
        "gradient_elements_hlo": sum(r["elements"] for r in rows if r["kind"] == "gradient"),
        "gradient_elements_expected": {k: sum(v.values()) for k, v in leaves.items()},
        "gradients_unmatched": unmatched,
        "gradient_dtypes": sorted({r["dtype"] for r in rows if r["kind"] == "gradient"}),
        "bytes_per_iteration": sum(per_collective.values()),
        "collective_bytes": [per_collective[i] for i in sorted(per_collective)],
        "flops_per_image": per_image,
        "flops_constant": constant,
        "flops_batches": dict(zip(args.flops_batches, flops, strict=True)),
        "hlo_compile_s": round(hlo_compile_s, 1), "flops_compile_s": round(flops_compile_s, 1),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------- model


def ring_seconds(bytes_list: list[int], chips: int, platform_name: str) -> float:
    """Seconds for ring all-reduces of these tensors (one collective each) over `chips` chips."""
    if chips <= 1:
        return 0.0
    links = PLATFORMS[platform_name]["links"]
    bw, lat = next((b, lt) for upto, b, lt in links if upto is None or chips <= upto)
    return sum(2 * (chips - 1) / chips * b / (bw * 1e9) + lat * 1e-6 for b in bytes_list)


def collective_split(m: dict[str, Any]) -> list[tuple[int, int]]:
    """(bytes, gradient bytes) of each compiled all-reduce at the model's size."""
    ops: dict[int, list[int]] = {}
    for r in m["rows"]:
        total_grad = ops.setdefault(r["collective"], [0, 0])
        total_grad[0] += r["bytes_full"]
        total_grad[1] += r["bytes_full"] if r["kind"] == "gradient" else 0
    return [(t, g) for t, g in (ops[i] for i in sorted(ops))]


def cost_model(m: dict[str, Any], collectives: list[tuple[int, int]], global_batch: int, chips: int,
               platform_name: str, dtype: str, mfu: float) -> dict[str, float]:
    """Per iteration: compute and all-reduce milliseconds (no overlap), the all-reduce time with the
    gradients all-reduced in bfloat16, and the images per chip (per pass) where compute = all-reduce.

    collectives: (bytes, gradient bytes) per compiled all-reduce (`collective_split`)."""
    peak = PLATFORMS[platform_name]["peak_tflops"]["bfloat16" if dtype == "bfloat16" else "float32"]
    flops_per_s = peak * 1e12 * mfu
    per_chip = global_batch / chips
    compute = (per_chip * m["flops_per_image"] + m["flops_constant"]) / flops_per_s
    comm = ring_seconds([t for t, _ in collectives], chips, platform_name)
    comm_bf16 = ring_seconds([t - g // 2 for t, g in collectives], chips, platform_name)
    latency = ring_seconds([0] * len(collectives), chips, platform_name)

    def even(seconds: float) -> float:
        return max(0.0, (seconds * flops_per_s - m["flops_constant"]) / m["flops_per_image"])

    return {"images_per_chip": per_chip, "compute_ms": compute * 1e3, "comm_ms": comm * 1e3,
            "latency_ms": latency * 1e3, "comm_fraction": comm / (comm + compute),
            "break_even_images_per_chip": even(comm), "comm_bf16_grads_ms": comm_bf16 * 1e3,
            "break_even_bf16_grads": even(comm_bf16)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if args.from_json:
        pass
    elif "jax" in sys.modules:
        import jax

        if jax.device_count() != args.devices:
            raise SystemExit(f"run as a fresh process: jax already started with {jax.device_count()} "
                             f"devices, the HLO needs {args.devices} (XLA_FLAGS={flag})")
    else:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results, date, machine, jax_version = (saved["measured"], saved["date"], saved["machine"],
                                               saved["jax"])
    else:
        import jax

        results = []
        for arch in args.archs:
            for stage in args.stages:
                m = measure(arch, stage, args)
                results.append(m)
                print(f"[scaling] {arch} {stage}: {m['all_reduce_ops']} all-reduces, "
                      f"{m['bytes_per_iteration'] / 1e6:.2f} MB/iteration, "
                      f"{m['flops_per_image'] / 1e9:.2f} GFLOP/image, compile {m['hlo_compile_s']} + "
                      f"{m['flops_compile_s']} s", file=sys.stderr, flush=True)
        date, machine, jax_version = (datetime.date.today().isoformat(), platform.platform(),
                                      jax.__version__)
    table = []
    for m in results if any(m["flops_per_image"] for m in results) else []:
        sizes = collective_split(m)
        for dataset, batch in PAPER_BATCHES.items():
            for plat in args.platforms:
                for n in args.chips:
                    if batch % n:
                        continue
                    row = cost_model(m, sizes, batch, n, plat, args.dtype, args.mfu)
                    table.append({"arch": m["arch"], "stage": m["stage"], "dataset": dataset,
                                  "batch": batch,
                                  "platform": plat, "chips": n, **row})
    print_tables(results, table)
    out = {"date": date, "machine": machine, "jax": jax_version, "args": dict(vars(args)),
           "measured": results,
           "model": table}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(json.dumps({"measured": [{k: m[k] for k in ("arch", "stage", "all_reduce_ops",
                                                       "bytes_per_iteration", "flops_per_image")}
                                   for m in results]}))
    return out


def print_tables(results: list[dict[str, Any]], table: list[dict[str, Any]]) -> None:
    print("| arch | stage | all-reduces | gradient MB | BN MB (tensors) | scalars B | MB/iteration |"
          " GFLOP/image/iteration | constant GFLOP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in results:
        k = m["bytes_by_kind"]
        print(f"| {m['arch']} | {m['stage']} | {m['all_reduce_ops']} | "
              f"{k.get('gradient', 0) / 1e6:.2f} | "
              f"{(k.get('bn_forward', 0) + k.get('bn_backward', 0)) / 1e6:.3f} ({m['bn_tensors']}) | "
              f"{k.get('scalar', 0)} | {m['bytes_per_iteration'] / 1e6:.2f} | "
              f"{m['flops_per_image'] / 1e9:.2f} | {m['flops_constant'] / 1e9:.2f} |")
    print()
    print("| arch | stage | batch | platform | chips | images/chip | compute ms | all-reduce ms"
          " (latency) | comm share | break-even images/chip | bf16 grads: all-reduce ms, break-even |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['arch']} | {r['stage']} | {r['batch']} | {r['platform']} | {r['chips']} | "
              f"{r['images_per_chip']:g} | {r['compute_ms']:.2f} | {r['comm_ms']:.2f} "
              f"({r['latency_ms']:.2f}) | {r['comm_fraction']:.0%} | "
              f"{r['break_even_images_per_chip']:.0f} | {r['comm_bf16_grads_ms']:.2f}, "
              f"{r['break_even_bf16_grads']:.0f} |")


if __name__ == "__main__":
    main()
