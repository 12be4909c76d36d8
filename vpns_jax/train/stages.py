"""Stages as data: which groups train with which optimizer, which passes make an iteration.

A *stage* is a frozen dataclass; one generic loop (`train.loop.run_stage`) runs any stage. Groups
are the three top-level trainable pytrees of `TrainState`: ``'params'`` (conv/dense kernels,
biases, BN affine), ``'scores'`` (one array per prunable kernel) and ``'prompt'`` (the visual
prompt's program).
"""
from __future__ import annotations

import dataclasses

from vpns_jax.errors import ConfigError

GROUPS = ('params', 'scores', 'prompt')
OPTIMIZER_KINDS = ('adam', 'sgd', 'frozen')
SCHEDULES = ('cosine', 'multistep', 'constant')
MASK_MODES = ('learned', 'fixed', 'none')
THRESHOLD_SCOPES = ('global', 'layer')
VIEWS = ('prompt', 'train', 'train_b')


def _check(value, allowed, field: str) -> None:
    if value not in allowed:
        choices = ', '.join(map(repr, allowed))
        raise ConfigError(f'{field}={value!r} is not allowed; use one of {choices}.')


@dataclasses.dataclass(frozen=True)
class GroupOptimizer:
    """Optimizer of one parameter group in one stage (PyTorch semantics, L2 added to the gradient).

    kind: 'adam' (torch.optim.Adam), 'sgd' (torch.optim.SGD, dampening 0, no Nesterov) or 'frozen'.
    lr: base learning rate; the per-epoch schedule multiplies it. momentum: SGD only (0 = plain
    SGD). weight_decay: L2 coefficient added to the gradient before the optimizer (grad += wd * p).
    schedule: 'cosine' (CosineAnnealingLR, T_max = stage epochs, eta_min 0), 'multistep' (x0.1 at
    50% and 72% of the epochs) or 'constant'. b1, b2, eps: Adam's betas and epsilon (PyTorch
    defaults).
    """

    kind: str = 'frozen'
    lr: float = 0.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = 'cosine'
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        _check(self.kind, OPTIMIZER_KINDS, 'optimizer kind')
        _check(self.schedule, SCHEDULES, 'schedule')
        if self.kind != 'frozen' and not self.lr > 0:
            raise ConfigError(f'learning rate must be > 0 for a {self.kind} group, got {self.lr}.')
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f'weight_decay must be >= 0 and momentum in [0, 1): {self}.')

    @property
    def trainable(self) -> bool:
        return self.kind != 'frozen'


FROZEN = GroupOptimizer()


def adam(lr: float, weight_decay: float = 0.0, schedule: str = 'cosine') -> GroupOptimizer:
    """torch.optim.Adam(lr, weight_decay) with default betas/eps."""
    return GroupOptimizer('adam', lr, 0.0, weight_decay, schedule)


def sgd(lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
        schedule: str = 'cosine') -> GroupOptimizer:
    """torch.optim.SGD(lr, momentum, weight_decay) (dampening 0, nesterov False)."""
    return GroupOptimizer('sgd', lr, momentum, weight_decay, schedule)


def make_group_optimizer(kind: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                         schedule: str = 'cosine') -> GroupOptimizer:
    """A group optimizer from a config-style kind name ('adam' | 'sgd' | 'frozen')."""
    _check(kind, OPTIMIZER_KINDS, 'optimizer kind')
    if kind == 'frozen':
        return FROZEN
    if kind == 'adam':
        return adam(lr, weight_decay, schedule)
    return sgd(lr, momentum, weight_decay, schedule)


PASS_RULES = ('step', 'collect', 'bilevel')
IMPLICIT_FORMS = ('port', 'algorithm')


@dataclasses.dataclass(frozen=True)
class Pass:
    """One forward/backward pass of an iteration.

    view: which loader's batch it consumes: 'prompt' (training split, test transform, no
    augmentation), 'train' (training split, augmented) or 'train_b' (a second, independently
    shuffled augmented loader; BiP's lower level). prompted: whether the images go through the
    visual prompt.
    update: the groups this pass differentiates and steps (None = every trainable group of the
    stage; the prompt only in a prompted pass).
    rule: 'step' (one optimizer step of `update`), 'collect' (no step: the gradient of every group
    of the state is kept for the next pass; BiP's "bilevel" backward) or 'bilevel' (the gradient of
    `update` plus BiP's implicit term -bilevel_lr * (g ⊙ g_collected), then one step).
    implicit: the implicit term's form: 'port' (the authors' code: the score gradient times the
    collected score gradient, element by element) or 'algorithm' (BiP's Algorithm: the collected
    gradient w.r.t. the weights, squared, aligned with each kernel's scores).
    """

    view: str
    prompted: bool
    update: tuple[str, ...] | None = None
    rule: str = 'step'
    bilevel_lr: float = 0.0
    implicit: str = 'port'

    def __post_init__(self):
        _check(self.view, VIEWS, 'pass view')
        _check(self.rule, PASS_RULES, 'pass rule')
        _check(self.implicit, IMPLICIT_FORMS, 'implicit form')
        for g in self.update or ():
            _check(g, GROUPS, 'pass update group')

    def active_groups(self, trainable: tuple[str, ...]) -> tuple[str, ...]:
        """The groups this pass steps, given the stage's trainable groups."""
        if self.rule == 'collect':
            return ()
        groups = trainable if self.update is None else self.update
        return tuple(g for g in GROUPS if g in groups and (g != 'prompt' or self.prompted))


# The released code's iteration: prompted pass on the non-augmented batch, then un-prompted pass on
# the augmented batch, each followed by its own optimizer step (reference §4.1).
TWO_PASSES = (Pass('prompt', True), Pass('train', False))
# The paper's objective (Eq. 5/6, ambiguity 2): only prompted inputs; we feed it the augmented
# batch.
PROMPTED_ONLY = (Pass('train', True),)
# HYDRA, dense fine-tuning and every un-prompted baseline: one un-prompted pass on the augmented
# batch.
UNPROMPTED = (Pass('train', False),)
PASS_PRESETS = {'two': TWO_PASSES, 'prompted_only': PROMPTED_ONLY, 'unprompted': UNPROMPTED}


def passes_preset(name: str) -> tuple[Pass, ...]:
    """The pass tuple of a config name: 'two' | 'prompted_only' | 'unprompted'."""
    _check(name, tuple(PASS_PRESETS), 'passes')
    return PASS_PRESETS[name]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    mask_mode: 'learned' (masks = ste_masks(scores, tau) in the forward; tau recomputed from the
    scores before every pass, i.e. after every score step), 'fixed' (hard mask made once at the
    stage start and kept in the state; pruned weights are zeroed and receive no update) or 'none'
    (dense). density: fraction of prunable weights kept (1 - sparsity); used by 'learned' and to
    derive a 'fixed' mask from scores; it is not part of the compiled step (`compute_key`): the
    number of pruned scores travels in the state as a traced value, so stages that differ only in
    density share one compiled step. threshold_scope: 'global' (one tau over all scores, VPNs) or
    'layer' (original HYDRA).
    start: what happens when the stage begins, before its optimizer state is made (the method
    layer's actions: make a mask from a criterion, rewind to the pretrained weights, label mapping,
    ...); opaque to the training engine.
    remap_every_epoch: re-run the frequency label mapping after every epoch (ILM / the pilot
    study's prompt training).
    report_start: the run's accuracy without the prompt is measured when this stage begins (the
    pilot study: the pruned network before its prompt is trained).
    """

    name: str
    epochs: int
    params: GroupOptimizer = FROZEN
    scores: GroupOptimizer = FROZEN
    prompt: GroupOptimizer = FROZEN
    passes: tuple[Pass, ...] = UNPROMPTED
    mask_mode: str = 'none'
    density: float = 1.0
    threshold_scope: str = 'global'
    start: tuple = ()
    remap_every_epoch: bool = False
    report_start: bool = False

    def __post_init__(self):
        _check(self.mask_mode, MASK_MODES, 'mask_mode')
        _check(self.threshold_scope, THRESHOLD_SCOPES, 'threshold_scope')
        if self.epochs < 0:
            raise ConfigError(f'stage {self.name!r}: epochs must be >= 0, got {self.epochs}.')
        if not self.passes:
            raise ConfigError(f'stage {self.name!r}: at least one pass is needed.')
        if not 0 < self.density <= 1:
            raise ConfigError(
                f'stage {self.name!r}: density must be in (0, 1], got {self.density}.')
        if (self.mask_mode == 'learned') != self.scores.trainable:
            raise ConfigError(
                f'stage {self.name!r}: scores train exactly when mask_mode is "learned" '
                f'(mask_mode={self.mask_mode!r}, scores={self.scores.kind!r}).')
        if self.prompt.trainable and not self.prompt_in_stage:
            raise ConfigError(f'stage {self.name!r}: the prompt trains but no pass is prompted.')
        for i, p in enumerate(self.passes):
            frozen = [g for g in p.update or () if not self.group(g).trainable]
            if frozen:
                raise ConfigError(f'stage {self.name!r}: pass {i} updates frozen group(s) {frozen}.')
            if p.rule == 'bilevel' and (i == 0 or self.passes[i - 1].rule != 'collect'):
                raise ConfigError(f"stage {self.name!r}: a 'bilevel' pass must follow a 'collect' "
                                  'pass (its implicit term uses the collected gradients).')

    def compute_key(self) -> Stage:
        """This stage with everything the compiled step does not depend on neutralised (name,
        epochs, density, learning rates, start actions, re-mapping): equal keys share one jitted
        step."""
        def lr_free(opt: GroupOptimizer) -> GroupOptimizer:  # the lr is a traced factor
            return dataclasses.replace(opt, lr=1.0) if opt.trainable else opt

        return dataclasses.replace(self, name='', epochs=0, density=1.0, start=(),
                                   remap_every_epoch=False, report_start=False,
                                   params=lr_free(self.params),
                                   scores=lr_free(self.scores), prompt=lr_free(self.prompt))

    def group(self, name: str) -> GroupOptimizer:
        _check(name, GROUPS, 'group')
        return getattr(self, name)

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        return tuple(g for g in GROUPS if self.group(g).trainable)

    @property
    def prompt_in_stage(self) -> bool:
        """Whether any pass of this stage runs the images through the prompt."""
        return any(p.prompted for p in self.passes)

    @property
    def views(self) -> tuple[str, ...]:
        """The loader views one iteration consumes, in first-use order."""
        return tuple(dict.fromkeys(p.view for p in self.passes))

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per iteration (one per pass that steps; a 'collect' pass does not)."""
        return sum(p.rule != 'collect' for p in self.passes)
