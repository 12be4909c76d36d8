"""The workdir's own files: one run at a time (a lock file), atomic small writes, clear read errors.

Lock: `WORKDIR/.lock` holds the holder's host, pid, process start time and start date (JSON). It is
made by writing a private temporary file and hard-linking it to `.lock` (`os.link` fails when the
name exists, atomically, also on NFS, where `O_EXCL` was unreliable before NFSv3 and `flock` may be
local to one client or unsupported); filesystems without hard links fall back to
`os.open(O_CREAT | O_EXCL)`. A lock file outlives a killed holder, so a lock whose holder is gone
(same host, pid not alive or re-used by a newer process) is taken over with a warning; one from
another host cannot be checked and is refused with the fix (delete it if that job is gone).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

from vpns_jax.errors import CheckpointError, ConfigError

LOCK_FILE = ".lock"


class WorkdirBusy(ConfigError):
    """The workdir is held by another live run (a sweep worker then tries its next cell)."""

_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_HELD: set[tuple[str, int]] = set()  # (workdir, thread) claimed by `claim` in this process


# ----------------------------------------------------------------------------------------------------
# Atomic writes


def _temp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call `write(tmp)` to fill a temporary file next to `path`, then rename it over `path`:
    readers see the old file or the new one, never a part. On failure the old file is intact and
    the temporary one removed. Returns `path`."""
    tmp = _temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def write_text(path: str, text: str) -> str:
    """Write `text` to `path` atomically (temporary file in the same directory + `os.replace`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, write)


def write_json(path: str, obj: Any, indent: int | None = 2) -> str:
    """`obj` as JSON in `path`, atomically; the text is made before the file is touched."""
    return write_text(path, json.dumps(obj, indent=indent))


def read_json(path: str, fix: str) -> Any:
    """Parse the JSON file `path`; an unreadable or garbled one raises CheckpointError naming the
    file and `fix` (what the user does about it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); {fix}") from None


def append_line(path: str, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line. A torn last line (a killed writer) is ended first, so it
    never merges with the new record; `read_lines` then skips it."""
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def read_lines(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, skipping (with a warning) lines that do not parse: a line
    torn by a killed writer. Missing file: []."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                logging.warning("%s line %d is torn (a writer was killed); skipped", path, n)
    return rows


# ----------------------------------------------------------------------------------------------------
# The lock


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a re-used pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {when}"


def _stale(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and is gone (pid dead, or re-used by a newer process)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    start = holder.get("pid_start")
    return start is not None and _pid_start(pid) not in (None, start)


class WorkdirLock:
    """An exclusive claim on a workdir for one run; `acquire` / `release`, or use as a context manager."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False
        self._token = uuid.uuid4().hex

    def _holder(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
                "since": time.time(), "token": self._token}

    def _create(self) -> bool:
        """Make the lock file with this process's record; False if it exists already."""
        text = json.dumps(self._holder())
        tmp = _temp_path(self.path)
        with open(tmp, "w") as f:
            f.write(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno in _READ_ONLY:
                raise
            # no hard links on this filesystem: exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _read(self) -> tuple[dict[str, Any] | None, str]:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None, ""
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), text

    def acquire(self) -> WorkdirLock:
        """Take the lock. ConfigError when another live run holds it (naming it and the fix);
        OSError (EACCES/EROFS) when the workdir is not writable."""
        for _ in range(3):
            if self._create():
                self.held = True
                atexit.register(self.release)
                return self
            holder, text = self._read()
            if holder is None:
                continue  # released in between: try again
            if not holder:
                raise ConfigError(
                    f"{self.path} is not a lock file this library wrote (garbled: {text[:60]!r}); "
                    "if no other run uses this workdir, delete it and rerun.")
            if not _stale(holder):
                where = ("" if holder.get("host") == socket.gethostname() else
                         " on another host (this one cannot check it)")
                raise WorkdirBusy(
                    f"{self.workdir} is in use by another run{where} ({_describe(holder)}); wait "
                    f"for it to end or use another --workdir (if that job is gone, delete {self.path}).")
            self._take_over(holder, text)
        raise WorkdirBusy(f"{self.path} keeps changing (several runs starting on this workdir?); "
                          "start one run per --workdir.")

    def _take_over(self, holder: dict[str, Any], text: str) -> None:
        """Set a stale lock aside; if it changed since it was read (another starter took it over
        first), put it back and let the next attempt see that one."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        with open(aside) as f:
            now = f.read()
        if now != text:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            logging.warning("%s: taking over the lock of a run that is gone (%s)", self.workdir,
                            _describe(holder))
        os.remove(aside)

    def release(self) -> None:
        """Remove the lock file if it is still this process's; idempotent."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        holder, _ = self._read()
        if holder and holder.get("token") == self._token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def claim(workdir: str, *, primary: bool, read_only_ok: bool) -> Iterator[bool]:
    """Hold the workdir's lock for a run (process 0 only: the other processes of the same job share
    its claim; a nested claim of the same workdir in the same thread shares the outer one).
    Yields whether the run may write to the workdir: False only when `read_only_ok`
    (mode=eval) and the workdir is not writable; training there raises ConfigError naming it."""
    held = (os.path.realpath(workdir), threading.get_ident())
    if not primary or held in _HELD:  # a sweep worker claimed the cell, then runs it here
        yield True
        return
    lock = WorkdirLock(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        lock.acquire()
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        if not read_only_ok:
            raise ConfigError(
                f"{workdir} is not writable ({e.strerror}); training writes its checkpoints and "
                "results there: use a writable --workdir (or --config.mode=eval to only evaluate "
                "what it holds).") from None
        logging.warning("%s is not writable: evaluating without updating results.json or plots",
                        workdir)
        yield False
        return
    _HELD.add(held)
    try:
        yield True
    finally:
        _HELD.discard(held)
        lock.release()
