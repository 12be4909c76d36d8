"""One experiment: every configured method at every sparsity level, each from the pretrained weights.

`run(config, workdir)` is what `python -m vpns_jax.main` calls. For each (method, sparsity) it builds a
fresh state from the pretrained variables, makes the first mask and the label mapping, runs the method's
stages with the generic loop (checkpointing after every epoch, so a rerun resumes), evaluates with and
without the prompt, saves the final state, and adds a row to `results.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from flax import traverse_util

from vpns_jax import (
    checkpoint,
    data,
    methods,
    models,
    parallel,
    preemption,
    prompts,
    report,
    runner,
    sparsity,
    structured_rows,
    tb,
    train,
    transfer,
)
from vpns_jax import config as config_lib
from vpns_jax import weights as weights_lib
from vpns_jax import workdir as workdir_lib
from vpns_jax.data import device_augment
from vpns_jax.errors import CheckpointError, ConfigError
from vpns_jax.methods.plan import Run, run_id

_SECOND_LOADER = 1_000_003  # seed offset of the 'train_b' loader
# Fields that do not change what a run computes (a rerun may change them and still resume), each
# with the only functions that may read it: speed, logging, checkpoint frequency, job control, and
# which runs exist (each row's key holds its own method options and sparsity). Every other field is
# in the resume check. tests/test_experiment.py records every config read of a whole run and fails
# when a field left out here is read anywhere else.
_E, _R, _P, _M = "vpns_jax.experiment.", "vpns_jax.runner.", "vpns_jax.proxy.", "vpns_jax.main."
NON_SEMANTIC: dict[str, tuple[str, ...]] = {
    "mode": (_E + "run", _E + "_run", _E + "setup"),
    "methods": ("vpns_jax.config.method_list",),
    "sparsities": ("vpns_jax.methods.plan.sparsity_levels",),
    # several seeds run as one workdir per seed (vpns_jax.sweep), each with seeds=() and its seed
    "seeds": (_E + "run", "vpns_jax.sweep.run_seeds", "vpns_jax.sweep.seed_cells"),
    "log_every_steps": (_R + "_train", _P + "_train", _P + "train_proxy"),
    "eval_every_epochs": (_R + "_train",),  # evaluations only (eval mode, no rng): tests/test_metrics.py
    "checkpoint_every_epochs": (_R + "_train.<locals>.epoch_hook", _P + "_train.<locals>.epoch_hook"),
    "checkpoint_every_steps": (_R + "_train", _P + "_train"),
    "compilation_cache": (_M + "main",),
    "plots": (_E + "_report",),
    "distributed": (_M + "main",),
    "distributed_timeout_s": (_M + "main",),
    "eval_batch_size": (_E + "eval_batch_size",),  # batches of passes counted per example
    "max_hours": (_E + "run",),
    "on_nonfinite": (_E + "setup", _R + "_train"),
    "data.worker_count": (_E + "data_options", _P + "train_proxy"),
    "data.num_threads": (_E + "data_options", _P + "train_proxy"),
    "data.prefetch": (_E + "data_options", _P + "train_proxy"),
}
# Fields added after workdirs existed: at this value a field is left out of the fingerprint (and so of
# every stage key), so workdirs made before it resume unchanged; any other value is in the resume check.
NEUTRAL: dict[str, Any] = {"mask_from": "", "proxy.input_size": 0}
_PER_HOST = ("compilation_cache", "data.worker_count", "data.num_threads", "data.prefetch")


@dataclasses.dataclass
class Context:
    """What every run of an experiment shares."""

    config: mlc.ConfigDict
    workdir: str
    arch: str
    model: Any
    pretrained: dict[str, Any]
    weights_meta: dict[str, Any]
    num_source: int
    num_target: int
    prompt_spec: prompts.PromptSpec
    mesh: jax.sharding.Mesh
    loaders: dict[str, Any]
    eval_loader: Any
    primary: bool
    runs: list[Run]
    env: runner.Env | None = None
    previous: dict[str, Any] = dataclasses.field(default_factory=dict)  # saved config.json, all fields
    writable: bool = True  # False: mode=eval in a read-only workdir (results.json, plots not written)

    def put(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host batch (this process's rows) → global device arrays sharded over the data axis."""
        return parallel.host_to_global(batch, self.mesh)

    def replicate(self, tree: Any) -> Any:
        """Every leaf replicated over the mesh (on several processes too)."""
        return parallel.to_replicated(tree, self.mesh)


# ----------------------------------------------------------------------------------------------------
# Set-up


def _config_without(config: mlc.ConfigDict, fields: Iterable[str]) -> dict[str, Any]:
    """The config as a plain dict without the (dotted) `fields`."""
    d = json.loads(config.to_json_best_effort())
    for field in fields:
        *parents, leaf = field.split(".")
        node = d
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    return d


def config_fingerprint(config: mlc.ConfigDict, *, with_methods: bool = False) -> dict[str, Any]:
    """The config fields that determine every run's results: data, model, weights, seed, label
    mapping, prompt geometry; with `with_methods` also the method subtrees (whose effect on a run is
    in its stage keys)."""
    d = _config_without(config, NON_SEMANTIC)
    for field, value in NEUTRAL.items():
        *parents, leaf = field.split(".")
        node = d
        for name in parents:
            node = node.get(name, {})
        if leaf in node and node[leaf] == value:
            node.pop(leaf)
    if not with_methods:
        for name in methods.names():
            d.pop(name, None)
    return d


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    flat_a = traverse_util.flatten_dict(saved, sep=".")
    flat_b = traverse_util.flatten_dict(current, sep=".")
    differ = sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))
    return ", ".join(f"{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}" for k in differ[:5])


def _saved_config(workdir: str) -> mlc.ConfigDict | None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    fix = ("restore it (it records the settings this workdir's checkpoints were made with), or "
           "use a new --workdir.")
    saved = workdir_lib.read_json(path, fix)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds no config (a JSON {type(saved).__name__}); {fix}")
    return mlc.ConfigDict(saved)


def _check_config(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
    """Refuse a workdir whose runs used other data/model settings (every row depends on them); a
    method's own options may change: its rows are then refused one by one (`run`). Returns the
    saved config's fingerprint with the method subtrees (empty for a new workdir)."""
    saved = _saved_config(workdir)
    if saved is not None:
        details = _differences(config_fingerprint(saved), config_fingerprint(config))
        if details:
            raise CheckpointError(
                f"{workdir} holds a run with a different config ({details}); resuming would mix "
                "them. Use a new --workdir, or the saved config.json's values.")
    return {} if saved is None else config_fingerprint(saved, with_methods=True)


def _write_config(config: mlc.ConfigDict, workdir: str, primary: bool) -> None:
    """Process 0 (atomically) rewrites config.json when it is new or its text changed; every
    process calls it, after `_check_config` (nobody reads config.json while it is rewritten)."""
    parallel.barrier("config read")
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2)
    if primary and (not os.path.exists(path) or text != _read_text(path)):
        os.makedirs(workdir, exist_ok=True)
        workdir_lib.write_text(path, text)


def _check_or_write_config(config: mlc.ConfigDict, workdir: str, primary: bool,
                           write: bool = True) -> dict[str, Any]:
    """`_check_config`, then with `write` (training) `_write_config`; returns the former's result."""
    previous = _check_config(config, workdir)
    if write:
        _write_config(config, workdir, primary)
    return previous


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def weights_path(config: mlc.ConfigDict, workdir: str) -> str:
    """The weights file: config.weights, or WORKDIR/proxy_<arch>.safetensors for a proxy run."""
    if config.weights:
        return os.path.expanduser(config.weights)
    return os.path.join(workdir, f"proxy_{config.arch}.safetensors")


def _load_pretrained(config: mlc.ConfigDict, path: str) -> tuple[str, dict, dict]:
    arch, variables, meta = weights_lib.load(path, arch_hint=config.arch)
    if arch != config.arch:
        raise ConfigError(f"config.arch = {config.arch!r} but the weights file {path} holds a {arch}; "
                          f"set --config.arch={arch} or point config.weights to {config.arch} weights.")
    options = meta["options"]
    for field in ("width", "small_input"):
        if options[field] != config.model[field]:
            raise ConfigError(
                f"config.model.{field} = {config.model[field]!r} but {path} was made with "
                f"{field}={options[field]!r}; set --config.model.{field}={options[field]!r}.")
    return arch, variables, meta


def data_options(config: mlc.ConfigDict) -> dict[str, int]:
    """The loaders' worker_count / num_threads / prefetch, resolved from config.data (auto from this
    process's CPU cores); they never change the batches."""
    options = data.pipeline.resolve_options(config.data.worker_count, config.data.num_threads,
                                            config.data.prefetch)
    return dataclasses.asdict(options)


def setup(config: mlc.ConfigDict, workdir: str, writable: bool = True,
          stops: preemption.StopRequests | None = None) -> Context:
    """Validate, prepare data and weights (training a proxy if configured), build the model and
    loaders. `writable=False` (mode=eval in a read-only workdir): nothing is written to it.
    `stops`: the job's stop requests (signals, config.max_hours); none when not given."""
    stops = stops if stops is not None else preemption.NoStops()
    config_lib.validate(config, known_archs=models.ARCHS, known_datasets=data.registry.names())
    # uint8 batches at the stored size, augmented inside the jitted steps (small fixed-size sets)
    on_device = bool(config.data.augment_on_device)
    if on_device:
        device_augment.stored_shape(config.dataset)  # ConfigError for variable-size datasets
    runs = plan(config)  # every method's options are checked here, before anything is written
    info = parallel.process_info()
    os.makedirs(workdir, exist_ok=True)
    parallel.check_same_on_all_processes("the config and workdir", _job_text(config, workdir))
    previous = _check_config(config, workdir)  # refused before a proxy trains or data is read
    data_dir = config.data_dir or None
    manual_dir = config.manual_dir or None
    path = weights_path(config, workdir)
    # Everything that can refuse this config is checked before anything is computed (a proxy) or
    # config.json is written: the datasets (the proxy's too), the weights, the model and loaders.
    make_proxy = bool(config.proxy.dataset) and not os.path.exists(path)
    if make_proxy:  # trained below with config.arch and config.model, on the proxy's classes
        arch, variables, meta = config.arch, None, None
        num_source = data.registry.get(config.proxy.dataset).num_classes
    else:
        arch, variables, meta = _load_pretrained(config, path)
        num_source = int(meta["options"]["num_classes"])
    datasets = [config.dataset] + ([config.proxy.dataset] if make_proxy else [])
    if info.is_primary:  # one process writes the dataset files; the others then find them
        for name in datasets:
            data.ensure_prepared(name, data_dir=data_dir, manual_dir=manual_dir)
    parallel.barrier("data prepared")
    for name in datasets:
        data.ensure_prepared(name, data_dir=data_dir, manual_dir=manual_dir)
    num_target = data.registry.get(config.dataset).num_classes
    num_outputs = num_target if config.label_mapping == "new_head" else num_source
    model = models.create(arch, num_outputs, width=config.model.width,
                          small_input=config.model.small_input,
                          dtype=models.compute_dtype(config.model.dtype))
    if config.label_mapping == "flm" or config.label_mapping == "ilm":
        if num_target > num_source:
            raise ConfigError(
                f"config.label_mapping = {config.label_mapping!r} maps each of the {num_target} "
                f"classes of {config.dataset} to a distinct one of the model's {num_source} classes, "
                "which is impossible; use --config.label_mapping=new_head.")
    _check_transfer(config, model)
    _check_channel_targets(runs, config, model)
    mesh = parallel.make_mesh()
    parallel.global_batch_size_check(config.batch_size, mesh)
    shard = {"shard_index": info.process_index, "shard_count": info.process_count}
    pipe = data_options(config)
    logging.info("input pipeline per loader: %s (config.data; -1/0 = auto)", pipe)
    views = {view for r in runs for stage in r.stages for view in stage.views} | {"train"}
    # 'train_b': a second augmented loader with its own shuffle (BiP's lower level, reference §5.9).
    seeds = {"train": config.seed, "prompt": config.seed, "train_b": config.seed + _SECOND_LOADER}
    loaders = {view: data.train_loader(config.dataset, view="train" if view == "train_b" else view,
                                       input_size=config.input_size, batch_size=config.batch_size,
                                       seed=seeds[view], data_dir=data_dir,
                                       max_steps_per_epoch=config.steps_per_epoch, **shard,
                                       **pipe, on_device=on_device)
               for view in sorted(views)}
    eval_batch = eval_batch_size(config)
    parallel.global_batch_size_check(eval_batch, mesh)
    eval_loader = data.eval_loader(config.dataset, input_size=config.input_size,
                                   batch_size=eval_batch, data_dir=data_dir, **shard, **pipe,
                                   on_device=on_device)
    # Weights and data are valid: only now is this config recorded (a run refused above, e.g. for
    # weights of another arch, leaves no config.json that would refuse the corrected rerun), and
    # before a proxy trains (an interrupted proxy resumes only under the same config).
    if writable and config.mode != "eval":
        _write_config(config, workdir, info.is_primary)
    if make_proxy:
        from vpns_jax import proxy

        proxy.train_proxy(config, path, data_dir=data_dir, stops=stops)
    parallel.barrier("proxy weights")  # process 0 wrote them; the others read them next
    if make_proxy:
        arch, variables, meta = _load_pretrained(config, path)
    spec = prompt_spec(config)
    ctx = Context(config=config, workdir=workdir, arch=arch, model=model, pretrained=variables,
                  weights_meta=meta, num_source=num_source, num_target=num_target, prompt_spec=spec,
                  mesh=mesh, loaders=loaders, eval_loader=eval_loader, primary=info.is_primary,
                  runs=runs, previous=previous)

    def train_split(epoch: int, sharded: bool = True, on_device: bool = on_device,
                    batch_size: int = eval_batch):
        """The training split once, with the training augmentation (the reference's train loader
        for label mapping and the data-driven criteria); unsharded: every process reads it all.
        The criteria run on host batches: always augmented on the host."""
        loader = data.eval_loader(config.dataset, split="train", augment_seed=config.seed + epoch,
                                  input_size=config.input_size, batch_size=batch_size,
                                  data_dir=data_dir, **(shard if sharded else {}), **pipe,
                                  on_device=on_device)
        return capped(loader, config.steps_per_epoch * config.batch_size)

    ctx.env = runner.Env(config=config, workdir=workdir, base_key=base_key(config), model=model,
                         initial=_initial_variables(ctx), prompt_spec=spec, loaders=loaders,
                         num_source=num_source, num_target=num_target, put=ctx.put,
                         replicate=ctx.replicate, label_map_batches=train_split,
                         # one criterion batch is one training batch, as the reference's
                         criterion_batches=lambda: train_split(0, sharded=False, on_device=False,
                                                               batch_size=config.batch_size),
                         evaluate=lambda state, stage, label_map: train.evaluate(
                             ctx.env.steps.eval(stage, prompted=False), state, eval_loader,
                             label_map, ctx.put)["accuracy"],
                         steps=runner.StepCache(
                             model, spec, skip_nonfinite=config.on_nonfinite == "skip_batch"),
                         primary=info.is_primary, stops=stops, eval_loader=eval_loader)
    return ctx


def _check_transfer(config: mlc.ConfigDict, model: Any) -> None:
    """With config.mask_from: the source mask's layers and shapes are this model's prunable kernels
    (shapes only, nothing computed); ConfigError naming the layer otherwise."""
    source = transfer.source(config)
    if source is None:
        return
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0),
                                                          config.input_size))
    flat = sparsity.flatten_params(shapes["params"])
    transfer.check_shapes(source, {p: tuple(flat[p].shape)
                                   for p in sparsity.prunable_paths(shapes["params"])})


def _check_channel_targets(runs: list[Run], config: mlc.ConfigDict, model: Any) -> None:
    """Structured runs: every channel sparsity can be pruned under its cap on this model's channel
    groups (shapes only); ConfigError naming the method and the capped layers otherwise, before
    anything trains."""
    if not any(r.structured for r in runs):
        return
    from vpns_jax.methods import channel_select
    from vpns_jax.train import state as train_state

    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0),
                                                          config.input_size))
    groups = train_state.channel_groups_of(model, shapes["params"], shapes.get("batch_stats", {}),
                                           config.input_size)
    channel_select.check_reachable(runs, groups)


def prompt_spec(config: mlc.ConfigDict) -> prompts.PromptSpec:
    """The visual prompt's geometry from config.prompt and config.input_size."""
    return prompts.PromptSpec(method=config.prompt.method, input_size=config.input_size,
                              output_size=config.prompt.output_size, pad_size=config.prompt.pad_size,
                              mask_size=config.prompt.mask_size)


def eval_batch_size(config: mlc.ConfigDict) -> int:
    """The global batch of the passes whose results are counted example by example (test accuracy,
    label-mapping counts): config.eval_batch_size, 0 = batch_size. It changes their speed only."""
    return config.eval_batch_size or config.batch_size


def capped(loader: Any, examples: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one pass of an eval-style `loader` over its first `examples` examples (0 = all):
    later rows' 'mask' is False and batches past them are not read, so the examples used do not
    depend on the loader's batch size (the cap of capped epochs, steps_per_epoch x batch_size)."""
    if not examples or examples >= loader.num_examples:
        yield from loader
        return
    keys = loader.plan()  # record key (= position in the split) of each local row, -1 = padding
    for step, batch in enumerate(itertools.islice(loader, math.ceil(examples / loader.batch_size))):
        yield {**batch, "mask": np.asarray(batch["mask"], bool) & (keys[step] < examples)}


# ----------------------------------------------------------------------------------------------------
# Runs


def plan(config: mlc.ConfigDict) -> list[Run]:
    """Every run of the configured methods, in order (dense first), options validated."""
    runs: list[Run] = []
    for method in config_lib.method_list(config):
        runs += methods.runs(config, method)
    return runs


def _job_text(config: mlc.ConfigDict, workdir: str) -> str:
    """What every process of a job must agree on: the whole config except per-host speed settings
    (data loader threads/workers, compilation cache), and the workdir."""
    d = _config_without(config, _PER_HOST)
    return json.dumps({"config": d, "workdir": workdir}, sort_keys=True)


def base_key(config: mlc.ConfigDict) -> str:
    """Hash of what every stage's result depends on besides the stages themselves: data, model,
    weights, seed, label mapping, prompt geometry (the method subtrees are in the stage keys)."""
    d = config_fingerprint(config)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def _initial_variables(ctx: Context) -> dict[str, Any]:
    """Pretrained variables; with a new head, every tensor whose shape changed is freshly initialised
    (from the seed, so every run starts from the same head)."""
    if ctx.config.label_mapping != "new_head":
        return ctx.pretrained
    fresh = models.init_variables(ctx.model, jax.random.PRNGKey(ctx.config.seed),
                                  ctx.config.input_size)
    out = {}
    for col in ("params", "batch_stats"):
        old = traverse_util.flatten_dict(ctx.pretrained.get(col, {}), sep="/")
        new = traverse_util.flatten_dict(jax.device_get(fresh.get(col, {})), sep="/")
        out[col] = traverse_util.unflatten_dict(
            {k: old[k] if k in old and np.shape(old[k]) == np.shape(v) else np.asarray(v)
             for k, v in new.items()}, sep="/")
    return out


def evaluate_state(ctx: Context, state: train.TrainState, stage: train.Stage,
                   label_map: Any, *, has_prompt: bool,
                   label_map_without_prompt: Any = None) -> dict[str, float | None]:
    """Test accuracy without and (when the run has a prompt) with the prompt; the un-prompted
    accuracy uses `label_map_without_prompt` when given (a mapping re-made through the prompt
    every epoch does not fit the un-prompted network)."""
    out: dict[str, float | None] = {}
    for prompted in (False, True):
        if prompted and not has_prompt:
            out["with_prompt"] = None
            continue
        fn = ctx.env.steps.eval(stage, prompted=prompted)
        lm = label_map if prompted or label_map_without_prompt is None else label_map_without_prompt
        out["with_prompt" if prompted else "without_prompt"] = train.evaluate(
            fn, state, ctx.eval_loader, lm, ctx.put)["accuracy"]
    return out


def row_key(base_key: str, run: Run) -> str:
    """The results.json key of `run`'s row: its last stage's key (the whole chain), and whether the
    row reports the prompted accuracy (the rest of a `Run` follows from its method and stages)."""
    key = runner.stage_keys(base_key, run.stages)[-1]
    if not run.prompt_at_test:
        return key
    return hashlib.sha256(f"{key}|prompt_at_test".encode()).hexdigest()[:20]


def run_one(ctx: Context, run: Run, *, allow_training: bool = True) -> dict[str, Any]:
    """Train (reusing finished shared stages) and evaluate one run; returns its results row.
    `allow_training=False` (mode=finalize): `runner.UnfinishedChain` unless its last stage is
    finished; then it is only evaluated and its final/ state saved again."""
    fresh = train.create_state(ctx.env.initial, rng=jax.random.PRNGKey(ctx.config.seed))
    with tb.RunLogger(ctx.workdir, run.name, primary=ctx.primary) as logger:
        end = runner.run_chain(ctx.env, run, fresh, allow_training=allow_training, logger=logger)
        row = _finish(ctx, run, end, logger)
        if measures_channels(ctx.runs, run):
            row.update(_structured_fields(ctx, run, end.state))
        return row


def measures_channels(runs: list[Run], run: Run) -> bool:
    """Structured runs, and the dense run of an experiment with structured ones (the speedup's
    reference), get the structured row fields (`vpns_jax.structured_rows`)."""
    return run.structured or (run.method == "dense" and any(r.structured for r in runs))


def _structured_fields(ctx: Context, run: Run, state: train.TrainState) -> dict[str, Any]:
    """Channel sparsity, params, FLOPs and measured speedup of the slimmed network (process 0's
    numbers on every process), and its export to WORKDIR/slim/<run>/ (written by process 0)."""
    masks = {p: np.asarray(m, bool) for p, m in jax.device_get(dict(state.masks)).items()}
    variables = {"params": train.state.zero_pruned(state.params, masks) if masks else state.params,
                 "batch_stats": state.batch_stats}
    export = (os.path.join(ctx.workdir, structured_rows.SLIM_DIR, run.name)
              if run.structured and ctx.primary and ctx.writable else None)
    options = {**ctx.weights_meta["options"], "num_classes": int(ctx.model.num_classes)}
    fields = structured_rows.row_fields(
        ctx.model, variables, masks, input_size=ctx.config.input_size,
        batch=eval_batch_size(ctx.config), export_dir=export, arch=ctx.arch, options=options,
        source={"run": run.name, "method": run.method, "sparsity": run.sparsity,
                "dataset": ctx.config.dataset})
    timed = ("latency_ms", "latency_dense_ms", "speedup")
    for key, value in zip(timed, parallel.from_process_0([fields[k] for k in timed]), strict=True):
        fields[key] = value
    return fields


def _final_problem(workdir: str, name: str) -> str | None:
    """Why WORKDIR/final/<name> cannot serve as the run's final state (missing, unreadable), or None."""
    path = os.path.join(workdir, "final", name)
    if not os.path.isdir(path):
        return f"{path} is missing"
    try:
        checkpoint.load_final(path)
    except CheckpointError as e:
        return str(e).split("; ")[0]  # without the advice to rerun: this rerun rebuilds it
    return None


def _load_results(ctx: Context) -> dict[str, Any]:
    """results.json, or none when it is unreadable: process 0 then sets it aside (renamed, never
    deleted) and the rows are rebuilt from the runs' checkpoints (no training for finished ones)."""
    try:
        return report.load_results(ctx.workdir)
    except CheckpointError as e:
        path = os.path.join(ctx.workdir, report.RESULTS_FILE)
        try:
            aside = report.set_aside_results(ctx.workdir) if ctx.primary else path + ".unreadable-*"
        except OSError:
            raise e from None  # it cannot even be renamed: the user has to see to it
        logging.warning("%s: set aside as %s; its rows are rebuilt from the finished runs' "
                        "checkpoints", str(e).split("; ")[0], aside)
        return {"runs": [], "dense": None}


def _test_record(ctx: Context, run: Run, end: runner.ChainEnd, logger: tb.RunLogger | None,
                 prompted: bool, accuracy: float) -> float:
    """Record the run's final test accuracy (global step = the chain's iterations) unless a row
    for it exists (mode=finalize); returns the maximum over the last stage's test rows
    (`accuracy_best_on_test`: selected on the test set)."""
    rows = tb.rows_of(ctx.workdir, "test") if ctx.primary else []
    if logger is not None and not any(r.get("stage_key") == end.stage_key
                                      and r.get("step") == end.iterations for r in rows):
        logger.log("test", end.iterations, {"stage": end.stage.name, "stage_key": end.stage_key,
                                            "epoch": end.stage.epochs, "prompted": prompted},
                   {"accuracy": accuracy})
    final = {"kind": "test", "stage_key": end.stage_key, "accuracy": accuracy}
    return tb.best_on_test([*rows, final], end.stage_key)


def _finish(ctx: Context, run: Run, end: runner.ChainEnd,
            logger: tb.RunLogger | None = None) -> dict[str, Any]:
    config = ctx.config
    state, last = end.state, end.stage
    started = time.perf_counter()
    has_prompt = run.has_prompt and bool(state.prompt)
    unprompted_map = None
    if has_prompt and (last.remap_every_epoch or config.label_mapping == "ilm"):
        # The mapping followed the prompt: the un-prompted network keeps the one it had when the
        # last stage began (pilot, §8: the pruned network without the prompt).
        unprompted_map = end.start_label_map
    accuracy = evaluate_state(ctx, state, last, end.label_map, has_prompt=has_prompt,
                              label_map_without_prompt=unprompted_map)
    tested = bool(run.prompt_at_test and accuracy["with_prompt"] is not None)
    best = _test_record(ctx, run, end, logger, tested,
                        accuracy["with_prompt"] if tested else accuracy["without_prompt"])
    if end.start_accuracy is not None:  # the pruned network before its prompt trained (§8)
        accuracy["without_prompt"] = end.start_accuracy
    masks = jax.device_get(train.current_masks(state, last))
    if not masks:  # dense: count zeros of the prunable kernels themselves
        flat = sparsity.flatten_params(jax.device_get(state.params))
        masks = {p: np.asarray(flat[p]) != 0 for p in sparsity.prunable_paths(state.params)}
    masks = {p: np.asarray(m, bool) for p, m in masks.items()}
    summary = sparsity.sparsity_summary(masks)
    if ctx.primary:
        report.save_layer_sparsity(ctx.workdir, run.method, run.sparsity, summary)
    params = jax.device_get(train.state.zero_pruned(state.params, masks))  # exactly sparse export
    final = {"params": params, "batch_stats": state.batch_stats, "scores": state.scores,
             "masks": masks, "prompt": state.prompt if has_prompt else {}}
    if end.label_map is not None:
        final["label_map"] = np.asarray(end.label_map, np.int32)
    if unprompted_map is not None:
        final["label_map_without_prompt"] = np.asarray(unprompted_map, np.int32)
    final = {k: v for k, v in final.items() if not isinstance(v, dict) or v}  # no empty items
    checkpoint.save_final(os.path.join(ctx.workdir, "final", run.name), jax.device_get(final),
                          {"arch": ctx.arch, "options": ctx.weights_meta["options"],
                           "num_outputs": int(ctx.model.num_classes), "method": run.method,
                           "sparsity": run.sparsity, "dataset": config.dataset,
                           "input_size": config.input_size,
                           "prompt": dataclasses.asdict(ctx.prompt_spec), "has_prompt": has_prompt,
                           "prompt_at_test": run.prompt_at_test,
                           "without_prompt_at_start": end.start_accuracy is not None,
                           **({"mask_from": run.mask_from} if run.mask_from else {})})
    # process 0 read the test rows back and timed the compiles: every process reports its numbers
    best, compile_seconds = parallel.from_process_0([best, end.compile_seconds])
    with_prompt, without = accuracy["with_prompt"], accuracy["without_prompt"]
    chosen = with_prompt if (run.prompt_at_test and with_prompt is not None) else without
    return report.run_record(
        method=run.method, arch=ctx.arch, dataset=config.dataset, seed=config.seed,
        sparsity=run.sparsity, actual_sparsity=summary["total"]["sparsity"], accuracy=chosen,
        accuracy_with_prompt=with_prompt, accuracy_without_prompt=without,
        epochs=end.epochs, gradient_steps=end.gradient_steps,
        seconds=end.seconds + time.perf_counter() - started,
        prompt_at_test=run.prompt_at_test and with_prompt is not None,
        accuracy_best_on_test=best, images=end.images, compile_seconds=compile_seconds,
        mask_from=run.mask_from)


# ----------------------------------------------------------------------------------------------------
# Entry points


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or, with mode=eval, re-evaluate) every planned run; returns the results dict."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    from vpns_jax import sweep  # several seeds: one workdir per seed, WORKDIR/seed_<s>/

    if tuple(config.seeds):
        return sweep.run_seeds(config, workdir)
    sweep.refuse_seeds_workdir(workdir)
    # one run per workdir (process 0 holds the lock for the whole job); eval takes it as well, as it
    # rewrites results.json, except in a read-only workdir, where it writes nothing
    with workdir_lib.claim(workdir, primary=parallel.process_info().is_primary,
                           read_only_ok=config.mode == "eval") as writable, \
            (preemption.StopRequests(config.max_hours) if config.mode == "train"
             else preemption.NoStops()) as stops:  # eval / finalize only evaluate: stop at once
        return _run(config, workdir, writable, stops)


def _run(config: mlc.ConfigDict, workdir: str, writable: bool,
         stops: preemption.StopRequests) -> dict[str, Any]:
    ctx = setup(config, workdir, writable, stops)
    ctx.writable = writable
    if config.mode == "eval":
        return evaluate_saved(ctx)
    finalize = config.mode == "finalize"
    results = _load_results(ctx)
    for n, run in enumerate(ctx.runs, start=1):
        key = row_key(ctx.env.base_key, run)
        row = next((r for r in results["runs"] if r["method"] == run.method and
                    r["sparsity"] == run.sparsity and r["seed"] == config.seed
                    and r.get("mask_from", "") == run.mask_from), None)
        if row is not None and row.get("key") == key and not finalize:
            problem = _final_problem(workdir, run.name)
            if problem is None:
                logging.info("[%d/%d] %s: done already (results.json)", n, len(ctx.runs), run.name)
                continue
            logging.warning("[%d/%d] %s is done (results.json) but %s; rebuilding it from the run's "
                            "checkpoints", n, len(ctx.runs), run.name, problem)
        elif row is not None and row.get("key") != key and not finalize:
            now = config_fingerprint(config, with_methods=True)
            details = (_differences(ctx.previous, now)
                       or "its method's options, or the vpns_jax version that computed it, differ")
            raise CheckpointError(
                f"{workdir}/results.json has {run.name} from a different config ({details}); use a "
                "new --workdir, the saved config.json's values for that method, or "
                "--config.mode=finalize to replace the row with this config's when its stages "
                "are finished in this workdir.")
        else:
            logging.info("[%d/%d] %s on %s, %s (%d stages)%s", n, len(ctx.runs), run.method,
                         config.dataset,
                         "dense" if run.sparsity == 0 else f"sparsity {run.sparsity:g}",
                         len(run.stages), ": rebuilding its outputs" if finalize else "")
        try:
            record = {**run_one(ctx, run, allow_training=not finalize), "key": key}
        except runner.UnfinishedChain as e:  # finalize: never trains
            kept = (" (results.json keeps its row from a different config)"
                    if row is not None and row.get("key") != key else "")
            line = f"{e}; run with --config.mode=train to finish it{kept}"
            if ctx.primary:
                print(line, flush=True)
            continue
        report.add_run(results, record)
        results["compiles"] = dict(ctx.env.steps.compiles)
        if ctx.primary:
            report.save_results(workdir, results)
        logging.info("%s: accuracy %.2f%% (with prompt %s), actual sparsity %.4f", run.name,
                     100 * record["accuracy"],
                     "-" if record["accuracy_with_prompt"] is None else
                     f"{100 * record['accuracy_with_prompt']:.2f}%", record["actual_sparsity"])
        reason = stops.check() if n < len(ctx.runs) else None  # a request during evaluation
        if reason:
            raise preemption.Stopped(f"{reason}: {run.name} is finished and in results.json; "
                                     "rerun the same command to run the rest")
    if stops.requested:
        logging.warning("a stop request (%s) arrived during the last run's evaluation; the job "
                        "is complete", stops.requested)
    logging.info("compiled steps this session: %s", dict(ctx.env.steps.compiles))
    _report(ctx, results)
    return results


def _report(ctx: Context, results: dict[str, Any]) -> None:
    if not ctx.primary:
        return
    table = report.format_table(results["runs"])
    print(f"\nResults ({ctx.arch} on {ctx.config.dataset}, {ctx.workdir}/results.json):\n{table}\n",
          flush=True)
    cost = report.format_cost_table(results["runs"])
    where = f", {report.write_cost(ctx.workdir, results['runs'])}" if ctx.writable else ""
    print(f"Cost (from the runs' records{where}):\n{cost}\n", flush=True)
    if ctx.env is not None and ctx.env.steps.compiles:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(ctx.env.steps.compiles.items()))
        print(f"Compiled this session (one per kind of stage, whatever the sparsity): {counts}",
              flush=True)
    if ctx.config.plots and ctx.writable:
        path = report.plot_accuracy(ctx.workdir, results)
        if path:
            print(f"Plot: {path}", flush=True)


def evaluate_saved(ctx: Context) -> dict[str, Any]:
    """mode=eval: restore every run's final state in WORKDIR/final and evaluate it again."""
    final_dir = os.path.join(ctx.workdir, "final")
    names = sorted(os.listdir(final_dir)) if os.path.isdir(final_dir) else []
    if not names:
        raise CheckpointError(f"{final_dir} holds no finished runs to evaluate; train first "
                              "(--config.mode=train) with this --workdir, or rebuild them from "
                              "finished checkpoints with --config.mode=finalize.")
    results = report.load_results(ctx.workdir)
    for name in names:
        tree, meta = checkpoint.load_final(os.path.join(final_dir, name))
        masks = {p: np.asarray(m, bool) for p, m in tree.get("masks", {}).items()}
        stage = train.Stage("eval", 0, mask_mode="fixed" if masks else "none")
        state = train.create_state({"params": tree["params"], "batch_stats": tree.get("batch_stats", {})},
                                   rng=jax.random.PRNGKey(ctx.config.seed),
                                   scores=tree.get("scores"), prompt=tree.get("prompt"))
        state = ctx.replicate(state.replace(masks=masks if stage.mask_mode == "fixed" else {}))
        label_map = tree.get("label_map")
        acc = evaluate_state(ctx, state, stage, label_map, has_prompt=bool(meta.get("has_prompt")),
                             label_map_without_prompt=tree.get("label_map_without_prompt"))
        at_test = bool(meta.get("prompt_at_test"))
        logging.info("%s: accuracy %s, with prompt %s", name, acc["without_prompt"],
                     acc["with_prompt"])
        if meta.get("without_prompt_at_start"):
            acc["without_prompt"] = None  # measured before the last stage trained; not in final/
        for r in results["runs"]:
            if run_id(r["method"], r["sparsity"], r.get("mask_from", "")) == name:
                if acc["without_prompt"] is None:  # keep the recorded one (pilot rows)
                    acc["without_prompt"] = r["accuracy_without_prompt"]
                r["accuracy_without_prompt"] = acc["without_prompt"]
                r["accuracy_with_prompt"] = acc["with_prompt"]
                use_prompt = at_test and acc["with_prompt"] is not None
                r["accuracy"] = acc["with_prompt"] if use_prompt else acc["without_prompt"]
    if ctx.primary and ctx.writable:
        report.save_results(ctx.workdir, results)
    _report(ctx, results)
    return results
