"""What a method's plan is made of: runs (chains of stages), stage-start actions, option readers.

A method turns its config subtree into a list of `Run`s. A run is a chain of `train.Stage`s from the
pretrained weights to one result row; each stage lists the actions that happen when it begins
(`Stage.start`). Runs that begin with the same stages share them: the experiment computes each
distinct stage once per workdir (a dense fine-tune needed by OMP, LTH and the pilot study at every
sparsity; LTH's round r is the prefix of round r + 1).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections as mlc

from vpns_jax.errors import ConfigError
from vpns_jax.train.stages import (
    FROZEN,
    OPTIMIZER_KINDS,
    SCHEDULES,
    UNPROMPTED,
    GroupOptimizer,
    Pass,
    Stage,
    make_group_optimizer,
)

# ----------------------------------------------------------------------------------------------------
# Stage-start actions (executed in order by the experiment; LabelMap after the stage's state is made)


@dataclasses.dataclass(frozen=True)
class InitScores:
    """Scores = HYDRA's scaled init sqrt(6/fan_in)·W/max|W| of the current weights (reference §3)."""


@dataclasses.dataclass(frozen=True)
class InitPrompt:
    """A fresh (zero) visual prompt."""


@dataclasses.dataclass(frozen=True)
class MaskFrom:
    """The stage's fixed mask from a criterion on the current state.

    criterion: 'scores' (the learned scores' global |s| > τ mask at `density`, as the reference
    freezes it after mask finding) or a `sparsity.criteria` name ('magnitude', 'random', 'snip',
    'grasp', 'synflow') computed on the current weights. within_current: prune only among the
    survivors of the current mask, `density` being the fraction of the survivors kept: LTH's round
    removes round((1 − density) · survivors) of them, as torch's `global_unstructured` does.
    options: the criterion's keyword options as (name, value) pairs.
    """

    criterion: str
    density: float
    scope: str = 'global'
    options: tuple[tuple[str, Any], ...] = ()
    within_current: bool = False


@dataclasses.dataclass(frozen=True)
class MaskFromRun:
    """The stage's fixed mask = a finished run's final mask (transfer, `vpns_jax.transfer`), read
    from `path` (WORKDIR/final/RUN) and set on the current weights. The stage key holds `source`
    ('<dataset>/<RUN>') and `digest` (sha256 of the mask), not the path."""

    source: str
    digest: str
    path: str = dataclasses.field(default='', compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class InitChannelScores:
    """Channel scores: one f32[C] per channel group of `vpns_jax.structured`, torch's
    Kaiming-uniform init of the research code's out x 1 x 1 x 1 score tensors (fan_in 1, a = sqrt(5):
    U(-1, 1)); no scaled init (reference §6, ambiguity 14)."""


@dataclasses.dataclass(frozen=True)
class ChannelMaskFrom:
    """The stage's fixed mask from a channel selection (`methods.channel_select`): importance per
    channel of every group by `criterion` ('scores': the learned channel scores' |s|, channel VPNs;
    'bn_scale': |gamma| of the group's BatchNorms, Slim; 'magnitude': the group's parameter-slice
    norms, DepGraph), channels below the threshold at `density` (fraction of channels kept) pruned,
    capped groups at most `cap` (scope 'global'; 'layer': every group at its own fraction), then
    expanded to per-parameter masks. options: the criterion's (name, value) pairs."""

    criterion: str
    density: float
    cap: float = 0.25
    scope: str = 'global'
    options: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Rewind:
    """Weights and BN statistics back to the pretrained ones; the current mask stays applied."""


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Frequency label mapping on the training split (eval mode, current mask; through the current
    prompt when `prompted`), computed once the stage's state is ready (reference §2)."""

    prompted: bool = False


@dataclasses.dataclass(frozen=True)
class Run:
    """One result row: the chain of stages that produces it.

    method: the row's method label; sparsity: its target sparsity; has_prompt: whether the run
    trains a prompt (the row then reports accuracy with it too); prompt_at_test: whether the row's
    `accuracy` is the prompted one; mask_from: '<dataset>/<RUN>' of a transferred mask
    (`vpns_jax.transfer`), '' otherwise.
    """

    method: str
    sparsity: float
    stages: tuple[Stage, ...]
    has_prompt: bool = False
    prompt_at_test: bool = False
    # whole channels pruned: the row gets channel sparsity, params, FLOPs and the measured speedup
    # of the slimmed model, final/ the slimmed export; `sparsity` is the channel sparsity
    structured: bool = False
    mask_from: str = ''

    @property
    def name(self) -> str:
        return run_id(self.method, self.sparsity, self.mask_from)


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """How a method makes a mask at one sparsity: the stages before it (possibly shared with other
    runs) and the actions that set it at the start of the next stage."""

    stages: tuple[Stage, ...]
    actions: tuple[Any, ...]


def run_id(method: str, sparsity: float, mask_from: str = '') -> str:
    """Directory-safe run name, e.g. 'vpns_s0.9' ('vpns_s0.9_from_digits_vpns_s0.9' for a mask
    transferred from digits/vpns_s0.9)."""
    name = f'{method}_s{sparsity:g}'
    return f'{name}_from_{mask_from.replace("/", "_")}' if mask_from else name


# ----------------------------------------------------------------------------------------------------
# Reading a method's options (validated once, here, by the code that uses them)


def train_block(epochs: int | None, optimizer: str, lr: float, *, momentum: float = 0.9,
                weight_decay: float = 1e-4, schedule: str = 'cosine',
                prompt_lr: float | None = None) -> mlc.ConfigDict:
    """A config block for one trained group: epochs (omitted when None), optimizer kind, lr,
    momentum, L2 added to the gradient, schedule (and `prompt_lr` when the stage also trains the
    prompt with the same kind of optimizer)."""
    block = {'optimizer': optimizer, 'lr': lr, 'momentum': momentum,
             'weight_decay': weight_decay, 'schedule': schedule}
    if epochs is not None:
        block = {'epochs': epochs, **block}
    if prompt_lr is not None:
        block['prompt_lr'] = prompt_lr
    return mlc.ConfigDict(block)


class Options:
    """A method's config subtree, read with validation: a bad value raises `ConfigError` naming
    `config.<method>.<field>`, its value and what is allowed."""

    def __init__(self, node: mlc.ConfigDict, prefix: str):
        self.node, self.prefix = node, prefix

    @classmethod
    def of(cls, config: mlc.ConfigDict, method: str) -> Options:
        return cls(config[method], f'config.{method}')

    def _fail(self, field: str, value: Any, allowed: str) -> None:
        raise ConfigError(f'{self.prefix}.{field} = {value!r} is not allowed; expected {allowed}.')

    def sub(self, field: str) -> Options:
        return Options(self.node[field], f'{self.prefix}.{field}')

    def one_of(self, field: str, allowed: Iterable[str]) -> str:
        allowed = tuple(allowed)
        value = self.node[field]
        if value not in allowed:
            self._fail(field, value, 'one of ' + ', '.join(map(repr, allowed)))
        return value

    def subset(self, field: str, allowed: Iterable[str]) -> tuple[str, ...]:
        """A tuple (or comma-separated string) of names from `allowed`, in the given order."""
        allowed = tuple(allowed)
        value = self.node[field]
        names = tuple(v.strip() for v in value.split(',') if v.strip()) if isinstance(
            value, str) else tuple(value)
        if not names or any(n not in allowed for n in names):
            self._fail(field, value, 'a non-empty tuple of ' + ', '.join(map(repr, allowed)))
        return names

    def integer(self, field: str, *, minimum: int = 0) -> int:
        value = self.node[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self._fail(field, value, f'an integer >= {minimum}')
        return value

    def number(self, field: str, *, minimum: float = 0.0, below: float | None = None,
               strict: bool = False) -> float:
        value = self.node[field]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and (value > minimum if strict else value >= minimum)
              and (below is None or value < below))
        if not ok:
            bound = f'{">" if strict else ">="} {minimum}' + (f' and < {below}' if below else '')
            self._fail(field, value, f'a finite number {bound}')
        return float(value)

    def flag(self, field: str) -> bool:
        value = self.node[field]
        if not isinstance(value, bool):
            self._fail(field, value, 'True or False')
        return value

    def optimizer(self, field: str | None = None, *, lr_field: str = 'lr') -> GroupOptimizer:
        """The group optimizer of block `field` (this node when None), `lr_field` as the lr."""
        block = self if field is None else self.sub(field)
        kind = block.one_of('optimizer', OPTIMIZER_KINDS)
        lr = block.number(lr_field, strict=kind != 'frozen')
        momentum = block.number('momentum', below=1.0)
        weight_decay = block.number('weight_decay')
        schedule = block.one_of('schedule', SCHEDULES)
        return make_group_optimizer(kind, lr, momentum=momentum, weight_decay=weight_decay,
                                    schedule=schedule)

    def prompt_optimizer(self, field: str) -> GroupOptimizer:
        """The prompt's optimizer in block `field`: the block's kind, momentum, L2 and schedule
        with `prompt_lr` (the released scripts' prompt follows the stage's network optimizer)."""
        if self.sub(field).number('prompt_lr') == 0:
            return FROZEN
        return self.optimizer(field, lr_field='prompt_lr')

    def epochs(self, field: str) -> int:
        return self.sub(field).integer('epochs')


# ----------------------------------------------------------------------------------------------------
# Stage builders shared by the recipes


def tuning_stage(opts: Options, block: str, *, start: Sequence[Any], passes: tuple[Pass, ...],
                 prompt: GroupOptimizer = FROZEN, name: str = 'tuning') -> Stage:
    """Weights (biases, BN affine) trained with block `block`'s optimizer under a fixed mask."""
    return Stage(name, opts.epochs(block), params=opts.optimizer(block), prompt=prompt,
                 passes=passes, mask_mode='fixed', start=tuple(start))


def sparsity_levels(config: mlc.ConfigDict) -> tuple[float, ...]:
    """The configured sparsities (validated by `config.validate`)."""
    return tuple(float(s) for s in config.sparsities)


def finetuned_runs(config: mlc.ConfigDict, method: str, mask_source: Any,
                   levels: Sequence[float] | None = None) -> list[Run]:
    """Prune-then-fine-tune runs (Random, OMP, LTH, SNIP, GraSP, SynFlow; reference §5.0): at each
    sparsity, the method's mask (`mask_source(config, sparsity)`), the label mapping of the pruned
    network, then `config.<method>.tuning` epochs of SGD on the surviving weights, un-prompted."""
    opts = Options.of(config, method)
    runs = []
    for s in sparsity_levels(config) if levels is None else levels:
        source = mask_source(config, s)
        tune = tuning_stage(opts, 'tuning', start=source.actions + (LabelMap(),),
                            passes=UNPROMPTED)
        runs.append(Run(method, s, source.stages + (tune,)))
    return runs


def finetuned_transfer(method: str) -> Callable[[mlc.ConfigDict, MaskSource, float], Run]:
    """The `transfer` hook of a prune-then-fine-tune method: its tuning stage (label mapping of
    the masked network first) on a given mask, at that mask's sparsity."""

    def transfer(config: mlc.ConfigDict, mask: MaskSource, sparsity: float) -> Run:
        (run,) = finetuned_runs(config, method, lambda _config, _s: mask, levels=(sparsity,))
        return run

    return transfer


def criterion_source(config: mlc.ConfigDict, method: str, criterion: str,
                     options: dict[str, Any], sparsity: float) -> MaskSource:
    """A mask from `criterion` on the pretrained weights (pruning at initialisation, §5.7)."""
    scope = Options.of(config, method).one_of('scope', ('global', 'layer'))
    return MaskSource((), (MaskFrom(criterion, 1.0 - sparsity, scope,
                                    tuple(sorted(options.items()))),))
