"""Transfer (paper Fig. 6, reference §9.3): a mask found by a finished run, tuned on this config's task.

`config.mask_from` names ONE finished run, as `WORKDIR/RUN` or `WORKDIR/final/RUN` (RUN as in
`WORKDIR/final/<RUN>`, e.g. `workdirs/src/vpns_s0.9`). Every configured method then plans one run:
the source's binary mask set on this config's pretrained weights (the stage-start action
`plan.MaskFromRun`), then the method's own tuning stage with that mask fixed (its `transfer` hook:
VPNs' weight + prompt tuning with its passes from the zero prompt, HYDRA's and the prune-then-fine-tune
methods' SGD tuning), the label mapping computed on this dataset as the method does it. The run's
sparsity is the source mask's (its row's target sparsity; config.sparsities is not used, and a log
line says so); its results row carries `mask_from` = '<source dataset>/<RUN>'.

Refused before anything trains, one line each: a missing source workdir, a run that is not finished
(no or an unreadable `final/<RUN>`), a source without a mask (dense), a structured (channel) run,
a source of another architecture, width or stem (`check_config`), and a mask whose layers or shapes
do not match this model's prunable kernels (`check_shapes`, naming the layer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections as mlc
import numpy as np
from absl import logging

from vpns_jax import checkpoint
from vpns_jax.errors import CheckpointError, ConfigError
from vpns_jax.methods.plan import MaskFromRun, MaskSource

_FORMS = "WORKDIR/RUN or WORKDIR/final/RUN (RUN as in WORKDIR/final/<RUN>, e.g. vpns_s0.9)"


@dataclasses.dataclass(frozen=True)
class Source:
    """A finished run's mask and what it was found with."""

    spec: str  # config.mask_from as given
    path: str  # absolute WORKDIR/final/RUN
    run: str
    dataset: str
    arch: str
    options: dict[str, Any]  # the source model's width, small_input, num_classes
    sparsity: float  # the source row's target sparsity
    masks: dict[str, np.ndarray]  # path -> bool mask
    digest: str

    @property
    def label(self) -> str:
        """'<source dataset>/<RUN>': the rows' `mask_from`."""
        return f"{self.dataset}/{self.run}"

    def mask_source(self) -> MaskSource:
        """The mask as a method's `MaskSource`: no stages, one action setting it."""
        return MaskSource((), (MaskFromRun(self.label, self.digest, self.path),))


def mask_digest(masks: Mapping[str, Any]) -> str:
    """sha256 of a mask (paths, shapes and bits, in sorted path order), 20 hex digits."""
    h = hashlib.sha256()
    for path in sorted(masks):
        m = np.asarray(masks[path], bool)
        h.update(f"{path}|{m.shape}|".encode())
        h.update(np.packbits(m, axis=None).tobytes())
    return h.hexdigest()[:20]


def split(spec: str) -> tuple[str, str]:
    """`config.mask_from` -> (absolute source workdir, run name)."""
    path = os.path.abspath(os.path.expanduser(str(spec).strip())).rstrip(os.sep)
    parent, run = os.path.split(path)
    if os.path.basename(parent) == "final":
        parent = os.path.dirname(parent)
    return parent, run


def _finished_runs(workdir: str) -> list[str]:
    final = os.path.join(workdir, "final")
    return sorted(os.listdir(final)) if os.path.isdir(final) else []


def _fail(spec: str, problem: str) -> None:
    raise ConfigError(f"config.mask_from = {spec!r}: {problem}")


_CACHE: dict[tuple[str, int], Source] = {}


def load(spec: str) -> Source:
    """The finished run `spec` names (cached per path and modification time); ConfigError, one
    line, when the workdir is missing, the run unfinished or unreadable, or it has no mask."""
    workdir, run = split(spec)
    path = os.path.join(workdir, "final", run)
    if os.path.isdir(os.path.join(workdir, run, "final")):  # a bare WORKDIR
        names = _finished_runs(os.path.join(workdir, run))
        _fail(spec, f"is a workdir; name one of its finished runs, as {_FORMS}: "
              f"{', '.join(names) or 'it has none yet'}.")
    if not os.path.isdir(workdir):
        _fail(spec, f"the source workdir {workdir} does not exist; give a finished run as {_FORMS}.")
    if not os.path.isdir(path):
        names = _finished_runs(workdir)
        _fail(spec, f"{workdir} has no finished run {run!r} ({path} is missing: the run is not "
              f"finished); its finished runs: {', '.join(names) or 'none (finish it first)'}.")
    key = (path, os.stat(path).st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        tree, meta = checkpoint.load_final(path)
    except CheckpointError as e:
        _fail(spec, f"the source run is not finished or its final state is unreadable "
              f"({str(e).split('; ')[0]}); rerun the source job to rebuild it "
              "(--config.mode=finalize) or name another run.")
    masks = {p: np.asarray(m, bool) for p, m in dict(tree.get("masks", {})).items()}
    if not masks:
        _fail(spec, f"{run} has no mask (a dense run); name a pruned run of {workdir}.")
    if any(m.ndim < 2 for m in masks.values()):  # BatchNorm / bias entries: whole channels
        _fail(spec, f"{run} is a structured run (its mask removes whole channels, BatchNorm "
              "included) and config.mask_from transfers an unstructured run's mask; name an "
              f"unstructured pruned run of {workdir}.")
    source = Source(spec=str(spec), path=path, run=run, dataset=str(meta.get("dataset", "")),
                    arch=str(meta.get("arch", "")), options=dict(meta.get("options", {})),
                    sparsity=float(meta["sparsity"]), masks=masks, digest=mask_digest(masks))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.size for m in masks.values())
    logging.info("config.mask_from: %s, a %s mask at sparsity %g (%d of %d weights kept); the runs "
                 "use its sparsity (config.sparsities is not used)", source.label, source.arch,
                 source.sparsity, kept, total)
    _CACHE[key] = source
    return source


def check_config(source: Source, config: mlc.ConfigDict) -> None:
    """The source must come from the model this config prunes: same arch, width and stem."""
    if source.arch != config.arch:
        _fail(source.spec, f"the source mask is of a {source.arch} and config.arch = "
              f"{config.arch!r}; a mask fits only the architecture it was found on: use "
              f"--config.arch={source.arch} (and its weights) or a {config.arch} source run.")
    for field in ("width", "small_input"):
        theirs = source.options.get(field)
        if theirs != config.model[field]:
            _fail(source.spec, f"the source model has {field}={theirs!r} and config.model.{field} "
                  f"= {config.model[field]!r}; use --config.model.{field}={theirs!r} or a source "
                  f"run with {field}={config.model[field]!r}.")


def source(config: mlc.ConfigDict) -> Source | None:
    """The checked source of `config.mask_from`, or None when it is '' (no transfer)."""
    spec = str(config.get("mask_from", "") or "").strip()
    if not spec:
        return None
    found = load(spec)
    check_config(found, config)
    return found


def check_shapes(source: Source, kernels: Mapping[str, tuple[int, ...]]) -> None:
    """The mask's layers and shapes must be this model's prunable kernels (`kernels`: path ->
    shape); ConfigError naming the first layer that differs."""
    for path in sorted(set(kernels) | set(source.masks)):
        if path not in source.masks:
            _fail(source.spec, f"the source mask has no layer {path} (shape {tuple(kernels[path])}) "
                  "of this model; it was found on another model.")
        if path not in kernels:
            _fail(source.spec, f"the source mask's layer {path} is not a prunable kernel of this "
                  "model; it was found on another model.")
        if tuple(source.masks[path].shape) != tuple(kernels[path]):
            _fail(source.spec, f"layer {path} has shape {tuple(source.masks[path].shape)} in the "
                  f"source mask and {tuple(kernels[path])} in this model (another number of "
                  "classes or input channels); a mask fits only the model it was found on.")


def load_masks(action: MaskFromRun) -> dict[str, np.ndarray]:
    """The mask `action` names, read from its run's final state; CheckpointError when it is no
    longer the mask the run was planned with."""
    for known in _CACHE.values():
        if known.path == action.path and known.digest == action.digest:
            return known.masks
    tree, _ = checkpoint.load_final(action.path)
    masks = {p: np.asarray(m, bool) for p, m in dict(tree.get("masks", {})).items()}
    if mask_digest(masks) != action.digest:
        raise CheckpointError(f"{action.path}: its mask changed since this run was planned "
                              f"(digest {mask_digest(masks)} != {action.digest}); rerun the command.")
    return masks
