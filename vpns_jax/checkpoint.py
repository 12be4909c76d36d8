"""Run checkpoints (resume) and final per-run artifacts, on top of orbax-checkpoint.

Layout of a workdir's checkpoints (one directory per step, written by orbax)::

    DIR/<step>/state/   the run state pytree (StandardSave: params, opt_state, scores, ...)
    DIR/<step>/meta/    JSON progress info (stage, epoch, data iterator state, config hash)

An interrupted save leaves ``DIR/<step>.orbax-checkpoint-tmp-*`` behind; orbax never lists it as a
step (and this wrapper deletes it when it opens the directory), so the next restore uses the
latest *complete* checkpoint. Anything else that cannot be restored (missing or truncated files, a
tree that does not match the requested target, a checkpoint written by another config) raises
:class:`vpns_jax.errors.CheckpointError` naming the directory and the fix.

Flat dicts with '/' in their keys (``'layer1_0/conv1/kernel'``) are stored as they are: orbax keys
leaves by the tuple of path elements, so no key encoding is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_policy

from vpns_jax.errors import CheckpointError

PyTree = Any

_STATE = "state"
_META = "meta"
_FINAL_TREE = "tree"
_MAX_MISMATCHES_SHOWN = 5


def _abs(directory: str | os.PathLike) -> str:
    """Absolute path; gs:// and other URLs are kept as they are (orbax needs absolute paths)."""
    d = os.fspath(directory)
    return d if "://" in d else os.path.abspath(d)


def _short(err: BaseException, limit: int = 240) -> str:
    """First line of an exception message, shortened: enough to see the cause, not a traceback."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text[:limit] + ("..." if len(text) > limit else "")
    return f"{type(err).__name__}: {text}"


def _check_json(meta: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Fail early (before any async write starts) if `meta` is not a JSON-able dict."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"{what} meta must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} meta is not JSON-serializable: {e}") from e


def _key_name(key: Any) -> str:
    """One path element as orbax names it (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_specs(tree: PyTree) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype | None]]:
    """Map each leaf's path to its (shape, dtype); Python scalars get shape () and no dtype."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = tuple(_key_name(k) for k in path)
        if isinstance(leaf, int | float | complex):  # bool is an int; orbax widens these
            out[key] = ((), None)
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out[key] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


def _mismatches(abstract: PyTree, stored: PyTree) -> list[str]:
    """Human-readable differences between a restore target and the stored tree's metadata."""
    want, have = _leaf_specs(abstract), _leaf_specs(stored)
    problems = []
    for path in sorted(set(want) | set(have)):
        name = "/".join(path)
        if path not in have:
            problems.append(f"{name}: expected by the target but not in the checkpoint")
        elif path not in want:
            problems.append(f"{name}: in the checkpoint but not in the target")
        elif want[path][0] != have[path][0]:
            problems.append(f"{name}: shape {have[path][0]} stored, {want[path][0]} expected")
        elif None not in (want[path][1], have[path][1]) and want[path][1] != have[path][1]:
            problems.append(f"{name}: dtype {have[path][1]} stored, {want[path][1]} expected")
    return problems


def _default_sharding() -> jax.sharding.Sharding:
    """Replicated over every device of every process (what a state with no sharding given gets)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _with_shardings(
    abstract_state: PyTree, shardings: PyTree | jax.sharding.Sharding | None
) -> PyTree:
    """ShapeDtypeStructs carrying a sharding each.

    `shardings` is one Sharding for every leaf, a tree of Shardings matching `abstract_state`, or
    None: then a leaf's own sharding is kept (a jax.Array or a ShapeDtypeStruct that has one), else
    the leaf is replicated over all devices.
    """
    default = None

    def one(leaf: Any, sharding: jax.sharding.Sharding | None) -> Any:
        nonlocal default
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            return leaf
        if sharding is None:
            sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            default = default or _default_sharding()
            sharding = default
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), abstract_state)
    return jax.tree.map(one, abstract_state, shardings)


@contextlib.contextmanager
def _quiet_orbax():
    """Hide orbax's WARNING lines for the duration (absl logs through the 'absl' logger)."""
    logger = std_logging.getLogger("absl")
    level = logger.level
    logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class RunCheckpointer:
    """Saves and restores a run's state pytree plus a JSON dict of progress info, one step per dir.

    Saves are asynchronous (arrays are copied to host before `save` returns, so the caller may
    donate them right away); `wait()` blocks until the last save is on disk; `close()` always waits.
    All processes of a multi-host run must call `save`/`restore` together.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = _abs(directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_policy.LatestN(max_to_keep),
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            raise CheckpointError(
                f"cannot open the checkpoint directory {self.directory} ({_short(e)}); "
                "check that it is writable, or use a new --workdir"
            ) from e

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fix(self, step: int | None) -> str:
        where = os.path.join(self.directory, str(step)) if step is not None else self.directory
        return f"delete {where} (or the whole {self.directory}) or use a new --workdir"

    def all_steps(self) -> list[int]:
        """Steps of the saved checkpoints (saves still in flight included), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest checkpoint's step (a save in flight counts; `restore` waits for it), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self, step: int, state_pytree: PyTree, meta: Mapping[str, Any], *, force: bool = False
    ) -> bool:
        """Start saving `state_pytree` and `meta` as checkpoint `step`; returns whether it saves.

        A step that is already on disk is kept (returns False) unless `force`, which replaces it.
        `meta` must be JSON-able (stage name, epoch, step in epoch, data iterator state, label
        mapping list, config hash, ...).
        """
        meta = _check_json(meta, "checkpoint")
        step = int(step)
        if step in self.all_steps():
            if not force:
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state_pytree), _META: ocp.args.JsonSave(meta)}
        )
        try:
            return bool(self._manager.save(step, args=args, force=True))
        except Exception as e:
            raise CheckpointError(
                f"saving checkpoint {step} in {self.directory} failed ({_short(e)}); "
                "check the disk space and permissions of the workdir"
            ) from e

    def keep_latest_only(self) -> None:
        """Delete every checkpoint but the newest (a finished stage keeps just its end state)."""
        self.wait()
        for step in self.all_steps()[:-1]:
            self._manager.delete(step)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON meta of checkpoint `step` (latest when None), without touching the arrays."""
        step = self._resolve_step(step)
        try:
            args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            with _quiet_orbax():  # orbax warns that the (deliberately skipped) state is not read
                out = self._manager.restore(step, args=args)
            return dict(out[_META])
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} has no readable meta ({_short(e)}); "
                f"{self._fix(step)}"
            ) from e

    def _resolve_step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(
                f"no checkpoint {step} in {self.directory} (complete ones: {steps or 'none'})"
            )
        return int(step)

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: PyTree,
        shardings: PyTree | jax.sharding.Sharding | None = None,
        config_hash: str | None = None,
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restore checkpoint `step` (latest complete one when None) → `(state, meta)`.

        `abstract_state` fixes the tree structure, shapes and dtypes (e.g.
        `jax.tree.map(ocp.utils.to_shape_dtype_struct, state)`, so optax states come back as their
        NamedTuples). `shardings` (one Sharding or a matching tree) places the arrays; without it a
        leaf keeps its own sharding or is replicated over all devices. With `config_hash`, a
        checkpoint whose meta has another `config_hash` is refused.
        """
        step = self._resolve_step(step)
        meta = self.read_meta(step)
        if config_hash is not None and meta.get("config_hash") != config_hash:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} was written by a different config "
                f"(config_hash {meta.get('config_hash')!r}, this run {config_hash!r}); use a new "
                f"--workdir for a new config, or {self._fix(step)}"
            )
        try:
            stored = self._manager.item_metadata(step)[_STATE]
            stored = getattr(stored, "tree", stored)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is incomplete or corrupt ({_short(e)}); "
                f"{self._fix(step)}"
            ) from e
        if stored is not None:
            problems = _mismatches(abstract_state, stored)
            if problems:
                shown = "; ".join(problems[:_MAX_MISMATCHES_SHOWN])
                more = len(problems) - _MAX_MISMATCHES_SHOWN
                shown += f"; and {more} more" if more > 0 else ""
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} does not match this run's state "
                    f"({shown}); it was probably written by another config or model: "
                    f"{self._fix(step)}"
                )
        target = _with_shardings(abstract_state, shardings)
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
            return out[_STATE], meta
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored ({_short(e)}); "
                f"it is corrupt or incomplete: {self._fix(step)}"
            ) from e

    def wait(self) -> None:
        """Block until every started save is complete on disk (a failed one raises here)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"a checkpoint save in {self.directory} failed ({_short(e)}); check the disk "
                "space and permissions of the workdir"
            ) from e

    def close(self) -> None:
        """Wait for pending saves, then release orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()


def _final_handler() -> ocp.CompositeCheckpointHandler:
    """Composite handler that knows its items' handlers (needed to read metadata without args)."""
    return ocp.CompositeCheckpointHandler(
        **{_FINAL_TREE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
    )


def save_final(directory: str | os.PathLike, tree: PyTree, meta: Mapping[str, Any]) -> None:
    """Write a run's final artifacts (synchronously), replacing `directory` if it exists.

    `tree` is a plain pytree of arrays (e.g. params, batch_stats, scores, bool masks, prompt, label
    mapping), `meta` a JSON-able dict (arch, options, results). All processes call it together.
    """
    path = _abs(directory)
    meta = _check_json(meta, "final")
    args = ocp.args.Composite(
        **{_FINAL_TREE: ocp.args.StandardSave(tree), _META: ocp.args.JsonSave(meta)}
    )
    with ocp.Checkpointer(_final_handler()) as ckptr:
        try:
            ckptr.save(path, args=args, force=True)
        except Exception as e:
            raise CheckpointError(
                f"saving the final artifacts to {path} failed ({_short(e)}); check the disk space "
                "and permissions of the workdir"
            ) from e


def load_final(directory: str | os.PathLike) -> tuple[PyTree, dict[str, Any]]:
    """Read what `save_final` wrote → `(tree of numpy arrays, meta)`, on any device topology.

    Needs no target: shapes and dtypes come from the stored metadata (bool stays bool, int32 stays
    int32); place the arrays on devices with `jax.device_put` as the caller needs.
    """
    path = _abs(directory)
    fix = f"rerun the job that writes it, or point to another run's {os.path.basename(path)}"
    with ocp.Checkpointer(_final_handler()) as ckptr:
        try:
            stored = ckptr.metadata(path).item_metadata[_FINAL_TREE]
            stored = getattr(stored, "tree", stored)
            if stored is None:
                raise FileNotFoundError(f"no '{_FINAL_TREE}' item")
        except Exception as e:
            raise CheckpointError(f"{path} holds no final artifacts ({_short(e)}); {fix}") from e
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), stored)
        args = ocp.args.Composite(
            **{_FINAL_TREE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}
        )
        try:
            out = ckptr.restore(path, args=args)
        except Exception as e:
            raise CheckpointError(
                f"the final artifacts in {path} are corrupt or incomplete ({_short(e)}); {fix}"
            ) from e
    return out[_FINAL_TREE], dict(out[_META] or {})
