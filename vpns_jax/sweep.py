"""Sweeps: a grid of configs × method groups × seeds (× the sparsities inside each run), one workdir per cell.

    python -m vpns_jax.sweep --sweep configs/sweeps/proxy_methods.py --dir SWEEPDIR [--workers N]
    python -m vpns_jax.sweep summarize --dir SWEEPDIR
    python -m vpns_jax.sweep plot --dir SWEEPDIR [--out DIR]      (figures: vpns_jax.figures)

A sweep file (Python, like `configs/`) defines `get_sweep()` returning a `Sweep`: named base configs
(config files, `'configs/x.py:args'`, or ConfigDicts), `methods` (each entry is one cell per config and
seed; `'dense,omp,lth'` puts methods that share stages — the dense fine-tune, LTH's rounds — in one
workdir, computed once), the sparsities (every run of a cell: all share one compiled step) and the seeds.
A cell is `SWEEPDIR/cells/<config>/<methods>/seed_<s>/`, an ordinary workdir run by
`experiment.run`, so it resumes on its own; a cell whose results.json has every planned row is skipped.

Workers: any number of processes (on one machine, `--workers N`, or on several sharing the directory)
run the same command; each takes the next cell whose workdir lock (`vpns_jax.workdir`) it can get, and
skips cells held by another live worker, so no cell runs twice. A source model trained here (the
offline proxy) is made once per config under its own lock (`SWEEPDIR/sources/<config>/`), with the
config's `seed`, and shared by every seed's cells, as downloaded weights would be.

`SWEEPDIR/sweep.json` records the grid; a sweep with another grid in that directory is refused.
`config.seeds` of a single experiment uses the same machinery: WORKDIR/seed_<s>/ and WORKDIR/seeds.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections as mlc
from absl import logging

from vpns_jax import aggregate, data, experiment, methods, models, parallel, preemption
from vpns_jax import config as config_lib
from vpns_jax import workdir as workdir_lib
from vpns_jax.errors import ConfigError, VpnsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID_FILE = "sweep.json"
SEEDS_FILE = "seeds.json"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid. `configs`: name -> config file spec ('configs/cifar10.py:arch=resnet50', or a bare
    shipped name 'quickstart') or a ConfigDict. `methods`: one entry per cell; comma-joined methods
    share one workdir (and its shared stages). `sparsities`, `seeds`: every cell runs all sparsities
    and has one seed; empty = the config's own. `overrides`: dotted fields set on every config."""

    configs: Mapping[str, str | mlc.ConfigDict]
    methods: Sequence[str] = ()
    sparsities: Sequence[float] = ()
    seeds: Sequence[int] = ()
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Cell:
    """One workdir of a sweep: a config, a group of methods, one seed, every sparsity."""

    name: str  # '<config>/<methods joined by +>/seed_<s>', also its directory under cells/
    dir: str  # relative to the sweep directory
    config_name: str
    methods: str
    seed: int
    config: mlc.ConfigDict
    keys: dict[tuple[str, float], str]  # (method, sparsity) -> results.json row key
    runs: list[str]  # run names (final/<name>)

    def record(self) -> dict[str, Any]:
        """The cell as the grid file lists it (what `aggregate.missing_rows` expects)."""
        return {"name": self.name, "dir": self.dir, "config": self.config_name,
                "methods": self.methods, "seed": self.seed,
                "runs": [[m, s] for m, s in self.keys]}


# ----------------------------------------------------------------------------------------------------
# Loading sweep and config files


def _shipped(pattern: str) -> list[str]:
    return sorted(os.path.splitext(os.path.basename(f))[0]
                  for f in glob.glob(os.path.join(ROOT, pattern)))


def _import(path: str, what: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_vpns_{what}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{what} file {e.filename}, line {e.lineno}: {e.msg}") from None
    return module


def load_sweep(path: str) -> Sweep:
    """The `Sweep` that `get_sweep()` of the Python file `path` returns."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file {path} does not exist; the shipped sweeps in configs/sweeps/: "
                          f"{', '.join(_shipped('configs/sweeps/*.py')) or 'none'}.")
    module = _import(path, "sweep")
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"sweep file {path} defines no get_sweep() returning a vpns_jax.sweep.Sweep.")
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"get_sweep() of {path} returned a {type(sweep).__name__}, not a "
                          "vpns_jax.sweep.Sweep.")
    return sweep


def load_config(spec: str | mlc.ConfigDict, name: str = "") -> mlc.ConfigDict:
    """A config from a ConfigDict (copied) or a config file spec 'FILE.py[:args]' (a bare name is
    configs/<name>.py); an unknown file is one line listing the shipped configs."""
    if isinstance(spec, mlc.ConfigDict):
        return mlc.ConfigDict(spec.to_dict())
    path, _, arg = str(spec).partition(":")
    candidates = [path, os.path.join(ROOT, path), os.path.join(ROOT, "configs", path + ".py")]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise ConfigError(f"sweep config {name!r}: config file {path!r} does not exist; known configs "
                          f"(configs/): {', '.join(_shipped('configs/*.py'))}.")
    module = _import(found, "config")
    config = module.get_config(arg) if arg else module.get_config()
    return mlc.ConfigDict(config.to_dict())


# ----------------------------------------------------------------------------------------------------
# Cells


def _group_methods(group: str) -> list[str]:
    return [m.strip() for m in group.split(",") if m.strip()]


def make_cell(rel: str, name: str, config_name: str, config: mlc.ConfigDict,
              seed: int) -> Cell:
    """A cell of `config` (methods and sparsities set) with `seed`; its runs validated."""
    c = mlc.ConfigDict(config.to_dict())
    c.seed = int(seed)
    c.seeds = ()
    try:
        config_lib.validate(c, known_archs=models.ARCHS, known_datasets=data.registry.names())
        runs = experiment.plan(c)
    except ConfigError as e:
        raise ConfigError(f"sweep cell {name}: {e}") from None
    base = experiment.base_key(c)
    keys = {(r.method, float(r.sparsity)): experiment.row_key(base, r) for r in runs}
    return Cell(name=name, dir=rel, config_name=config_name, methods=str(c.methods), seed=int(seed),
                config=c, keys=keys, runs=[r.name for r in runs])


def source_path(directory: str, config_name: str, config: mlc.ConfigDict) -> str | None:
    """Where a config's shared proxy source model goes (None: it uses given weights)."""
    if not config.proxy.dataset or str(config.weights).strip():
        return None
    return os.path.join(os.path.abspath(directory), "sources", config_name or ".",
                        f"proxy_{config.arch}.safetensors")


def _source_key(config: mlc.ConfigDict) -> str:
    """Everything `proxy.train_proxy` reads: two configs with the same key train the same model."""
    from vpns_jax import proxy

    fields = {"arch": config.arch, "width": config.model.width,
              "small_input": config.model.small_input, "proxy": config.proxy.to_dict(),
              "input_size": proxy.input_size(config),
              "seed": config.seed, "data": config.data.to_dict(), "data_dir": config.data_dir,
              "manual_dir": config.manual_dir}
    return json.dumps(fields, sort_keys=True, default=str)


@dataclasses.dataclass
class Plan:
    """A sweep's cells, its grid record (what sweep.json holds) and the shared source models to make
    first: (config with the seed to train it with, weights path)."""

    cells: list[Cell]
    grid: dict[str, Any]
    sources: list[tuple[mlc.ConfigDict, str]]


def plan_cells(sweep: Sweep, directory: str) -> Plan:
    """Every cell of `sweep` in `directory`, all validated before anything runs. Unknown config,
    method or dataset: one line naming it and the known ones."""
    if not sweep.configs:
        raise ConfigError("the sweep names no configs (Sweep(configs={'name': 'configs/x.py'}, ...)).")
    known_methods, known_datasets = methods.names(), data.registry.names()
    for group in sweep.methods:
        for m in _group_methods(group):
            if m not in known_methods:
                raise ConfigError(f"sweep: unknown method {m!r} (in methods entry {group!r}); known "
                                  f"methods: {', '.join(known_methods)}.")
    cells, grid_configs, sources = [], {}, []
    shared: dict[str, str] = {}  # _source_key -> source model path
    for config_name, spec in sweep.configs.items():
        if not _NAME.match(config_name):
            raise ConfigError(f"sweep config name {config_name!r} must be letters, digits, '_', '-', "
                              "'.' (it names a directory)")
        base = load_config(spec, config_name)
        config_lib.apply_overrides(base, dict(sweep.overrides))
        if base.dataset not in known_datasets:
            raise ConfigError(f"sweep config {config_name!r}: unknown dataset {base.dataset!r}; known "
                              f"datasets: {', '.join(known_datasets)}.")
        if sweep.sparsities:
            base.sparsities = tuple(float(s) for s in sweep.sparsities)
        source = source_path(directory, config_name, base)
        if source:
            # Configs whose source models would be trained identically share the first one's.
            key = _source_key(base)
            if key in shared:
                source = shared[key]
            else:
                shared[key] = source
                sources.append((mlc.ConfigDict(base.to_dict()), source))
            base.weights = source
        grid_configs[config_name] = experiment.config_fingerprint(base, with_methods=True)
        seeds = list(sweep.seeds) or list(base.seeds) or [int(base.seed)]
        for group in (list(sweep.methods) or [str(base.methods)]):
            for seed in seeds:
                c = mlc.ConfigDict(base.to_dict())
                c.methods = ",".join(_group_methods(group))
                name = f"{config_name}/{'+'.join(_group_methods(group))}/seed_{seed}"
                cells.append(make_cell(os.path.join("cells", name), name, config_name, c, seed))
    grid = {"configs": grid_configs, "methods": [",".join(_group_methods(g)) for g in sweep.methods],
            "sparsities": [float(s) for s in sweep.sparsities], "seeds": [int(s) for s in sweep.seeds],
            "overrides": dict(sweep.overrides)}
    return Plan(cells, json.loads(json.dumps(grid)), sources)


def _flat_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += _flat_differences(saved.get(k), current.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]


def record_grid(directory: str, grid: dict[str, Any], cells: Sequence[Cell],
                filename: str = GRID_FILE) -> None:
    """Create `directory/filename` with the grid and its cells, atomically (exactly one of several
    starting workers writes it); refuse (ConfigError naming the differences) when it holds another
    grid."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    record = {"grid": grid, "cells": [c.record() for c in cells]}
    text = json.dumps(record, indent=2)
    tmp = os.path.join(directory, f".{filename}.{os.getpid()}.{time.time_ns()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)  # fails if it exists: the first writer's grid is the sweep's
        return
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)
    saved = workdir_lib.read_json(path, "restore it or use a new directory")
    differences = _flat_differences(saved.get("grid"), grid)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more"
                                               if len(differences) > 4 else "")
        raise ConfigError(
            f"{directory} holds a sweep with a different grid ({shown}); one directory holds one "
            "grid, so results of both would mix: use a new --dir, or the sweep file it was made "
            f"with ({path} records its grid).")


def cell_done(directory: str, cell: Cell) -> bool:
    """True when the cell's results.json has every planned row under this config (row keys) and
    each run's final state directory exists."""
    workdir = os.path.join(directory, cell.dir)
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return False
    try:
        rows = json.load(open(path))["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: the cell's run sets it aside and rebuilds it
    keys = {(r["method"], float(r["sparsity"])): r.get("key") for r in rows
            if r.get("seed") == cell.seed}
    return (all(keys.get(k) == v for k, v in cell.keys.items())
            and all(os.path.isdir(os.path.join(workdir, "final", n)) for n in cell.runs))


def prepare_source(config: mlc.ConfigDict, path: str | None, *, poll_s: float = 2.0) -> None:
    """Train the shared proxy source model into `path` once (with `config.seed`), under the lock of
    its directory; another worker training it is waited for. Nothing to do without a proxy or when
    the file exists."""
    if path is None or os.path.exists(path) or config.mode != "train":
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    info = parallel.process_info()
    while not os.path.exists(path):
        try:
            with workdir_lib.claim(directory, primary=info.is_primary, read_only_ok=False), \
                    preemption.StopRequests(config.max_hours) as stops:
                if not os.path.exists(path):
                    from vpns_jax import proxy

                    for name in (config.proxy.dataset, config.dataset):
                        data.ensure_prepared(name, data_dir=config.data_dir or None,
                                             manual_dir=config.manual_dir or None)
                    logging.info("training the shared source model %s (seed %d)", path, config.seed)
                    proxy.train_proxy(config, path, data_dir=config.data_dir or None, stops=stops)
            parallel.barrier("shared source model")
        except workdir_lib.WorkdirBusy:
            logging.info("another worker trains the source model %s; waiting", path)
            time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------------
# Running


def _run_cell(directory: str, cell: Cell) -> dict[str, Any]:
    """Run (or resume) one cell's workdir; WorkdirBusy when another worker holds it."""
    return experiment.run(cell.config, os.path.join(directory, cell.dir))


@dataclasses.dataclass
class WorkerReport:
    """What one worker did: cells it ran, found finished, and found held by another worker."""

    ran: list[str] = dataclasses.field(default_factory=list)
    finished_before: list[str] = dataclasses.field(default_factory=list)
    held: list[str] = dataclasses.field(default_factory=list)


def run_worker(directory: str, cells: Sequence[Cell],
               on_cell_done: Callable[[Cell], None] | None = None) -> WorkerReport:
    """Run every cell not finished and not held by another worker, in order; a cell's error
    stops the worker, naming the cell (a rerun resumes it)."""
    out = WorkerReport()
    primary = parallel.process_info().is_primary
    for n, cell in enumerate(cells, start=1):
        if cell_done(directory, cell):
            out.finished_before.append(cell.name)
            continue
        try:  # claimed before it is checked again: another worker may have just finished it
            with workdir_lib.claim(os.path.join(directory, cell.dir), primary=primary,
                                   read_only_ok=False):
                if cell_done(directory, cell):
                    out.finished_before.append(cell.name)
                    continue
                logging.info("sweep cell %d/%d: %s", n, len(cells), cell.name)
                _run_cell(directory, cell)  # experiment.run shares this claim
        except workdir_lib.WorkdirBusy:
            logging.info("sweep cell %s is held by another worker; next", cell.name)
            out.held.append(cell.name)
            continue
        except VpnsError as e:
            raise type(e)(f"sweep cell {cell.name}: {e}") from None
        except preemption.Stopped as e:
            raise preemption.Stopped(f"sweep cell {cell.name}: {e} (rerun the sweep command: "
                                     "finished cells are skipped)") from None
        out.ran.append(cell.name)
        if on_cell_done is not None:
            on_cell_done(cell)
    return out


def run_sweep(sweep: Sweep | str, directory: str, *,
              on_cell_done: Callable[[Cell], None] | None = None,
              print_summary: bool = True) -> tuple[WorkerReport, dict[str, Any]]:
    """One worker of a sweep (what the command runs): validate every cell, record (or check) the
    grid, make the shared source models, run the open cells, then summarize what exists."""
    directory = os.path.abspath(directory)
    if isinstance(sweep, str):
        sweep = load_sweep(sweep)
    plan = plan_cells(sweep, directory)
    cells = plan.cells
    record_grid(directory, plan.grid, cells)
    for config, path in plan.sources:
        prepare_source(config, path)
    done = run_worker(directory, cells, on_cell_done)
    summary = aggregate.summarize(directory, [c.record() for c in cells])
    if print_summary:
        print(aggregate.format_summary(summary), flush=True)
        if done.held:
            print(f"{len(done.held)} cells are held by other workers (they finish them): "
                  f"{', '.join(done.held)}", flush=True)
    return done, summary


def summarize_dir(directory: str, *, write: bool = True) -> dict[str, Any]:
    """`aggregate.summarize` of a sweep directory (sweep.json) or a seeds workdir (seeds.json)."""
    for name in (GRID_FILE, SEEDS_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            cells = workdir_lib.read_json(path, "restore it (it lists the cells)")["cells"]
            return aggregate.summarize(directory, cells, write=write)
    raise ConfigError(f"{directory} holds no sweep ({GRID_FILE}) and no seeds workdir ({SEEDS_FILE}); "
                      "give the --dir of `python -m vpns_jax.sweep --sweep ...` or the --workdir of a "
                      "run with --config.seeds.")


# ----------------------------------------------------------------------------------------------------
# config.seeds of one experiment


def seed_cells(config: mlc.ConfigDict, workdir: str) -> list[Cell]:
    """One cell per seed of `config.seeds`: WORKDIR/seed_<s>/, sharing WORKDIR's source model."""
    base = mlc.ConfigDict(config.to_dict())
    base.weights = experiment.weights_path(config, workdir)  # given weights, or WORKDIR's proxy
    return [make_cell(f"seed_{s}", f"seed_{s}", "", base, s) for s in config.seeds]


def refuse_seeds_workdir(workdir: str) -> None:
    """A single-seed run in a workdir made by config.seeds is refused (its runs are in seed_<s>/)."""
    if os.path.exists(os.path.join(workdir, SEEDS_FILE)):
        raise ConfigError(
            f"{workdir} holds runs for several seeds ({SEEDS_FILE}, seed_<s>/); pass "
            "--config.seeds=... again, or use --workdir WORKDIR/seed_<s> for one of them.")


def run_seeds(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
    """Every run for each of `config.seeds`, one workdir per seed (WORKDIR/seed_<s>/); the proxy
    source model, when one is trained, is made once with `config.seed`. Prints and writes (WORKDIR/
    summary.json, summary.md) the mean ± std over seeds. Returns {'runs': every seed's rows,
    'summary': ...}."""
    config_lib.validate(config, known_archs=models.ARCHS, known_datasets=data.registry.names())
    if os.path.exists(os.path.join(workdir, "config.json")):
        raise ConfigError(f"{workdir} holds a single-seed run (config.json); --config.seeds runs "
                          "one workdir per seed inside a new --workdir: use another one.")
    cells = seed_cells(config, workdir)
    info = parallel.process_info()
    grid = {"config": json.loads(json.dumps(experiment.config_fingerprint(config)))}
    with workdir_lib.claim(workdir, primary=info.is_primary,
                           read_only_ok=config.mode == "eval") as writable:
        if writable and info.is_primary:
            _record_seeds(workdir, grid, cells)
        if config.proxy.dataset:  # with config.seed, once for every seed
            prepare_source(config, experiment.weights_path(config, workdir))
        rows = []
        for cell in cells:
            logging.info("seed %d (%s)", cell.seed, cell.dir)
            rows += experiment.run(cell.config, os.path.join(workdir, cell.dir))["runs"]
        summary = aggregate.summarize(workdir, [c.record() for c in cells],
                                      write=writable and info.is_primary)
    if info.is_primary:
        print(f"\nOver seeds {', '.join(map(str, config.seeds))} ({workdir}/summary.md):\n"
              f"{aggregate.format_summary(summary)}\n", flush=True)
    return {"runs": rows, "dense": None, "summary": summary}


def _record_seeds(workdir: str, grid: dict[str, Any], cells: Sequence[Cell]) -> None:
    """WORKDIR/seeds.json: the config (its seeds may grow between reruns; nothing else may change)."""
    path = os.path.join(workdir, SEEDS_FILE)
    if os.path.exists(path):
        saved = workdir_lib.read_json(path, "restore it or use a new --workdir")
        differences = _flat_differences(saved.get("grid"), grid)
        if differences:
            raise ConfigError(f"{workdir} holds seeds of a different config "
                              f"({'; '.join(differences[:4])}); use a new --workdir.")
    workdir_lib.write_json(path, {"grid": grid, "cells": [c.record() for c in cells]})


# ----------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpns_jax.sweep", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="run", choices=("run", "summarize", "plot"))
    p.add_argument("--sweep", help="sweep file (configs/sweeps/<file>.py) defining get_sweep()")
    p.add_argument("--dir", required=True, help="sweep directory (cells/, sweep.json, summary.*)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine (each takes the next free cell)")
    p.add_argument("--out", help="plot: the figures' folder (default DIR/figures/)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns the exit code (2: a user error, 75: stopped, resume by rerunning)."""
    args = _parser().parse_args(argv)
    if args.command == "plot":  # vpns_jax.figures: every figure of the sweep's data so far
        from vpns_jax import figures

        return figures.run_cli(args.dir, args.out)
    from vpns_jax import main as main_lib

    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(main_lib._QuietLibraries())  # orbax's per-save chatter
    logging.set_verbosity(logging.INFO)
    try:
        if args.command == "summarize":
            print(aggregate.format_summary(summarize_dir(args.dir)), flush=True)
            return 0
        if not args.sweep:
            raise ConfigError("--sweep FILE is required to run a sweep (configs/sweeps/<file>.py)")
        if args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: expected an integer >= 1")
        sweep = load_sweep(args.sweep)
        plan = plan_cells(sweep, args.dir)  # every user error before anything starts
        record_grid(os.path.abspath(args.dir), plan.grid, plan.cells)
        if args.workers > 1:
            return _spawn(args)
        main_lib.setup_platform(plan.cells[0].config.compilation_cache, False)
        run_sweep(sweep, args.dir)
        return 0
    except preemption.Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return preemption.EXIT_STOPPED
    except VpnsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _spawn(args: argparse.Namespace) -> int:
    """`--workers N`: N worker processes of the same sweep, logs in DIR/logs/worker_<i>.log."""
    logs = os.path.join(args.dir, "logs")
    os.makedirs(logs, exist_ok=True)
    command = [sys.executable, "-m", "vpns_jax.sweep", "run", "--sweep", args.sweep, "--dir", args.dir]
    procs = []
    for i in range(args.workers):
        log = open(os.path.join(logs, f"worker_{i}.log"), "a")
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)  # stagger the starts (each claims the next free cell)
    print(f"{args.workers} workers running; logs in {logs}/", flush=True)
    # SIGTERM (a scheduler) goes to every worker: each saves and stops (exit 75); Ctrl-C reaches
    # them from the terminal's process group, so this process only waits for them.
    signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p, _ in procs])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    codes = []
    for proc, log in procs:
        codes.append(proc.wait())
        log.close()
    print(aggregate.format_summary(summarize_dir(args.dir)), flush=True)
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"{len(bad)} workers ended with exit codes {bad}; see {logs}/", file=sys.stderr)
    return max(codes)


if __name__ == "__main__":  # run the imported module, whose Sweep class the sweep files use
    from vpns_jax import sweep as _module

    sys.exit(_module.main())
