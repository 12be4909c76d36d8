"""The workdir's lock (one run at a time, stale takeover), atomic small files and clear read errors."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from vpns_jax import experiment, report
from vpns_jax import workdir as wd
from vpns_jax.config import default_config
from vpns_jax.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lock_record(tmp_path):
    with open(tmp_path / wd.LOCK_FILE) as f:
        return json.load(f)


def _write_lock(tmp_path, **holder):
    with open(tmp_path / wd.LOCK_FILE, "w") as f:
        json.dump(holder, f)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------------
# Lock


def test_lock_records_the_holder_and_is_released(tmp_path):
    with wd.WorkdirLock(str(tmp_path)) as lock:
        holder = _lock_record(tmp_path)
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        assert lock.held
    assert not (tmp_path / wd.LOCK_FILE).exists()
    assert os.listdir(tmp_path) == []  # no temporary file left either
    with wd.WorkdirLock(str(tmp_path)):  # free again
        pass


def test_second_process_is_refused_naming_the_holder(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from vpns_jax import workdir
        with workdir.WorkdirLock({str(tmp_path)!r}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError) as e:
            wd.WorkdirLock(str(tmp_path)).acquire()
        message = str(e.value)
        assert f"pid {child.pid}" in message and socket.gethostname() in message
        assert "in use by another run" in message and "delete" in message
        assert _lock_record(tmp_path)["pid"] == child.pid  # the holder's lock is untouched
    finally:
        child.communicate("\n", timeout=30)
    assert child.returncode == 0
    assert not (tmp_path / wd.LOCK_FILE).exists()  # released by the child at its exit


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead, since=0)
    with wd.WorkdirLock(str(tmp_path)):
        assert _lock_record(tmp_path)["pid"] == os.getpid()
    assert any("taking over" in r.getMessage() and f"pid {dead}" in r.getMessage()
               for r in caplog.records)
    assert os.listdir(tmp_path) == []


def test_reused_pid_is_stale_but_a_live_one_is_not(tmp_path):
    me = os.getpid()
    _write_lock(tmp_path, host=socket.gethostname(), pid=me, pid_start="1", since=0)
    with wd.WorkdirLock(str(tmp_path)):  # pid alive but started later: a re-used pid
        assert _lock_record(tmp_path)["pid_start"] == wd._pid_start(me) != "1"
    _write_lock(tmp_path, host=socket.gethostname(), pid=me, pid_start=wd._pid_start(me), since=0)
    with pytest.raises(ConfigError, match=f"pid {me}"):
        wd.WorkdirLock(str(tmp_path)).acquire()


def test_lock_from_another_host_is_refused_with_the_fix(tmp_path):
    _write_lock(tmp_path, host="elsewhere-node-7", pid=_dead_pid(), since=1.7e9)
    with pytest.raises(ConfigError) as e:
        wd.WorkdirLock(str(tmp_path)).acquire()
    message = str(e.value)
    assert "another host" in message and "elsewhere-node-7" in message
    assert "2023-11-14 22:13:20 UTC" in message  # since=1.7e9 s, as a date
    assert f"delete {tmp_path / wd.LOCK_FILE}" in message


def test_garbled_lock_is_refused(tmp_path):
    (tmp_path / wd.LOCK_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="garbled.*delete it"):
        wd.WorkdirLock(str(tmp_path)).acquire()


def test_claim_only_process_0_locks_and_releases_on_error(tmp_path):
    other = tmp_path / "other"
    with wd.claim(str(other), primary=False, read_only_ok=False) as writable:
        assert writable and not (other / wd.LOCK_FILE).exists()
    with pytest.raises(RuntimeError), wd.claim(str(tmp_path), primary=True, read_only_ok=False):
        assert (tmp_path / wd.LOCK_FILE).exists()
        raise RuntimeError("boom")
    assert not (tmp_path / wd.LOCK_FILE).exists()


def _read_only(monkeypatch):
    def refuse(self):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.path)
    monkeypatch.setattr(wd.WorkdirLock, "_create", refuse)


def test_read_only_workdir_training_refused_eval_allowed(tmp_path, monkeypatch):
    _read_only(monkeypatch)
    with pytest.raises(ConfigError) as e, wd.claim(str(tmp_path), primary=True, read_only_ok=False):
        pass
    assert str(e.value).startswith(f"{tmp_path} is not writable (Read-only file system)")
    assert "--config.mode=eval" in str(e.value)
    with wd.claim(str(tmp_path), primary=True, read_only_ok=True) as writable:
        assert writable is False


# ----------------------------------------------------------------------------------------------------
# Atomic files


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    wd.write_json(path, {"v": 1})

    def fail(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        wd.write_json(path, {"v": 2})
    monkeypatch.undo()
    with pytest.raises(TypeError):  # not serialisable: fails before the file is touched
        wd.write_json(path, {"v": object()})
    with pytest.raises(ValueError):  # fails half-way through writing the temporary file
        wd.atomic_write(path, lambda tmp: (open(tmp, "w").write('{"v": 3'), int("x")))
    assert json.loads(open(path).read()) == {"v": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_sparsity_and_results_files_are_written_whole(tmp_path):
    summary = {"total": 0.5, "layers": {"conv": 0.25}}
    path = report.save_layer_sparsity(str(tmp_path), "vpns", 0.5, summary)
    assert path == str(tmp_path / "sparsity" / "vpns_0.5.json")
    assert json.load(open(path)) == summary and os.listdir(tmp_path / "sparsity") == ["vpns_0.5.json"]
    results = {"runs": [{"method": "vpns"}], "dense": None}
    report.save_results(str(tmp_path), results)
    assert report.load_results(str(tmp_path)) == results


def test_metrics_torn_last_line_is_skipped_and_ended(tmp_path):
    report.append_metrics(str(tmp_path), {"epoch": 1, "loss": 0.5})
    with open(tmp_path / report.METRICS_FILE, "a") as f:
        f.write('{"epoch": 2, "lo')  # a writer killed mid-line
    assert report.load_metrics(str(tmp_path)) == [{"epoch": 1, "loss": 0.5}]
    report.append_metrics(str(tmp_path), {"epoch": 2, "loss": 0.25})
    assert report.load_metrics(str(tmp_path)) == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    assert (tmp_path / report.METRICS_FILE).read_text().count("\n") == 3


# ----------------------------------------------------------------------------------------------------
# Unreadable files, config.json rewrites


@pytest.mark.parametrize("text", ['{"dataset": "dig', "\x00\x01\x02", "[1, 2]"])
def test_garbage_config_json_is_one_clear_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(CheckpointError) as e:
        experiment._saved_config(str(tmp_path))
    assert str(e.value).startswith(f"{path} ") and "restore it" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ['{"runs": [', "", '{"dense": null}'])
def test_garbage_results_json_is_one_clear_error(tmp_path, text):
    path = tmp_path / "results.json"
    path.write_text(text)
    with pytest.raises(CheckpointError) as e:
        report.load_results(str(tmp_path))
    assert str(e.value).startswith(f"{path} ") and "delete it to recompute" in str(e.value)


def test_config_json_written_only_when_new_or_changed(tmp_path):
    config, path = default_config(), tmp_path / "config.json"
    experiment._check_or_write_config(config, str(tmp_path), True, write=False)
    assert not path.exists()  # eval: never written
    experiment._check_or_write_config(config, str(tmp_path), True)
    first = os.stat(path)
    assert json.loads(path.read_text())["dataset"] == config.dataset
    experiment._check_or_write_config(config, str(tmp_path), True)
    assert os.stat(path).st_ino == first.st_ino  # unchanged: not rewritten
    config.log_every_steps += 1
    experiment._check_or_write_config(config, str(tmp_path), True, write=False)
    assert os.stat(path).st_ino == first.st_ino
    experiment._check_or_write_config(config, str(tmp_path), True)
    assert os.stat(path).st_ino != first.st_ino  # changed (a harmless field): replaced whole
    assert json.loads(path.read_text())["log_every_steps"] == config.log_every_steps
