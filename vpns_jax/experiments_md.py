"""EXPERIMENTS.md from a finished (or partly finished) sweep: the setting, the table, seed noise against
the spread between methods, the paper's ordering claim tested pair by pair, the figure and the cost.

    python -m vpns_jax.experiments_md --dir workdirs/sweeps/benchmark [--out EXPERIMENTS.md]

Everything in the file is computed from the sweep directory (its grid, the cells' config.json and
results.json rows); nothing is typed in by hand, so rerunning the sweep and this command rewrites it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from vpns_jax import aggregate, report
from vpns_jax import sweep as sweep_lib
from vpns_jax import workdir as workdir_lib
from vpns_jax.errors import VpnsError

# The paper's claim at high sparsity, as ordered pairs (better, worse) of method names.
CLAIM = ("vpns", "hydra", "omp", "random")
_LABELS = {"vpns": "VPNs", "hydra": "HYDRA", "omp": "OMP", "random": "Random", "lth": "LTH",
           "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow", "bip": "BiP"}
# The paper's methods in the order of its Figure 4 legend; other rows (VPNs w. X, the post-pruning
# prompt pilot) are variants, shown in their own table and figure.
MAIN_METHODS = ("dense", "vpns", "hydra", "bip", "omp", "lth", "snip", "grasp", "synflow", "random")


def ordered(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups in MAIN_METHODS order, then the other methods by name (stable within a method)."""
    def rank(g: dict[str, Any]) -> tuple:
        m = g["method"]
        return (MAIN_METHODS.index(m) if m in MAIN_METHODS else len(MAIN_METHODS), m)
    return sorted(groups, key=rank)


def split_variants(groups: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the paper's main methods, the variants) of `groups`, each `ordered`."""
    main = [g for g in groups if g["method"] in MAIN_METHODS]
    return ordered(main), ordered([g for g in groups if g["method"] not in MAIN_METHODS])
NOISE_FACTOR = 2.0  # a difference counts when it exceeds this many standard errors


def _mean_std(group: dict[str, Any], metric: str = "accuracy") -> tuple[float, float | None, int]:
    value = group[metric]
    return value["mean"], value["std"], value["n"]


def pair_verdict(better: dict[str, Any], worse: dict[str, Any], *, factor: float = NOISE_FACTOR
                 ) -> dict[str, Any]:
    """Test 'better ≥ worse' on two summary groups: the difference of means (percentage points), its
    standard error sqrt(s1²/n1 + s2²/n2) and a verdict: 'holds' (difference > factor·SE), 'reversed'
    (difference < −factor·SE) or 'within noise'. With one seed (no std) the verdict is 'one seed'."""
    m1, s1, n1 = _mean_std(better)
    m2, s2, n2 = _mean_std(worse)
    diff = 100 * (m1 - m2)
    if s1 is None or s2 is None:
        return {"diff": diff, "se": None, "verdict": "one seed"}
    se = 100 * math.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2)
    if diff > factor * se:
        verdict = "holds"
    elif diff < -factor * se:
        verdict = "reversed"
    else:
        verdict = "within noise"
    return {"diff": diff, "se": se, "verdict": verdict}


def noise_and_spread(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per sparsity: the seed noise (the largest and the median of the methods' std over seeds) and
    the spread between methods (max − min of their means), in percentage points; sparsities that
    fewer than two methods have are left out."""
    out = []
    for sparsity in sorted({g["sparsity"] for g in groups if g["method"] != "dense"}):
        at = [g for g in groups if g["method"] != "dense" and g["sparsity"] == sparsity]
        if len(at) < 2:  # e.g. an LTH round no other method has: nothing to compare
            continue
        means = [100 * g["accuracy"]["mean"] for g in at]
        stds = [100 * g["accuracy"]["std"] for g in at if g["accuracy"]["std"] is not None]
        out.append({"sparsity": sparsity, "methods": len(at), "spread": max(means) - min(means),
                    "max_std": max(stds, default=None),
                    "median_std": statistics.median(stds) if stds else None,
                    "best": max(at, key=lambda g: g["accuracy"]["mean"])["method"],
                    "worst": min(at, key=lambda g: g["accuracy"]["mean"])["method"]})
    return out


def claim_checks(groups: Sequence[dict[str, Any]], claim: Sequence[str] = CLAIM
                 ) -> list[dict[str, Any]]:
    """`pair_verdict` for each adjacent pair of `claim` at each sparsity where both have results."""
    index = {(g["method"], g["sparsity"]): g for g in groups}
    out = []
    for sparsity in sorted({g["sparsity"] for g in groups}):
        for better, worse in zip(claim, claim[1:], strict=False):
            if (better, sparsity) in index and (worse, sparsity) in index:
                out.append({"sparsity": sparsity, "better": better, "worse": worse,
                            **pair_verdict(index[(better, sparsity)], index[(worse, sparsity)])})
    return out


def findings(groups: Sequence[dict[str, Any]], claim: Sequence[str] = CLAIM) -> list[str]:
    """Plain sentences from the numbers: per sparsity the ranking of the methods (mean ± std), the
    seed noise against the spread, and which of the claim's pairs hold, are reversed or are within
    noise."""
    lines = []
    checks = claim_checks(groups, claim)
    spread = {s["sparsity"]: s for s in noise_and_spread(groups)}
    for sparsity in sorted(spread):
        at = sorted((g for g in groups if g["sparsity"] == sparsity and g["method"] != "dense"),
                    key=lambda g: -g["accuracy"]["mean"])
        ranking = ", ".join(f"{_LABELS.get(g['method'], g['method'])} {aggregate.format_stat(g['accuracy'])}"
                            for g in at)
        sp = spread[sparsity]
        noise = "" if sp["median_std"] is None else (
            f" The spread between methods is {sp['spread']:.1f} pp against a median seed std of "
            f"{sp['median_std']:.1f} pp (largest {sp['max_std']:.1f}).")
        pairs = [c for c in checks if c["sparsity"] == sparsity]
        verdicts = "; ".join(f"{_LABELS.get(c['better'], c['better'])} ≥ "
                             f"{_LABELS.get(c['worse'], c['worse'])} {c['verdict']} "
                             f"({c['diff']:+.1f} ± {c['se']:.1f} pp)" if c["se"] is not None else
                             f"{c['better']} ≥ {c['worse']} {c['verdict']}" for c in pairs)
        claim_text = ""
        if pairs:
            whole = ("holds at every step" if all(c["verdict"] == "holds" for c in pairs) else
                     "is contradicted" if any(c["verdict"] == "reversed" for c in pairs) else
                     "holds only in part (the other steps are within noise)")
            claim_text = f" The claim {whole}: {verdicts}."
        lines.append(f"- **{100 * sparsity:g}%**: {ranking}.{noise}{claim_text}")
    return lines


def method_table(groups: Sequence[dict[str, Any]], metric: str = "accuracy") -> str:
    """Methods as rows, sparsities as columns: mean ± std (%) of `metric` over seeds; dense in its
    own column (it has one sparsity, 0)."""
    sparsities = sorted({g["sparsity"] for g in groups if g["method"] != "dense"})
    methods: list[str] = []
    for g in ordered(groups):
        if g["method"] not in methods:
            methods.append(g["method"])
    index = {(g["method"], g["sparsity"]): g for g in groups}
    header = ["method", "n"] + [f"{100 * s:g}%" for s in sparsities]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        if m == "dense":
            g = next(g for g in groups if g["method"] == "dense")
            cells = [aggregate.format_stat(g[metric])] * len(sparsities)
            lines.append(f"| dense (no pruning) | {g['n']} | " + " | ".join(cells) + " |")
            continue
        row = [index.get((m, s)) for s in sparsities]
        n = max((g["n"] for g in row if g), default=0)
        cells = [aggregate.format_stat(g[metric]) if g else "-" for g in row]
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _setting(grid: dict[str, Any]) -> list[str]:
    """The setting, read from the sweep's grid file (its first config; every cell shares it but the
    methods and the seed)."""
    spec = grid["grid"]
    name, config = next(iter(spec["configs"].items()))
    model, proxy = config.get("model", {}), config.get("proxy", {})
    overrides = ", ".join(f"{k}={v}" for k, v in spec.get("overrides", {}).items())
    return [
        f"- Architecture: {config['arch']} at width {model.get('width', 1.0):g}, "
        f"{model.get('dtype', 'float32')}, {'CIFAR' if model.get('small_input') else 'ImageNet'} stem.",
        f"- Source model (stands in for ImageNet weights): trained here from scratch on "
        f"{proxy.get('dataset')} for {proxy.get('epochs')} x {proxy.get('steps_per_epoch')} steps "
        f"(batch {proxy.get('batch_size')}, seed {config['seed']}), one for every cell.",
        f"- Downstream: {config['dataset']} at {config['input_size']} px, batch {config['batch_size']}, "
        f"label mapping {config.get('label_mapping')}, {config['prompt'].get('method')} prompt of "
        f"{config['prompt'].get('pad_size')} px.",
        f"- Sparsities {', '.join(f'{s:g}' for s in spec['sparsities'])}; seeds "
        f"{', '.join(str(s) for s in spec['seeds'])} (each seed: its own data order, mask, score and "
        "prompt initialisation and training; the source model is shared).",
        f"- Epochs: dense fine-tune {config['dense']['epochs']}; HYDRA "
        f"{config['hydra']['mask_finding']['epochs']} + {config['hydra']['tuning']['epochs']}; VPNs "
        f"{config['vpns']['mask_finding']['epochs']} + {config['vpns']['tuning']['epochs']} (two passes "
        f"per iteration); BiP {config['bip']['epochs']}; OMP / Random / SNIP / GraSP / SynFlow / LTH "
        f"tuning {config['omp']['tuning']['epochs']} each (LTH: {config['lth']['rounds']} rounds at rate "
        f"{config['lth']['rate']:g}).",
        f"- Hyper-parameters: config '{name}' of the grid{' with ' + overrides if overrides else ''}, "
        "the same for every seed and sparsity, set before this benchmark and not tuned per method on "
        "the test set.",
    ]


def build(directory: str, *, figure_path: str | None = None, out_dir: str = ".") -> str:
    """The Markdown text of EXPERIMENTS.md for the sweep in `directory`; writes the figure to
    `figure_path` (relative to `out_dir` in the text) when figures are available."""
    grid_file = os.path.join(directory, sweep_lib.GRID_FILE)
    if not os.path.isfile(grid_file):
        raise VpnsError(f"{directory} holds no sweep ({sweep_lib.GRID_FILE} is missing); run "
                        "`python -m vpns_jax.sweep --sweep FILE --dir DIR` first.")
    with open(grid_file) as f:
        grid = json.load(f)
    summary = sweep_lib.summarize_dir(directory)
    groups = summary["groups"]
    if not groups:
        raise VpnsError(f"the sweep in {directory} has no finished runs yet.")
    main, variants = split_variants(groups)
    shown = os.path.relpath(directory)
    if shown.startswith(".."):
        shown = os.path.abspath(directory)
    parts = ["# Experiments", ""]
    parts.append(f"Generated on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by "
                 f"`python -m vpns_jax.experiments_md --dir {shown}` from that sweep's own results "
                 "(`bash scripts/benchmark.sh` runs the sweep and then this); do not edit by hand.")
    parts += ["", "## Offline proxy benchmark", "",
              "**This is a proxy, not the paper's setting.** No ImageNet weights or paper datasets are "
              "reachable offline, so a small source model trained here on Fashion-MNIST stands in for "
              "the ImageNet-pretrained network, and scikit-learn's digits stand in for the downstream "
              "dataset. The numbers say how the methods rank in this small setting; they are not "
              "evidence about ImageNet-scale transfer.", ""]
    parts += _setting(grid)
    if not summary["complete"]:
        parts += ["", f"**Unfinished:** {summary['cells_done']}/{summary['cells']} cells, "
                  f"{len(summary['missing'])} rows missing; the tables show what exists."]
    parts += ["", "### What the data say", "",
              "Per sparsity, the methods ranked by mean test accuracy (mean ± sample std over "
              "seeds), and the paper's claim "
              f"{' ≥ '.join(_LABELS.get(m, m) for m in CLAIM)} tested pair by pair (below):", ""]
    parts += findings(main)
    parts += ["", "### Test accuracy (%), mean ± sample std over seeds", "",
              "Each method's headline number: test images without the prompt, as the released "
              "code evaluates VPNs (reference §4.4).", "", method_table(main), ""]
    prompted = [g for g in main if g["accuracy_with_prompt"] is not None and not g["prompt_at_test"]]
    if prompted:
        parts += ["The same runs evaluated with their learned prompt:", "",
                  method_table(prompted, "accuracy_with_prompt"), ""]
    if figure_path:
        from vpns_jax import figures
        path = figures.accuracy_vs_sparsity({**summary, "groups": main}, figure_path)
        parts += [f"![accuracy against sparsity]({os.path.relpath(path, out_dir)})", ""]
    if variants:
        parts += ["Variants (paper Fig. 7, VPNs w. X: the baseline's mask, then VPNs' prompt + "
                  "weight tuning; Fig. 1, vp_after_X: a prompt trained on a pruned network, "
                  "zero-shot or with fine-tuning); these evaluate with their prompt:", "",
                  method_table(variants), ""]
        if figure_path:
            root, ext = os.path.splitext(figure_path)
            path = figures.accuracy_vs_sparsity(
                {**summary, "groups": [g for g in groups if g["method"] in ("dense", "vpns")]
                 + variants}, f"{root}_variants{ext}")
            parts += [f"![variants against sparsity]({os.path.relpath(path, out_dir)})", ""]
    parts += ["### Seed noise against the spread between methods", "",
              "Over the paper's main methods (dense excluded).", "",
              "| sparsity | methods | spread of means (pp) | largest seed std (pp) | median seed std (pp) "
              "| best | worst |", "|---|---|---|---|---|---|---|"]
    for s in noise_and_spread(main):
        def pp(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"
        parts.append(f"| {100 * s['sparsity']:g}% | {s['methods']} | {pp(s['spread'])} "
                     f"| {pp(s['max_std'])} | {pp(s['median_std'])} | {s['best']} | {s['worst']} |")
    parts += ["", f"### The paper's claim: {' ≥ '.join(_LABELS.get(m, m) for m in CLAIM)}",
              "", f"Each adjacent pair at each sparsity: difference of mean accuracy (percentage points) "
              f"± its standard error sqrt(s1²/n1 + s2²/n2); 'holds' when the difference exceeds "
              f"{NOISE_FACTOR:g} standard errors, 'reversed' when it is below minus that, else "
              "'within noise'.", "",
              "| sparsity | pair | difference (pp) | SE (pp) | verdict |", "|---|---|---|---|---|"]
    for c in claim_checks(main):
        se = "-" if c["se"] is None else f"{c['se']:.2f}"
        parts.append(f"| {100 * c['sparsity']:g}% | {c['better']} ≥ {c['worse']} | {c['diff']:+.2f} "
                     f"| {se} | {c['verdict']} |")
    workdirs = [os.path.join(directory, c["dir"]) for c in grid["cells"]
                if os.path.isfile(os.path.join(directory, c["dir"], report.RESULTS_FILE))]
    rows = [r for w in workdirs for r in report.load_results(w)["runs"]]
    parts += ["", "### Cost", "", _cost_line(directory), "",
              report.format_cost_table(rows), "",
              "The full table with the actual sparsities:", "",
              aggregate.markdown_table(groups), ""]
    return "\n".join(parts)


def _cost_line(directory: str) -> str:
    """The sweep's total wall time (scripts/benchmark.sh's record) and the machine."""
    record = os.path.join(directory, "benchmark_time.json")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if os.path.isfile(record):
        with open(record) as f:
            seconds = json.load(f)["seconds"]
        return (f"The whole sweep took {seconds / 60:.1f} min of wall time on this machine "
                f"({machine}), source model included.")
    return f"Machine: {machine}."


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vpns_jax.experiments_md", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="the sweep directory")
    parser.add_argument("--out", default="EXPERIMENTS.md", help="the Markdown file to write")
    parser.add_argument("--figure", default="docs/figures/offline_benchmark.png",
                        help="where the accuracy-against-sparsity figure goes ('' = none)")
    args = parser.parse_args(argv)
    try:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        text = build(args.dir, figure_path=args.figure or None, out_dir=out_dir)
    except VpnsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir_lib.write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
