"""Figures from a sweep's (or one workdir's) own data: PNG files drawn with matplotlib (Agg).

    python -m vpns_jax.sweep plot --dir SWEEPDIR [--out DIR]      (default SWEEPDIR/figures/)
    python -m vpns_jax.figures --workdir WORKDIR [--out DIR]      (default WORKDIR/figures/)

1. `accuracy_vs_sparsity`: per (config, dataset, arch), test accuracy against sparsity, one line per
   method with error bars (mean ± sample std over seeds, n in the legend), the paper's Figure 4 style;
   two panels, without and with the prompt; dense as a band (mean ± std). Where the paper has numbers
   for the same setting (`vpns_jax.paper_numbers`), its curve for the same method is drawn dashed in
   the same colour ("paper: VPNs") in the panel it was measured in.
2. `layer_sparsity_bars`: per-layer sparsity, one group of bars per layer, one bar per method.
3. `prompt_image`: the learned prompt as the model sees it (program ⊙ region, added to a mid-grey
   image and to a test image), from the run's final export.
4. `mask_overlap`: IoU of the kept-weight sets per layer for each pair of methods at the same sparsity
   and seed (heatmap: layers × method pairs, mean over seeds).
5. `training_curves`: loss, training accuracy and test accuracy (when measured) of one run against
   the global step, from metrics.jsonl.

Every file is written atomically (`vpns_jax.workdir.atomic_write`). What is not there yet (an
unfinished cell, a run without a final export) is reported as one line per thing missing, and what
exists is drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vpns_jax import paper_numbers, report
from vpns_jax import workdir as workdir_lib
from vpns_jax.errors import ConfigError, VpnsError

# The paper's plotting scripts' colours (plot/superior_performance/*.py), other methods from tab10.
COLORS = {"dense": "black", "vpns": "green", "hydra": "blue", "bip": "hotpink",
          "omp": "darkolivegreen", "lth": "#dda15e", "snip": "darkorange", "grasp": "purple",
          "synflow": "red", "random": "violet", "vpns_w_lth": "#bc6c25", "vpns_w_omp": "olive",
          "vpns_w_random": "orchid", "channel_vpns": "green", "slim": "steelblue",
          "depgraph": "crimson"}
# Other methods: colours unlike those above, each with its own marker.
_EXTRA = ("#17becf", "#8c564b", "#7f7f7f", "#bcbd22", "#1f77b4", "#ff7f0e", "#9467bd", "#d62728",
          "#e377c2", "#2ca02c", "#aec7e8", "#ffbb78")
_MARKERS = ("s", "^", "v", "D", "P", "X", "*", "<", ">", "h")
PANELS = ("without prompt", "with prompt")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def color_of(method: str, others: Sequence[str] = ()) -> str:
    """A fixed colour per method (the paper's where it has one), so every figure agrees."""
    if method in COLORS:
        return COLORS[method]
    rest = sorted(m for m in set(others) | {method} if m not in COLORS)
    return _EXTRA[rest.index(method) % len(_EXTRA)]


def marker_of(method: str, others: Sequence[str] = ()) -> str:
    """'o' for the paper's methods, a distinct marker for each other one."""
    if method in COLORS:
        return "o"
    rest = sorted(m for m in set(others) | {method} if m not in COLORS)
    return _MARKERS[rest.index(method) % len(_MARKERS)]


def save_figure(fig: Any, path: str) -> str:
    """Write `fig` as a PNG to `path` atomically and close it; returns `path`."""
    plt = _plt()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        workdir_lib.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# 1. Accuracy against sparsity


@dataclasses.dataclass
class Series:
    """One method's points in one panel: x = sparsity in %, mean and std (0 when n = 1) in %."""

    method: str
    x: list[float]
    mean: list[float]
    std: list[float]
    n: list[int]

    @property
    def label(self) -> str:
        lo, hi = min(self.n), max(self.n)
        return f"{self.method} (n={lo})" if lo == hi else f"{self.method} (n={lo}-{hi})"


def _without_prompt(group: Mapping[str, Any]) -> dict[str, Any] | None:
    """The group's accuracy without the prompt: its own field, or the reported accuracy when the
    method reports the un-prompted one (summaries written before the field was aggregated)."""
    if "accuracy_without_prompt" in group:
        return group["accuracy_without_prompt"]
    return None if group.get("prompt_at_test") else group.get("accuracy")


def panel_series(groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What `accuracy_vs_sparsity` draws for the groups of one (config, dataset, arch):
    {'without prompt': [Series], 'with prompt': [Series], 'dense': stats or None (the band, %),
    'dense_with_prompt': ...}. Values in % (100 × the summary's fractions)."""
    out: dict[str, Any] = {p: [] for p in PANELS}
    out["dense"] = out["dense_with_prompt"] = None
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for g in groups:
        by_method.setdefault(g["method"], []).append(g)
    for method in sorted(by_method):
        rows = sorted(by_method[method], key=lambda g: float(g["sparsity"]))
        for panel, pick in ((PANELS[0], _without_prompt),
                            (PANELS[1], lambda g: g.get("accuracy_with_prompt"))):
            points = [(float(g["sparsity"]), pick(g)) for g in rows if pick(g) is not None]
            if not points:
                continue
            if method == "dense":
                _, st = points[0]
                band = {"mean": 100 * st["mean"], "std": 100 * (st["std"] or 0.0), "n": st["n"]}
                out["dense" if panel == PANELS[0] else "dense_with_prompt"] = band
                continue
            out[panel].append(Series(method, [100 * s for s, _ in points],
                                     [100 * st["mean"] for _, st in points],
                                     [100 * (st["std"] or 0.0) for _, st in points],
                                     [int(st["n"]) for _, st in points]))
    return out


def _sparsity_scale(ax: Any, xs: Sequence[float]) -> None:
    """x axis in sparsity % with log-spaced density (−log10(1 − s)) once a sweep goes past 90 %, so
    0.9 / 0.99 / 0.999 are evenly spaced; linear (the paper's) otherwise. Ticks at the data."""
    def forward(x: Any) -> Any:
        return -np.log10(np.clip(1.0 - np.asarray(x, float) / 100.0, 1e-6, None))

    def inverse(y: Any) -> Any:
        return 100.0 * (1.0 - 10.0 ** (-np.asarray(y, float)))

    log = bool(xs) and max(xs) > 90.0 + 1e-9
    if log:
        ax.set_xscale("function", functions=(forward, inverse))
    ticks = sorted(set(round(x, 4) for x in xs))
    if ticks:
        where = forward(ticks) if log else np.asarray(ticks)
        span = float(where[-1] - where[0]) or 1.0
        labels, last = [], None
        for t, w in zip(ticks, where, strict=True):  # no label closer than 4 % of the axis
            keep = last is None or (w - last) / span >= 0.04
            labels.append(f"{t:g}" if keep else "")
            last = w if keep else last
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7, rotation=45 if len(ticks) > 8 else 0)


def _setting_groups(summary: Mapping[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    keyed: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for g in summary.get("groups", []):
        keyed.setdefault((g.get("config", ""), g["dataset"], g["arch"]), []).append(g)
    return keyed


def accuracy_vs_sparsity(summary: dict, out_path: str, *, title: str = "", paper: bool = True,
                         settings: Mapping[str, str] | None = None) -> str:
    """Accuracy (%) against sparsity (%) of a summary (`aggregate.summarize` / `sweep.summarize_dir`),
    one row of two panels (without / with the prompt) per (config, dataset, arch); writes a PNG to
    `out_path` and returns it. With `paper`, the paper's curves for the same (dataset, arch, method)
    are drawn dashed beside the run's; `settings` maps a config name to its paper setting ('standard',
    'transfer': a mask from another dataset, 'structured'; default: 'structured' for channel-pruning
    methods, else 'standard'). ValueError when the summary has no groups."""
    keyed = _setting_groups(summary)
    if not keyed:
        raise ValueError("accuracy_vs_sparsity: the summary has no results groups (no finished runs)")
    plt = _plt()
    rows = sorted(keyed)
    many = max(len({g["method"] for g in keyed[k]}) for k in rows) > 6
    fig, axes = plt.subplots(len(rows), 2, figsize=(15 if many else 11, 4.2 * len(rows)), dpi=110,
                             squeeze=False)
    captions = []
    for (config, dataset, arch), ax_row in zip(rows, axes, strict=True):
        groups = keyed[(config, dataset, arch)]
        series = panel_series(groups)
        setting = (settings or {}).get(config) or (
            "structured" if {g["method"] for g in groups} & paper_numbers.STRUCTURED_METHODS
            else "standard")
        methods = sorted({g["method"] for g in groups})
        curves = paper_numbers.curves_for(dataset, arch, setting=setting, methods=set(methods)) \
            if paper else []
        paper_dense = paper_numbers.dense_for(dataset, arch, setting=setting) if paper else None
        xs_all = [x for p in PANELS for s in series[p] for x in s.x]
        where = f"{config}: " if config else ""
        for panel, ax in zip(PANELS, ax_row, strict=True):
            band = series["dense_with_prompt"] if panel == PANELS[1] else None
            label = "dense"
            if band is None:
                band = series["dense"]
                label = "dense, no prompt" if panel == PANELS[1] else "dense"
            if band is not None:
                label = f"{label} (n={band['n']})"
                ax.axhspan(band["mean"] - band["std"], band["mean"] + band["std"], color="black",
                           alpha=0.12, lw=0)
                ax.axhline(band["mean"], color="black", ls="--", lw=1.2, label=label)
            for s in series[panel]:
                ax.errorbar(s.x, s.mean, yerr=s.std, marker=marker_of(s.method, methods), ms=4,
                            capsize=3, lw=1.5,
                            color=color_of(s.method, methods), label=s.label)
            drawn = [c for c in curves if c.prompted == (panel == PANELS[1])]
            for c in drawn:
                ax.plot([100 * x for x in c.sparsities], c.accuracy, ls="--", lw=1.2, marker="x",
                        ms=4, color=color_of(c.method, methods), alpha=0.8, label=c.label)
                xs_all += [100 * x for x in c.sparsities]
            if paper_dense is not None and panel == PANELS[0]:
                ax.axhline(paper_dense, color="gray", ls=":", lw=1.2, label="paper: dense")
            if not series[panel] and not drawn:
                ax.text(0.5, 0.5, f"no {panel} accuracy\nin these runs", ha="center",
                        va="center", transform=ax.transAxes, color="gray")
            ax.set_title(f"{title + ' — ' if title else ''}{where}{arch} on {dataset}, {panel}",
                         fontsize=9)
            ax.set_xlabel("sparsity (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            entries = len(ax.get_legend_handles_labels()[0])
            if entries > 7:  # outside the axes, so no curve is hidden
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            elif entries:
                ax.legend(fontsize=7, loc="best")
        for ax in ax_row:
            _sparsity_scale(ax, xs_all)
        if curves:
            sources = sorted({f"{c.figure} ({c.script})" for c in curves})
            captions.append(f"{where}paper curves (dashed): {', '.join(sources)}, reference §9 "
                            f"({setting} setting).")
        else:
            captions.append(f"{where}no paper numbers for {arch} on "
                            f"{dataset} ({setting} setting): no paper curve.")
    missing = len(summary.get("missing", []))
    captions.append("Mean ± sample std (n − 1) over n seeds (n in the legend); dense: line = mean, "
                    "band = ± std." + (f" {missing} planned runs not finished yet." if missing else ""))
    fig.tight_layout(rect=(0, 0.03 + 0.02 * len(captions) / len(rows), 1, 1))
    fig.text(0.01, 0.005, "\n".join(captions), fontsize=7, va="bottom", ha="left", wrap=True)
    return save_figure(fig, out_path)


# ----------------------------------------------------------------------------------------------------
# 2. Per-layer sparsity


_HEADS = ("fc", "classifier", "head")


def layer_order(paths: Sequence[str]) -> list[str]:
    """Layers in network order: natural sort of the Flax paths ('layer1_0' < 'layer1_1' <
    'layer2_0', 'features_2' < 'features_10'), the classifier head last."""
    def key(path: str) -> tuple:
        parts = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))
        return (path.split("/")[0].startswith(_HEADS), tuple((isinstance(p, int), p) for p in parts))

    return sorted(paths, key=key)


@dataclasses.dataclass
class LayerBars:
    """One method's bars: per layer (in `layers` order) the sparsity mean and std over seeds, in %."""

    method: str
    mean: list[float]
    std: list[float]
    n: int
    total: float  # mean whole-network sparsity, %


def layer_bar_values(per_method: Mapping[str, Sequence[Mapping[str, Any]]]
                     ) -> tuple[list[str], list[LayerBars]]:
    """(layers, bars) of per-layer sparsity summaries (`sparsity.sparsity_summary` / the files
    `report.save_layer_sparsity` writes), several per method (one per seed). ValueError when the
    methods' layers differ (runs of different models)."""
    layers: list[str] | None = None
    bars = []
    for method in sorted(per_method):
        summaries = per_method[method]
        names = layer_order(list(summaries[0]["layers"]))
        if layers is None:
            layers = names
        elif names != layers:
            raise ValueError(f"layer_sparsity: {method}'s layers differ from the other methods' "
                             "(runs of different models in one figure)")
        values = np.array([[100 * s["layers"][p]["sparsity"] for p in layers] for s in summaries])
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(layers))
        total = float(np.mean([100 * s["total"]["sparsity"] for s in summaries]))
        bars.append(LayerBars(method, values.mean(axis=0).tolist(), std.tolist(), len(values), total))
    return layers or [], bars


def layer_sparsity_bars(per_method: Mapping[str, Sequence[Mapping[str, Any]]], out_path: str, *,
                        title: str = "") -> str:
    """Grouped bars of per-layer sparsity (%): one group per layer (network order), one bar per
    method (mean over its summaries, one per seed; error bar ± sample std when n > 1); writes a PNG."""
    layers, bars = layer_bar_values(per_method)
    if not bars:
        raise ValueError("layer_sparsity_bars: no per-layer sparsity summaries given")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) * max(1, len(bars)) ** 0.5 + 2), 4.2),
                           dpi=110)
    x = np.arange(len(layers))
    width = 0.8 / len(bars)
    names = [b.method for b in bars]
    for i, b in enumerate(bars):
        ax.bar(x - 0.4 + width * (i + 0.5), b.mean, width, yerr=b.std if b.n > 1 else None,
               capsize=2, color=color_of(b.method, names),
               label=f"{b.method} (n={b.n}, total {b.total:.2f} %)")
    short = [p.removesuffix("/kernel") for p in layers]
    ax.set_xticks(x, short, rotation=90, fontsize=7)
    ax.set(ylabel="sparsity (%)", ylim=(0, 100), title=title or "per-layer sparsity")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out_path)


# ----------------------------------------------------------------------------------------------------
# 3. The learned prompt


def prompt_views(program: np.ndarray, spec: Any, image: np.ndarray | None = None,
                 *, grey: float = 0.5, rng_seed: int = 0) -> dict[str, np.ndarray]:
    """The prompt as the model sees it, via `vpns_jax.prompts.apply_prompt`: 'added' (f(program) ⊙
    region, f = identity for pad, sigmoid for fix/random; float [out, out, 3], may be negative),
    'grey' (a mid-grey input image prompted, clamped to [0, 1]) and, with `image` (f32[in, in, 3] in
    [0, 1]), 'image' (it padded, unprompted) and 'prompted'. The random prompt's square is drawn at
    `jax.random.PRNGKey(rng_seed)`."""
    import jax

    from vpns_jax import prompts

    rng = jax.random.PRNGKey(rng_seed) if spec.method == "random" else None
    prompt = {"program": np.asarray(program, np.float32)}
    f = prompt["program"] if spec.method == "pad" else np.asarray(jax.nn.sigmoid(prompt["program"]))
    out = {"added": np.asarray(prompts.region_mask(spec, rng)) * f}
    flat = np.full((1, spec.input_size, spec.input_size, 3), grey, np.float32)
    out["grey"] = np.asarray(prompts.apply_prompt(prompt, flat, spec, rng))[0]
    if image is not None:
        batch = np.asarray(image, np.float32)[None]
        out["image"] = np.asarray(prompts.pad_images(batch, spec))[0]
        out["prompted"] = np.asarray(prompts.apply_prompt(prompt, batch, spec, rng))[0]
    return out


def prompt_image(program: np.ndarray, spec: Any, out_path: str, *, image: np.ndarray | None = None,
                 title: str = "") -> str:
    """Draw the learned prompt (`prompt_views`): the added term (grey = 0, scaled by its largest
    |value|), the prompted mid-grey image and, with `image`, the test image without and with the
    prompt (pixels exactly as the model gets them before normalization); writes a PNG."""
    views = prompt_views(program, spec, image)
    plt = _plt()
    panels = [("grey", "on a mid-grey image (0.5)")]
    if image is not None:
        panels += [("image", "test image"), ("prompted", "test image + prompt")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.6), dpi=110)
    added = views["added"]
    scale = float(np.abs(added).max()) or 1.0
    axes[0].imshow(np.clip(0.5 + added / (2 * scale), 0, 1), interpolation="nearest")
    axes[0].set_title(f"program ⊙ mask\n(grey = 0, ±{scale:.3g} = black / white)", fontsize=8)
    for ax, (key, label) in zip(axes[1:], panels, strict=True):
        ax.imshow(views[key], vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    where = f"{spec.method} prompt, input {spec.input_size} → {spec.output_size}" + (
        f", pad {spec.pad_size}" if spec.method == "pad" else f", square {spec.mask_size}") + (
        " (placed anew every forward; here at PRNGKey(0)'s draw)" if spec.method == "random" else "")
    fig.suptitle(f"{title + ': ' if title else ''}{where}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_path)


# ----------------------------------------------------------------------------------------------------
# 4. Mask overlap


def mask_iou(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per layer, intersection over union of the kept-weight sets of two masks (bool arrays keyed by
    layer path), plus 'total' over all weights: |a ∧ b| / |a ∨ b| (1.0 when both keep nothing).
    ValueError when the layers or shapes differ."""
    if set(a) != set(b):
        raise ValueError(f"mask_iou: the masks have different layers ({sorted(set(a) ^ set(b))[:3]})")
    out, inter_all, union_all = {}, 0, 0
    for path in layer_order(list(a)):
        x, y = np.asarray(a[path], bool), np.asarray(b[path], bool)
        if x.shape != y.shape:
            raise ValueError(f"mask_iou: {path} has shapes {x.shape} and {y.shape}")
        inter, union = int(np.sum(x & y)), int(np.sum(x | y))
        out[path] = inter / union if union else 1.0
        inter_all, union_all = inter_all + inter, union_all + union
    out["total"] = inter_all / union_all if union_all else 1.0
    return out


def random_iou(density_a: float, density_b: float) -> float:
    """Expected IoU of two independent random masks keeping fractions `density_a`, `density_b`:
    d_a d_b / (d_a + d_b − d_a d_b) (the chance level a heatmap cell compares to)."""
    both = density_a * density_b
    either = density_a + density_b - both
    return both / either if either else 1.0


MAX_PAIRS = 12  # per-layer columns beyond which only the pairs with the focus method are shown


def mask_overlap(ious: Mapping[tuple[str, str], Sequence[Mapping[str, float]]], out_path: str, *,
                 title: str = "", density: float | None = None, focus: str = "vpns") -> str:
    """Two heatmaps of `mask_iou` results (mean over the seeds given for each pair, colour scale
    fixed to [0, 1], numbers written in): left, method × method IoU of the whole network; right,
    layers (network order) + 'total' × method pairs. With more than MAX_PAIRS pairs the right one
    keeps the pairs with `focus` (VPNs; else the first method). `density` (kept fraction) adds the
    chance level of two independent random masks. Writes a PNG.

    Heatmaps per sparsity rather than lines per layer: with k methods there are k(k − 1)/2 pairs
    and ~20 layers, which as lines would cross and hide each other; a grid shows every value with
    its number, and one figure per sparsity keeps like with like (IoU falls with the density, so
    sparsities on one colour scale would mislead)."""
    pairs = sorted(ious)
    if not pairs:
        raise ValueError("mask_overlap: no pairs of masks given")
    methods = sorted({m for p in pairs for m in p})
    shown = pairs
    if len(pairs) > MAX_PAIRS:
        focus = focus if focus in methods else methods[0]
        shown = [p for p in pairs if focus in p]
    layers = layer_order([k for k in ious[pairs[0]][0] if k != "total"]) + ["total"]
    values = np.array([[np.mean([r[layer] for r in ious[p]]) for p in shown] for layer in layers])
    matrix = np.eye(len(methods))
    for a, b in pairs:
        i, j = methods.index(a), methods.index(b)
        matrix[i, j] = matrix[j, i] = np.mean([r["total"] for r in ious[(a, b)]])
    plt = _plt()
    left = 1.5 + 0.45 * len(methods)
    right = max(4.0, 2.0 + 0.9 * len(shown))
    fig, (ax_m, ax) = plt.subplots(
        1, 2, figsize=(left + right, max(3.5, 1.8 + 0.27 * len(layers), 1.5 + 0.4 * len(methods))),
        dpi=110, gridspec_kw={"width_ratios": [left, right]})

    def grid(axis: Any, data: np.ndarray) -> Any:
        image = axis.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, j in itertools.product(range(data.shape[0]), range(data.shape[1])):
            axis.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if data[i, j] < 0.6 else "black")
        return image

    grid(ax_m, matrix)
    ax_m.set_xticks(range(len(methods)), methods, rotation=90, fontsize=7)
    ax_m.set_yticks(range(len(methods)), methods, fontsize=7)
    ax_m.set_title("whole network", fontsize=8)
    image = grid(ax, values)
    ax.set_xticks(range(len(shown)), [f"{a} ∩ {b} (n={len(ious[(a, b)])})" for a, b in shown],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(len(layers)), [p.removesuffix("/kernel") for p in layers], fontsize=7)
    ax.set_title("per layer" + (f" (pairs with {focus})" if shown is not pairs else ""), fontsize=8)
    fig.colorbar(image, ax=ax, label="IoU of kept weights")
    chance = (f"; two independent random masks at density {density:g}: IoU "
              f"{random_iou(density, density):.3f}") if density is not None else ""
    fig.suptitle((title or "mask overlap") + f", mean over seeds{chance}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_path)


# ----------------------------------------------------------------------------------------------------
# 5. Training curves


def curve_data(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What `training_curves` draws from one run's metrics.jsonl rows (`tb` kinds): {'x_label',
    'loss': {label: (x, y)}, 'accuracy': {label: (x, y)}, 'test': {label: (x, y)}, 'stages':
    [(x where a stage starts, name)]}. Step rows give '<pass> (step)' series, epoch rows
    '<pass> (epoch mean)', test rows 'test' / 'test, prompted'. x is the global step; rows written
    before steps were recorded (per-epoch rows only) use the epoch's ordinal."""
    from vpns_jax import tb

    has_steps = all("step" in r for r in rows)
    out: dict[str, Any] = {"x_label": "global step" if has_steps else "epoch (ordinal over stages)",
                           "loss": {}, "accuracy": {}, "test": {}, "stages": []}
    ordinal, last_x = 0, 0.0
    for r in rows:
        kind = tb.kind_of(r)
        if kind == "epoch":
            ordinal += 1
        x = float(r["step"]) if has_steps else float(ordinal)
        stage = r.get("stage")
        if stage and (not out["stages"] or out["stages"][-1][1] != stage) and kind != "test":
            out["stages"].append((last_x, stage))  # where the previous stage ended
        last_x = x
        if kind == "test":
            label = "test, prompted" if r.get("prompted") else "test"
            xs, ys = out["test"].setdefault(label, ([], []))
            xs.append(x)
            ys.append(100 * float(r["accuracy"]))
            continue
        prefix = "train/" if kind == "step" else ""
        suffix = " (step)" if kind == "step" else " (epoch mean)"
        for key, value in r.items():
            if not key.startswith(prefix) or value is None:
                continue
            name = key[len(prefix):]
            for metric in ("loss", "accuracy"):
                if name.endswith("/" + metric):
                    xs, ys = out[metric].setdefault(name[: -len(metric) - 1] + suffix, ([], []))
                    xs.append(x)
                    ys.append(float(value) * (100 if metric == "accuracy" else 1))
    return out


def training_curves(rows: Sequence[Mapping[str, Any]], out_path: str, *, title: str = "") -> str:
    """Loss, training accuracy (%) and test accuracy (%, when measured) of one run against the
    global step, one line per pass (step rows thin, epoch means thick), stage starts as dotted
    lines; writes a PNG."""
    data = curve_data(rows)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for ax, key, ylabel in zip(axes, ("loss", "accuracy", "test"),
                               ("training loss", "training accuracy (%)", "test accuracy (%)"),
                               strict=True):
        names = sorted({label.split(" (")[0] for label in data[key]})
        for label, (xs, ys) in sorted(data[key].items()):
            epoch = "epoch" in label or key == "test"
            ax.plot(xs, ys, marker="o" if epoch else None, ms=3, lw=1.8 if epoch else 0.8,
                    alpha=1.0 if epoch else 0.5, label=label,  # one colour per pass
                    color=_EXTRA[names.index(label.split(" (")[0]) % len(_EXTRA)])
        for x, _ in data["stages"][1:]:
            ax.axvline(x, color="gray", ls=":", lw=1)
        if not data[key]:
            ax.text(0.5, 0.5, "not measured" if key == "test" else "no rows", ha="center",
                    va="center", transform=ax.transAxes, color="gray")
        ax.set(xlabel=data["x_label"], ylabel=ylabel)
        ax.grid(alpha=0.3)
        if data[key]:
            ax.legend(fontsize=7)
    stages = " → ".join(s for _, s in data["stages"])
    fig.suptitle(f"{title + ': ' if title else ''}{stages}" if stages else title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_path)


# ----------------------------------------------------------------------------------------------------
# A sweep's (or one workdir's) figures


@dataclasses.dataclass
class Cell:
    """One workdir to draw from: its sweep cell name ('' for a lone workdir), config name, seed and
    the (method, sparsity) runs planned there (those with results rows, for a lone workdir)."""

    name: str
    dir: str
    config: str
    seed: int | None
    runs: list[tuple[str, float]]


@dataclasses.dataclass
class Plotted:
    """What `plot_dir` did: files written, one line per thing missing, the summary it drew from."""

    written: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] | None = None


def find_cells(directory: str) -> tuple[list[Cell], dict[str, Any]]:
    """The cells of a sweep directory (sweep.json), a seeds workdir (seeds.json) or one workdir
    (results.json or metrics.jsonl), and the summary of their results so far. ConfigError (one
    line) for a directory that is none of these."""
    from vpns_jax import aggregate, sweep

    if not os.path.isdir(directory):
        raise ConfigError(f"{directory} does not exist; give the --dir of a sweep or the --workdir "
                          "of a run")
    for name in (sweep.GRID_FILE, sweep.SEEDS_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            records = workdir_lib.read_json(path, "restore it (it lists the cells)")["cells"]
            cells = [Cell(r["name"], os.path.join(directory, r["dir"]), r["config"], int(r["seed"]),
                          [(m, float(s)) for m, s in r["runs"]]) for r in records]
            return cells, aggregate.summarize(directory, records, write=False)
    if not any(os.path.exists(os.path.join(directory, f))
               for f in (report.RESULTS_FILE, report.METRICS_FILE)):
        raise ConfigError(
            f"{directory} holds no sweep ({sweep.GRID_FILE}), no seeds workdir ({sweep.SEEDS_FILE}) "
            f"and no run ({report.RESULTS_FILE} or {report.METRICS_FILE}); give the --dir of a sweep "
            "or the --workdir of a run that has started")
    rows = report.load_results(directory)["runs"]
    seeds = sorted({int(r["seed"]) for r in rows})
    cell = Cell("", directory, "", seeds[0] if len(seeds) == 1 else None,
                [(r["method"], float(r["sparsity"])) for r in rows])
    return [cell], {"groups": aggregate.group_rows(rows), "missing": [], "rows": len(rows)}


def _tag(*parts: Any) -> str:
    """A file-name-safe tag of the parts ('proxy', 'seed_0', 'vpns_s0.9' -> 'proxy_seed_0_vpns_s0.9')."""
    return "_".join(re.sub(r"[^A-Za-z0-9_.+-]", "-", str(p)) for p in parts if p not in ("", None))


def _rows_of(cell: Cell) -> list[dict[str, Any]]:
    try:
        return report.load_results(cell.dir)["runs"]
    except VpnsError:
        return []


def _setting_of(cell: Cell, methods: set[str]) -> str:
    """The paper setting of a cell: 'transfer' when its config takes the mask from another run
    (`mask_from`), 'structured' for channel pruning, else 'standard'."""
    config_path = os.path.join(cell.dir, "config.json")
    if os.path.exists(config_path):
        try:
            if workdir_lib.read_json(config_path, "").get("mask_from"):
                return "transfer"
        except VpnsError:
            pass
    return "structured" if methods & paper_numbers.STRUCTURED_METHODS else "standard"


def _final(cache: dict[str, Any], cell: Cell, method: str, sparsity: float
           ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A run's final export (tree, meta), read once; None when it is missing or unreadable."""
    from vpns_jax import checkpoint
    from vpns_jax.methods.plan import run_id

    path = os.path.join(cell.dir, "final", run_id(method, sparsity))
    if path not in cache:
        cache[path] = None
        if os.path.isdir(path):
            try:
                cache[path] = checkpoint.load_final(path)
            except VpnsError:
                pass
    return cache[path]


def _test_image(dataset: str, input_size: int, data_dir: str | None) -> np.ndarray | str:
    """The first test image of `dataset` at `input_size` (f32 [in, in, 3] in [0, 1]), or why it
    cannot be read here (a figure is drawn without it rather than not at all)."""
    from vpns_jax import data

    try:
        loader = data.eval_loader(dataset, input_size=input_size, batch_size=1,
                                  data_dir=data_dir or None)
        batch = next(iter(loader))
        return np.asarray(batch["image"][0], np.float32)
    except Exception as e:  # noqa: BLE001 - any data problem: the prompt is drawn on grey only
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def plot_dir(directory: str, out: str | None = None, *, paper: bool = True) -> Plotted:
    """Every figure of a sweep directory or a workdir into `out` (default DIRECTORY/figures/):
    accuracy vs sparsity per config, per-layer sparsity and mask overlap per (config, sparsity), the
    prompt per (config, method, sparsity) (lowest seed) and training curves per run (curves/). What
    is not there yet is listed in `missing`, one line each. ConfigError when there is nothing to
    draw at all."""
    cells, summary = find_cells(directory)
    out = out or os.path.join(directory, "figures")
    done = Plotted(summary=summary)
    configs = sorted({c.config for c in cells})
    rows_by_cell = {c.name: _rows_of(c) for c in cells}

    # 1. accuracy vs sparsity, one file per config
    by_cell: dict[str, list[str]] = {}
    for m in summary.get("missing", []):
        by_cell.setdefault(m["cell"], []).append(f"{m['method']} at {m['sparsity']:g}")
    for name, what in by_cell.items():
        done.missing.append(f"acc_vs_sparsity: {name} not finished ({', '.join(what)})")
    for config in configs:
        groups = [g for g in summary["groups"] if g.get("config", "") == config]
        if not groups:
            done.missing.append(f"acc_vs_sparsity: {config or directory}: no finished runs")
            continue
        one = {**summary, "groups": groups,
               "missing": [m for m in summary.get("missing", []) if m["config"] == config]}
        methods = {g["method"] for g in groups}
        first = next(c for c in cells if c.config == config)
        done.written.append(accuracy_vs_sparsity(
            one, os.path.join(out, f"{_tag('acc_vs_sparsity', config)}.png"), paper=paper,
            settings={config: _setting_of(first, methods)}))

    cache: dict[str, Any] = {}
    for config in configs:
        ccells = [c for c in cells if c.config == config]
        finished = [(c, r) for c in ccells for r in rows_by_cell[c.name]]
        sparsities = sorted({float(r["sparsity"]) for _, r in finished if r["method"] != "dense"})
        for sp in sparsities:
            here = [(c, r) for c, r in finished if float(r["sparsity"]) == sp]
            # 2. per-layer sparsity
            per_method: dict[str, list[dict[str, Any]]] = {}
            for c, r in here:
                path = os.path.join(c.dir, "sparsity", f"{r['method']}_{sp:g}.json")
                if os.path.exists(path):
                    per_method.setdefault(r["method"], []).append(workdir_lib.read_json(path, ""))
                else:
                    done.missing.append(f"layer_sparsity: {c.name or c.dir} {r['method']} at {sp:g}: "
                                        f"no {os.path.relpath(path, c.dir)}")
            if per_method:
                done.written.append(layer_sparsity_bars(
                    per_method, os.path.join(out, f"{_tag('layer_sparsity', config, f's{sp:g}')}.png"),
                    title=f"{config + ': ' if config else ''}per-layer sparsity at {sp:g}"))
            # 4. mask overlap: pairs of methods with the same seed
            masks: dict[tuple[str, int], dict[str, np.ndarray]] = {}
            for c, r in here:
                final = _final(cache, c, r["method"], sp)
                if final is None:
                    done.missing.append(f"mask_overlap: {c.name or c.dir} {r['method']} at {sp:g}: "
                                        "no final export")
                elif final[0].get("masks"):
                    masks[(r["method"], int(r["seed"]))] = final[0]["masks"]
            ious: dict[tuple[str, str], list[dict[str, float]]] = {}
            for (ma, sa), (mb, sb) in itertools.combinations(sorted(masks), 2):
                if sa == sb and ma != mb:
                    ious.setdefault((ma, mb), []).append(mask_iou(masks[(ma, sa)], masks[(mb, sb)]))
            if ious:
                done.written.append(mask_overlap(
                    ious, os.path.join(out, f"{_tag('mask_overlap', config, f's{sp:g}')}.png"),
                    title=f"{config + ': ' if config else ''}kept-weight IoU at sparsity {sp:g}",
                    density=1 - sp))
            elif len({m for m, _ in masks}) < 2:
                done.missing.append(f"mask_overlap: {config or directory} at {sp:g}: fewer than two "
                                    "methods with masks")
        # 3. prompts: one per (method, sparsity), the lowest seed that has one
        drawn: set[tuple[str, float]] = set()
        images: dict[tuple[str, int], np.ndarray | str] = {}
        for c, r in sorted(finished, key=lambda cr: int(cr[1]["seed"])):
            key = (r["method"], float(r["sparsity"]))
            if r.get("accuracy_with_prompt") is None or key in drawn:
                continue
            final = _final(cache, c, *key)
            if final is None or "program" not in (final[0].get("prompt") or {}):
                done.missing.append(f"prompt: {c.name or c.dir} {key[0]} at {key[1]:g}: no final "
                                    "export with a prompt")
                continue
            from vpns_jax import prompts

            tree, meta = final
            spec = prompts.PromptSpec(**meta["prompt"])
            data_key = (str(meta.get("dataset")), spec.input_size)
            if data_key not in images:
                config_json = os.path.join(c.dir, "config.json")
                data_dir = (workdir_lib.read_json(config_json, "").get("data_dir")
                            if os.path.exists(config_json) else None)
                images[data_key] = _test_image(*data_key, data_dir)
                if isinstance(images[data_key], str):
                    done.missing.append(f"prompt: no test image of {data_key[0]} readable here "
                                        f"({images[data_key]}); prompts drawn on grey only")
            drawn.add(key)
            run = f"{key[0]}_s{key[1]:g}"
            done.written.append(prompt_image(
                tree["prompt"]["program"], spec,
                os.path.join(out, f"{_tag('prompt', config, 'seed_' + str(r['seed']), run)}.png"),
                image=None if isinstance(images[data_key], str) else images[data_key],
                title=f"{(c.name or config or run)} {run}"))
    # 5. training curves, every run with metrics rows
    for c in cells:
        metrics = report.load_metrics(c.dir) if os.path.exists(
            os.path.join(c.dir, report.METRICS_FILE)) else []
        runs = sorted({r["run"] for r in metrics if r.get("run")})
        for run in runs:
            rows = [r for r in metrics if r.get("run") == run]
            seed = f"seed_{c.seed}" if c.seed is not None else ""
            done.written.append(training_curves(
                rows, os.path.join(out, "curves", f"{_tag(c.config, seed, run)}.png"),
                title=f"{c.name + ' ' if c.name else ''}{run}"))
        from vpns_jax.methods.plan import run_id

        for method, sp in c.runs:
            if run_id(method, sp) not in runs:
                done.missing.append(f"training_curves: {c.name or c.dir} {run_id(method, sp)}: no "
                                    "metrics rows yet")
    if not done.written:
        raise ConfigError(f"nothing to plot in {directory}: no results rows and no training metrics "
                          "yet (" + (done.missing[0] if done.missing else "no runs") + ")")
    return done


def run_cli(directory: str, out: str | None) -> int:
    """Plot `directory`, print the files written and one line per thing missing; 2 on a user error."""
    try:
        plotted = plot_dir(directory, out)
    except VpnsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in plotted.written:
        print(f"wrote {path}")
    for line in plotted.missing:
        print(f"missing: {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vpns_jax.figures --workdir DIR [--out DIR]` (a workdir, seeds workdir or sweep)."""
    p = argparse.ArgumentParser(prog="python -m vpns_jax.figures", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", "--dir", dest="directory", required=True,
                   help="a run's workdir, a --config.seeds workdir or a sweep directory")
    p.add_argument("--out", help="output folder (default: DIR/figures/)")
    args = p.parse_args(argv)
    return run_cli(args.directory, args.out)


if __name__ == "__main__":
    sys.exit(main())
