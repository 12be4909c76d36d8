"""Metrics of a run while it trains: rows in `WORKDIR/metrics.jsonl` and TensorBoard event files in
`WORKDIR/tb/<run>/` (written with tensorboardX: no TensorFlow). Only process 0 writes.

Every row has a `kind`: 'step' (every `config.log_every_steps` iterations: the loss / accuracy of
that iteration's passes, the learning rate of each trained group, images/s), 'epoch' (the epoch's
mean training metrics) or 'test' (test accuracy, `config.eval_every_epochs`, and at the end of the
run). Rows written before kinds existed have none: they are epoch rows (`kind_of`). `step` is the
global iteration over the run's chain of stages (stage i's iterations follow stage i - 1's), the
x axis of every TensorBoard scalar: tags 'train/<metric>', 'lr/<group>', 'speed/images_per_second',
'epoch/<metric>' and 'test/accuracy'.

Resume: a run resumed from a checkpoint at global step k repeats the iterations after k, so its
rows with a larger step are dropped from metrics.jsonl (rewritten atomically) and TensorBoard is
told to discard its events after k (tensorboardX's `purge_step`, a SessionLog START event that
TensorBoard's readers honour): each step is shown once, with the values of the run that went on.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from vpns_jax import report
from vpns_jax import workdir as workdir_lib

TB_DIR = "tb"
KINDS = ("step", "epoch", "test")
_PREFIX = {"step": "", "epoch": "epoch/", "test": "test/"}


def kind_of(row: Mapping[str, Any]) -> str:
    """A metrics.jsonl row's kind; rows from before kinds existed are per-epoch rows."""
    return row.get("kind", "epoch")


def rows_of(workdir: str, kind: str, run: str | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl rows of one kind ('step' | 'epoch' | 'test'), optionally of one run."""
    return [r for r in report.load_metrics(workdir)
            if kind_of(r) == kind and (run is None or r.get("run") == run)]


def event_dir(workdir: str, run: str) -> str:
    """The run's TensorBoard event directory, WORKDIR/tb/<run>/ (`tensorboard --logdir WORKDIR/tb`)."""
    return os.path.join(workdir, TB_DIR, run)


class RunLogger:
    """One run's metrics writer (metrics.jsonl rows and TensorBoard scalars); a no-op when not
    `primary`. Use as a context manager, or call `close`."""

    def __init__(self, workdir: str, run: str, *, primary: bool = True, flush_secs: int = 30):
        self.workdir, self.run, self.primary, self.flush_secs = workdir, run, primary, flush_secs
        self._writer: Any = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # A new file per writer, named so that files sort in the order they were written
            # (tensorboardX names them by the second: a second writer would overwrite the first).
            self._writer = SummaryWriter(event_dir(self.workdir, self.run), purge_step=purge_step,
                                         flush_secs=self.flush_secs,
                                         filename_suffix=f".{time.time_ns():019d}")
        return self._writer

    def resume(self, stage_key: str, step: int) -> None:
        """A stage (content key `stage_key`) continues after global step `step`: drop its rows
        with a later step (an earlier session's, about to be recomputed) and open the event file
        with TensorBoard's purge of later events."""
        if not self.primary:
            return
        rows = report.load_metrics(self.workdir)
        kept = [r for r in rows if not (r.get("stage_key") == stage_key and r.get("step", -1) > step)]
        if len(kept) != len(rows):
            workdir_lib.write_text(os.path.join(self.workdir, report.METRICS_FILE),
                                   "".join(json.dumps(r) + "\n" for r in kept))
        self._open(purge_step=step + 1)

    def log(self, kind: str, step: int, info: Mapping[str, Any], scalars: Mapping[str, float]) -> None:
        """Append one row {kind, run, **info, step, **scalars} and write each scalar to TensorBoard
        at `step` (tag '<kind prefix><name>': step rows' names carry their own prefix)."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        if not self.primary:
            return
        values = {k: float(v) for k, v in scalars.items()}
        report.append_metrics(self.workdir, {"kind": kind, "run": self.run, **info, "step": int(step),
                                             **values})
        writer = self._open()
        for name, value in values.items():
            if math.isfinite(value):
                writer.add_scalar(_PREFIX[kind] + name, value, int(step))

    def close(self) -> None:
        """Flush and close the event file (a later `log` opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def step_scalars(metrics: Mapping[str, float], lr: Mapping[str, float],
                 images_per_second: float | None) -> dict[str, float]:
    """A step row's scalars: 'train/<metric>' (e.g. train/pass0/loss), 'lr/<group>', and
    'speed/images_per_second' when measured."""
    out = {f"train/{k}": float(v) for k, v in metrics.items()}
    out.update({f"lr/{g}": float(v) for g, v in lr.items()})
    if images_per_second is not None:
        out["speed/images_per_second"] = float(images_per_second)
    return out


def best_on_test(rows: list[Mapping[str, Any]], stage_key: str) -> float | None:
    """The released code's number: the maximum test accuracy over the evaluations of the stage
    `stage_key` (the run's last stage) -- selected on the test set, so not a held-out estimate."""
    values = [float(r["accuracy"]) for r in rows
              if kind_of(r) == "test" and r.get("stage_key") == stage_key and "accuracy" in r]
    return max(values) if values else None
