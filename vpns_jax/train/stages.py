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
MASK_MODES = ('learned', 'fixed', 'none', 'channel')
THRESHOLD_SCOPES = ('global', 'layer')
VIEWS = ('prompt', 'train', 'train_b')


def _repr_skipping_defaults(obj, later: tuple[str, ...]) -> str:
    """The dataclass repr, without the fields in `later` that hold their default value.

    Stage keys (`runner.stage_keys`) hash stage reprs; fields added after workdirs were made
    (`later`) appear only when set, so the keys of every existing stage, and the resume of every
    existing workdir, stay the same.
    """
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.repr and not (f.name in later and value == f.default):
            parts.append(f'{f.name}={value!r}')
    return f'{type(obj).__qualname__}({", ".join(parts)})'


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
    defaults). clip: > 0 clips every gradient entry to [-clip, clip] before the step
    (torch.nn.utils.clip_grad_value_ before optimizer.step(), so before the L2 term; the
    structured research script's score optimizer uses 0.25, reference §6); 0 = no clipping.
    """

    kind: str = 'frozen'
    lr: float = 0.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = 'cosine'
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip: float = 0.0

    def __repr__(self) -> str:
        return _repr_skipping_defaults(self, ('clip',))

    def __post_init__(self):
        if not self.clip >= 0:
            raise ConfigError(f'gradient value clip must be >= 0 (0 = none), got {self.clip}.')
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
                         schedule: str = 'cosine', clip: float = 0.0) -> GroupOptimizer:
    """A group optimizer from a config-style kind name ('adam' | 'sgd' | 'frozen'); `clip`: the
    gradient value clip (0 = none)."""
    _check(kind, OPTIMIZER_KINDS, 'optimizer kind')
    if kind == 'frozen':
        return FROZEN
    opt = adam(lr, weight_decay, schedule) if kind == 'adam' else sgd(lr, momentum, weight_decay,
                                                                        schedule)
    return dataclasses.replace(opt, clip=clip) if clip else opt


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
    stage start and kept in the state; pruned weights are zeroed and receive no update), 'none'
    (dense) or 'channel' (structured mask finding: the scores are one f32[C] per channel group of
    `vpns_jax.structured`; the forward masks the parameters with
    `expand(channel_ste_masks(scores, density, channel_cap))`, the channel threshold recomputed
    before every pass; the next stage freezes them with `plan.ChannelMaskFrom`).
    density: fraction of prunable weights kept (1 - sparsity; in a 'channel' stage the fraction of
    channels kept); used by 'learned' and to derive a 'fixed' mask from scores; it is not part of
    the compiled step (`compute_key`, except in a 'channel' stage): the number of pruned scores
    travels in the state as a traced value, so stages that differ only in density share one
    compiled step. threshold_scope: 'global' (one tau over all scores, VPNs) or
    'layer' (original HYDRA).
    start: what happens when the stage begins, before its optimizer state is made (the method
    layer's actions: make a mask from a criterion, rewind to the pretrained weights, label mapping,
    ...); opaque to the training engine.
    remap_every_epoch: re-run the frequency label mapping after every epoch (ILM / the pilot
    study's prompt training).
    report_start: the run's accuracy without the prompt is measured when this stage begins (the
    pilot study: the pruned network before its prompt is trained).
    channel_cap: 'channel' stages: the most channel sparsity a capped group (the stem and layer1
    for ResNet) may get (reference §6: 0.25).
    bn_l1: > 0 adds bn_l1 * sign(gamma) to the gradient of every BatchNorm scale before the step
    (Network Slimming's sparsity term lambda * |gamma|, as its code and Torch-Pruning's
    BNScalePruner.regularize do); 0 = none.
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
    channel_cap: float = 0.25
    bn_l1: float = 0.0

    def __repr__(self) -> str:
        return _repr_skipping_defaults(self, ('channel_cap', 'bn_l1'))

    def __post_init__(self):
        _check(self.mask_mode, MASK_MODES, 'mask_mode')
        if not 0 < self.channel_cap <= 1:
            raise ConfigError(f'stage {self.name!r}: channel_cap must be in (0, 1], got '
                              f'{self.channel_cap}.')
        if not self.bn_l1 >= 0:
            raise ConfigError(f'stage {self.name!r}: bn_l1 must be >= 0, got {self.bn_l1}.')
        _check(self.threshold_scope, THRESHOLD_SCOPES, 'threshold_scope')
        if self.epochs < 0:
            raise ConfigError(f'stage {self.name!r}: epochs must be >= 0, got {self.epochs}.')
        if not self.passes:
            raise ConfigError(f'stage {self.name!r}: at least one pass is needed.')
        if not 0 < self.density <= 1:
            raise ConfigError(
                f'stage {self.name!r}: density must be in (0, 1], got {self.density}.')
        if (self.mask_mode in ('learned', 'channel')) != self.scores.trainable:
            raise ConfigError(
                f'stage {self.name!r}: scores train exactly when mask_mode is "learned" or '
                '"channel" '
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
        step. A 'channel' stage keeps its density: its channel threshold is computed from it
        inside the step."""
        def lr_free(opt: GroupOptimizer) -> GroupOptimizer:  # the lr is a traced factor
            return dataclasses.replace(opt, lr=1.0) if opt.trainable else opt

        density = self.density if self.mask_mode == 'channel' else 1.0
        return dataclasses.replace(self, name='', epochs=0, density=density, start=(),
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
