"""Physically slimmed networks: from channel masks, a model with the surviving widths and weights.

    slim_model, slim_variables, widths = slim(model, variables, groups, channel_masks)

`slim_model` is the same architecture built with `widths` (`vpns_jax.models.create(...,
widths=...)`: output channels per conv module path); its eval-mode logits equal those of the masked
network (parameters times `channels.expand(groups, channel_masks, params)`) to float precision:
a pruned channel is zero after its BatchNorm (scale and bias masked), so removing it, its BN entries
and the consumers' input rows changes nothing but the summation order.

`export_slim` writes it for PyTorch (torchvision state-dict names, like `vpns_jax.export`) with the
widths, and in the project's weights format; `vpns_jax.structured.torch_slim.load_slim` rebuilds it in
PyTorch. For an export command: call `ensure_structured(run, channel_masks)` first; an unstructured
run (no channel masks) is a one-line `VpnsError` saying that only structured runs can be slimmed.

`count_params(variables)` and `count_flops(model, input_size)` measure the slimmed model from its
shapes.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpns_jax.errors import VpnsError
from vpns_jax.structured.groups import ChannelGroup

WIDTHS_FILE = "widths.json"
TORCH_FILE = "slim.safetensors"
VPNS_FILE = "slim_vpns.safetensors"


def ensure_structured(run: str | None, channel_masks: Mapping[str, Any] | None) -> None:
    """VpnsError unless `channel_masks` holds a structured run's channel masks (run: its name)."""
    if not channel_masks:
        what = f"run {run!r} has" if run else "no run given:"
        raise VpnsError(f"{what} no channel masks (an unstructured run); only structured "
                        "runs can be slimmed: export it without slimming, or run a structured "
                        "method (channel VPNs, Slim, DepGraph)")


def _keep_indices(groups: Sequence[ChannelGroup],
                  channel_masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    ensure_structured(None, channel_masks)
    missing = [g.name for g in groups if g.name not in channel_masks]
    if missing:
        raise VpnsError(f"channel masks are missing for groups {missing[:5]}; only structured "
                        "runs can be slimmed, with masks from the same model's channel groups")
    keep = {}
    for g in groups:
        m = np.asarray(channel_masks[g.name]).reshape(-1) != 0
        if m.shape != (g.size,):
            raise VpnsError(f"channel mask of group {g.name} has {m.size} entries, expected "
                            f"{g.size}")
        if not m.any():
            raise VpnsError(f"channel mask of group {g.name} prunes every channel; a slimmed "
                            "network keeps at least one per group")
        keep[g.name] = np.flatnonzero(m)
    return keep


def widths_of(groups: Sequence[ChannelGroup], channel_masks: Mapping[str, Any]) -> dict[str, int]:
    """{conv module path: surviving output channels} for `models.create(..., widths=...)`."""
    keep = _keep_indices(groups, channel_masks)
    return {p.rsplit("/", 1)[0]: int(keep[g.name].size) for g in groups for p in g.producers}


def slim(model: nn.Module, variables: Mapping[str, Any], groups: Sequence[ChannelGroup],
         channel_masks: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any], dict[str, int]]:
    """(slim_model, slim_variables, widths): the network without its pruned channels.

    variables: {'params', 'batch_stats'} of `model`; groups: `channel_groups(model, ...)`;
    channel_masks: {group name: bool/float[size]} (nonzero = kept). slim_variables are float32
    numpy trees with the surviving entries of every kernel (output and input axes), conv bias and
    BatchNorm scale/bias/mean/var; widths: {conv module path: channels}.
    """
    keep = _keep_indices(groups, channel_masks)
    widths = widths_of(groups, channel_masks)
    out_axis: dict[str, np.ndarray] = {}
    in_axis: dict[str, tuple[np.ndarray, int]] = {}
    vectors: dict[str, np.ndarray] = {}  # flat 'params/…' / 'batch_stats/…' paths of [C] leaves
    flat_params = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    for g in groups:
        idx = keep[g.name]
        for p in g.producers:
            out_axis[p] = idx
        for p in g.biases:
            vectors[f"params/{p}"] = idx
        for module in g.norms:
            for leaf in ("params/{}/scale", "params/{}/bias", "batch_stats/{}/mean",
                         "batch_stats/{}/var"):
                vectors[leaf.format(module)] = idx
        for p in g.consumers:
            rows = np.shape(flat_params[p])[-2 if np.ndim(flat_params[p]) == 4 else 0]
            in_axis[p] = (idx, rows // g.size)
    new: dict[str, dict[str, np.ndarray]] = {}
    for col in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(variables.get(col) or {}), sep="/")
        out = {}
        for path, value in flat.items():
            v = np.asarray(value, np.float32)
            key = f"{col}/{path}"
            if key in vectors:
                v = v[vectors[key]]
            if col == "params" and path in out_axis:
                v = v[..., out_axis[path]]
            if col == "params" and path in in_axis:
                idx, inner = in_axis[path]
                if v.ndim == 4:
                    v = v[:, :, idx, :]
                else:  # dense after a channel-major flatten: rows inner·c … inner·c + inner − 1
                    v = v[(idx[:, None] * inner + np.arange(inner)).reshape(-1)]
            out[path] = np.ascontiguousarray(v)
        new[col] = traverse_util.unflatten_dict(out, sep="/") if out else {}
    # groups from another model give variables that do not fit: flax's apply names the parameter
    return model.clone(widths=tuple(sorted(widths.items()))), new, widths


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of parameters (the 'params' collection; BatchNorm statistics are not parameters)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(variables["params"])))


def count_flops(model: nn.Module, input_size: int) -> int:
    """Multiply-adds of one image's forward through every conv and dense layer, from shapes:
    conv: H_out·W_out·C_out·(kh·kw·C_in), dense: in·out (the torchvision/fvcore 'FLOPs'
    convention; XLA's cost analysis counts 2 per multiply-add and skips padded taps). Nothing is
    computed (`jax.eval_shape`)."""
    total = [0]

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv | nn.Dense):
            kernel = module.variables["params"]["kernel"]
            per_output = math.prod(kernel.shape[:-1])  # kh·kw·C_in or in
            total[0] += math.prod(out.shape[1:]) * per_output
        return out

    from vpns_jax import models

    variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0),
                                                             int(input_size)))

    def forward(v):
        with nn.intercept_methods(count):
            return model.apply(v, jnp.zeros((1, int(input_size), int(input_size), 3)), train=False)

    jax.eval_shape(forward, variables)
    return int(total[0])


def _torch_widths(widths: Mapping[str, int]) -> dict[str, int]:
    from vpns_jax.weights.keys import torch_key

    return {torch_key(f"params/{p}/kernel")[: -len(".weight")]: int(w) for p, w in widths.items()}


def export_slim(out_dir: str, slim_variables: Mapping[str, Any], widths: Mapping[str, int],
                arch: str, *, num_classes: int, width: float = 1.0, small_input: bool = False,
                input_size: int | None = None, source: Mapping[str, Any] | None = None
                ) -> list[str]:
    """Write a slimmed model to `out_dir`; returns the paths written:

    - `slim.safetensors`: torchvision-named state dict (OIHW, running stats), loadable with
      `vpns_jax.structured.torch_slim.load_slim(out_dir)` (PyTorch, no JAX needed);
    - `widths.json`: {'arch', 'num_classes', 'width', 'small_input', 'input_size', 'widths':
      {torch conv module name: channels}, 'flax_widths': {flax module path: channels}, 'source'};
    - `slim_vpns.safetensors`: the project's weights format (`vpns_jax.weights.load` rebuilds
      `models.create(arch, **options)` with the widths).
    """
    from vpns_jax import export as export_lib
    from vpns_jax import weights as weights_lib

    os.makedirs(out_dir, exist_ok=True)
    torch_path = os.path.join(out_dir, TORCH_FILE)
    export_lib.check_writable(torch_path)
    options = {"num_classes": int(num_classes), "width": float(width),
               "small_input": bool(small_input), "widths": {k: int(v) for k, v in widths.items()}}
    variables = {"params": slim_variables["params"],
                 "batch_stats": slim_variables.get("batch_stats") or {}}
    state = weights_lib.to_torch_state_dict(arch, variables, {"options": options})
    with export_lib._writing(torch_path):
        export_lib._write_state_dict(state, torch_path)
    info = {"arch": arch, "num_classes": int(num_classes), "width": float(width),
            "small_input": bool(small_input), "input_size": input_size,
            "widths": _torch_widths(widths), "flax_widths": dict(options["widths"]),
            "source": dict(source or {})}
    widths_path = os.path.join(out_dir, WIDTHS_FILE)
    with export_lib._writing(widths_path), open(widths_path, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True,
                  default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    vpns_path = os.path.join(out_dir, VPNS_FILE)
    with export_lib._writing(vpns_path):
        weights_lib.save(vpns_path, arch, variables, options=options, source=dict(source or {}))
    return [torch_path, widths_path, vpns_path]
