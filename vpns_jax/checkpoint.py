"""Run checkpoints (resume) and final per-run artifacts, on top of orbax-checkpoint.

Layout of a workdir's checkpoints (one directory per step, written by orbax)::

    DIR/<step>/state/   the run state pytree (StandardSave: params, opt_state, scores, ...)
    DIR/<step>/meta/    JSON progress info (stage, epoch, data iterator state, config hash)

An interrupted save leaves ``DIR/<step>.orbax-checkpoint-tmp-*`` behind; orbax never lists it as a
step (and this wrapper deletes it when it opens the directory), so the next restore uses the
latest *complete* checkpoint.

A complete checkpoint that cannot be read (a missing or truncated file, garbled meta) is *set
aside*, never deleted: renamed ``DIR/<step>.unreadable-<UTC time>`` (orbax lists neither that nor
a tmp directory as a step) and the previous readable one is used, with one warning naming both.
Only when none is readable does `restore` raise :class:`vpns_jax.errors.CheckpointError` (and then
it renames nothing). A checkpoint that reads but does not *match* (another tree, another
config_hash) is not corruption: it is refused with a CheckpointError naming the directory and the
fix, and left in place.

Failures leave no asyncio noise behind: orbax runs each async operation on a fresh event loop and
closes it as soon as the first of its tasks fails, while tensorstore still completes the others
onto the closed loop ("Event loop is closed" tracebacks, "Task was destroyed but it is pending").
`_install_quiet_failures` gives orbax loops that finish their pending tasks before closing.

Flat dicts with '/' in their keys (``'layer1_0/conv1/kernel'``) are stored as they are: orbax keys
leaves by the tuple of path elements, so no key encoding is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging as std_logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_policy

from vpns_jax.errors import CheckpointError

PyTree = Any

_STATE = "state"
_META = "meta"
_FINAL_TREE = "tree"
_MAX_MISMATCHES_SHOWN = 5
UNREADABLE = ".unreadable-"  # DIR/<step>.unreadable-<UTC time>: a set-aside checkpoint
_DRAIN_TIMEOUT_S = 120.0  # how long a closing event loop waits for its pending I/O tasks


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


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop whose `close()` first lets its pending tasks finish (a bounded wait).

    orbax runs every async save/restore with `loop.run_until_complete(coro)` on a fresh loop, then
    closes it. When one of `asyncio.gather`'s tasks fails, the others are still reading or writing
    through tensorstore; their completions later land on the closed loop and print "Event loop is
    closed" tracebacks (or "Task was destroyed but it is pending" at exit) after the clear error.
    Finishing them here, with their exceptions retrieved, leaves nothing behind.
    """

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                _, late = self.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S))
                for task in late:
                    task.cancel()
                if late:
                    self.run_until_complete(asyncio.wait(late, timeout=5.0))
                for task in pending:
                    if task.done() and not task.cancelled():
                        task.exception()  # retrieved: no "exception was never retrieved" at exit
        super().close()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        # A Ctrl-C inside `run_until_complete` leaves its task "finished with KeyboardInterrupt,
        # never retrieved"; the interrupt itself already propagated to the caller.
        if not isinstance(context.get("exception"), KeyboardInterrupt | SystemExit):
            super().call_exception_handler(context)


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _DrainingEventLoop()


class _OrbaxErrorsReraised(std_logging.Filter):
    """Drops orbax's ERROR records that carry a traceback: orbax logs an exception that way (a
    failed background save, four times) before `wait_until_finished` re-raises it, and
    RunCheckpointer turns that into one CheckpointError naming the directory and the cause."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno >= std_logging.ERROR and record.exc_info
                    and "/orbax/" in record.pathname)


_installed = False


def _install_quiet_failures() -> None:
    """Once per process: draining event loops (unless the application set its own asyncio policy,
    e.g. uvloop's) and the filter on orbax's error records."""
    global _installed
    if _installed:
        return
    _installed = True
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(_DrainingPolicy())
    std_logging.getLogger("absl").addFilter(_OrbaxErrorsReraised())


_DISK_FULL = {errno.ENOSPC: os.strerror(errno.ENOSPC), errno.EDQUOT: os.strerror(errno.EDQUOT)}


def _disk_full(err: BaseException | None) -> str | None:
    """'No space left on device' (or the quota's text) when `err` or its cause is a full disk:
    an OSError with ENOSPC/EDQUOT, or tensorstore's error text that quotes the OS error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return _DISK_FULL[err.errno]
        for code, text in _DISK_FULL.items():
            if text in str(err) or f"os_error_code='{code}'" in str(err):
                return text
        err = err.__cause__ or err.__context__
    return None


def _all_processes_max(code: int) -> int:
    """The largest of every process's `code` (each process calls it at the same point): one
    process's failure becomes every process's decision. One process: `code`, no collective."""
    if jax.process_count() == 1:
        return int(code)
    return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


class _Unreadable(Exception):
    """One checkpoint cannot be read (corrupt or incomplete); `str()` is the reason, one line."""


class _Refused(Exception):
    """One checkpoint reads but does not fit this run; carries the user-facing CheckpointError."""

    def __init__(self, error: CheckpointError):
        super().__init__(str(error))
        self.error = error


class RunCheckpointer:
    """Saves and restores a run's state pytree plus a JSON dict of progress info, one step per dir.

    Saves are asynchronous (arrays are copied to host before `save` returns, so the caller may
    donate them right away); `wait()` blocks until the last save is on disk; `close()` always waits.
    All processes of a multi-host run must call `save`/`restore`/`read_meta` together: they come to
    the same decision about unreadable checkpoints, and only process 0 renames them.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        _install_quiet_failures()
        self.directory = _abs(directory)
        self._saving: int | None = None  # step of the last save started and not yet checked
        self._failed: CheckpointError | None = None  # a failed save, reported once
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
        # Restores read through the handler, not the manager: no barrier inside, so a process
        # that fails cannot leave the others waiting; they agree afterwards (_all_processes_max).
        self._reader = ocp.CompositeCheckpointHandler(
            **{_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}
        )

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fix(self, step: int | None) -> str:
        where = os.path.join(self.directory, str(step)) if step is not None else self.directory
        return f"delete {where} (or the whole {self.directory}) or use a new --workdir"

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

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
        mapping list, config hash, ...). A failed earlier save raises here (CheckpointError).
        """
        meta = _check_json(meta, "checkpoint")
        step = int(step)
        self.wait()  # the previous save's failure is reported as that save's, not this one's
        if step in self.all_steps():
            if not force:
                return False
            self._manager.delete(step)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state_pytree), _META: ocp.args.JsonSave(meta)}
        )
        self._saving = step
        try:
            return bool(self._manager.save(step, args=args, force=True))
        except Exception as e:
            raise self._save_failed(e) from e

    def _save_failed(self, err: BaseException) -> CheckpointError:
        """The one error of a failed save of step `self._saving` (later calls raise it again)."""
        step, self._saving = self._saving, None
        with contextlib.suppress(Exception):
            self._manager.reload()  # forget the failed step: only complete ones are listed
        kept = [s for s in self.all_steps() if s != step]
        previous = (f"checkpoint {kept[-1]} ({self._step_dir(kept[-1])}) is kept" if kept
                    else "no earlier checkpoint of it exists")
        full = _disk_full(err)
        if full:
            message = (f"saving checkpoint {step} in {self.directory} failed: the disk is full "
                       f"({full}); {previous}. Free disk space (or move the workdir to a larger "
                       "disk) and rerun the same command to resume")
        else:
            message = (f"saving checkpoint {step} in {self.directory} failed ({_short(err)}); "
                       f"{previous}. Check the disk space and permissions of the workdir and rerun "
                       "the same command to resume")
        self._failed = CheckpointError(message)
        return self._failed

    def keep_latest_only(self) -> None:
        """Delete every checkpoint but the newest (a finished stage keeps just its end state)."""
        self.wait()
        for step in self.all_steps()[:-1]:
            self._manager.delete(step)

    # ----------------------------------------------------------------------------------- reading

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON meta of checkpoint `step`, without touching the arrays.

        With `step=None`: the newest checkpoint whose meta reads; newer unreadable ones are set
        aside (see the module docstring). CheckpointError when none (or the given step) reads.
        """
        if step is not None:
            step = self._resolve_step(step)
            try:
                return self._read_meta(step)
            except _Unreadable as e:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} has no readable meta ({e}); "
                    f"{self._fix(step)}"
                ) from None
        meta, _ = self._newest_readable(self._read_meta, "read its meta")
        return meta

    def restore(
        self,
        step: int | None = None,
        *,
        abstract_state: PyTree,
        shardings: PyTree | jax.sharding.Sharding | None = None,
        config_hash: str | None = None,
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restore checkpoint `step` → `(state, meta)`; with `step=None` the newest readable one.

        `abstract_state` fixes the tree structure, shapes and dtypes (e.g.
        `jax.tree.map(ocp.utils.to_shape_dtype_struct, state)`, so optax states come back as their
        NamedTuples). `shardings` (one Sharding or a matching tree) places the arrays; without it a
        leaf keeps its own sharding or is replicated over all devices. With `config_hash`, a
        checkpoint whose meta has another `config_hash` is refused.

        `step=None` falls back: an unreadable newest checkpoint is set aside (renamed, with a
        warning) and the previous one restored; CheckpointError when none is readable. A
        checkpoint that does not match the target or the config is refused, never set aside.
        """
        def one(s: int) -> tuple[PyTree, dict[str, Any]]:
            return self._restore_one(s, abstract_state, shardings, config_hash)

        if step is None:
            state, meta = self._newest_readable(one, "restore it")[0]
            return state, meta
        step = self._resolve_step(step)
        try:
            return one(step)
        except _Refused as e:
            raise e.error from None
        except _Unreadable as e:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} cannot be restored ({e}); it is corrupt "
                f"or incomplete: {self._fix(step)}"
            ) from None

    def _resolve_step(self, step: int | None) -> int:
        self.wait()
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

    def _read_meta(self, step: int) -> dict[str, Any]:
        path = epath.Path(self._step_dir(step))
        try:
            with _quiet_orbax():  # orbax warns that the (deliberately skipped) state is not read
                out = self._reader.restore(
                    path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
                )
            meta = out[_META]
        except Exception as e:
            raise _Unreadable(_short(e)) from None
        if not isinstance(meta, Mapping):
            raise _Unreadable(f"the meta is {type(meta).__name__}, not a JSON object")
        return dict(meta)

    def _restore_one(
        self, step: int, abstract_state: PyTree, shardings: Any, config_hash: str | None
    ) -> tuple[PyTree, dict[str, Any]]:
        """Read checkpoint `step`: _Unreadable if it cannot be read, _Refused if it does not fit."""
        meta = self._read_meta(step)
        if config_hash is not None and meta.get("config_hash") != config_hash:
            raise _Refused(CheckpointError(
                f"checkpoint {step} in {self.directory} was written by a different config "
                f"(config_hash {meta.get('config_hash')!r}, this run {config_hash!r}); use a new "
                f"--workdir for a new config, or {self._fix(step)}"
            ))
        path = epath.Path(self._step_dir(step))
        try:
            stored = self._reader.metadata(path).item_metadata[_STATE]
            stored = getattr(stored, "tree", stored)
            if stored is None:
                raise FileNotFoundError(f"no '{_STATE}' item")
        except Exception as e:
            raise _Unreadable(_short(e)) from None
        problems = _mismatches(abstract_state, stored)
        if problems:
            shown = "; ".join(problems[:_MAX_MISMATCHES_SHOWN])
            more = len(problems) - _MAX_MISMATCHES_SHOWN
            shown += f"; and {more} more" if more > 0 else ""
            raise _Refused(CheckpointError(
                f"checkpoint {step} in {self.directory} does not match this run's state "
                f"({shown}); it was probably written by another config or model: "
                f"{self._fix(step)}"
            ))
        target = _with_shardings(abstract_state, shardings)
        try:
            out = self._reader.restore(
                path, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
        except Exception as e:
            raise _Unreadable(_short(e)) from None
        return out[_STATE], meta

    def _newest_readable(self, read: Any, what: str) -> tuple[Any, int]:
        """`(read(step), step)` for the newest step that every process reads; the newer ones that
        some process could not read are set aside (process 0 renames, the others wait)."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        failed: list[tuple[int, str | None]] = []
        for step in reversed(steps):
            result: Any = None
            try:
                result, code = read(step), 0
            except _Unreadable as e:
                result, code = str(e), 1
            except _Refused as e:
                result, code = e.error, 2
            decision = _all_processes_max(code)
            if decision == 0:
                self._set_aside(failed, step)
                return result, step
            if decision == 2:
                if code == 2:
                    raise result
                raise CheckpointError(
                    f"another process refused checkpoint {step} in {self.directory} (its log "
                    f"says why); {self._fix(step)}"
                )
            failed.append((step, result if code == 1 else None))
        reasons = "; ".join(f"{self._step_dir(s)}: {r or 'unreadable on another process'}"
                            for s, r in failed)
        raise CheckpointError(
            f"no checkpoint in {self.directory} is readable, cannot {what} ({reasons}); they are "
            f"left in place: move {self.directory} aside (or delete it) to recompute this stage "
            "from its start, or use a new --workdir"
        )

    def _set_aside(self, failed: list[tuple[int, str | None]], used: int) -> None:
        """Rename each unreadable checkpoint DIR/<step> to DIR/<step>.unreadable-<UTC time>
        (process 0 renames; `reason` None: another process could not read it)."""
        if not failed:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        renamed, problem = [], None
        if jax.process_index() == 0:
            for step, _ in failed:
                source, target = self._step_dir(step), f"{self._step_dir(step)}{UNREADABLE}{stamp}"
                try:
                    epath.Path(source).rename(target)
                except OSError as e:
                    problem = (f"checkpoint {step} in {self.directory} cannot be read and cannot be "
                               f"set aside ({_short(e)}); move {source} out of {self.directory} "
                               "yourself, or use a new --workdir")
                    break
                renamed.append(target)
        # Also the barrier: no process goes on before the renames are done.
        if _all_processes_max(problem is not None):
            raise CheckpointError(problem or "process 0 could not set aside an unreadable "
                                  f"checkpoint in {self.directory} (its log says why)")
        for (step, reason), target in zip(failed, renamed or [None] * len(failed), strict=True):
            if target is not None:
                logging.warning(
                    "checkpoint %d in %s cannot be read (%s); set it aside as %s (rename it back "
                    "to retry it) and using checkpoint %d (%s) instead", step, self.directory,
                    reason or "another process could not read it, its log says why", target, used,
                    self._step_dir(used))
            elif reason is not None:  # processes > 0 log what they could not read
                logging.warning("checkpoint %d in %s cannot be read on process %d (%s); process 0 "
                                "sets it aside and every process uses checkpoint %d", step,
                                self.directory, jax.process_index(), reason, used)
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save is complete on disk (a failed one raises here)."""
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from e
        self._saving = None

    def close(self) -> None:
        """Wait for pending saves, then release orbax's resources (a failed save raises once)."""
        try:
            if self._failed is None:
                self.wait()
        finally:
            self._manager.close()
            self._reader.close()


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
    _install_quiet_failures()
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
    _install_quiet_failures()
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
