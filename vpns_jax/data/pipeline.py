"""Input pipeline: TFDS array_record data source → grain dataset API → host numpy batches (no
TensorFlow).

Three views, as in the reference (§7), all float32 NHWC in [0, 1] with 3 channels (no
normalization):

- ``train_loader(view='train')``: training split, resize to floor(1.125·S)², random crop S², random
  flip;
- ``train_loader(view='prompt')``: training split, resize to S², no augmentation, shuffled with an
  independent seed stream (the reference's "vp loader");
- ``eval_loader``: test split, resize to S², in order (or any split, optionally with the train
  view's crop and flip, for a pass over every training example, e.g. label mapping).

Batching and sharding. ``batch_size`` is the GLOBAL batch size; with ``shard_count`` processes each
yields ``batch_size // shard_count`` examples per step (it must divide). Training: for epoch ``e``
the whole training split is permuted by a generator seeded with (seed, view stream, e); global batch
``k`` is positions [k·G, (k+1)·G) of that permutation and process ``p`` gets the ``p``-th slice of
it. The last ``N mod G`` positions are dropped (static shapes for jit), so an epoch has ``N // G``
steps and every training example appears exactly once in the epoch's permutation, and at most once
among the examples actually yielded by all processes together (exactly once unless it fell in that
epoch's dropped remainder, which changes from epoch to epoch). The global batches, augmentation
included (each example's crop/flip is drawn from (seed, view stream, epoch, position)), do not
depend on ``shard_count``, ``worker_count``, ``num_threads`` or ``prefetch``. Evaluation:
``ceil(N / G)`` steps over the split in order; the last global batch is padded with zero images
(label 0) and ``mask`` False, so every test example is counted exactly once on any number of
processes.

The grain pipeline of a loader (one per process; ``_Ordered`` is the only hand-made node):

    _Ordered(order)                       MapDataset: stream position i → record key (epoch
                                          i // (steps·G), position i mod (steps·G) of that
                                          epoch's permutation) + where its crop/flip draw comes from
    → .batch(B)                           B = G / shard_count consecutive positions
    → [shard_index::shard_count]          this process's slice of every global batch
    → .map(_ReadBatch)                    one bulk read of the B records from the TFDS source,
                                          then per example: resize (+ crop + flip, drawn from
                                          (seed, view, epoch, position)), float32; label int32
    → [start:]                            resume position (global step index)
    → .to_iter_dataset(ReadOptions(num_threads, prefetch))   threads read batches ahead
    → .mp_prefetch(MultiprocessingOptions(worker_count))     worker processes, when > 0

Positions are batched before the records are read because grain 0.2's ``MapDataset.batch``
fetches its elements one by one in one thread (its batched-read pushdown is an experiment, off),
and reading records one at a time plus grain's per-element overhead cost 3× the CPU (measured on
Fashion-MNIST at 32 px: 2,950 against 9,000 images per CPU-second with one bulk read per batch);
threads and workers parallelize across batches (``prefetch`` >= ``num_threads`` keeps every
thread busy).
Every node is a function of the stream index, so threads and workers only change who computes a
batch, never its content (grain's workers take whole batches, w::W, and interleave them back in
order). One grain iterator (a "stream") runs across epochs: ``epoch(e + 1)`` continues the stream
``epoch(e)`` ended, so worker processes start once, not once per epoch, and read the next epoch
ahead; an iterator asked for another position restarts the stream there.

Checkpointing. ``TrainLoader.epoch(e)`` returns a ``BatchIterator``; ``get_state()`` gives a
JSON-able dict (epoch, step, loader fingerprint: dataset, view, seed, input size, global batch
size, split size, steps per epoch; no shard index or count, so a state written by 2 processes
restores on 1 and vice versa) and ``TrainLoader.restore(state)`` continues with the same batches
(DataError naming the differing fields for a state of another setup).

Parallelism settings (``resolve_options``; config.data.worker_count / num_threads / prefetch): -1 /
0 / 0 mean auto from the CPU cores this process may use (its CPU affinity, shared among the
processes of a host when a launcher runs several on one host without binding them).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import os
import re
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

import grain.python as grain
import numpy as np
from absl import logging

from vpns_jax.data import device_augment, registry, transforms
from vpns_jax.data.preparation import not_prepared_error
from vpns_jax.errors import DataError

View = Literal["train", "prompt"]
VIEW_STREAMS = {"train": 0, "prompt": 1}
_EVAL_STREAM = 2
_ORDER, _AUGMENT = 0, 1


# --- data sources and metadata


def _split_name(info: registry.DatasetInfo, split: str) -> str:
    if split == "train":
        return info.train_split
    if split == "test":
        return info.test_split
    raise DataError(f"split must be 'train' or 'test' (the reference's roles), got {split!r}")


def open_split(name: str, split: Literal["train", "test"], *, data_dir=None):
    """Random-access TFDS data source of ``name``'s train or test split.

    Records are dicts with a decoded uint8 'image' ``[H, W, C]`` and an int 'label'. DataError if
    the dataset is not prepared (the message names the prepare command).
    """
    info = registry.get(name)
    builder = registry.builder(name, data_dir=data_dir)
    try:
        return builder.as_data_source(split=_split_name(info, split))
    except DataError:
        raise
    except (ValueError, NotImplementedError, AssertionError, FileNotFoundError, KeyError) as error:
        raise not_prepared_error(name, data_dir) from error


def num_examples(name: str, split: Literal["train", "test"], *, data_dir=None) -> int:
    """Number of examples of ``name``'s train or test split (as the reference uses them)."""
    return len(open_split(name, split, data_dir=data_dir))


def class_names(name: str, *, data_dir=None) -> list[str]:
    """Class names in label order (from the prepared dataset's info; '0'..'n-1' when unknown)."""
    info = registry.get(name)
    try:
        names = list(registry.builder(name, data_dir=data_dir).info.features["label"].names)
    except (KeyError, AttributeError):  # pragma: no cover - every registered dataset has 'label'
        names = []
    return names if len(names) == info.num_classes else [str(i) for i in range(info.num_classes)]


# --- batch plans (pure numpy)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def local_batch_size(batch_size: int, shard_count: int) -> int:
    """Per-process batch size = global batch_size / shard_count; DataError unless it divides."""
    if shard_count < 1:
        raise DataError(f"shard_count must be >= 1, got {shard_count}")
    if batch_size < 1 or batch_size % shard_count:
        raise DataError(
            f"batch_size (global) must be a positive multiple of shard_count={shard_count}, "
            f"got {batch_size}"
        )
    return batch_size // shard_count


def train_plan(
    n: int,
    *,
    batch_size: int,
    seed: int,
    stream: int,
    epoch: int,
    shard_index: int,
    shard_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(record keys, global positions), both int64 ``[n // batch_size, batch_size // shard_count]``:
    what process ``shard_index`` reads at each step of ``epoch`` (see module doc)."""
    local = local_batch_size(batch_size, shard_count)
    steps = n // batch_size
    order = _rng(seed, stream, epoch, _ORDER).permutation(n)[: steps * batch_size]
    positions = np.arange(steps * batch_size, dtype=np.int64).reshape(steps, batch_size)
    cols = slice(shard_index * local, (shard_index + 1) * local)
    return order.reshape(steps, batch_size)[:, cols].astype(np.int64), positions[:, cols]


def eval_plan(n: int, *, batch_size: int, shard_index: int, shard_count: int) -> np.ndarray:
    """Record keys int64 ``[ceil(n / G), G // shard_count]`` in order (G = batch_size), −1 = pad."""
    local = local_batch_size(batch_size, shard_count)
    steps = math.ceil(n / batch_size)
    keys = np.arange(steps * batch_size, dtype=np.int64)
    keys[keys >= n] = -1
    return keys.reshape(steps, batch_size)[:, shard_index * local : (shard_index + 1) * local]



# --- grain pipeline

_MAX_EPOCHS = 1_000_000  # a stream's length, in epochs (or evaluation passes)


@dataclasses.dataclass(frozen=True)
class _Transform:
    """Per-example transform: ``augment`` → train view (needs an rng), else resize only."""

    input_size: int
    augment: bool
    seed: int
    stream: int
    epoch: int

    def __call__(self, image: np.ndarray, position: int) -> np.ndarray:
        """uint8 image → float32 ``[S, S, 3]``; the crop/flip draw is a function of
        (seed, stream, epoch, position) only."""
        if self.augment:
            rng = _rng(self.seed, self.stream, self.epoch, _AUGMENT, position)
            return transforms.train_transform(image, self.input_size, rng)
        return transforms.eval_transform(image, self.input_size)


class _Slot(NamedTuple):
    """One stream position: the record key there (−1 = eval padding) and where its crop/flip draw
    comes from."""

    key: int
    epoch: int
    position: int


class _TrainOrder:
    """Record key of each position of each epoch: ``_rng(seed, stream, epoch)``'s permutation
    (the same as ``train_plan``). Picklable (grain ships it to worker processes); caches the
    permutations of the last epochs it saw."""

    def __init__(self, n: int, seed: int, stream: int):
        self.n, self.seed, self.stream = n, seed, stream
        self._cache: dict[int, np.ndarray] = {}

    def locate(self, epoch: int, position: int) -> tuple[int, int, int]:
        """(record key, epoch of the draw, position of the draw)."""
        order = self._cache.get(epoch)
        if order is None:
            order = _rng(self.seed, self.stream, epoch, _ORDER).permutation(self.n)
            if len(self._cache) >= 3:
                self._cache = {}
            self._cache[epoch] = order
        return int(order[position]), epoch, position

    def __getstate__(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "stream": self.stream, "_cache": {}}


class _EvalOrder:
    """Every pass is the split in order, then padding (key −1); draws use (epoch 0, key)."""

    def __init__(self, n: int):
        self.n = n

    def locate(self, epoch: int, position: int) -> tuple[int, int, int]:
        del epoch
        return (position if position < self.n else -1), 0, position


class _Ordered(grain.MapDataset):
    """Stream position ``i`` → ``_Slot`` of epoch ``i // per_epoch``, position ``i % per_epoch``."""

    def __init__(self, order: _TrainOrder | _EvalOrder, per_epoch: int):
        super().__init__()
        self._order, self._per_epoch = order, per_epoch

    def __len__(self) -> int:
        return self._per_epoch * _MAX_EPOCHS

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return _Slot(*self._order.locate(*divmod(int(index), self._per_epoch)))

    def __str__(self) -> str:
        return f"_Ordered(per_epoch={self._per_epoch}, order={type(self._order).__name__})"


def _read(records, keys: list[int]) -> list[Mapping[str, Any]]:
    """Records at ``keys`` in one bulk read when the source supports it (array_record does: 78 µs
    of CPU per Fashion-MNIST record in reads of 64, against 193 µs in one read per record)."""
    if keys and hasattr(records, "__getitems__"):
        try:
            return list(records.__getitems__(keys))
        except TypeError:  # tfds.testing.mock_data's source has a broken __getitems__
            pass
    return [records[k] for k in keys]


@dataclasses.dataclass(frozen=True)
class _ReadBatch(grain.MapTransform):
    """A local batch of ``_Slot``s → {'image': f32[B, S, S, 3], 'label': i32[B] (, 'mask':
    bool[B])}: one bulk read of its records (decoded by the TFDS source), then each example's
    transform; padding → zero image, label 0, mask False. With ``stored_shape`` (on-device
    augmentation): 'image' uint8 ``[B, *stored_shape]`` as stored, plus 'crop' i32[B, 3] for the
    train view (``device_augment.host_example``, the same draws as ``_Transform``)."""

    records: Any
    input_size: int
    augment: bool
    seed: int
    stream: int
    with_mask: bool
    stored_shape: tuple[int, int, int] | None = None

    def map(self, slots: tuple[_Slot, ...]) -> dict[str, np.ndarray]:
        size = self.input_size
        shape = (size, size, 3) if self.stored_shape is None else tuple(self.stored_shape)
        images = np.zeros((len(slots), *shape), np.float32 if self.stored_shape is None else np.uint8)
        labels = np.zeros((len(slots),), np.int32)
        batch = {"image": images, "label": labels}
        if self.stored_shape is not None and self.augment:
            batch["crop"] = np.zeros((len(slots), 3), np.int32)
        valid = [i for i, slot in enumerate(slots) if slot.key >= 0]
        for i, record in zip(valid, _read(self.records, [slots[i].key for i in valid]),
                             strict=True):
            slot, image = slots[i], np.asarray(record["image"])
            labels[i] = int(record["label"])
            if self.stored_shape is None:
                transform = _Transform(size, self.augment, self.seed, self.stream, slot.epoch)
                images[i] = transform(image, slot.position)
                continue
            rng = (_rng(self.seed, self.stream, slot.epoch, _AUGMENT, slot.position)
                   if self.augment else None)
            shipped = device_augment.host_example(image, shape=shape, input_size=size, rng=rng)
            images[i] = shipped["image"]
            if "crop" in shipped:
                batch["crop"][i] = shipped["crop"]
        if self.with_mask:
            batch["mask"] = np.array([slot.key >= 0 for slot in slots], bool)
        return batch


def _local_batches(records, order, *, per_epoch: int, read: _ReadBatch, local: int,
                   shard_index: int, shard_count: int) -> grain.MapDataset:
    """This process's local batches, element ``j`` = global step ``j`` of the stream."""
    ds = _Ordered(order, per_epoch).batch(local, drop_remainder=True, batch_fn=tuple)
    return ds[shard_index::shard_count].map(read)


def _mark_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()


class _Stream:
    """A running grain iterator over ``batches[start:]``; ``position`` = next global step index."""

    def __init__(self, batches: grain.MapDataset, start: int, options: Options):
        self.position = start
        ds = batches[start:].to_iter_dataset(
            grain.ReadOptions(num_threads=options.num_threads,
                              prefetch_buffer_size=options.prefetch))
        if options.worker_count > 0:
            _mark_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count))
        self._it = iter(ds)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self.position += 1
        return batch

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


_LIVE: weakref.WeakSet = weakref.WeakSet()  # loaders with a running stream


@atexit.register
def _close_all() -> None:
    """Stops every running stream before the interpreter tears down the modules grain's worker
    cleanup needs (otherwise: tracebacks and a wait for the workers at exit)."""
    for owner in list(_LIVE):
        owner.close()


class _StreamOwner:
    """Keeps one stream per loader, restarting it when an iterator asks for another position."""

    _stream: _Stream | None = None
    _options: Options

    def _make_batches(self) -> grain.MapDataset:
        raise NotImplementedError

    @functools.cached_property
    def _batches(self) -> grain.MapDataset:
        return self._make_batches()

    def _seek(self, index: int) -> _Stream:
        if self._stream is None or self._stream.position != index:
            self.close()
            self._stream = _Stream(self._batches, index, self._options)
            _LIVE.add(self)
        return self._stream

    def close(self) -> None:
        """Stops the running stream (its threads and worker processes), if any."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


# --- iterators and loaders


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator over the local batches of one epoch (or of one pass over the eval split), with a
    checkpointable position.

    ``step`` counts the batches already returned; ``len()`` is the number left.
    """

    def __init__(self, owner: _StreamOwner, *, epoch: int, start_step: int, steps: int,
                 base: int, fingerprint: dict):
        self.epoch, self.step, self.steps = epoch, start_step, steps
        self._owner, self._base, self._fingerprint = owner, base, fingerprint
        if start_step < steps:
            owner._seek(base + start_step)  # starts reading ahead now

    def __len__(self) -> int:
        return self.steps - self.step

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.steps:
            raise StopIteration
        batch = next(self._owner._seek(self._base + self.step))
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position {'epoch', 'step', 'loader'}, for ``TrainLoader.restore``."""
        return {"epoch": self.epoch, "step": self.step, "loader": dict(self._fingerprint)}


@dataclasses.dataclass(frozen=True)
class Options:
    """Resolved parallelism of a loader: grain worker processes (0 = none), read threads per
    process (per worker when there are workers) and batches read ahead by them."""

    worker_count: int = 0
    num_threads: int = 2
    prefetch: int = 2


_Options = Options  # the name used before issue 13


def process_cores() -> int:
    """CPU cores this process may use: its CPU affinity; when it is not bound to a subset and a
    launcher says several processes share the host (LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE),
    the host's cores divided among them."""
    total = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = total
    if cores >= total:
        for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
            match = re.match(r"\d+", os.environ.get(var, ""))
            if match and int(match.group()) > 1:
                return max(1, cores // int(match.group()))
    return max(1, cores)


_WARNED: set[tuple[int, int]] = set()


def resolve_options(worker_count: int = -1, num_threads: int = 0, prefetch: int = 0, *,
                    cores: int | None = None) -> Options:
    """Options from config.data's fields (-1 / 0 / 0 = auto from ``cores``, default
    ``process_cores()``).

    Auto: no worker processes on <= 4 cores, else cores // 2 (a VPNs iteration reads two views at
    once, each from its own loader), at most 32; read threads min(16, cores) without workers, 1
    per worker with them; prefetch max(2, threads) batches (each thread reads one batch). A worker
    count above the cores logs a one-line warning. DataError for values below -1 / 0 / 0.
    """
    for name, value, low in (("worker_count", worker_count, -1), ("num_threads", num_threads, 0),
                             ("prefetch", prefetch, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise DataError(f"{name} must be an integer >= {low} ({low} = auto), got {value!r}")
    cores = process_cores() if cores is None else max(1, int(cores))
    if worker_count < 0:
        worker_count = 0 if cores <= 4 else min(32, cores // 2)
    elif worker_count > cores and (worker_count, cores) not in _WARNED:
        _WARNED.add((worker_count, cores))
        logging.warning("data worker_count=%d is above the %d CPU cores this process may use: the "
                        "workers compete for them (set config.data.worker_count=-1 for auto)",
                        worker_count, cores)
    num_threads = num_threads or (min(16, cores) if worker_count == 0 else 1)
    prefetch = prefetch or max(2, num_threads)
    return Options(int(worker_count), int(num_threads), int(prefetch))


def _check_geometry(input_size: int, batch_size: int, shard_index: int,
                    shard_count: int) -> tuple[int, int, int]:
    """(input size, global batch, per-process batch) after checking them and the shard index."""
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    batch_size = int(batch_size)
    return (transforms.check_input_size(input_size), batch_size,
            local_batch_size(batch_size, shard_count))


class TrainLoader(_StreamOwner):
    """Training-split batches for the 'train' (augmented) or 'prompt' (resize only) view.

    ``epoch(e)`` iterates epoch ``e``: ``steps_per_epoch`` batches ``{'image': f32[B, S, S, 3] in
    [0, 1], 'label': i32[B]}`` with B = ``local_batch_size``, the order a function of (seed, view,
    e) only. ``iter(loader)`` runs epochs 0, 1, 2, … on successive calls. ``restore(state)`` resumes
    a checkpointed ``BatchIterator.get_state()``; ``close()`` stops the reading threads/workers.
    """

    def __init__(
        self,
        name: str,
        records,
        *,
        view: View,
        input_size: int,
        batch_size: int,
        seed: int,
        shard_index: int,
        shard_count: int,
        options: Options,
        max_steps_per_epoch: int = 0,
        on_device: bool = False,
    ):
        self.name, self.view, self.seed = name, view, int(seed)
        self.stored_shape = device_augment.stored_shape(name) if on_device else None
        self.input_size, self.batch_size, self.local_batch_size = _check_geometry(
            input_size, batch_size, shard_index, shard_count)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_examples = len(records)
        self.steps_per_epoch = self.num_examples // self.batch_size
        if max_steps_per_epoch < 0:
            raise DataError(f"max_steps_per_epoch must be >= 0 (0 = whole split), got {max_steps_per_epoch}")
        if max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{name}: the training split has {self.num_examples} examples, "
                f"fewer than one global "
                f"batch of {self.batch_size}; lower batch_size."
            )
        self._records, self._options, self._next_epoch = records, options, 0
        self._stream_id = VIEW_STREAMS[view]

    @property
    def options(self) -> Options:
        """The resolved worker / thread / prefetch settings."""
        return self._options

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpointed state must match to be restored here (no shard index or count: the
        global batches do not depend on them)."""
        return {
            "dataset": self.name, "view": self.view, "seed": self.seed,
            "input_size": self.input_size, "batch_size": self.batch_size,
            "num_examples": self.num_examples, "steps_per_epoch": self.steps_per_epoch,
        }  # fmt: skip

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(record keys, global positions) of ``epoch``, int64 ``[steps_per_epoch, local_B]``."""
        keys, positions = train_plan(
            self.num_examples, batch_size=self.batch_size, seed=self.seed,
            stream=self._stream_id, epoch=epoch, shard_index=self.shard_index,
            shard_count=self.shard_count,
        )  # fmt: skip
        return keys[: self.steps_per_epoch], positions[: self.steps_per_epoch]

    def _make_batches(self) -> grain.MapDataset:
        return _local_batches(
            self._records, _TrainOrder(self.num_examples, self.seed, self._stream_id),
            per_epoch=self.steps_per_epoch * self.batch_size,
            read=_ReadBatch(self._records, self.input_size, self.view == "train", self.seed,
                            self._stream_id, with_mask=False, stored_shape=self.stored_shape),
            local=self.local_batch_size, shard_index=self.shard_index,
            shard_count=self.shard_count,
        )  # fmt: skip

    def epoch(self, epoch: int, *, start_step: int = 0) -> BatchIterator:
        """Iterator over epoch ``epoch`` (0-based), starting after ``start_step`` batches."""
        if not 0 <= epoch < _MAX_EPOCHS or not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"epoch must be in [0, {_MAX_EPOCHS}) and start_step in "
                            f"[0, {self.steps_per_epoch}], got {epoch} and {start_step}")
        return BatchIterator(self, epoch=epoch, start_step=start_step, steps=self.steps_per_epoch,
                             base=epoch * self.steps_per_epoch, fingerprint=self.fingerprint)

    def state_at(self, epoch: int, step: int) -> dict[str, Any]:
        """The ``get_state()`` of an iterator of ``epoch`` after ``step`` batches."""
        return {"epoch": int(epoch), "step": int(step), "loader": self.fingerprint}

    def check_state(self, state: Mapping[str, Any]) -> tuple[int, int]:
        """(epoch, step) of a checkpointed ``get_state()``; DataError naming every fingerprint
        field that differs from this loader's (another dataset, view, seed, size or batch)."""
        if not isinstance(state, Mapping) or not {"epoch", "step", "loader"} <= set(state):
            raise DataError(f"cannot restore the data iterator from {state!r}: expected the dict "
                            "of BatchIterator.get_state() ('epoch', 'step', 'loader')")
        saved = dict(state["loader"] or {})
        diffs = [f"{k}={saved.get(k)!r} (this loader: {v!r})"
                 for k, v in self.fingerprint.items() if saved.get(k) != v]
        if diffs:
            raise DataError("cannot restore the data iterator: it was saved with "
                            + ", ".join(diffs) + "; resume with the dataset, view, seed, input "
                            "size and global batch size it was written with")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise DataError(f"cannot restore the data iterator: epoch {epoch}, step {step} is "
                            f"outside [0, {self.steps_per_epoch}] steps per epoch")
        return epoch, step

    def restore(self, state: Mapping[str, Any]) -> BatchIterator:
        """Continues from ``BatchIterator.get_state()`` (written by any number of processes);
        DataError if saved by another setup."""
        epoch, step = self.check_state(state)
        return self.epoch(epoch, start_step=step)

    def __iter__(self) -> BatchIterator:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch


class EvalLoader(_StreamOwner):
    """Batches of a whole split in order: ``{'image': f32[B, S, S, 3], 'label': i32[B],
    'mask': bool[B]}``.

    ``steps`` = ceil(N / global batch); padded positions have ``mask`` False (zero image, label 0).
    Images are resized to S² or, with ``augment_seed``, get the train view's crop and flip (drawn
    from (augment_seed, example index), so the same on any number of processes). Each ``iter()``
    is one pass (every pass yields the same batches).
    """

    def __init__(
        self,
        name: str,
        records,
        *,
        input_size: int,
        batch_size: int,
        shard_index: int,
        shard_count: int,
        options: Options,
        split: str = "test",
        augment_seed: int | None = None,
        on_device: bool = False,
    ):
        self.name, self.split, self.augment_seed = name, split, augment_seed
        self.stored_shape = device_augment.stored_shape(name) if on_device else None
        self.input_size, self.batch_size, self.local_batch_size = _check_geometry(
            input_size, batch_size, shard_index, shard_count)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_examples = len(records)
        self.steps = math.ceil(self.num_examples / self.batch_size)
        self._records, self._options, self._passes = records, options, 0

    def plan(self) -> np.ndarray:
        """Record keys int64 ``[steps, local_batch_size]``, −1 = padding."""
        return eval_plan(
            self.num_examples,
            batch_size=self.batch_size,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
        )

    def _make_batches(self) -> grain.MapDataset:
        augment = self.augment_seed is not None
        return _local_batches(
            self._records, _EvalOrder(self.num_examples), per_epoch=self.steps * self.batch_size,
            read=_ReadBatch(self._records, self.input_size, augment, self.augment_seed or 0,
                            _EVAL_STREAM, with_mask=True, stored_shape=self.stored_shape),
            local=self.local_batch_size, shard_index=self.shard_index,
            shard_count=self.shard_count,
        )  # fmt: skip

    def __iter__(self) -> BatchIterator:
        # Pass p reads stream steps [p·steps, (p+1)·steps): a finished pass leaves the stream
        # where the next one starts (an abandoned one restarts it there).
        self._passes = (self._passes + 1) % _MAX_EPOCHS
        fingerprint = {"dataset": self.name, "split": self.split, "batch_size": self.batch_size}
        return BatchIterator(self, epoch=0, start_step=0, steps=self.steps,
                             base=(self._passes - 1) * self.steps, fingerprint=fingerprint)

    def __len__(self) -> int:
        return self.steps


def train_loader(
    name: str,
    *,
    view: View = "train",
    input_size: int,
    batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    prefetch: int = 2,
    num_threads: int = 2,
    max_steps_per_epoch: int = 0,
    on_device: bool = False,
) -> TrainLoader:
    """Loader over ``name``'s training split for ``view`` 'train' (augmented) or 'prompt' (resize
    only).

    worker_count / num_threads / prefetch: grain worker processes, read threads, batches read
    ahead (-1 / 0 / 0 = auto, see ``resolve_options``); they never change the batches.
    batch_size is global (per process: batch_size // shard_count); the remainder of each epoch is
    dropped; ``max_steps_per_epoch`` > 0 caps an epoch at that many batches (quick runs).
    ``on_device`` (config.data.augment_on_device): 'image' is uint8 ``[B, H, W, C]`` as stored,
    plus 'crop' i32[B, 3] (top, left, flip) for the train view, for ``device_augment.apply`` in
    the jitted step (ConfigError for a dataset without one stored size). DataError
    for an unknown dataset or view, an unprepared dataset, a non-positive input
    size or a batch size that does not divide among the processes.
    """
    if view not in VIEW_STREAMS:
        raise DataError(f"view must be one of {sorted(VIEW_STREAMS)}, got {view!r}")
    transforms.check_input_size(input_size)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    records = open_split(name, "train", data_dir=data_dir)
    return TrainLoader(
        name, records, view=view, input_size=input_size, batch_size=batch_size, seed=seed,
        shard_index=shard_index, shard_count=shard_count,
        options=resolve_options(worker_count, num_threads, prefetch),
        max_steps_per_epoch=max_steps_per_epoch, on_device=on_device,
    )  # fmt: skip


def eval_loader(
    name: str,
    *,
    input_size: int,
    batch_size: int,
    split: Literal["train", "test"] = "test",
    augment_seed: int | None = None,
    data_dir: str | os.PathLike | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    prefetch: int = 2,
    num_threads: int = 2,
    on_device: bool = False,
) -> EvalLoader:
    """Loader over all of ``name``'s ``split`` in order, last batch padded, with a validity mask.

    Default: the test split, resized (evaluation). ``split='train'`` passes over every training
    example once (e.g. for frequency label mapping); ``augment_seed`` (int >= 0) applies the train
    view's random crop and flip, as the reference's label mapping does. ``on_device``: as for
    ``train_loader`` ('crop' only with ``augment_seed``).
    """
    transforms.check_input_size(input_size)
    if augment_seed is not None and (
        isinstance(augment_seed, bool) or not isinstance(augment_seed, int) or augment_seed < 0
    ):
        raise DataError(
            f"augment_seed must be None or a non-negative integer, got {augment_seed!r}"
        )
    records = open_split(name, split, data_dir=data_dir)
    return EvalLoader(
        name, records, input_size=input_size, batch_size=batch_size, shard_index=shard_index,
        shard_count=shard_count, options=resolve_options(worker_count, num_threads, prefetch),
        split=split, augment_seed=augment_seed, on_device=on_device,
    )  # fmt: skip
