"""Entry point: `python -m vpns_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.x=v]`.

Only flags, platform set-up and dispatch live here; the work is in `vpns_jax.experiment`.
"""

from __future__ import annotations

import difflib
import glob
import logging as std_logging
import os
import re
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from vpns_jax import preemption
from vpns_jax.errors import Diverged, VpnsError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/<file>.py[:args]; fields can be overridden with --config.x=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: config, checkpoints (a rerun resumes), results.json, plots.")


_USAGE = "python -m vpns_jax.main --config configs/<file>.py[:args] --workdir DIR [--config.x=v]"
_LIBRARY_LOGS = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/", "/jax/_src/xla_bridge")


class _QuietLibraries(std_logging.Filter):
    """Keep the libraries' INFO chatter (orbax logs every save step) out of the run's log."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in _LIBRARY_LOGS)


def setup_platform(compilation_cache: str, distributed: bool, timeout_s: float = 300) -> None:
    """CPU malloc settings, persistent compilation cache, (multi-host) distributed initialisation."""
    from vpns_jax import cpu_malloc

    cpu_malloc.keep_freed_memory()  # before the backend starts its threads
    import jax

    if compilation_cache != "off":
        path = compilation_cache or os.path.expanduser("~/.cache/vpns_jax/jax_cache")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from vpns_jax import parallel

    # True forces jax.distributed.initialize(); None lets SLURM / TPU multi-process launches be detected.
    explicit = distributed or os.environ.get("VPNS_DISTRIBUTED") == "1"
    parallel.initialize_distributed(True if explicit else None, timeout_s=timeout_s)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    if jax.devices()[0].platform == "cpu":
        logging.info("CPU allocator: %s", cpu_malloc.malloc_name())


def _usage_error(message: str) -> NoReturn:
    """One line and exit code 2 (absl's UsageError would print the whole flag help first)."""
    print(f"error: {message} (usage: {_USAGE}; --help lists the flags)", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        _usage_error("--config is required, e.g. --config configs/quickstart.py")
    if not _WORKDIR.value:
        _usage_error("--workdir is required: the run's directory (a rerun resumes there)")
    config = _CONFIG.value
    logging.get_absl_handler().addFilter(_QuietLibraries())
    setup_platform(config.compilation_cache, config.distributed, config.distributed_timeout_s)
    from vpns_jax import experiment

    experiment.run(config, _WORKDIR.value)


def _user_error(exc: BaseException) -> VpnsError | None:
    """The `VpnsError` behind `exc` (config files raise it inside flag parsing), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, VpnsError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _last_user_message(text: str) -> str | None:
    """config_flags re-raises a config file's error as formatted text: recover its message."""
    found = re.findall(r"vpns_jax\.errors\.\w+: (.*)", text)
    return found[-1] if found else None


def unknown_field(argv: list[str]) -> str | None:
    """A one-line message for the first `--config.a.b=v` that names no field of the config (e.g. an
    option a method does not have), listing the fields that exist there."""
    from ml_collections import ConfigDict

    from vpns_jax import config as config_lib

    defaults = config_lib.default_config()
    for arg in argv:
        found = re.match(r"--config\.([\w.]+)", arg)
        if not found:
            continue
        parts, node = found.group(1).split("."), defaults
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(["config", *parts[:i]])
                names = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                near = difflib.get_close_matches(part, names, n=3)
                hint = f" did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
                return (f"{where} has no option {part!r} (from --config.{found.group(1)});{hint} "
                        f"its options: {', '.join(names) or 'none'}.")
            node = node[part]
    return None


def config_file_arg(argv: list[str]) -> str | None:
    """The file named by `--config FILE[:args]` / `--config=FILE[:args]` in argv, if any."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--config=", "-config=")):
            value = arg.split("=", 1)[1]
        else:
            continue
        return value.split(":", 1)[0]
    return None


def missing_config_file(argv: list[str]) -> str | None:
    """A one-line message when `--config` names a file that does not exist, listing configs/*.py."""
    path = config_file_arg(argv)
    if not path or os.path.isfile(path):
        return None
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(shipped, "*.py")))
    where = os.path.relpath(shipped)
    where = shipped if where.startswith("..") else where
    return (f"config file {path} does not exist; the shipped configs in {where}/: "
            f"{', '.join(names) or 'none'}.")


def _parse_flags(argv: list[str]) -> list[str]:
    missing = missing_config_file(argv[1:])
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
        print(f"error: {unknown_field(argv) or e}", file=sys.stderr)
        sys.exit(2)
    except SyntaxError as e:  # a config file that is not valid Python: where, not a traceback
        print(f"error: config file {e.filename}, line {e.lineno}: {e.msg}: "
              f"{(e.text or '').strip()!r}", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        cause = _user_error(e)
        text = str(cause if cause is not None else e)
        message = _last_user_message(text) or text
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Console entry: user errors print one clear message instead of a traceback. Exit codes: 0 done,
    2 a user error, 3 diverged (`config.on_nonfinite`), 75 stopped by SIGTERM / SIGINT /
    `config.max_hours` after saving (rerun to resume)."""
    try:
        app.run(main, flags_parser=_parse_flags)
    except preemption.Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(preemption.EXIT_STOPPED)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(preemption.EXIT_DIVERGED)
    except VpnsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C where nothing is saved on request (eval, set-up)
        print("interrupted (nothing was being trained; rerun the same command)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
