"""One optimizer per stage: optax.partition over groups, PyTorch L2 semantics, per-epoch lr.

PyTorch's Adam and SGD add ``weight_decay * p`` to the gradient before the moments (L2, not AdamW),
and the learning rate multiplies the final direction only (SGD: ``p -= lr * buf`` with
``buf = m * buf + g``; Adam: ``p -= lr * m_hat / (sqrt(v_hat) + eps)``). Hence each group is
``add_decayed_weights(wd) -> trace(momentum) | scale_by_adam -> scale(-1)``, and the epoch's learning
rate (base lr times the schedule, as torch's ``param_group['lr']``) multiplies that direction in
`apply_updates`. It is computed on the host per epoch (PyTorch steps its scheduler once per epoch) and
passed as a traced value, so the schedule does not depend on the optimizer's internal step count
(which may differ between groups, see `apply_updates`) and stages that differ only in their learning
rates share one compiled step.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
import optax

from vpns_jax.train.stages import GROUPS, GroupOptimizer, Stage

Tree = Any


def group_labels(tree: Mapping[str, Tree]) -> dict[str, Tree]:
    """Label every leaf with its top-level key ('params' | 'scores' | 'prompt')."""
    return {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in tree.items()}


def group_transform(opt: GroupOptimizer) -> optax.GradientTransformation:
    """The optax chain equal to one group's torch.optim optimizer (schedule factor excluded)."""
    if not opt.trainable:
        return optax.set_to_zero()
    parts = []
    if opt.clip:  # torch.nn.utils.clip_grad_value_ before optimizer.step(): before the L2 term
        parts.append(optax.clip(opt.clip))
    if opt.weight_decay:
        parts.append(optax.add_decayed_weights(opt.weight_decay))
    if opt.kind == 'adam':
        parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    elif opt.momentum:
        parts.append(optax.trace(decay=opt.momentum, nesterov=False))
    parts.append(optax.scale(-1.0))  # the lr is the traced factor of `lr_factors`
    return optax.chain(*parts)


def make_optimizer(stage: Stage) -> optax.GradientTransformation:
    """`optax.partition` over the three groups; frozen groups get `set_to_zero`.

    The transformation expects the tree ``{'params': ..., 'scores': ..., 'prompt': ...}``.
    """
    return optax.partition({g: group_transform(stage.group(g)) for g in GROUPS}, group_labels)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base lr during 0-based `epoch` of a stage of `epochs` epochs.

    cosine: torch CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per epoch,
    (1 + cos(pi e / T)) / 2.
    multistep: torch MultiStepLR(milestones=[int(0.5 T), int(0.72 T)], gamma=0.1).
    """
    if schedule == 'constant' or epochs <= 0:
        return 1.0
    if schedule == 'cosine':
        return (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
    if schedule == 'multistep':
        milestones = [int(0.5 * epochs), int(0.72 * epochs)]
        return 0.1 ** bisect.bisect_right(milestones, epoch)
    raise ValueError(f'unknown schedule {schedule!r}')


def lr_factors(stage: Stage, epoch: int) -> dict[str, np.float32]:
    """Per-group learning rates of `epoch` (base lr × schedule; 0 for frozen groups): host f32
    scalars, so a jit argument that neither retraces per epoch nor pins a device (safe with
    multi-host meshes)."""
    return {g: np.float32(stage.group(g).lr * lr_factor(stage.group(g).schedule, epoch,
                                                          stage.epochs)) for g in GROUPS}


def apply_updates(
    tx: optax.GradientTransformation,
    grads: Mapping[str, Tree],
    opt_state: optax.OptState,
    trainables: Mapping[str, Tree],
    *,
    active: Collection[str],
    factors: Mapping[str, jax.Array],
) -> tuple[dict[str, Tree], optax.OptState]:
    """One optimizer step that touches only the `active` groups.

    grads and trainables: ``{'params', 'scores', 'prompt'}`` trees (grads of inactive groups may be
    zeros). A group outside `active` keeps its values AND its optimizer state (moments, Adam count)
    exactly: this is PyTorch >= 2 behaviour for a parameter whose grad is None (reference ambiguity
    3). Returns (new trainables, new optimizer state).
    """
    updates, new_state = tx.update(dict(grads), opt_state, dict(trainables))
    inner = dict(new_state.inner_states)
    new_trainables = {}
    for g in GROUPS:
        if g in active:
            new_trainables[g] = jax.tree.map(
                lambda p, u, f=factors[g]: (p + f * u).astype(p.dtype), trainables[g], updates[g])
        else:
            inner[g] = opt_state.inner_states[g]
            new_trainables[g] = trainables[g]
    return new_trainables, new_state._replace(inner_states=inner)
