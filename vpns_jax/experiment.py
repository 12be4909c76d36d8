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
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from flax import traverse_util

from vpns_jax import checkpoint, data, methods, models, parallel, prompts, report, sparsity, train
from vpns_jax import config as config_lib
from vpns_jax import weights as weights_lib
from vpns_jax.errors import CheckpointError, ConfigError

# Fields that do not change what a run computes: a rerun may change them and still resume.
_NON_SEMANTIC = ("mode", "log_every_steps", "checkpoint_every_epochs", "checkpoint_every_steps",
                 "compilation_cache", "plots",
                 "distributed", "eval_batch_size", "methods", "sparsities")


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

    def put(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host batch (this process's rows) → global device arrays sharded over the data axis."""
        return parallel.host_to_global(batch, self.mesh)

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, parallel.replicated(self.mesh))


# ----------------------------------------------------------------------------------------------------
# Set-up


def config_fingerprint(config: mlc.ConfigDict) -> dict[str, Any]:
    """The config fields that determine results (used to refuse resuming under another config)."""
    d = json.loads(config.to_json_best_effort())
    for field in _NON_SEMANTIC:
        d.pop(field, None)
    return d


def _config_hash(config: mlc.ConfigDict) -> str:
    blob = json.dumps(config_fingerprint(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_or_write_config(config: mlc.ConfigDict, workdir: str, primary: bool) -> None:
    path = os.path.join(workdir, "config.json")
    current = config_fingerprint(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = config_fingerprint(mlc.ConfigDict(json.load(f)))
        flat_a = traverse_util.flatten_dict(saved, sep=".")
        flat_b = traverse_util.flatten_dict(current, sep=".")
        differ = sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k) != flat_b.get(k))
        if differ:
            details = ", ".join(f"{k}: {flat_a.get(k)!r} -> {flat_b.get(k)!r}" for k in differ[:5])
            raise CheckpointError(
                f"{workdir} holds a run with a different config ({details}); resuming would mix "
                "them. Use a new --workdir, or the saved config.json's values.")
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def weights_path(config: mlc.ConfigDict, workdir: str) -> str:
    """The weights file: config.weights, or WORKDIR/proxy_<arch>.safetensors for a proxy run."""
    if config.weights:
        return os.path.expanduser(config.weights)
    return os.path.join(workdir, f"proxy_{config.arch}.safetensors")


def _load_pretrained(config: mlc.ConfigDict, path: str) -> tuple[str, dict, dict]:
    arch, variables, meta = weights_lib.load(path)
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


def setup(config: mlc.ConfigDict, workdir: str) -> Context:
    """Validate, prepare data and weights (training a proxy if configured), build the model and loaders."""
    config_lib.validate(config, known_archs=models.ARCHS, known_datasets=data.registry.names())
    info = parallel.process_info()
    os.makedirs(workdir, exist_ok=True)
    _check_or_write_config(config, workdir, info.is_primary)
    data_dir = config.data_dir or None
    manual_dir = config.manual_dir or None
    path = weights_path(config, workdir)
    if config.proxy.dataset and not os.path.exists(path):
        from vpns_jax import proxy

        proxy.train_proxy(config, path, data_dir=data_dir)
    arch, variables, meta = _load_pretrained(config, path)
    data.ensure_prepared(config.dataset, data_dir=data_dir, manual_dir=manual_dir)
    num_source = int(meta["options"]["num_classes"])
    num_target = data.registry.get(config.dataset).num_classes
    num_outputs = num_target if config.label_mapping == "new_head" else num_source
    model = models.create(arch, num_outputs, width=config.model.width,
                          small_input=config.model.small_input)
    if config.label_mapping == "flm" or config.label_mapping == "ilm":
        if num_target > num_source:
            raise ConfigError(
                f"config.label_mapping = {config.label_mapping!r} maps each of the {num_target} "
                f"classes of {config.dataset} to a distinct one of the model's {num_source} classes, "
                "which is impossible; use --config.label_mapping=new_head.")
    mesh = parallel.make_mesh()
    parallel.global_batch_size_check(config.batch_size, mesh)
    shard = {"shard_index": info.process_index, "shard_count": info.process_count}
    loaders = {view: data.train_loader(config.dataset, view=view, input_size=config.input_size,
                                       batch_size=config.batch_size, seed=config.seed,
                                       data_dir=data_dir,
                                       max_steps_per_epoch=config.steps_per_epoch, **shard)
               for view in ("train", "prompt")}
    eval_batch = config.eval_batch_size or config.batch_size
    parallel.global_batch_size_check(eval_batch, mesh)
    eval_loader = data.eval_loader(config.dataset, input_size=config.input_size,
                                   batch_size=eval_batch, data_dir=data_dir, **shard)
    spec = prompts.PromptSpec(method=config.prompt.method, input_size=config.input_size,
                              output_size=config.prompt.output_size, pad_size=config.prompt.pad_size,
                              mask_size=config.prompt.mask_size)
    return Context(config=config, workdir=workdir, arch=arch, model=model, pretrained=variables,
                   weights_meta=meta, num_source=num_source, num_target=num_target, prompt_spec=spec,
                   mesh=mesh, loaders=loaders, eval_loader=eval_loader, primary=info.is_primary)


# ----------------------------------------------------------------------------------------------------
# Methods from the config


def method_overrides(config: mlc.ConfigDict, method: str, density: float) -> dict[str, Any]:
    """The method recipe's Config fields from the run config."""
    if method == "dense":
        d = config.dense
        return {"epochs": d.epochs, "weight_optimizer": d.optimizer, "weight_lr": d.lr,
                "weight_momentum": d.momentum, "weight_weight_decay": d.weight_decay,
                "schedule": d.schedule}
    mf, tu = (config.hydra.mask_finding, config.hydra.tuning) if method == "hydra" else (
        config.mask_finding, config.tuning)
    if mf.schedule != tu.schedule:
        raise ConfigError(f"config {method} stages use schedules {mf.schedule!r} and {tu.schedule!r}; "
                          "one schedule serves both stages: set both to the same value.")
    out = {"density": density, "mask_finding_epochs": mf.epochs, "tuning_epochs": tu.epochs,
           "score_optimizer": mf.optimizer, "score_lr": mf.lr, "score_momentum": mf.momentum,
           "score_weight_decay": mf.weight_decay, "weight_optimizer": tu.optimizer,
           "weight_lr": tu.lr, "weight_momentum": tu.momentum, "weight_weight_decay": tu.weight_decay,
           "schedule": mf.schedule, "threshold_scope": config.threshold}
    if method == "vpns":
        out.update(prompt_mask_finding_lr=mf.prompt_lr, prompt_tuning_lr=tu.prompt_lr,
                   passes=config.passes, prompt_in=config.prompt.stages,
                   prompt_at_test=config.prompt.at_test)
    return out


def run_id(method: str, sparsity_level: float) -> str:
    return f"{method}_s{sparsity_level:g}"


def _plan(config: mlc.ConfigDict) -> list[tuple[str, float]]:
    plan = []
    for method in config_lib.method_list(config):
        levels = (0.0,) if method == "dense" else tuple(config.sparsities)
        plan += [(method, float(s)) for s in levels]
    return plan


# ----------------------------------------------------------------------------------------------------
# One run


def _initial_variables(ctx: Context, rng: jax.Array) -> dict[str, Any]:
    """Pretrained variables; with a new head, every tensor whose shape changed is freshly initialised."""
    if ctx.config.label_mapping != "new_head":
        return ctx.pretrained
    fresh = models.init_variables(ctx.model, rng, ctx.config.input_size)
    out = {}
    for col in ("params", "batch_stats"):
        old = traverse_util.flatten_dict(ctx.pretrained.get(col, {}), sep="/")
        new = traverse_util.flatten_dict(jax.device_get(fresh.get(col, {})), sep="/")
        out[col] = traverse_util.unflatten_dict(
            {k: old[k] if k in old and np.shape(old[k]) == np.shape(v) else np.asarray(v)
             for k, v in new.items()}, sep="/")
    return out


def label_map_for(ctx: Context, state: train.TrainState, stage: train.Stage,
                  prompted: bool, epoch: int = 0) -> np.ndarray | None:
    """FLM over the augmented training split (eval mode, current mask, through the prompt if any)."""
    if ctx.config.label_mapping == "new_head":
        return None
    predict = train.make_source_predictions(stage, ctx.model, ctx.prompt_spec, prompted=prompted)
    config = ctx.config
    info = parallel.process_info()
    # Every training example once, with the training augmentation (the reference's train loader).
    loader = data.eval_loader(config.dataset, split="train", augment_seed=config.seed + epoch,
                              input_size=config.input_size,
                              batch_size=config.eval_batch_size or config.batch_size,
                              data_dir=config.data_dir or None, shard_index=info.process_index,
                              shard_count=info.process_count)
    batches = itertools.islice(loader, config.steps_per_epoch or None)
    return train.flm_label_map(predict, state, batches, ctx.num_source, ctx.num_target, ctx.put)


def _append_metrics(ctx: Context, row: dict[str, Any]) -> None:
    if ctx.primary:
        with open(os.path.join(ctx.workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def evaluate_state(ctx: Context, state: train.TrainState, stage: train.Stage,
                   label_map: Any, *, has_prompt: bool) -> dict[str, float | None]:
    """Test accuracy without and (when the run has a prompt) with the prompt."""
    out: dict[str, float | None] = {}
    for prompted in (False, True):
        if prompted and not has_prompt:
            out["with_prompt"] = None
            continue
        fn = train.make_eval_step(stage, ctx.model, ctx.prompt_spec, prompted=prompted)
        out["with_prompt" if prompted else "without_prompt"] = train.evaluate(
            fn, state, ctx.eval_loader, label_map, ctx.put)["accuracy"]
    return out


def run_one(ctx: Context, method: str, sparsity_level: float) -> dict[str, Any]:
    """Train and evaluate `method` at `sparsity_level` from the pretrained weights; returns its record."""
    config = ctx.config
    recipe = methods.get(method)
    stages = recipe.recipe(methods.make_config(
        method, method_overrides(config, method, 1.0 - sparsity_level)))
    uses_prompt = bool(recipe.USES_PROMPT)
    name = run_id(method, sparsity_level)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), sum(map(ord, name)))
    variables = _initial_variables(ctx, rng)
    scores = recipe.init_scores(variables["params"])
    prompt = prompts.init_prompt(ctx.prompt_spec) if uses_prompt else None
    fresh = train.create_state(variables, rng=rng, scores=scores, prompt=prompt)
    ckpt = checkpoint.RunCheckpointer(os.path.join(ctx.workdir, "checkpoints", name))
    # Position = (stage, epoch, iteration done in that epoch); checkpoints are never at (i, 0, 0).
    progress = {"stage": 0, "epoch": 0, "iteration": 0, "seconds": 0.0, "label_map": None}
    latest = ckpt.latest_step()
    if latest is not None:
        meta = ckpt.read_meta(latest)
        abstract = jax.eval_shape(lambda s: train.begin_stage(stages[int(meta["stage"])], s), fresh)
        state, meta = ckpt.restore(latest, abstract_state=abstract,
                                   config_hash=_config_hash(config))
        progress.update({k: meta[k] for k in progress})
        logging.info("%s: resuming at stage %s, epoch %d, iteration %d (checkpoint %d)", name,
                     stages[progress["stage"]].name, progress["epoch"] + 1, progress["iteration"],
                     latest)
    else:
        state = fresh
        # The mapping is computed once, after the initial mask, with the zero prompt (reference §2).
        started = time.perf_counter()
        label_map = label_map_for(ctx, ctx.replicate(state), stages[0], prompted=uses_prompt)
        progress["label_map"] = None if label_map is None else label_map.tolist()
        progress["seconds"] = time.perf_counter() - started
    try:
        state = _run_stages(ctx, name, stages, ctx.replicate(state), ckpt, progress)
    finally:
        ckpt.close()  # an interrupted run still finishes writing its last checkpoint
    return _finish(ctx, method, sparsity_level, stages, state, progress, uses_prompt)


def _label_map(progress: dict[str, Any]) -> np.ndarray | None:
    lm = progress["label_map"]
    return None if lm is None else np.asarray(lm, np.int32)


def _run_stages(ctx: Context, name: str, stages: list[train.Stage], state: train.TrainState,
                ckpt: checkpoint.RunCheckpointer, progress: dict[str, Any]) -> train.TrainState:
    """Run the stages from the position in `progress`, checkpointing after every epoch (and every
    `config.checkpoint_every_steps` iterations). `progress` is updated in place and saved as meta."""
    config = ctx.config
    steps = len(ctx.loaders["train"])
    offsets = np.cumsum([0] + [s.epochs * steps for s in stages])  # checkpoint number = iteration
    for i, stage in enumerate(stages):
        if i < progress["stage"] or (i == progress["stage"] and progress["epoch"] >= stage.epochs):
            continue  # finished before (a checkpoint at its end was restored), or empty
        if i > progress["stage"]:
            progress.update(stage=i, epoch=0, iteration=0)
        start_epoch, start_iteration = progress["epoch"], progress["iteration"]
        if (start_epoch, start_iteration) == (0, 0):
            state = ctx.replicate(train.begin_stage(stage, state))
        started, seconds_before = time.perf_counter(), progress["seconds"]

        def save(state: train.TrainState, epoch: int, iteration: int, label_map: Any, i: int = i,
                 started: float = started, before: float = seconds_before) -> None:
            progress.update(stage=i, epoch=epoch, iteration=iteration,
                            seconds=before + time.perf_counter() - started,
                            label_map=None if label_map is None else np.asarray(label_map).tolist())
            ckpt.save(int(offsets[i]) + epoch * steps + iteration, state,
                      {**progress, "config_hash": _config_hash(config)})

        def epoch_hook(end: train.EpochEnd) -> None:
            epoch = end.epoch + 1
            _append_metrics(ctx, {"run": name, "stage": end.stage.name, "epoch": epoch,
                                  **end.metrics})
            if epoch % config.checkpoint_every_epochs == 0 or epoch == end.stage.epochs:
                save(end.state, epoch, 0, end.label_map)

        hooks: list[Callable] = []
        if config.label_mapping == "ilm":  # re-mapped after every epoch, through the current prompt
            hooks.append(lambda end: label_map_for(ctx, end.state, end.stage,
                                                   prompted=end.stage.prompt_in_stage,
                                                   epoch=end.epoch + 1))
        hooks.append(epoch_hook)
        state, _ = train.run_stage(
            stage, state, ctx.model, {v: ctx.loaders[v] for v in stage.views},
            prompt_spec=ctx.prompt_spec, label_map=_label_map(progress), hooks=hooks,
            start_epoch=start_epoch, start_iteration=start_iteration,
            log_every=config.log_every_steps, put_batch=ctx.put,
            step_hook=lambda end: save(end.state, end.epoch, end.iteration, end.label_map),
            step_hook_every=config.checkpoint_every_steps)
        progress.update(stage=i, epoch=stage.epochs, iteration=0)
    return state


def _finish(ctx: Context, method: str, sparsity_level: float, stages: list[train.Stage],
            state: train.TrainState, progress: dict[str, Any], uses_prompt: bool) -> dict[str, Any]:
    config = ctx.config
    last = stages[-1]
    label_map = _label_map(progress)
    started = time.perf_counter()
    accuracy = evaluate_state(ctx, state, last, label_map, has_prompt=uses_prompt)
    masks = jax.device_get(train.current_masks(state, last))
    if not masks:  # dense: count zeros of the prunable kernels themselves
        flat = sparsity.flatten_params(jax.device_get(state.params))
        masks = {p: np.asarray(flat[p]) != 0 for p in sparsity.prunable_paths(state.params)}
    summary = sparsity.sparsity_summary(masks)
    name = run_id(method, sparsity_level)
    if ctx.primary:
        report.save_layer_sparsity(ctx.workdir, method, sparsity_level, summary)
    final = {"params": state.params, "batch_stats": state.batch_stats, "scores": state.scores,
             "masks": {p: np.asarray(m, bool) for p, m in masks.items()}, "prompt": state.prompt}
    if label_map is not None:
        final["label_map"] = np.asarray(label_map, np.int32)
    final = {k: v for k, v in final.items() if not isinstance(v, dict) or v}  # no empty items
    checkpoint.save_final(os.path.join(ctx.workdir, "final", name), jax.device_get(final),
                          {"arch": ctx.arch, "options": ctx.weights_meta["options"],
                           "num_outputs": int(ctx.model.num_classes), "method": method,
                           "sparsity": sparsity_level, "dataset": config.dataset,
                           "input_size": config.input_size,
                           "prompt": dataclasses.asdict(ctx.prompt_spec), "has_prompt": uses_prompt})
    with_prompt, without = accuracy["with_prompt"], accuracy["without_prompt"]
    chosen = with_prompt if (config.prompt.at_test and with_prompt is not None) else without
    steps_per_epoch = len(ctx.loaders["train"])
    return report.run_record(
        method=method, arch=ctx.arch, dataset=config.dataset, seed=config.seed,
        sparsity=sparsity_level, actual_sparsity=summary["total"]["sparsity"], accuracy=chosen,
        accuracy_with_prompt=with_prompt, accuracy_without_prompt=without,
        epochs={s.name: s.epochs for s in stages},
        gradient_steps=sum(s.epochs * steps_per_epoch * s.steps_per_iteration for s in stages),
        seconds=progress["seconds"] + time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------------
# Entry points


def run(config: mlc.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (or, with mode=eval, re-evaluate) every planned run; returns the results dict."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ctx = setup(config, workdir)
    if config.mode == "eval":
        return evaluate_saved(ctx)
    results = report.load_results(workdir)
    plan = _plan(config)
    for n, (method, level) in enumerate(plan, start=1):
        if any(r["method"] == method and r["sparsity"] == level and r["seed"] == config.seed
               for r in results["runs"]):
            logging.info("[%d/%d] %s: done already (results.json)", n, len(plan), run_id(method, level))
            continue
        logging.info("[%d/%d] %s on %s, %s", n, len(plan), method, config.dataset,
                     "dense" if method == "dense" else f"sparsity {level:g}")
        record = run_one(ctx, method, level)
        report.add_run(results, record)
        if ctx.primary:
            report.save_results(workdir, results)
        logging.info("%s: accuracy %.2f%% (with prompt %s), actual sparsity %.4f",
                     run_id(method, level), 100 * record["accuracy"],
                     "-" if record["accuracy_with_prompt"] is None else
                     f"{100 * record['accuracy_with_prompt']:.2f}%", record["actual_sparsity"])
    _report(ctx, results)
    return results


def _report(ctx: Context, results: dict[str, Any]) -> None:
    if not ctx.primary:
        return
    table = report.format_table(results["runs"])
    print(f"\nResults ({ctx.arch} on {ctx.config.dataset}, {ctx.workdir}/results.json):\n{table}\n",
          flush=True)
    if ctx.config.plots:
        path = report.plot_accuracy(ctx.workdir, results)
        if path:
            print(f"Plot: {path}", flush=True)


def evaluate_saved(ctx: Context) -> dict[str, Any]:
    """mode=eval: restore every run's final state in WORKDIR/final and evaluate it again."""
    final_dir = os.path.join(ctx.workdir, "final")
    names = sorted(os.listdir(final_dir)) if os.path.isdir(final_dir) else []
    if not names:
        raise CheckpointError(f"{final_dir} holds no finished runs to evaluate; train first "
                              "(--config.mode=train) with this --workdir.")
    results = report.load_results(ctx.workdir)
    for name in names:
        tree, meta = checkpoint.load_final(os.path.join(final_dir, name))
        masks = {p: np.asarray(m, bool) for p, m in tree.get("masks", {}).items()}
        stage = train.Stage("eval", 0, mask_mode="fixed" if any(not m.all() for m in masks.values())
                            else "none")
        state = train.create_state({"params": tree["params"], "batch_stats": tree.get("batch_stats", {})},
                                   rng=jax.random.PRNGKey(ctx.config.seed),
                                   scores=tree.get("scores"), prompt=tree.get("prompt"))
        state = ctx.replicate(state.replace(masks=masks if stage.mask_mode == "fixed" else {}))
        label_map = tree.get("label_map")
        acc = evaluate_state(ctx, state, stage, label_map, has_prompt=bool(meta.get("has_prompt")))
        logging.info("%s: accuracy %.4f, with prompt %s", name, acc["without_prompt"],
                     acc["with_prompt"])
        for r in results["runs"]:
            if run_id(r["method"], r["sparsity"]) == name:
                r["accuracy_without_prompt"] = acc["without_prompt"]
                r["accuracy_with_prompt"] = acc["with_prompt"]
                use_prompt = ctx.config.prompt.at_test and acc["with_prompt"] is not None
                r["accuracy"] = acc["with_prompt"] if use_prompt else acc["without_prompt"]
    if ctx.primary:
        report.save_results(ctx.workdir, results)
    _report(ctx, results)
    return results
