"""torchvision/timm weights → project format (load/save) → back to torchvision layout.

Project format: ONE `.safetensors` file with float32 tensors keyed `params/<flax path>` and
`batch_stats/<flax path>`, and JSON metadata under the header key 'vpns_jax':
`{format_version, arch, options (kwargs of models.create), source {file, sha256},
num_batches_tracked {torch key: int}, source_dtypes {torch key: dtype, only non-float32}, notes}`.
CLI: `python -m vpns_jax.weights convert|export ...` (see `__main__`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpns_jax import models
from vpns_jax.errors import WeightsError
from vpns_jax.weights.keys import (
    describe_layout,
    flax_path,
    normalize_keys,
    num_classes_of,
    to_flax,
    to_torch,
    torch_key,
    torch_order,
)
from vpns_jax.weights.pth import read_pth

FORMAT_VERSION = 1
META_KEY = "vpns_jax"
_HOW_TO_GET = (
    "Get torchvision weights on a connected machine, e.g. `torch.hub.load_state_dict_from_url("
    "torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)` (it lands in "
    "~/.cache/torch/hub/checkpoints/), copy the .pth here, then "
    "`python -m vpns_jax.weights convert --arch ARCH --src FILE --out OUT`.")

__all__ = ["convert", "export", "expected_shapes", "flax_path", "load", "read_state_dict", "save",
           "to_torch_state_dict", "torch_key"]


def _check_exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist. {_HOW_TO_GET}")


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _not_safetensors(path: Path) -> str | None:
    """What `path` is instead, when its first bytes are not a safetensors header (else None).

    A safetensors file starts with an 8-byte little-endian header length N, then N bytes of JSON.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return None
    if head.startswith(b"PK\x03\x04"):  # as a header length: petabytes, never a safetensors file
        return "a PyTorch checkpoint (torch.save zip archive)"
    if head.startswith(b"\x80\x02\x8a\x0a") or (head[:1] == b"\x80" and path.suffix != ".safetensors"):
        return "a PyTorch checkpoint (legacy pickle format)"  # torch's magic number, or a pickle
    if path.suffix == ".safetensors":
        return None  # a damaged safetensors file: `_read_safetensors` says so
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return f"probably a PyTorch checkpoint (by its {path.suffix} name)"
    return "of an unknown format"


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own Rust-side error types
        raise WeightsError(f"{path}: corrupt or truncated .safetensors file "
                           f"({type(e).__name__}: {e}); download or export it again.") from None


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a torchvision/timm state dict (.pth zip or legacy, or .safetensors) as numpy arrays.

    Unwraps a dict nested under 'state_dict' or 'model', strips a 'module.' prefix and renames
    timm's VGG head to torchvision's. Returns (state dict with torchvision names, notes on changes).
    """
    path = Path(path)
    _check_exists(path, "Weights file")
    notes: list[str] = []
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)[0]
    else:
        obj = read_pth(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            notes.append(f"state dict nested under {wrapper!r}")
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{path}: expected a state dict (name → tensor), got {type(obj).__name__}.")
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {bad[:5]} ({len(bad)} in all); "
                           "expected a plain state dict.")
    state, more = normalize_keys({str(k): v for k, v in obj.items()})
    return state, notes + more


def _model_layout(arch: str, options: Mapping[str, Any]) -> tuple[list[str], dict[str, tuple]]:
    """Flax paths ('params/…', 'batch_stats/…') in module-creation order, and their shapes."""
    model = models.create(arch, **options)
    order: list[str] = []

    def init(rng: jax.Array) -> dict[str, Any]:
        # model.init directly (not a jitted helper): its dicts are in creation order while tracing.
        variables = model.init({"params": rng}, jnp.zeros((1, 32, 32, 3)), train=False)
        variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        for col in ("params", "batch_stats"):
            order.extend(f"{col}/{p}" for p in traverse_util.flatten_dict(variables[col], sep="/"))
        return variables

    shapes = jax.eval_shape(init, jax.random.key(0))
    flat = {f"{col}/{p}": tuple(s.shape) for col in ("params", "batch_stats")
            for p, s in traverse_util.flatten_dict(shapes[col], sep="/").items()}
    return order, flat


def expected_shapes(arch: str, options: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Flax path → shape for `models.create(arch, **options)` (no allocation)."""
    return _model_layout(arch, options)[1]


def _mismatch(path: Path | str, arch: str, options: Mapping[str, Any], missing: list[str],
              unexpected: list[str], wrong: list[str], shapes: Mapping[str, tuple]) -> WeightsError:
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (" …" if len(keys) > 5 else "")

    lines = [f"{path}: does not match {arch} with options {dict(options)}."]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {few(unexpected)}")
    if wrong:
        lines.append(f"  shape mismatches ({len(wrong)}): {few(wrong)}")
    looks = describe_layout(shapes)
    lines.append(f"  the file looks like: {looks}." if looks else
                 "  the file does not look like a torchvision ResNet or VGG.")
    lines.append("  Pass the matching --arch/--width/--small-input/--num-classes.")
    return WeightsError("\n".join(lines))


def convert_state_dict(state: Mapping[str, np.ndarray], arch: str, options: Mapping[str, Any],
                       *, name: str = "<state dict>") -> tuple[dict[str, Any], dict[str, Any]]:
    """torchvision-named state dict → ({'params', 'batch_stats'} of float32 numpy, torch meta).

    Strict: every model variable filled, every source tensor used except `num_batches_tracked`
    (kept in the returned meta), every shape checked.
    """
    order, layout = _model_layout(arch, options)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    flat: dict[str, np.ndarray] = {}
    missing, wrong, used = [], [], set()
    dtypes: dict[str, str] = {}
    for path in order:
        key = torch_key(path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        value = to_flax(np.asarray(state[key]))
        if tuple(value.shape) != layout[path]:
            want = tuple(to_torch(np.zeros(layout[path], np.int8)).shape)
            wrong.append(f"{key} {shapes[key]} vs expected {want}")
            continue
        if value.dtype != np.float32:
            if not np.issubdtype(value.dtype, np.floating):
                wrong.append(f"{key} has dtype {value.dtype}, expected floating point")
                continue
            dtypes[key] = str(value.dtype)
        flat[path] = value.astype(np.float32, copy=False)
    nbt = {k: int(np.asarray(v).reshape(())) for k, v in state.items()
           if k.endswith(".num_batches_tracked")}
    unexpected = [k for k in state if k not in used and k not in nbt]
    if missing or unexpected or wrong:
        raise _mismatch(name, arch, options, missing, unexpected, wrong, shapes)
    variables = {"params": {}, "batch_stats": {}}
    for path, value in flat.items():
        col, rest = path.split("/", 1)
        variables[col][rest] = value
    variables = {c: traverse_util.unflatten_dict(v, sep="/") for c, v in variables.items()}
    return variables, {"num_batches_tracked": nbt, "source_dtypes": dtypes}


def _flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    flat = {}
    for col in ("params", "batch_stats"):
        for p, v in traverse_util.flatten_dict(dict(variables.get(col, {})), sep="/").items():
            flat[f"{col}/{p}"] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    return flat


def _source_meta(source: Any) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    return {"file": path.name, "sha256": sha256(path)}


def _json_default(value: Any) -> Any:
    """numpy/JAX scalars and arrays (e.g. metrics in a proxy's `source`) as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save(path: str | os.PathLike, arch: str, variables: Mapping[str, Any], *,
         options: Mapping[str, Any], source: Any = None,
         torch_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write variables in the project format; returns the metadata written.

    options: kwargs of `models.create` (num_classes, width, small_input, and widths for a slimmed
    network). source: a file path (its
    name and sha256 are recorded), a dict (recorded as is, e.g. {'proxy': 'fashion_mnist'}), or
    None.
    torch_meta: {'num_batches_tracked', 'source_dtypes'} from conversion (restored by export).
    """
    if arch not in models.ARCHS:
        raise WeightsError(f"unknown arch {arch!r}; known: {', '.join(models.ARCHS)}")
    opts = {"num_classes": int(options.get("num_classes", 1000)),
            "width": float(options.get("width", 1.0)),
            "small_input": bool(options.get("small_input", False))}
    if options.get("widths"):  # a slimmed network (vpns_jax.structured.slim)
        opts["widths"] = {str(k): int(v) for k, v in dict(options["widths"]).items()}
    meta = {"format_version": FORMAT_VERSION, "arch": arch, "options": opts,
            "source": _source_meta(source), **dict(torch_meta or {})}
    from safetensors.numpy import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    text = json.dumps(meta, default=_json_default)
    save_file(_flatten_variables(variables), str(tmp), metadata={META_KEY: text})
    os.replace(tmp, out)
    return meta


def load(path: str | os.PathLike, *, arch_hint: str | None = None
         ) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Read a project weights file → (arch, {'params', 'batch_stats'} of float32 numpy, meta).

    Validated against `models.create(arch, **meta['options'])`: same variables, same shapes.
    arch_hint: the expected arch, only used to spell out the `convert` command when `path` is a
    PyTorch checkpoint or any other non-safetensors file.
    """
    path = Path(path)
    _check_exists(path, "Project weights file")
    other = _not_safetensors(path)
    if other is not None:
        out = path.with_suffix(".safetensors") if path.suffix != ".safetensors" else \
            path.with_name(path.stem + "_vpns.safetensors")
        raise WeightsError(
            f"{path} is {other}, not a project weights file (.safetensors); convert it once with "
            f"`python -m vpns_jax.weights convert --arch {arch_hint or 'ARCH'} --src {path} "
            f"--out {out}` and pass --config.weights={out}.")
    tensors, header = _read_safetensors(path)
    if META_KEY not in header:
        raise WeightsError(f"{path}: not a vpns_jax weights file (no '{META_KEY}' metadata). "
                           "If it is a torchvision/timm checkpoint, convert it first: "
                           f"python -m vpns_jax.weights convert --arch ARCH --src {path} "
                           "--out OUT.safetensors")
    try:
        meta = json.loads(header[META_KEY])
        arch, options = meta["arch"], dict(meta["options"])
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: unreadable vpns_jax metadata ({e}).") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: format version {meta.get('format_version')} is not "
                           f"{FORMAT_VERSION}; re-convert the source weights.")
    if arch not in models.ARCHS:
        raise WeightsError(f"{path}: unknown arch {arch!r}; known: {', '.join(models.ARCHS)}")
    layout = expected_shapes(arch, options)
    missing = [k for k in layout if k not in tensors]
    unexpected = [k for k in tensors if k not in layout]
    wrong = [f"{k} {tensors[k].shape} vs {layout[k]}" for k in layout
             if k in tensors and tuple(tensors[k].shape) != layout[k]]
    if missing or unexpected or wrong:
        raise WeightsError(f"{path}: tensors do not match {arch} {options}: missing {missing[:5]} "
                           f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                           f"shape mismatches {wrong[:5]} ({len(wrong)}).")
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, value in tensors.items():
        col, rest = key.split("/", 1)
        variables[col][rest] = value.astype(np.float32, copy=False)
    variables = {c: traverse_util.unflatten_dict(v, sep="/") for c, v in variables.items()}
    return arch, variables, meta


def to_torch_state_dict(arch: str, variables: Mapping[str, Any],
                        meta: Mapping[str, Any]) -> OrderedDict[str, np.ndarray]:
    """Variables → torchvision state dict (numpy, OIHW/OI layouts) in torchvision's key order.

    num_batches_tracked: the converted source's values (only the keys it had), else 0 for every BN.
    Tensors that were float16/float64 in the source are cast back to that dtype.
    """
    order, _ = _model_layout(arch, meta["options"])
    flat = _flatten_variables(variables)
    by_key = {torch_key(p): to_torch(flat[p]) for p in order}
    nbt = meta.get("num_batches_tracked")
    dtypes = meta.get("source_dtypes", {})
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key in torch_order(order):
        if key.endswith(".num_batches_tracked"):
            if nbt is None or key in nbt:
                out[key] = np.array(0 if nbt is None else nbt[key], dtype=np.int64)
        else:
            value = by_key[key]
            out[key] = value.astype(dtypes[key]) if key in dtypes else value
    return out


def convert(arch: str, src: str | os.PathLike, out: str | os.PathLike, *,
            num_classes: int | None = None, width: float = 1.0, small_input: bool = False,
            check_forward: bool = True) -> dict[str, Any]:
    """Convert a torchvision/timm checkpoint to the project format; returns the metadata written.

    num_classes None → taken from the file's head. check_forward runs one eval forward and
    requires finite logits.
    """
    src = Path(src)
    if arch not in models.ARCHS:
        raise WeightsError(f"unknown arch {arch!r}; known: {', '.join(models.ARCHS)}")
    state, notes = read_state_dict(src)
    if num_classes is None:
        num_classes = num_classes_of({k: tuple(v.shape) for k, v in state.items()}) or 1000
    options = {"num_classes": int(num_classes), "width": float(width),
               "small_input": bool(small_input)}
    variables, torch_meta = convert_state_dict(state, arch, options, name=src)
    if check_forward:
        _check_forward(arch, options, variables, src)
    return save(out, arch, variables, options=options, source=src,
                torch_meta={**torch_meta, "notes": notes})


def _check_forward(arch: str, options: Mapping[str, Any], variables: Mapping[str, Any],
                   src: Path) -> None:
    model = models.create(arch, **options)
    size = 32 if options["small_input"] or arch.startswith("vgg") else 64
    x = np.random.default_rng(0).uniform(-2, 2, (1, size, size, 3)).astype(np.float32)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    if not bool(np.isfinite(np.asarray(logits)).all()):
        raise WeightsError(f"{src}: converted weights give non-finite logits; the file is corrupt.")


def export(src: str | os.PathLike, out: str | os.PathLike) -> OrderedDict[str, np.ndarray]:
    """Project weights file → torchvision state dict at `out` (.safetensors, or .pth with torch)."""
    arch, variables, meta = load(src)
    state = to_torch_state_dict(arch, variables, meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(dict(state), str(out), metadata={"format": "pt"})
    elif out.suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError:
            raise WeightsError(f"writing {out} needs torch (`pip install torch`); or export to "
                               f"{out.with_suffix('.safetensors')} instead.") from None
        torch.save(OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items()), out)
    else:
        raise WeightsError(f"{out}: export writes .safetensors or .pth, not {out.suffix!r}.")
    return state
