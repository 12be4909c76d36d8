"""The run configuration: defaults (the released VPNs code), per-dataset settings, and validation.

A config is a locked `ml_collections.ConfigDict`. `default_config()` holds every field with the released
code's defaults; config files in `configs/` start from it. `validate(config)` checks every field at start and
raises `ConfigError` naming the field, its value and the allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections as mlc

from vpns_jax import methods, models
from vpns_jax.errors import ConfigError

PROMPT_METHODS = ("pad", "fix", "random")
LABEL_MAPPINGS = ("flm", "ilm", "new_head")
# train: run (or resume) every planned run; eval: evaluate the final states in --workdir again;
# finalize: rebuild final/, results.json rows and plots from each run's finished last stage (never trains).
MODES = ("train", "eval", "finalize")
ON_NONFINITE = ("stop", "skip_batch")
# Computation dtypes of config.model.dtype: the names `vpns_jax.models.compute_dtype` maps.
MODEL_DTYPES = tuple(models.COMPUTE_DTYPES)  # ("float32", "bfloat16")
# Sizes the released code accepts (reference §1.1); others are allowed with a warning-free check of
# consistency only, because CPU-scale runs use small inputs.
REFERENCE_INPUT_SIZES = (224, 192, 160, 128, 96, 64, 32)

# Reference batch sizes (reference §4.3 / §7).
DATASET_BATCH_SIZE = {
    "cifar10": 256, "cifar100": 256, "food101": 256, "tiny_imagenet": 256,
    "oxford_flowers102": 128, "stanford_cars": 128, "dtd": 64, "oxford_iiit_pet": 64,
    "imagenet2012": 1024, "fashion_mnist": 256, "digits": 64,
}


def default_config() -> mlc.ConfigDict:
    """Every field, with the released VPNs code's defaults (ResNet-18, CIFAR-10, 224, pad 16)."""
    c = mlc.ConfigDict()
    # train | eval (restore the final states in --workdir and evaluate them) | finalize (rebuild
    # final/, results.json and plots from the runs' finished checkpoints; never trains)
    c.mode = "train"
    c.methods = "vpns"  # comma-separated names of vpns_jax.methods (see README), run in this order
    c.arch = "resnet18"
    c.weights = ""  # project-format weights (python -m vpns_jax.weights convert ...)
    # dtype: computation dtype of activations and matmuls ('float32' | 'bfloat16'); parameters,
    # BatchNorm statistics and optimizer state stay float32.
    c.model = mlc.ConfigDict({"width": 1.0, "small_input": False, "dtype": "float32"})
    c.dataset = "cifar10"
    c.data_dir = ""  # TFDS data dir ('' = TFDS default, ~/tensorflow_datasets)
    c.manual_dir = ""  # files for manual datasets (tiny_imagenet, stanford_cars, imagenet2012, ...)
    c.input_size = 224
    # Input pipeline (vpns_jax.data.pipeline). Results do not depend on worker_count, num_threads or
    # prefetch; augment_on_device moves resize/crop/flip into the jitted step (small stored images).
    c.data = mlc.ConfigDict({
        # grain worker processes per loader; -1 = auto (0 on <= 4 cores, else cores // 2, <= 32)
        "worker_count": -1,
        "num_threads": 0,  # read/decode threads per process (per worker); 0 = auto
        "prefetch": 0,  # batches read ahead per process (per worker); 0 = auto
        "augment_on_device": False,
    })
    c.batch_size = 256  # global batch, split over devices and processes
    c.eval_batch_size = 0  # 0 = batch_size
    c.seed = 7
    # Several seeds: every run for each of them, one workdir per seed (WORKDIR/seed_<s>/, each a
    # complete workdir); () = just `seed`. A source model trained here (proxy) is made once, with `seed`.
    c.seeds = ()
    c.sparsities = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    # Transfer (paper Fig. 6): a finished run's mask, 'WORKDIR/RUN' or 'WORKDIR/final/RUN', tuned here
    # by each configured method's tuning stage at that mask's sparsity ('' = none; vpns_jax.transfer).
    c.mask_from = ""
    c.label_mapping = "flm"  # flm (released) | ilm (re-mapped every epoch) | new_head
    c.prompt = mlc.ConfigDict({  # the prompt's geometry; where and how it trains is each method's
        "method": "pad",
        "output_size": 224,
        "pad_size": 16,
        "mask_size": 115,
    })
    # One subtree per registered method, config.<method>.*, with the reference's defaults; each
    # method validates its own options when it builds its runs.
    for name, subtree in methods.default_configs().items():
        c[name] = subtree
    # Offline proxy source model: when `proxy.dataset` is set and `weights` does not exist yet, a model is
    # trained from scratch on that dataset and saved to `weights` (default: WORKDIR/proxy_<arch>.safetensors)
    # in the same format as converted ImageNet weights; the rest of the run cannot tell the difference.
    c.proxy = mlc.ConfigDict({
        "dataset": "",
        "epochs": 2,
        "lr": 0.05,
        "batch_size": 128,
        "steps_per_epoch": 0,
        "input_size": 0,  # image size it trains at; 0 = config.input_size
    })
    c.steps_per_epoch = 0  # 0 = the whole training split; >0 caps iterations per epoch (quick runs)
    c.log_every_steps = 50
    # Test accuracy every N epochs of each stage (0 = at the end of every stage; -1 = only at the end
    # of the run, which is always measured). Recorded in metrics.jsonl and TensorBoard; it never
    # changes training.
    c.eval_every_epochs = 0
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 0  # >0: also checkpoint every N iterations inside an epoch
    # Wall-time budget in hours (0 = none): when it is spent, the run saves a checkpoint after the
    # current iteration and exits with code 75, as on SIGTERM; the rerun resumes.
    c.max_hours = 0.0
    # A non-finite loss or parameter: 'stop' (exit 3, the last good checkpoint kept) or
    # 'skip_batch' (the iteration's update is dropped and counted; the run goes on).
    c.on_nonfinite = "stop"
    c.distributed = False  # jax.distributed.initialize() (also with env VPNS_DISTRIBUTED=1)
    c.distributed_timeout_s = 300  # how long a process waits for the job's coordinator
    c.compilation_cache = ""  # '' = ~/.cache/vpns_jax/jax_cache; 'off' disables
    c.plots = True
    return c


def apply_overrides(config: mlc.ConfigDict, overrides: dict[str, Any]) -> None:
    """Set dotted fields (`'tuning.lr'`) on an unlocked or locked config."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
    """Parse a config-file argument `'key=value,flag,...'` (big_vision style) over `defaults`.

    A bare key sets a boolean default to True. Values are converted to the type of the default.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if key not in defaults:
            raise ConfigError(
                f"Unknown config argument {key!r}; allowed: {', '.join(sorted(defaults))}."
            )
        kind = type(defaults[key])
        if not sep:
            if kind is not bool:
                raise ConfigError(f"Config argument {key!r} needs a value: {key}=...")
            out[key] = True
        elif kind is bool:
            out[key] = raw.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = kind(raw)
    return mlc.ConfigDict(out)


# ----------------------------------------------------------------------------------------------------
# Validation


def method_list(config: mlc.ConfigDict) -> list[str]:
    """The configured methods, in run order (dense first: it is the reference point)."""
    names = [m.strip() for m in str(config.methods).split(",") if m.strip()]
    return sorted(set(names), key=lambda m: (m != "dense", names.index(m)))


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field} = {value!r} is not allowed; expected {allowed}.")


def _one_of(config: mlc.ConfigDict, field: str, allowed: Iterable[str]) -> None:
    value = _get(config, field)
    allowed = tuple(allowed)
    if value not in allowed:
        _fail(field, value, "one of " + ", ".join(map(repr, allowed)))


def _get(config: mlc.ConfigDict, field: str) -> Any:
    node: Any = config
    for name in field.split("."):
        node = node[name]
    return node


def _positive_int(config: mlc.ConfigDict, field: str, *, allow_zero: bool = False) -> None:
    value = _get(config, field)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or
                                                                      (allow_zero and value == 0))
    if not ok:
        _fail(field, value, "an integer " + (">= 0" if allow_zero else "> 0"))


def _positive_float(config: mlc.ConfigDict, field: str, *, allow_zero: bool = False) -> None:
    value = _get(config, field)
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value > 0 or (allow_zero and value == 0))
    if not ok:
        _fail(field, value, "a finite number " + (">= 0" if allow_zero else "> 0"))


def validate_sparsities(values: Sequence[Any]) -> None:
    """Each sparsity must be a number in [0, 1) (1 would remove every weight)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        _fail("sparsities", values, "a non-empty tuple of numbers in [0, 1), e.g. (0.5, 0.9)")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            _fail("sparsities", tuple(values),
                  f"numbers in [0, 1) (sparsity = fraction of weights removed); {s!r} is not")


def validate(config: mlc.ConfigDict, *, known_archs: Iterable[str] | None = None,
             known_datasets: Iterable[str] | None = None) -> None:
    """Check every field; raise `ConfigError` naming the first bad field and its allowed values."""
    _one_of(config, "mode", MODES)
    known = methods.names()
    chosen = method_list(config)
    if not chosen:
        _fail("methods", config.methods, f"a comma-separated subset of {', '.join(known)}")
    for m in chosen:
        if m not in known:
            _fail("methods", config.methods,
                  f"a comma-separated subset of {', '.join(known)} ({m!r} is unknown)")
        if m not in config:
            _fail("methods", config.methods, f"methods whose options are in the config "
                  f"(config.{m} is missing: build it with default_config() after registering {m!r})")
    if known_archs is not None:
        _one_of(config, "arch", known_archs)
    if known_datasets is not None:
        _one_of(config, "dataset", known_datasets)
    _positive_float(config, "model.width")
    _one_of(config, "model.dtype", MODEL_DTYPES)
    _positive_int(config, "input_size")
    for field, low in (("worker_count", -1), ("num_threads", 0), ("prefetch", 0)):
        value = config.data[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(f"data.{field}", value, f"an integer >= {low} ({low} = auto from the CPU cores)")
    _positive_int(config, "batch_size")
    _positive_int(config, "eval_batch_size", allow_zero=True)
    if not isinstance(config.seed, int):
        _fail("seed", config.seed, "an integer")
    seeds = config.seeds
    if (isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence)
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
            or len(set(seeds)) != len(seeds)):
        _fail("seeds", seeds, "a tuple of distinct integers, e.g. (0,1,2) (() = just config.seed)")
    validate_sparsities(config.sparsities)
    if not isinstance(config.mask_from, str):
        _fail("mask_from", config.mask_from, "a finished run's directory, WORKDIR/RUN or "
              "WORKDIR/final/RUN ('' = no transfer)")
    _one_of(config, "label_mapping", LABEL_MAPPINGS)
    _one_of(config, "prompt.method", PROMPT_METHODS)
    _positive_int(config, "prompt.output_size")
    _positive_int(config, "prompt.pad_size", allow_zero=True)
    _positive_int(config, "prompt.mask_size")
    out, pad = config.prompt.output_size, config.prompt.pad_size
    if config.input_size > out:
        _fail("input_size", config.input_size,
              f"a size <= prompt.output_size ({out}); the prompt pads the image up to output_size")
    if 2 * pad > out:
        _fail("prompt.pad_size", pad, f"at most prompt.output_size / 2 = {out // 2}")
    if config.prompt.method in ("fix", "random") and config.prompt.mask_size > out:
        _fail("prompt.mask_size", config.prompt.mask_size, f"at most prompt.output_size = {out}")
    _positive_int(config, "steps_per_epoch", allow_zero=True)
    _positive_int(config, "log_every_steps")
    if config.eval_every_epochs != -1:
        _positive_int(config, "eval_every_epochs", allow_zero=True)
    _positive_int(config, "distributed_timeout_s")
    _positive_int(config, "checkpoint_every_epochs")
    _positive_int(config, "checkpoint_every_steps", allow_zero=True)
    _positive_float(config, "max_hours", allow_zero=True)
    _one_of(config, "on_nonfinite", ON_NONFINITE)
    for m in chosen:  # each method validates its own options as it builds its runs
        trains_prompt = any(stage.prompt.trainable for run in methods.runs(config, m)
                            for stage in run.stages)
        if trains_prompt and config.prompt.method == "pad" and config.prompt.pad_size == 0:
            _fail("prompt.pad_size", 0, f"> 0: method {m!r} trains a visual prompt and a pad prompt "
                  "of width 0 has nothing to train (or leave the prompted methods out of "
                  "config.methods)")
    if config.proxy.dataset:
        if known_datasets is not None:
            _one_of(config, "proxy.dataset", known_datasets)
        _positive_int(config, "proxy.epochs")
        _positive_float(config, "proxy.lr")
        _positive_int(config, "proxy.batch_size")
        _positive_int(config, "proxy.steps_per_epoch", allow_zero=True)
        _positive_int(config, "proxy.input_size", allow_zero=True)
    elif not str(config.weights).strip():
        _fail("weights", config.weights,
              "the path of a weights file in the project's format; make one from torchvision's "
              "ImageNet weights with `python -m vpns_jax.weights convert --arch ARCH --src FILE.pth "
              "--out FILE.safetensors` (configs/quickstart.py trains an offline proxy instead)")


# ----------------------------------------------------------------------------------------------------
# Builders used by the files in configs/


def proxy_task_config(fast: bool = False) -> mlc.ConfigDict:
    """`default_config()` set to the offline proxy task of configs/quickstart.py and
    configs/proxy_compare.py: a width-0.25 ResNet-18 trained here on Fashion-MNIST as the source
    model (1 x 20 steps with `fast`, else 2 x 200), then digits at 32 px, pad prompt 4, batch 64."""
    c = default_config()
    c.arch = "resnet18"
    c.model.width = 0.25
    c.model.small_input = False  # ImageNet stem: 32 px -> 8x8 maps after the stem, cheap on a CPU
    c.proxy.dataset = "fashion_mnist"
    c.proxy.epochs = 1 if fast else 2
    c.proxy.steps_per_epoch = 20 if fast else 200
    c.proxy.batch_size = 128
    c.proxy.lr = 0.05
    c.dataset = "digits"
    c.input_size = 32
    c.prompt.output_size = 32
    c.prompt.pad_size = 4
    c.batch_size = 64
    return c


def set_epochs(config: mlc.ConfigDict, fn: Any) -> None:
    """Replace every method's `epochs` fields (at any depth) by `fn(epochs)` (quick configs)."""
    for name in methods.names():
        if name in config:
            _map_epochs(config[name], fn)


def _map_epochs(node: mlc.ConfigDict, fn: Any) -> None:
    for key in list(node.keys()):
        value = node[key]
        if isinstance(value, mlc.ConfigDict):
            _map_epochs(value, fn)
        elif key == "epochs":
            node[key] = int(fn(value))


def paper_config(dataset: str, arg: str | None = None) -> mlc.ConfigDict:
    """The paper's setting for `dataset`; `arg` = 'arch=resnet18,method=vpns,hparams=released,runlocal'
    (several methods: method=dense+hydra+vpns).

    - `hparams=released` (default): the released code's settings for every dataset (Adam 1e-4 scores and
      prompt in mask finding, SGD 0.01 weights and prompt in tuning, 30 + 30 epochs).
    - `hparams=research`: the authors' per-dataset research scripts (Adam 1e-3 for Flowers-102 and Stanford
      Cars, SGD 0.05 scores for Oxford-IIIT Pets).
    - `runlocal`: a few steps of one epoch at one sparsity, to check a set-up end to end.
    """
    args = parse_arg(arg, arch="resnet18", method="vpns", hparams="released", runlocal=False,
                     dataset=dataset)
    if args.hparams not in ("released", "research"):
        _fail("hparams (config argument)", args.hparams, "'released' or 'research'")
    c = default_config()
    c.dataset = args.dataset
    c.arch = args.arch
    c.methods = args.method.replace("+", ",")
    c.batch_size = DATASET_BATCH_SIZE.get(args.dataset, 256)
    if args.hparams == "research":  # the authors' per-dataset scripts, as each method lists them
        for name in methods.names():
            research = getattr(methods.get(name), "research", None)
            overrides = research(args.dataset) if research else {}
            apply_overrides(c, {f"{name}.{k}": v for k, v in overrides.items()})
    c.lth.rounds = 10  # the research scripts' LTH curve: 20% ... 89.26% (reference §9.1)
    if args.arch == "resnet50":
        c.weights = ""  # ResNet-50: torchvision IMAGENET1K_V2 weights (reference ambiguity 11)
    if args.runlocal:
        c.sparsities = (0.5,)
        c.steps_per_epoch = 2
        c.log_every_steps = 1
        set_epochs(c, lambda epochs: min(epochs, 1))
        c.lth.rounds = 1
        c.synflow.iterations = 2
        c.batch_size = min(c.batch_size, 16)
    return c
