"""Input pipeline: TFDS array_record data source → grain → host numpy batches (no TensorFlow).

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
depend on ``shard_count`` or ``worker_count``. Evaluation: ``ceil(N / G)`` steps over the split in
order; the last global batch is padded with zero images (label 0) and ``mask`` False, so every test
example is counted exactly once on any number of processes.

Checkpointing. ``TrainLoader.epoch(e)`` returns a ``BatchIterator``; ``get_state()`` gives a
JSON-able dict (epoch, step, loader fingerprint) and ``TrainLoader.restore(state)`` continues with
the same batches.

Each grain record is one whole local batch (decode + transforms run inside the data source), so
batches are identical with or without worker processes; ``prefetch`` batches are read ahead by
``num_threads`` threads (PIL releases the GIL) or by ``worker_count`` processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import grain.python as grain
import numpy as np

from vpns_jax.data import registry, transforms
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


# --- grain source of whole batches


@dataclasses.dataclass(frozen=True)
class _Transform:
    """Per-example transform: ``augment`` → train view (needs an rng), else resize only."""

    input_size: int
    augment: bool
    seed: int
    stream: int
    epoch: int

    def __call__(self, image: np.ndarray, position: int) -> np.ndarray:
        if self.augment:
            rng = _rng(self.seed, self.stream, self.epoch, _AUGMENT, position)
            return transforms.train_transform(image, self.input_size, rng)
        return transforms.eval_transform(image, self.input_size)


def _read(records, keys: np.ndarray) -> list[Mapping[str, Any]]:
    """Records at ``keys``, in one bulk read when the source supports it (array_record does)."""
    keys = [int(k) for k in keys]
    if keys and hasattr(records, "__getitems__"):
        try:
            return list(records.__getitems__(keys))
        except TypeError:  # tfds.testing.mock_data's source has a broken __getitems__
            pass
    return [records[k] for k in keys]


class _BatchSource(grain.RandomAccessDataSource):
    """Random-access source whose element ``i`` is local batch ``i``, decoded and transformed."""

    def __init__(
        self,
        records,
        keys: np.ndarray,
        positions: np.ndarray,
        transform: _Transform,
        with_mask: bool,
    ):
        self._records, self._keys, self._positions = records, keys, positions
        self._transform, self._with_mask = transform, with_mask

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        keys = self._keys[index]
        size = self._transform.input_size
        images = np.zeros((len(keys), size, size, 3), np.float32)
        labels = np.zeros((len(keys),), np.int32)
        valid = np.flatnonzero(keys >= 0)
        for i, record in zip(valid, _read(self._records, keys[valid]), strict=True):
            images[i] = self._transform(np.asarray(record["image"]), int(self._positions[index][i]))
            labels[i] = int(record["label"])
        batch = {"image": images, "label": labels}
        if self._with_mask:
            batch["mask"] = keys >= 0
        return batch

    def __repr__(self) -> str:
        return f"_BatchSource(batches={len(self)}, transform={self._transform})"


def _grain_iterator(source: _BatchSource, *, worker_count: int, prefetch: int, num_threads: int):
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.NoSharding(),
        shuffle=False,
        num_epochs=1,
        seed=0,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch),
    )
    return iter(loader)


# --- iterators and loaders


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Iterator over the local batches of one epoch (or of the test split), with a checkpointable
    position.

    ``step`` counts the batches already returned; ``len()`` is the number left.
    """

    def __init__(
        self,
        make_source,
        *,
        epoch: int,
        start_step: int,
        steps: int,
        fingerprint: dict,
        worker_count: int,
        prefetch: int,
        num_threads: int,
    ):
        self.epoch, self.step, self.steps = epoch, start_step, steps
        self._fingerprint = fingerprint
        self._it = None
        if start_step < steps:
            source = make_source(start_step)
            self._it = _grain_iterator(
                source, worker_count=worker_count, prefetch=prefetch, num_threads=num_threads
            )

    def __len__(self) -> int:
        return self.steps - self.step

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None or self.step >= self.steps:
            raise StopIteration
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position {'epoch', 'step', 'loader'}, for ``TrainLoader.restore``."""
        return {"epoch": self.epoch, "step": self.step, "loader": dict(self._fingerprint)}


@dataclasses.dataclass(frozen=True)
class _Options:
    worker_count: int = 0
    prefetch: int = 2
    num_threads: int = 2


def _check_geometry(input_size: int, batch_size: int, shard_index: int,
                    shard_count: int) -> tuple[int, int, int]:
    """(input size, global batch, per-process batch) after checking them and the shard index."""
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    batch_size = int(batch_size)
    return (transforms.check_input_size(input_size), batch_size,
            local_batch_size(batch_size, shard_count))


class TrainLoader:
    """Training-split batches for the 'train' (augmented) or 'prompt' (resize only) view.

    ``epoch(e)`` iterates epoch ``e``: ``steps_per_epoch`` batches ``{'image': f32[B, S, S, 3] in
    [0, 1], 'label': i32[B]}`` with B = ``local_batch_size``, the order a function of (seed, view,
    e) only. ``iter(loader)`` runs epochs 0, 1, 2, … on successive calls. ``restore(state)`` resumes
    a checkpointed ``BatchIterator.get_state()``.
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
        options: _Options,
        max_steps_per_epoch: int = 0,
    ):
        self.name, self.view, self.seed = name, view, int(seed)
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
        self._stream = VIEW_STREAMS[view]

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpointed state must match to be restored here."""
        return {
            "dataset": self.name, "view": self.view, "seed": self.seed,
            "input_size": self.input_size,
            "batch_size": self.batch_size, "shard_index": self.shard_index,
            "shard_count": self.shard_count, "num_examples": self.num_examples,
            "steps_per_epoch": self.steps_per_epoch,
        }  # fmt: skip

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(record keys, global positions) of ``epoch``, int64 ``[steps_per_epoch, local_B]``."""
        return train_plan(
            self.num_examples, batch_size=self.batch_size, seed=self.seed, stream=self._stream,
            epoch=epoch, shard_index=self.shard_index, shard_count=self.shard_count,
        )  # fmt: skip

    def epoch(self, epoch: int, *, start_step: int = 0) -> BatchIterator:
        """Iterator over epoch ``epoch`` (0-based), starting after ``start_step`` batches."""
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"epoch must be >= 0 and start_step in [0, {self.steps_per_epoch}]")
        transform = _Transform(
            self.input_size, self.view == "train", self.seed, self._stream, epoch
        )

        def make_source(start: int) -> _BatchSource:
            keys, positions = self.plan(epoch)
            return _BatchSource(self._records, keys[start:], positions[start:], transform, False)

        return BatchIterator(
            make_source, epoch=epoch, start_step=start_step, steps=self.steps_per_epoch,
            fingerprint=self.fingerprint, **dataclasses.asdict(self._options),
        )  # fmt: skip

    def restore(self, state: Mapping[str, Any]) -> BatchIterator:
        """Continues from ``BatchIterator.get_state()``; DataError if saved by another setup."""
        if dict(state.get("loader", {})) != self.fingerprint:
            raise DataError(
                f"cannot restore data iterator: saved for {state.get('loader')}, this loader is "
                f"{self.fingerprint}"
            )
        return self.epoch(int(state["epoch"]), start_step=int(state["step"]))

    def __iter__(self) -> BatchIterator:
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch


class EvalLoader:
    """Batches of a whole split in order: ``{'image': f32[B, S, S, 3], 'label': i32[B],
    'mask': bool[B]}``.

    ``steps`` = ceil(N / global batch); padded positions have ``mask`` False (zero image, label 0).
    Images are resized to S² or, with ``augment_seed``, get the train view's crop and flip (drawn
    from (augment_seed, example index), so the same on any number of processes).
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
        options: _Options,
        split: str = "test",
        augment_seed: int | None = None,
    ):
        self.name, self.split, self.augment_seed = name, split, augment_seed
        self.input_size, self.batch_size, self.local_batch_size = _check_geometry(
            input_size, batch_size, shard_index, shard_count)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.num_examples = len(records)
        self.steps = math.ceil(self.num_examples / self.batch_size)
        self._records, self._options = records, options

    def plan(self) -> np.ndarray:
        """Record keys int64 ``[steps, local_batch_size]``, −1 = padding."""
        return eval_plan(
            self.num_examples,
            batch_size=self.batch_size,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
        )

    def __iter__(self) -> BatchIterator:
        augment = self.augment_seed is not None
        seed = self.augment_seed if augment else 0
        transform = _Transform(self.input_size, augment, seed, _EVAL_STREAM, 0)

        def make_source(start: int) -> _BatchSource:
            keys = self.plan()[start:]
            return _BatchSource(self._records, keys, np.maximum(keys, 0), transform, True)

        fingerprint = {"dataset": self.name, "split": self.split, "batch_size": self.batch_size}
        return BatchIterator(
            make_source,
            epoch=0,
            start_step=0,
            steps=self.steps,
            fingerprint=fingerprint,
            **dataclasses.asdict(self._options),
        )

    def __len__(self) -> int:
        return self.steps


def _options(worker_count: int, prefetch: int, num_threads: int) -> _Options:
    if worker_count < 0 or prefetch < 1 or num_threads < 1:
        raise DataError("worker_count must be >= 0, prefetch and num_threads >= 1")
    return _Options(worker_count=worker_count, prefetch=prefetch, num_threads=num_threads)


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
) -> TrainLoader:
    """Loader over ``name``'s training split for ``view`` 'train' (augmented) or 'prompt' (resize
    only).

    batch_size is global (per process: batch_size // shard_count); the remainder of each epoch is
    dropped; ``max_steps_per_epoch`` > 0 caps an epoch at that many batches (quick runs). DataError
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
        options=_options(worker_count, prefetch, num_threads),
        max_steps_per_epoch=max_steps_per_epoch,
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
) -> EvalLoader:
    """Loader over all of ``name``'s ``split`` in order, last batch padded, with a validity mask.

    Default: the test split, resized (evaluation). ``split='train'`` passes over every training
    example once (e.g. for frequency label mapping); ``augment_seed`` (int >= 0) applies the train
    view's random crop and flip, as the reference's label mapping does.
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
        shard_count=shard_count, options=_options(worker_count, prefetch, num_threads),
        split=split, augment_seed=augment_seed,
    )  # fmt: skip
