"""Baseline pruning criteria (VPNs reference §5.1–5.7) as pure functions on one exact top-k.

Every criterion has the signature

    fn(params, batch_stats, model, batches, rng, density, scope='global', **options)
        -> {path: bool mask}

over `prunable_paths(params)` (every conv / dense kernel; conv HWIO, dense (in, out)):

- `params`, `batch_stats`: nested Flax collections of the (pretrained) model;
- `model`: a Flax module called as `model.apply({'params', 'batch_stats'}, x, train=False)`
  (eval mode: BN uses running statistics, reference §5.7) returning raw logits [B, K];
- `batches`: list of host dicts {'image': f32[B, H, W, 3] in [0, 1], 'label': i32[B]}; a criterion
  that needs one batch concatenates them; images go through `prompts.normalize` before the model;
- `rng`: a `jax.random` key (used by `random` and GraSP's 'ratios' mode only);
- `density`: fraction kept, in (0, 1]; `scope`: 'global' (one ranking over all layers) or 'layer'.

Kept counts are exact: `num_kept(N, density)` entries via `top_k_masks` (ties broken by position),
except where a reference rule adds entries (SNIP's non-empty-layer rule) or draws at random.
Score functions (`snip_scores`, `grasp_scores`, `synflow_scores`) take the model input `x`
(already normalized) and return float scores per prunable path.

The scores are computed in float32 whatever the model's computation dtype (a bfloat16 model from
`config.model.dtype` is cloned to float32 for them): a criterion runs once per mask, so its cost
does not matter, while bfloat16's 8-bit mantissa would tie most of the ranked scores, GraSP's
Hessian-gradient product cancels large sums, and SynFlow multiplies |W| through every layer.
The masks thus do not depend on the training dtype.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vpns_jax import models, prompts
from vpns_jax.sparsity.masks import apply_masks
from vpns_jax.sparsity.scores import flatten_params, prunable_paths
from vpns_jax.sparsity.threshold import _check_density, kth_smallest

Array = jax.Array
Masks = dict[str, Array]
Count = int | Array
SCOPES = ("global", "layer")


# ----------------------------------------------------------------------------------------------
# Counts and the exact top-k
# ----------------------------------------------------------------------------------------------


def num_kept(n: int, density: float) -> int:
    """Entries kept out of `n` at `density`: n − floor((1 − density)·n + 1e-6).

    The +1e-6 absorbs float representation error (density 0.3 of 1000 keeps exactly 300, not 301).
    """
    return n - math.floor((1.0 - _check_density(density)) * n + 1e-6)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: allowed values are {', '.join(SCOPES)}.")
    return scope


def keep_counts(
    sizes: Mapping[str, int], density: float, scope: str = "global"
) -> int | dict[str, int]:
    """`num_kept` of the total size (scope 'global': an int) or of each layer ('layer': a dict)."""
    if _check_scope(scope) == "global":
        return num_kept(sum(int(n) for n in sizes.values()), density)
    return {p: num_kept(int(n), density) for p, n in sizes.items()}


def _ranked_values(score: Array, eligible: Array | None) -> Array:
    """f32 scores with ineligible entries (and NaN) at −inf: the values `top_k_masks` ranks."""
    s = jnp.asarray(score).astype(jnp.float32)
    drop = jnp.isnan(s) if eligible is None else jnp.isnan(s) | ~jnp.asarray(eligible, bool)
    return jnp.where(drop, -jnp.inf, s)


def _top_k_global(
    scores: Mapping[str, Array], n_keep: Count, eligible: Mapping[str, Array] | None
) -> Masks:
    """Exact top-k over all entries of `scores`, global order = sorted paths, then row-major."""
    paths = sorted(scores)
    elig = {p: jnp.ones(jnp.shape(scores[p]), bool) if eligible is None
            else jnp.asarray(eligible[p], bool) for p in paths}
    values = {p: _ranked_values(scores[p], None if eligible is None else elig[p]) for p in paths}
    n = sum(int(v.size) for v in values.values())
    if n == 0:
        return {p: jnp.zeros(jnp.shape(scores[p]), bool) for p in paths}
    n_eligible = sum(jnp.sum(elig[p], dtype=jnp.int32) for p in paths)
    k = jnp.clip(jnp.asarray(n_keep, jnp.int32), 0, n_eligible)
    # v = the k-th largest value (k = 0: the maximum, with nothing above it and no tie kept).
    v = kth_smallest([values[p] for p in paths], n - k + 1)
    above = {p: (values[p] > v) & elig[p] for p in paths}
    ties = {p: (values[p] == v) & elig[p] for p in paths}
    room = k - sum(jnp.sum(above[p], dtype=jnp.int32) for p in paths)  # ties still to keep
    masks, later = {}, jnp.zeros((), jnp.int32)  # `later`: tie count in the following layers
    for p in reversed(paths):
        flat = jnp.ravel(ties[p]).astype(jnp.int32)
        from_here = jnp.cumsum(flat[::-1])[::-1] + later  # ties at or after each position
        keep_tie = ties[p] & (from_here.reshape(ties[p].shape) <= room)
        masks[p] = above[p] | keep_tie
        later = later + jnp.sum(flat)
    return {p: masks[p] for p in paths}


# One compiled program per set of shapes (nested inside an outer jit it is simply inlined); eager
# op-by-op execution would compile dozens of small programs instead.
_top_k_global_jit = jax.jit(_top_k_global)


def top_k_masks(
    scores: Mapping[str, Array],
    n_keep: Count | Mapping[str, Count],
    *,
    eligible: Mapping[str, Array] | None = None,
) -> Masks:
    """Bool masks keeping exactly the `n_keep` largest scores.

    scores: {path: float array}; compared in float32 (f64 scores are cast).
    n_keep: one count (Python int or traced int32 scalar) over ALL layers, or {path: count} per
        layer; clipped to [0, number of eligible entries].
    eligible: {path: bool array}; False entries are never kept (they rank as −inf, as do NaNs).
    Ties at the threshold value: the entries LATER in the global order (paths sorted, then
    row-major within a layer) are kept. Jit-able with traced counts: one radix select
    (`threshold.kth_smallest`) plus counts and cumulative sums, no sort.
    """
    if not isinstance(n_keep, Mapping):
        return _top_k_global_jit(dict(scores), n_keep, None if eligible is None else dict(eligible))
    missing = sorted(set(scores) - set(n_keep))
    if missing:
        raise KeyError(f"top_k_masks: no count for paths {missing[:5]}")
    masks = {}
    for p in sorted(scores):
        sub_eligible = None if eligible is None else {p: eligible[p]}
        masks.update(_top_k_global_jit({p: scores[p]}, n_keep[p], sub_eligible))
    return masks


def _sizes(tree: Mapping[str, Any]) -> dict[str, int]:
    return {p: int(np.prod(jnp.shape(v))) for p, v in tree.items()}


def _keep_by_density(
    scores: Mapping[str, Array],
    density: float,
    scope: str,
    eligible: Mapping[str, Array] | None = None,
) -> Masks:
    """Top `num_kept(·, density)` scores, globally or per layer."""
    return top_k_masks(scores, keep_counts(_sizes(scores), density, scope), eligible=eligible)


def layer_densities(masks: Mapping[str, Array]) -> dict[str, float]:
    """Kept fraction of each mask (host floats)."""
    return {p: float(np.mean(np.asarray(m, bool))) if np.size(m) else 0.0
            for p, m in masks.items()}


# ----------------------------------------------------------------------------------------------
# Shared model plumbing
# ----------------------------------------------------------------------------------------------


def _kernels(params: Mapping) -> dict[str, Array]:
    flat = flatten_params(params)
    return {p: flat[p] for p in prunable_paths(params)}


def _with_kernels(params: Mapping, kernels: Mapping[str, Array]) -> dict:
    """Nested params with the given flat kernels substituted."""
    flat = flatten_params(params)
    flat.update(kernels)
    return traverse_util.unflatten_dict(flat, sep="/")


def _forward(model: Any, params: Mapping, batch_stats: Mapping | None, x: Array) -> Array:
    """Eval-mode forward (BN running statistics), always in float32 (see the module docstring)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return models.with_dtype(model, jnp.float32).apply(variables, x, train=False)


def _cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy with integer targets (torch `F.cross_entropy`)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


def _concat(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One host batch from a list of batches (images and labels concatenated in order)."""
    if not batches:
        raise ValueError("criteria: `batches` is empty; pass at least one {'image', 'label'} batch.")
    return {k: np.concatenate([np.asarray(b[k]) for b in batches]) for k in ("image", "label")}


def _model_input(batches: Sequence[Mapping[str, np.ndarray]]) -> tuple[Array, Array]:
    """(normalized images, labels) of the concatenated batches."""
    batch = _concat(batches)
    images = jnp.asarray(batch["image"])  # f32 (f64 kept when x64 is enabled)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    return prompts.normalize(images), jnp.asarray(batch["label"])


def _normalized(scores: Mapping[str, Array], norm: Array) -> dict[str, Array]:
    return {p: s / norm for p, s in scores.items()}


def _total(scores: Mapping[str, Array]) -> Array:
    return sum(jnp.sum(s) for s in scores.values())


# ----------------------------------------------------------------------------------------------
# Magnitude (OMP §5.2, LTH §5.3)
# ----------------------------------------------------------------------------------------------


def magnitude(
    params: Mapping,
    batch_stats: Mapping | None = None,
    model: Any = None,
    batches: Sequence | None = None,
    rng: Array | None = None,
    density: float = 1.0,
    scope: str = "global",
    *,
    within: Mapping[str, Array] | None = None,
    n_keep: Count | Mapping[str, Count] | None = None,
) -> Masks:
    """Keep the largest |W| (reference §5.2 OMP, §5.3 LTH round; torch `L1Unstructured`).

    within: a previous mask; only its survivors compete, entries outside stay pruned and do not
        count as kept (an IMP round). The count is num_kept(N, density) of the TOTAL size N
        (per layer with scope 'layer'), capped at the survivors.
    n_keep: explicit count(s) overriding `density`, e.g. from `imp_kept_counts`.
    """
    scores = {p: jnp.abs(w) for p, w in _kernels(params).items()}
    if n_keep is None:
        n_keep = keep_counts(_sizes(scores), density, scope)
    return top_k_masks(scores, n_keep, eligible=within)


def imp_kept_counts(n_total: int, rounds: int, rate: float = 0.2) -> list[int]:
    """Survivors after each IMP round of `global_unstructured(amount=rate)` (reference §5.3).

    torch prunes round(rate · remaining) of the remaining entries each round (Python's round,
    half to even); e.g. 1000 -> [800, 640, 512].
    """
    remaining, counts = int(n_total), []
    for _ in range(rounds):
        remaining -= round(rate * remaining)
        counts.append(remaining)
    return counts


# ----------------------------------------------------------------------------------------------
# Random (§5.1) and ERK
# ----------------------------------------------------------------------------------------------


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def bernoulli_masks(
    rng: Array, shapes_or_params: Mapping[str, Any], layer_density: Mapping[str, float]
) -> Masks:
    """Each entry of layer p kept independently with probability layer_density[p].

    shapes_or_params: {path: array or shape tuple}; one key per path from `jax.random.split(rng)`
    in sorted path order. Mirrors `torch.rand(shape) < density` of the reference (§5.1, §5.5).
    """
    paths = sorted(shapes_or_params)
    keys = jax.random.split(rng, len(paths))
    return {p: jax.random.uniform(key, _shape_of(shapes_or_params[p])) < layer_density[p]
            for p, key in zip(paths, keys, strict=True)}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities (RigL `sparse_utils`, erk_power_scale 1).

    density_l = ε · (Σ dims_l)/(Π dims_l), ε chosen so Σ density_l·n_l = num_kept(N, density);
    a layer whose density would exceed 1 is made dense (all layers sharing the largest raw
    ratio at once, as RigL) and ε is solved again for the rest.
    """
    shapes = {p: tuple(int(d) for d in s) for p, s in shapes.items()}
    sizes = {p: math.prod(s) for p, s in shapes.items()}
    target = num_kept(sum(sizes.values()), density)
    raw = {p: sum(s) / sizes[p] for p, s in shapes.items()}
    dense: set[str] = set()
    while True:
        sparse = [p for p in shapes if p not in dense]
        if not sparse:
            break
        eps = (target - sum(sizes[p] for p in dense)) / sum(raw[p] * sizes[p] for p in sparse)
        top = max(raw[p] for p in sparse)
        if eps * top <= 1.0:
            break
        dense |= {p for p in sparse if raw[p] == top}
    return {p: 1.0 if p in dense else eps * raw[p] for p in shapes}


def erk_counts(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, int]:
    """Exact per-layer counts for ERK summing to num_kept(N, density).

    floor(density_l · n_l) per layer, then the remaining entries go one each to the layers with
    the largest fractional parts (ties: sorted path order).
    """
    densities = erk_densities(shapes, density)
    sizes = {p: math.prod(int(d) for d in s) for p, s in shapes.items()}
    target = num_kept(sum(sizes.values()), density)
    exact = {p: min(densities[p], 1.0) * sizes[p] for p in sorted(shapes)}
    counts = {p: min(math.floor(x), sizes[p]) for p, x in exact.items()}
    open_ = sorted((p for p in counts if counts[p] < sizes[p]),
                   key=lambda p: -(exact[p] - counts[p]))  # stable: sorted paths break ties
    for p in open_[: max(target - sum(counts.values()), 0)]:
        counts[p] += 1
    return counts


def _random_exact(rng: Array, shapes: Mapping[str, Any], counts: Mapping[str, int]) -> Masks:
    """Exactly counts[p] uniformly random positions per layer (top-k of uniform noise)."""
    paths = sorted(shapes)
    keys = jax.random.split(rng, len(paths))
    noise = {p: jax.random.uniform(key, _shape_of(shapes[p]))
             for p, key in zip(paths, keys, strict=True)}
    return top_k_masks(noise, dict(counts))


RANDOM_MODES = ("bernoulli", "exact", "erk")


def random(
    params: Mapping,
    batch_stats: Mapping | None = None,
    model: Any = None,
    batches: Sequence | None = None,
    rng: Array | None = None,
    density: float = 1.0,
    scope: str = "global",
    *,
    mode: str = "bernoulli",
) -> Masks:
    """Random masks (reference §5.1). `scope` is unused (every mode is layer-wise by nature).

    mode 'bernoulli' (the VPNs baseline): each weight kept with probability `density`, same in
    every layer, not an exact count. 'exact': num_kept(n_l, density) random positions per layer.
    'erk': ERK layer densities with exact per-layer counts totalling num_kept(N, density).
    """
    _check_scope(scope)
    if rng is None:
        raise ValueError("random: an rng key is required.")
    kernels = _kernels(params)
    if mode == "bernoulli":
        return bernoulli_masks(rng, kernels, {p: _check_density(density) for p in kernels})
    if mode == "exact":
        return _random_exact(rng, kernels, keep_counts(_sizes(kernels), density, "layer"))
    if mode == "erk":
        shapes = {p: w.shape for p, w in kernels.items()}
        return _random_exact(rng, kernels, erk_counts(shapes, density))
    raise ValueError(f"random: mode={mode!r}; allowed values are {', '.join(RANDOM_MODES)}.")


# ----------------------------------------------------------------------------------------------
# SNIP (§5.4)
# ----------------------------------------------------------------------------------------------


def snip_scores(
    params: Mapping, batch_stats: Mapping | None, model: Any, x: Array, labels: Array
) -> dict[str, Array]:
    """SNIP saliency |∂L/∂m| at m = 1 (= |g ⊙ W|), normalised by the sum of all scores (§5.4).

    L = mean CE of the RAW model outputs (eval mode) with `labels` as integer targets (downstream
    labels index the source logits directly, as the reference; no label mapping).
    x: normalized model input [B, H, W, 3]; labels: int [B].
    """
    ones = {p: jnp.ones_like(w) for p, w in _kernels(params).items()}

    def loss(m: Mapping[str, Array]) -> Array:
        return _cross_entropy(_forward(model, apply_masks(params, m), batch_stats, x), labels)

    scores = {p: jnp.abs(g) for p, g in jax.grad(loss)(ones).items()}
    return _normalized(scores, _total(scores))


def _keep_nonempty(masks: Mapping[str, Array], scores: Mapping[str, Array]) -> Masks:
    """SNIP rule: a layer that keeps nothing keeps its single best entry (first argmax)."""
    out = {}
    for p, m in masks.items():
        best = jnp.zeros(m.size, bool).at[jnp.argmax(jnp.ravel(scores[p]))].set(True)
        out[p] = jnp.where(jnp.any(m), m, best.reshape(m.shape))
    return out


def snip(
    params: Mapping,
    batch_stats: Mapping | None,
    model: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    rng: Array | None = None,
    density: float = 1.0,
    scope: str = "global",
) -> Masks:
    """SNIP (reference §5.4): one mini-batch (all `batches` concatenated), top num_kept scores
    (global, or per layer with scope 'layer'); an empty layer keeps its best entry (so the total
    can exceed num_kept by the number of such layers)."""
    _check_scope(scope)
    x, labels = _model_input(batches)
    scores = _snip_scores_jit(params, batch_stats, model, x, labels)
    return _keep_nonempty(_keep_by_density(scores, density, scope), scores)


# ----------------------------------------------------------------------------------------------
# GraSP (§5.5)
# ----------------------------------------------------------------------------------------------


def grasp_scores(
    params: Mapping,
    batch_stats: Mapping | None,
    model: Any,
    x: Array,
    labels: Array,
    temperature: float = 200.0,
) -> dict[str, Array]:
    """GraSP scores −W ⊙ Hg normalised by |Σ scores| + 1e-10 (Wang et al.; reference §5.5).

    Halves A = x[:N//2], B = x[N//2:]; L_h = mean CE(f(h)/T) of the raw outputs, eval mode.
    g = ∇_W L_A + ∇_W L_B (treated as a constant); Hg = Σ_h ∇_W ⟨g, ∇_W L_h⟩ over the prunable
    kernels W (biases and BN fixed). One iteration (num_iters = 1). Large score = remove.
    """
    if x.shape[0] < 2:
        raise ValueError(f"grasp_scores: needs at least 2 examples (two halves), got {x.shape[0]}.")
    kernels = _kernels(params)
    n = x.shape[0]
    halves = [(x[: n // 2], labels[: n // 2]), (x[n // 2:], labels[n // 2:])]

    def loss(w: Mapping[str, Array], xs: Array, ys: Array) -> Array:
        logits = _forward(model, _with_kernels(params, w), batch_stats, xs)
        return _cross_entropy(logits / temperature, ys)

    grads = [jax.grad(loss)(kernels, xs, ys) for xs, ys in halves]
    g = jax.lax.stop_gradient(jax.tree.map(jnp.add, *grads))

    def g_dot_grad(w: Mapping[str, Array], xs: Array, ys: Array) -> Array:
        gf = jax.grad(loss)(w, xs, ys)
        return sum(jnp.sum(g[p] * gf[p]) for p in gf)

    hg = jax.tree.map(jnp.add, *[jax.grad(g_dot_grad)(kernels, xs, ys) for xs, ys in halves])
    scores = {p: -kernels[p] * hg[p] for p in kernels}
    return _normalized(scores, jnp.abs(_total(scores)) + 1e-10)


GRASP_MASK_MODES = ("ratios", "grasp")


def grasp(
    params: Mapping,
    batch_stats: Mapping | None,
    model: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    rng: Array | None = None,
    density: float = 1.0,
    scope: str = "global",
    *,
    mask_mode: str = "ratios",
    temperature: float = 200.0,
) -> Masks:
    """GraSP (reference §5.5): remove the (1 − density) fraction with the LARGEST scores, i.e.
    keep the num_kept(N, density) smallest (per layer with scope 'layer').

    `batches` are concatenated (build them with `grasp_batch`). The fc layer is NOT
    re-initialised: the original code's `reinit` would overwrite the pretrained head (VPNs prunes
    pretrained weights), and the authors' call sites do not rely on it.
    mask_mode 'ratios' (default, the authors' baseline): only each layer's resulting density is
    kept and a Bernoulli mask is drawn per layer with `rng`; 'grasp': the GraSP mask itself.
    """
    _check_scope(scope)
    if mask_mode not in GRASP_MASK_MODES:
        raise ValueError(
            f"grasp: mask_mode={mask_mode!r}; allowed values are {', '.join(GRASP_MASK_MODES)}.")
    x, labels = _model_input(batches)
    scores = _grasp_scores_jit(params, batch_stats, model, x, labels, float(temperature))
    masks = _keep_by_density({p: -s for p, s in scores.items()}, density, scope)
    if mask_mode == "grasp":
        return masks
    if rng is None:
        raise ValueError("grasp: mask_mode='ratios' draws random masks; pass an rng key.")
    return bernoulli_masks(rng, masks, layer_densities(masks))


def grasp_batch(
    batch_iter: Iterable[Mapping[str, np.ndarray]],
    num_classes: int,
    per_class: int | None = None,
    *,
    order: str = "class",
) -> dict[str, np.ndarray]:
    """Exactly `per_class` examples of every class, as `GraSP_fetch_data` (reference §5.5).

    per_class: default min(floor(512 / num_classes), 25) (at least 1); an explicit value is used
    as given. Batches are consumed in order, examples of classes not yet full are taken, and the
    iteration stops as soon as every class is full. order 'class' (the reference's concatenation:
    class 0's examples, then class 1's, …, which makes GraSP's two halves split by class) or
    'collected' (the order the examples were met). Raises ValueError if the iterable runs out.
    """
    if per_class is None:
        per_class = max(1, min(512 // num_classes, 25))
    if order not in ("class", "collected"):
        raise ValueError(f"grasp_batch: order={order!r}; allowed values are class, collected.")
    taken: list[tuple[int, np.ndarray]] = []  # (label, image) in the order collected
    counts = np.zeros(num_classes, np.int64)
    for batch in batch_iter:
        for image, label in zip(np.asarray(batch["image"]), np.asarray(batch["label"]),
                                strict=True):
            label = int(label)
            if not 0 <= label < num_classes:
                raise ValueError(f"grasp_batch: label {label} outside [0, {num_classes}).")
            if counts[label] < per_class:
                counts[label] += 1
                taken.append((label, image))
        if counts.min() >= per_class:
            break
    short = np.flatnonzero(counts < per_class)
    if short.size:
        found = ", ".join(f"class {c}: {counts[c]}" for c in short[:10])
        more = f" (+{short.size - 10} more classes)" if short.size > 10 else ""
        raise ValueError(
            f"grasp_batch: the data ran out with {short.size} class(es) short of {per_class} "
            f"examples ({found}{more} found, {per_class} needed); lower GraSP's "
            "samples_per_class (per_class) or use a larger split.")
    if order == "class":
        taken = sorted(taken, key=lambda t: t[0])  # stable: collection order within a class
    return {"image": np.stack([t[1] for t in taken]),
            "label": np.asarray([t[0] for t in taken], np.int32)}


# ----------------------------------------------------------------------------------------------
# SynFlow (§5.6)
# ----------------------------------------------------------------------------------------------


def synflow_scores(
    params: Mapping,
    batch_stats: Mapping | None,
    model: Any,
    x: Array,
    masks: Mapping[str, Array] | None = None,
) -> dict[str, Array]:
    """One SynFlow iteration's scores |∂R/∂W ⊙ W| (reference §5.6).

    Every tensor (params incl. BN scale/bias and biases, batch_stats mean/var) is replaced by its
    absolute value; W = |kernel|, the forward uses W ⊙ mask (so pruned entries score 0);
    R = sum of the eval-mode outputs on `x` (normalized real images, or all ones).
    """
    abs_params = jax.tree.map(jnp.abs, params)
    abs_stats = jax.tree.map(jnp.abs, batch_stats) if batch_stats else batch_stats
    kernels = _kernels(abs_params)

    def flow(w: Mapping[str, Array]) -> Array:
        p = _with_kernels(abs_params, w)
        return jnp.sum(_forward(model, p if masks is None else apply_masks(p, masks), abs_stats, x))

    grads = jax.grad(flow)(kernels)
    return {p: jnp.abs(grads[p] * kernels[p]) for p in kernels}


SYNFLOW_INPUTS = ("batch", "ones")


def synflow(
    params: Mapping,
    batch_stats: Mapping | None,
    model: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    rng: Array | None = None,
    density: float = 1.0,
    scope: str = "global",
    *,
    iterations: int = 100,
    input: str = "batch",  # noqa: A002 (the option's name)
) -> Masks:
    """Iterative SynFlow (reference §5.6): for e = 1..iterations, score with the current mask
    and keep the top num_kept(N, density^(e/iterations)) (per layer with scope 'layer').

    input 'batch' (the authors' choice): the concatenated real batch, normalized; 'ones': an
    all-ones [1, H, W, 3] input as in the SynFlow paper. A pruned entry scores 0 and is never
    revived (only survivors are eligible, as in the reference where pruned weights are zero).
    One jitted step (scores + exact top-k with a traced count) serves all iterations.
    """
    _check_scope(scope)
    if input not in SYNFLOW_INPUTS:
        raise ValueError(f"synflow: input={input!r}; allowed values are {', '.join(SYNFLOW_INPUTS)}.")
    x, _ = _model_input(batches)
    if input == "ones":
        x = jnp.ones((1, *x.shape[1:]), x.dtype)
    kernels = _kernels(params)
    sizes = _sizes(kernels)

    masks = {p: jnp.ones(w.shape, bool) for p, w in kernels.items()}
    for e in range(1, iterations + 1):
        counts = keep_counts(sizes, density ** (e / iterations), scope)
        masks = _synflow_step(params, batch_stats, model, x, masks,
                              jax.tree.map(jnp.int32, counts))
    return masks


# Module-level jits with the (hashable) Flax module static: one compilation per model and input
# shape for a whole sweep, whatever the density (counts are traced).
_snip_scores_jit = jax.jit(snip_scores, static_argnums=2)
_grasp_scores_jit = jax.jit(grasp_scores, static_argnums=(2, 5))


@functools.partial(jax.jit, static_argnums=2)
def _synflow_step(params: Mapping, batch_stats: Mapping | None, model: Any, x: Array,
                  masks: Masks, n_keep: Any) -> Masks:
    """One SynFlow iteration: scores on the current mask, then its exact top-k."""
    return top_k_masks(synflow_scores(params, batch_stats, model, x, masks), n_keep,
                       eligible=masks)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

Criterion = Callable[..., Masks]

CRITERIA: dict[str, Criterion] = {
    "magnitude": magnitude,
    "random": random,
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
}


def get(name: str) -> Criterion:
    """The criterion registered under `name`; ValueError listing the known names otherwise."""
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {name!r}; known: {', '.join(sorted(CRITERIA))}.")
    return CRITERIA[name]
