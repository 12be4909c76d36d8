"""Export a finished run's sparse model for PyTorch or as project weights.

    python -m vpns_jax.export --workdir DIR --run vpns_s0.9 --out model.safetensors   (or .pth)
    python -m vpns_jax.export --workdir DIR --list

Writes a torchvision-layout state dict whose pruned weights are exact zeros (load it with
`model.load_state_dict`), plus `<out stem>.extras.safetensors` with what PyTorch needs to reproduce the
run's predictions: the binary masks (uint8, torchvision keys and layouts), the visual prompt (3×H×W, add it
to the border of [0,1] images before clamping and normalizing) and the label mapping (downstream class c
→ source logit `label_map[c]`). `--format vpns` writes the project's own weights format instead.
`--format slim --out DIR` copies a structured run's physically slimmed network (WORKDIR/slim/RUN:
`slim.safetensors`, `widths.json`, `slim_vpns.safetensors`; load it in PyTorch with
`vpns_jax.structured.torch_slim.load_slim(DIR)`); for an unstructured run it is a one-line error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from flax import traverse_util

from vpns_jax import checkpoint
from vpns_jax import weights as weights_lib
from vpns_jax.errors import VpnsError
from vpns_jax.weights.keys import to_torch, torch_key


def finished_runs(workdir: str) -> list[str]:
    """Names of the runs with final artifacts in `workdir/final`."""
    final = os.path.join(workdir, "final")
    return sorted(os.listdir(final)) if os.path.isdir(final) else []


def export_run(workdir: str, run: str, out: str, *, fmt: str = "torchvision") -> list[str]:
    """Export run `run` of `workdir` to `out`; returns the paths written."""
    runs = finished_runs(workdir)
    if run not in runs:
        raise VpnsError(f"no finished run {run!r} in {workdir}/final; finished runs: "
                        f"{', '.join(runs) or 'none'} (train first, or pick one of these)")
    if fmt == "slim":
        return _copy_slim(workdir, run, out)
    check_writable(out)
    tree, meta = checkpoint.load_final(os.path.join(workdir, "final", run))
    options = {**meta["options"], "num_classes": int(meta.get("num_outputs",
                                                              meta["options"]["num_classes"]))}
    variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
    masks = {p: np.asarray(m, bool) for p, m in (tree.get("masks") or {}).items()}
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    for path, m in masks.items():  # exact zeros, whatever the stored weights hold
        flat[path] = np.where(m, flat[path], 0).astype(np.float32)
    variables["params"] = traverse_util.unflatten_dict(flat, sep="/")
    source = {"run": run, "workdir": os.path.abspath(workdir), "method": meta.get("method"),
              "sparsity": meta.get("sparsity"), "dataset": meta.get("dataset")}
    if fmt == "vpns":
        with _writing(out):
            weights_lib.save(out, meta["arch"], variables, options=options, source=source)
        return [out]
    state = weights_lib.to_torch_state_dict(meta["arch"], variables, {"options": options})
    with _writing(out):
        _write_state_dict(state, out)
    extras = {f"masks/{torch_key('params/' + p)}": to_torch(m.astype(np.uint8))
              for p, m in masks.items()}
    if tree.get("prompt") and "program" in tree["prompt"]:
        extras["prompt/program"] = np.ascontiguousarray(
            np.transpose(np.asarray(tree["prompt"]["program"], np.float32), (2, 0, 1)))
    label_map = np.asarray(tree.get("label_map", []), np.int32)
    if label_map.size:
        extras["label_map"] = label_map
    extras_path = os.path.splitext(out)[0] + ".extras.safetensors"
    from safetensors.numpy import save_file

    with _writing(extras_path):
        save_file(extras, extras_path,
                  metadata={"vpns_jax": json.dumps({**source, **_prompt_meta(meta)})})
    return [out, extras_path]


def _copy_slim(workdir: str, run: str, out: str) -> list[str]:
    """Copy the slimmed export of structured run `run` (WORKDIR/slim/RUN) into folder `out`."""
    import shutil

    from vpns_jax.structured import slim
    from vpns_jax.structured_rows import SLIM_DIR

    source = os.path.join(workdir, SLIM_DIR, run)
    if not os.path.isdir(source):
        slim.ensure_structured(run, None)  # the one-line error: only structured runs slim
    if os.path.isfile(out):
        raise VpnsError(f"--out {out} is a file; --format slim writes a folder (widths.json and "
                        "weights), give a folder path")
    check_writable(os.path.join(out, slim.TORCH_FILE))
    written = []
    for name in sorted(os.listdir(source)):
        with _writing(os.path.join(out, name)):
            written.append(shutil.copy2(os.path.join(source, name), os.path.join(out, name)))
    return written


def check_writable(out: str) -> None:
    """Raise a one-line `VpnsError` naming `out` when it cannot be written (before any work)."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise VpnsError(f"cannot write --out {out}: its folder {parent} cannot be created "
                        f"({e.strerror}); choose a writable --out path") from None
    if os.path.isdir(out):
        raise VpnsError(f"cannot write --out {out}: it is a folder; give a file name ending in "
                        ".safetensors or .pth")
    if not os.access(parent, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise VpnsError(f"cannot write --out {out}: no write permission in {parent}; choose a "
                        "writable --out path")


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn a failed write of `path` (disk full, permissions) into a one-line VpnsError."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise VpnsError(f"cannot write {path}: {reason}; free space or choose a writable --out "
                        "path") from None


def _prompt_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": meta.get("prompt"), "input_size": meta.get("input_size"),
            "prompt_at_test_supported": bool(meta.get("has_prompt"))}


def _write_state_dict(state: dict[str, np.ndarray], out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, out,
                  metadata={"format": "pt"})
    elif out.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise VpnsError(f"writing {out} needs PyTorch; install it or use a .safetensors "
                            "output (torch loads it with safetensors.torch.load_file)") from None
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, out)
    else:
        raise VpnsError(f"--out {out}: use a .safetensors or .pth file name")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpns_jax.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--run", help="e.g. vpns_s0.9 (see --list)")
    parser.add_argument("--out", help="output .safetensors or .pth (--format slim: a folder)")
    parser.add_argument("--format", choices=("torchvision", "vpns", "slim"), default="torchvision")
    parser.add_argument("--list", action="store_true", help="list the finished runs")
    args = parser.parse_args(argv)
    try:
        if args.list or not args.run:
            print("\n".join(finished_runs(args.workdir)) or f"no finished runs in {args.workdir}")
            return 0
        if not args.out:
            parser.error("--out is required with --run")
        for path in export_run(args.workdir, args.run, args.out, fmt=args.format):
            print(f"wrote {path}")
    except VpnsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
