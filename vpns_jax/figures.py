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

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vpns_jax import paper_numbers
from vpns_jax import workdir as workdir_lib

# The paper's plotting scripts' colours (plot/superior_performance/*.py), other methods from tab10.
COLORS = {"dense": "black", "vpns": "green", "hydra": "blue", "bip": "hotpink",
          "omp": "darkolivegreen", "lth": "#dda15e", "snip": "darkorange", "grasp": "purple",
          "synflow": "red", "random": "violet", "vpns_w_lth": "#bc6c25", "vpns_w_omp": "olive",
          "vpns_w_random": "orchid", "channel_vpns": "green", "slim": "steelblue",
          "depgraph": "crimson"}
_EXTRA = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan")
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
    if xs and max(xs) > 90.0 + 1e-9:
        def forward(x: Any) -> Any:
            return -np.log10(np.clip(1.0 - np.asarray(x, float) / 100.0, 1e-6, None))

        def inverse(y: Any) -> Any:
            return 100.0 * (1.0 - 10.0 ** (-np.asarray(y, float)))

        ax.set_xscale("function", functions=(forward, inverse))
    ticks = sorted(set(round(x, 4) for x in xs))
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks], fontsize=7,
                           rotation=45 if len(ticks) > 8 else 0)


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
    'transfer': a mask from another dataset, 'structured'; default 'standard'). ValueError when the
    summary has no groups."""
    keyed = _setting_groups(summary)
    if not keyed:
        raise ValueError("accuracy_vs_sparsity: the summary has no results groups (no finished runs)")
    plt = _plt()
    rows = sorted(keyed)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), dpi=110, squeeze=False)
    captions = []
    for (config, dataset, arch), ax_row in zip(rows, axes, strict=True):
        groups = keyed[(config, dataset, arch)]
        series = panel_series(groups)
        setting = (settings or {}).get(config, "standard")
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
                ax.errorbar(s.x, s.mean, yerr=s.std, marker="o", ms=4, capsize=3, lw=1.5,
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
            if ax.get_legend_handles_labels()[0]:
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
