"""Channel masks: the global channel threshold with the reference's cap, straight-through channel
masks, and their expansion onto the parameters (vpns_reference.md §6).

Channel scores and masks are dicts keyed by `ChannelGroup.name`, one f32[size] (masks: bool[size]
or float) per group. A channel mask is applied by masking PARAMETERS (`expand`, then
`vpns_jax.train.state.zero_pruned`): the producers' kernels on their output axis (and their biases),
the BatchNorms' scale AND bias (γ·x̂ + β = 0 for a pruned channel: the same as masking the BN output,
as the reference does, gradients included), and the consumers' kernels on their input axis. Every
mask is a multiplication of parameters by a broadcast mask, so a straight-through float mask per
group gives the score gradient by autodiff.

Selection rule (`channel_threshold`), exact and deterministic:
- k = floor(sparsity · total channels + 1e-6) channels are pruned, exactly (the 1e-6 absorbs the
  float error of 1 − density, as `sparsity.criteria.num_kept`). Total channels = Σ group sizes: a
  residual group's channel counts once, though pruning it removes one output channel of each of its
  producers (`channel_sparsity_summary` reports both counts).
- Channels are ranked by |score| ascending; ties: the channel earlier in group order (groups in
  forward order, channels by index) ranks lower, i.e. is pruned first.
- A capped group prunes at most floor(cap · size + 1e-6) channels: when the global threshold would
  prune more, the group gets its own threshold at the cap and the global threshold over the rest is
  recomputed so the total is still k (the reference's rule; equivalently, channels are taken in rank
  order, skipping those of groups that are full).
- Every group keeps at least one channel (a group pruned to nothing would disconnect the network and
  could not be slimmed): it prunes at most size − 1, and the channel it keeps is replaced by the next
  channel in rank order elsewhere, so the count is still exactly k.
- When the groups cannot absorb k (the capped groups' limit plus one kept channel per group), a
  ConfigError names the capped layers.
Everything but the count is traceable: the masks are recomputed inside a jitted step from traced
scores.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vpns_jax.errors import ConfigError
from vpns_jax.structured.groups import ChannelGroup


def _check(sparsity: float, cap: float) -> None:
    if not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError(f"channel sparsity must be in [0, 1), got {sparsity}; it is the fraction "
                          "of conv output channels pruned")
    if not 0.0 <= float(cap) <= 1.0:
        raise ConfigError(f"channel cap must be in [0, 1], got {cap}; it is the most channel "
                          "sparsity a capped group (ResNet stem and layer1) may have")


def most_pruned(group: ChannelGroup, cap: float) -> int:
    """The most channels `group` may lose: size − 1, and floor(cap · size) when it is capped."""
    limit = group.size - 1
    if group.capped:
        limit = min(limit, math.floor(cap * group.size + 1e-6))
    return limit


def pruned_channel_count(groups: Sequence[ChannelGroup], sparsity: float,
                         cap: float = 0.25) -> int:
    """Channels pruned at `sparsity` (floor(sparsity · total + 1e-6)); ConfigError when sparsity is
    outside [0, 1) or the groups cannot lose that many under `cap` (naming the capped layers)."""
    _check(sparsity, cap)
    total = sum(g.size for g in groups)
    k = math.floor(float(sparsity) * total + 1e-6)
    room = sum(most_pruned(g, cap) for g in groups)
    if k > room:
        capped = [p.rsplit("/", 1)[0] for g in groups if g.capped for p in g.producers]
        capped_room = sum(most_pruned(g, cap) for g in groups if g.capped)
        raise ConfigError(
            f"channel sparsity {sparsity} prunes {k} of {total} channels, but at most {room} can "
            f"go: the cap {cap} limits the capped layers {', '.join(capped) or '(none)'} to "
            f"{capped_room} and every group keeps one channel; lower the sparsity or raise the cap")
    return k


def _check_scores(scores: Mapping[str, jax.Array], groups: Sequence[ChannelGroup]) -> None:
    names = [g.name for g in groups]
    if set(scores) != set(names):
        missing, extra = sorted(set(names) - set(scores)), sorted(set(scores) - set(names))
        raise ConfigError(f"channel scores must have one entry per channel group; missing "
                          f"{missing[:5]}, unexpected {extra[:5]}")
    for g in groups:
        if tuple(jnp.shape(scores[g.name])) != (g.size,):
            raise ConfigError(f"channel scores of group {g.name} have shape "
                              f"{tuple(jnp.shape(scores[g.name]))}, expected ({g.size},)")


@functools.partial(jax.jit, static_argnums=(1, 2))
def pruned_channels(values: jax.Array, sizes: tuple[int, ...], limits: tuple[int, ...],
                    k: int | jax.Array) -> jax.Array:
    """bool[N]: which of the N = Σ sizes channels are pruned.

    values: f32[N], the groups' |scores| concatenated in group order. limits: the most channels
    each group may lose. k: how many to prune (Python or traced int, ≤ Σ limits). The k lowest in
    rank order (value, then index) are pruned, skipping channels of groups that are full. Jitted
    (one program per group layout, any k).
    """
    n = int(values.shape[0])
    gid = np.repeat(np.arange(len(sizes)), sizes)
    offset = np.repeat(np.cumsum([0, *sizes[:-1]]), sizes)
    limit = np.repeat(np.asarray(limits, np.int32), sizes)
    order = jnp.argsort(values, stable=True)  # ties: lower index first
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    by_group = jnp.argsort(jnp.asarray(gid, jnp.int32) * n + rank)  # keys are unique
    pos = jnp.zeros(n, jnp.int32).at[by_group].set(jnp.arange(n, dtype=jnp.int32))
    eligible = (pos - offset) < limit  # among its group's `limit` lowest
    eligible_sorted = eligible[order]
    taken = eligible_sorted & (jnp.cumsum(eligible_sorted.astype(jnp.int32)) <= k)
    return taken[rank]


def channel_threshold(scores: Mapping[str, jax.Array], groups: Sequence[ChannelGroup],
                      sparsity: float, cap: float = 0.25) -> dict[str, jax.Array]:
    """{group name: bool[size]} channels kept at channel `sparsity` (module docstring's rule).

    scores: {group name: f32[size]} (|score| ranks; traced values allowed). sparsity in [0, 1) and
    cap in [0, 1] are Python floats. Exactly floor(sparsity · total + 1e-6) channels are pruned.
    """
    k = pruned_channel_count(groups, sparsity, cap)
    _check_scores(scores, groups)
    if k == 0:
        return {g.name: jnp.ones((g.size,), bool) for g in groups}
    values = jnp.concatenate([jnp.abs(jnp.asarray(scores[g.name], jnp.float32)) for g in groups])
    sizes = tuple(g.size for g in groups)
    pruned = pruned_channels(values, sizes, tuple(most_pruned(g, cap) for g in groups), k)
    keep = ~pruned
    starts = np.cumsum([0, *sizes])
    return {g.name: keep[starts[i]:starts[i + 1]] for i, g in enumerate(groups)}


@jax.custom_vjp
def _straight_through(score: jax.Array, hard: jax.Array) -> jax.Array:
    return hard


def _st_fwd(score, hard):
    return hard, jnp.sign(score)


def _st_bwd(sign, g):
    return sign * g, jnp.zeros_like(g)


_straight_through.defvjp(_st_fwd, _st_bwd)


def channel_ste_masks(scores: Mapping[str, jax.Array], groups: Sequence[ChannelGroup],
                      sparsity: float, cap: float = 0.25) -> dict[str, jax.Array]:
    """{group name: f32[size]}: forward the `channel_threshold` mask (1 kept, 0 pruned); backward
    ∂L/∂score = sign(score) · ∂L/∂mask (sign(0) = 0, as `sparsity.masks.ste_mask`). The threshold is
    computed outside the gradient."""
    hard = channel_threshold(jax.lax.stop_gradient(dict(scores)), groups, sparsity, cap)
    return {name: _straight_through(jnp.asarray(scores[name], jnp.float32),
                                    keep.astype(jnp.float32))
            for name, keep in hard.items()}


def _combine(a: jax.Array | None, b: jax.Array) -> jax.Array:
    if a is None:
        return b
    if a.dtype == jnp.bool_ and b.dtype == jnp.bool_:
        return a & b
    return a * b


def expand(groups: Sequence[ChannelGroup], channel_masks: Mapping[str, jax.Array],
           params: Mapping) -> dict[str, jax.Array]:
    """Per-channel masks → {flat param path: mask broadcastable to that parameter}.

    Producer kernels: on the output (last) axis, shape (1, ..., 1, C); their biases and the groups'
    BatchNorm scale and bias: (C,); consumer conv kernels: on the input axis, (1, 1, C, 1); dense
    consumers: (in_features, 1), each channel's mask repeated over the in_features that come from
    it (1 after global pooling; VGG's 7×7 channel-major flatten: 49). A kernel that is both a
    consumer and a producer gets the product, (1, 1, C_in, C_out). The masks keep their dtype
    (bool masks combine with `and`, float masks multiply, so a straight-through gradient flows).
    params: nested or flat params (only shapes are read).
    """
    from vpns_jax.sparsity.scores import flatten_params

    flat = flatten_params(params) if any(isinstance(v, Mapping) for v in params.values()) \
        else dict(params)
    missing = sorted(set(g.name for g in groups) - set(channel_masks))
    if missing:
        raise ConfigError(f"channel masks missing for groups {missing[:5]}")
    out: dict[str, jax.Array] = {}

    def put(path: str, mask: jax.Array) -> None:
        if path not in flat:
            raise ConfigError(f"channel groups name {path}, which is not a parameter of this model; "
                              "derive the groups from the same model (channel_groups)")
        out[path] = _combine(out.get(path), mask)

    for g in groups:
        m = jnp.asarray(channel_masks[g.name])
        if m.shape != (g.size,):
            raise ConfigError(f"channel mask of group {g.name} has shape {m.shape}, expected "
                              f"({g.size},)")
        for path in g.producers:
            put(path, m.reshape((1,) * (jnp.ndim(flat.get(path, m)) - 1) + (g.size,)))
        for path in g.biases:
            put(path, m)
        for module in g.norms:
            put(f"{module}/scale", m)
            put(f"{module}/bias", m)
        for path in g.consumers:
            shape = jnp.shape(flat[path]) if path in flat else ()
            if len(shape) == 4:
                put(path, m.reshape(1, 1, g.size, 1))
            else:
                put(path, jnp.repeat(m, shape[0] // g.size).reshape(-1, 1) if shape else m)
    return out


def channel_sparsity_summary(groups: Sequence[ChannelGroup],
                             channel_masks: Mapping[str, jax.Array]) -> dict:
    """Kept (nonzero) channels, plain Python numbers for the results rows:
    {'total': {'channels', 'kept', 'sparsity', 'conv_channels', 'conv_kept', 'conv_sparsity'},
     'groups': {name: {'size', 'kept', 'sparsity', 'layers'}}}.

    'channels' counts each group's channels once (the unit of `channel_threshold`'s sparsity);
    'conv_channels' counts the output channels of every conv (a residual group's channel once per
    producer, downsample convs included), the unit of the reference's per-conv masks.
    """
    rows = {}
    total = kept = conv_total = conv_kept = 0
    for g in groups:
        k = int(np.count_nonzero(np.asarray(channel_masks[g.name])))
        rows[g.name] = {"size": g.size, "kept": k, "sparsity": 1.0 - k / g.size,
                        "layers": [p.rsplit("/", 1)[0] for p in g.producers]}
        total, kept = total + g.size, kept + k
        conv_total += g.size * len(g.producers)
        conv_kept += k * len(g.producers)
    return {"total": {"channels": total, "kept": kept,
                      "sparsity": 1.0 - kept / total if total else 0.0,
                      "conv_channels": conv_total, "conv_kept": conv_kept,
                      "conv_sparsity": 1.0 - conv_kept / conv_total if conv_total else 0.0},
            "groups": rows}
