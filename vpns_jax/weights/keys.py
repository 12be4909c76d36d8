"""The one mapping between Flax variable paths and torchvision state-dict keys, and layout guessing.

Flax path ('/'-joined, collection first) ↔ torch key:
  params/layer1_0/conv1/kernel  ↔ layer1.0.conv1.weight    (conv: HWIO ↔ OIHW; dense: IO ↔ OI)
  params/layer1_0/bn1/scale         ↔ layer1.0.bn1.weight
  params/.../bias                   ↔ ....bias
  batch_stats/.../mean | var        ↔ ....running_mean | running_var
A module name `<name>_<index>` (layer1_0, downsample_0, features_0, classifier_6) ↔
`<name>.<index>`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_INDEXED = re.compile(r"^(.+)_(\d+)$")


def torch_key(flax_path: str) -> str:
    """'params/layer1_0/downsample_0/kernel' → 'layer1.0.downsample.0.weight'."""
    collection, *modules, leaf = flax_path.split("/")
    if (collection, leaf) not in _LEAF_TO_TORCH or not modules:
        raise KeyError(f"no torchvision key for Flax path {flax_path!r}")
    parts = []
    for name in modules:
        m = _INDEXED.match(name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    return ".".join([*parts, _LEAF_TO_TORCH[(collection, leaf)]])


def flax_path(key: str, ndim: int) -> str:
    """Inverse of `torch_key`: 'layer1.0.bn1.weight' (ndim 1) → 'params/layer1_0/bn1/scale'.

    `ndim` (of the torch tensor) tells a conv/dense `weight` (kernel, ndim ≥ 2) from a BN one
    (scale).
    """
    *parts, leaf = key.split(".")
    if leaf == "weight":
        collection, leaf = ("params", "kernel") if ndim >= 2 else ("params", "scale")
    elif leaf == "bias":
        collection = "params"
    elif leaf in ("running_mean", "running_var"):
        collection, leaf = "batch_stats", ("mean" if leaf == "running_mean" else "var")
    else:
        raise KeyError(f"no Flax path for torch key {key!r}")
    modules: list[str] = []
    for part in parts:
        if part.isdigit() and modules:
            modules[-1] = f"{modules[-1]}_{part}"
        else:
            modules.append(part)
    if not modules:
        raise KeyError(f"no Flax path for torch key {key!r}")
    return "/".join([collection, *modules, leaf])


def to_flax(value: np.ndarray) -> np.ndarray:
    """torch layout → Flax layout: conv OIHW → HWIO, dense OI → IO, others unchanged."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def to_torch(value: np.ndarray) -> np.ndarray:
    """Flax layout → torch layout (inverse of `to_flax`)."""
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def torch_order(flax_paths: list[str]) -> list[str]:
    """torchvision state-dict order for Flax paths given in module-creation order.

    Modules in order of first appearance; per module: weight, bias, running_mean, running_var,
    num_batches_tracked (the last only for BN modules, i.e. those with batch stats).
    """
    modules: dict[str, set[str]] = {}
    for path in flax_paths:
        key = torch_key(path)
        prefix, leaf = key.rsplit(".", 1)
        modules.setdefault(prefix, set()).add(leaf)
    order = ("weight", "bias", "running_mean", "running_var")
    out = []
    for prefix, leaves in modules.items():
        out += [f"{prefix}.{leaf}" for leaf in order if leaf in leaves]
        if "running_mean" in leaves:
            out.append(f"{prefix}.num_batches_tracked")
    return out


# timm VGG names (its ConvMlp head) → torchvision names, with the weight reshapes timm applies.
_TIMM_VGG = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.",
             "head.fc.": "classifier.6."}


def normalize_keys(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Bring a state dict to torchvision names; return it and the notes on what was changed.

    Handles a 'module.' prefix (DataParallel) and timm's VGG head (`pre_logits.fc1/fc2` as 7×7/1×1
    convs, `head.fc`), reshaped to torchvision's Linear weights. timm ResNet keys already equal
    torchvision's.
    """
    notes: list[str] = []
    out: dict[str, np.ndarray] = {}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("stripped 'module.' prefix")
    for key, value in state.items():
        for timm_prefix, tv_prefix in _TIMM_VGG.items():
            if key.startswith(timm_prefix):
                key = tv_prefix + key[len(timm_prefix):]
                if value.ndim == 4:
                    value = value.reshape(value.shape[0], -1)
                if "timm VGG head renamed to classifier.0/3/6" not in notes:
                    notes.append("timm VGG head renamed to classifier.0/3/6")
        out[key] = value
    return out, notes


def describe_layout(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What a torchvision-named state dict looks like, e.g. 'resnet50 (num_classes=1000)'."""
    head = None
    if "layer1.0.conv1.weight" in shapes:
        counts = [len({k.split(".")[1] for k in shapes if k.startswith(f"layer{i}.")})
                  for i in (1, 2, 3, 4)]
        bottleneck = "layer1.0.conv3.weight" in shapes
        names = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
                 (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
                 (True, (3, 8, 36, 3)): "resnet152"}
        arch = names.get((bottleneck, tuple(counts)),
                         f"a ResNet with {'Bottleneck' if bottleneck else 'BasicBlock'} stages "
                         f"{'-'.join(map(str, counts))}")
        extras = []
        stem = shapes.get("conv1.weight")
        if stem is not None:
            if stem[-1] == 3:
                extras.append("small_input=True")
            if stem[0] != 64:
                extras.append(f"width≈{stem[0] / 64:g}")
        head = shapes.get("fc.weight")
    elif any(k.startswith("features.") for k in shapes):
        convs = [k for k, s in shapes.items() if k.startswith("features.") and len(s) == 4]
        bn = any(k.endswith("running_mean") for k in shapes if k.startswith("features."))
        depth = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}.get(len(convs))
        arch = (depth + ("_bn" if bn else "")) if depth else f"a VGG with {len(convs)} convs"
        extras = []
        first = shapes.get("features.0.weight")
        if first is not None and first[0] != 64:
            extras.append(f"width≈{first[0] / 64:g}")
        head = shapes.get("classifier.6.weight")
    else:
        return None
    if head is not None:
        extras.append(f"num_classes={head[0]}")
    return f"{arch} ({', '.join(extras)})" if extras else arch


def num_classes_of(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Output classes of a torchvision-named ResNet/VGG head, if present."""
    for key in ("fc.weight", "classifier.6.weight"):
        if key in shapes and len(shapes[key]) == 2:
            return int(shapes[key][0])
    return None
