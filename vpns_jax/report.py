"""Results of a run: `results.json`, `metrics.jsonl`, per-layer sparsity files, the printed table and
the plot (all written atomically, via `vpns_jax.workdir`)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from vpns_jax import workdir as workdir_lib
from vpns_jax.errors import CheckpointError

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


def run_record(*, method: str, arch: str, dataset: str, seed: int, sparsity: float,
               actual_sparsity: float, accuracy: float, accuracy_with_prompt: float | None,
               accuracy_without_prompt: float, epochs: list[int], gradient_steps: int,
               seconds: float, prompt_at_test: bool = False,
               accuracy_best_on_test: float | None = None, images: int | None = None,
               compile_seconds: float | None = None, mask_from: str = "") -> dict[str, Any]:
    """One row of `results.json` (accuracies as fractions in [0, 1]; `epochs` per stage of the run's
    chain, shared stages included; `gradient_steps`, `images` (training images read) and `seconds`
    the whole chain's cost; `compile_seconds` the sum of its stages' first iterations).

    accuracy_best_on_test: the released code's number, the maximum test accuracy over the
    evaluations of the last stage (config.eval_every_epochs) -- selected on the test set, never
    the headline `accuracy`. mask_from: '<dataset>/<RUN>' of a transferred mask (the row then
    has that field; `vpns_jax.transfer`)."""
    row = {
        "method": method, "arch": arch, "dataset": dataset, "seed": seed,
        "sparsity": float(sparsity), "actual_sparsity": float(actual_sparsity),
        "accuracy": float(accuracy),
        "accuracy_with_prompt": None if accuracy_with_prompt is None else float(accuracy_with_prompt),
        "accuracy_without_prompt": float(accuracy_without_prompt),
        "epochs": [int(e) for e in epochs], "gradient_steps": int(gradient_steps), "seconds": float(seconds),
        "prompt_at_test": bool(prompt_at_test),
        "accuracy_best_on_test": None if accuracy_best_on_test is None else float(accuracy_best_on_test),
        "images": None if images is None else int(images),
        "compile_seconds": None if compile_seconds is None else float(compile_seconds),
    }
    if mask_from:
        row["mask_from"] = str(mask_from)
    return row


def load_results(workdir: str) -> dict[str, Any]:
    """The workdir's results so far (`{'runs': [], 'dense': None}` when there are none)."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        return {"runs": [], "dense": None}
    fix = ("restore it, or delete it to recompute its rows (finished runs resume from their "
           "checkpoints in the workdir; --config.mode=finalize sets it aside and rebuilds it "
           "without training).")
    results = workdir_lib.read_json(path, fix)
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise CheckpointError(f"{path} holds no results (no 'runs' list); {fix}")
    results.setdefault("dense", None)
    return results


def set_aside_results(workdir: str) -> str:
    """Rename an unreadable `results.json` to `results.json.unreadable-<UTC time>` (kept, not
    deleted); returns the new path."""
    path = os.path.join(workdir, RESULTS_FILE)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = f"{path}.unreadable-{stamp}"
    n = 1
    while os.path.exists(aside):
        aside, n = f"{path}.unreadable-{stamp}-{n}", n + 1
    os.replace(path, aside)
    return aside


def save_results(workdir: str, results: dict[str, Any]) -> str:
    """Write `results.json` atomically; returns its path."""
    return workdir_lib.write_json(os.path.join(workdir, RESULTS_FILE), results)


def append_metrics(workdir: str, record: dict[str, Any]) -> None:
    """Add one line to `metrics.jsonl` (step / epoch / test rows: `vpns_jax.tb`)."""
    workdir_lib.append_line(os.path.join(workdir, METRICS_FILE), record)


def load_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `metrics.jsonl`; a torn last line (a killed run) is skipped."""
    return workdir_lib.read_lines(os.path.join(workdir, METRICS_FILE))


def add_run(results: dict[str, Any], record: dict[str, Any]) -> None:
    """Insert or replace the row with the same method, seed, sparsity (and mask_from); dense also
    fills 'dense'."""

    def key(r: dict[str, Any]) -> tuple:
        return r["method"], r["seed"], r["sparsity"], r.get("mask_from", "")

    results["runs"] = [r for r in results["runs"] if key(r) != key(record)] + [record]
    if record["method"] == "dense":
        results["dense"] = {"accuracy": record["accuracy"],
                            "accuracy_with_prompt": record["accuracy_with_prompt"]}


def save_layer_sparsity(workdir: str, method: str, sparsity: float,
                        summary: dict[str, Any]) -> str:
    """Per-layer sparsity of one run as `sparsity/<method>_<sparsity>.json`."""
    directory = os.path.join(workdir, "sparsity")
    os.makedirs(directory, exist_ok=True)
    return workdir_lib.write_json(os.path.join(directory, f"{method}_{sparsity:g}.json"), summary)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def method_label(row: dict[str, Any]) -> str:
    """The row's method as tables show it: 'vpns', or 'vpns (mask from digits/vpns_s0.9)'."""
    source = row.get("mask_from")
    return f"{row['method']} (mask from {source})" if source else row["method"]


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the runs: accuracy (%) without and with the prompt; `*` marks the one a
    method reports when that is the prompted one (VPNs w. X, the pilot). When rows have it, a last
    column gives `accuracy_best_on_test`, labelled (and footnoted) as selected on the test set."""
    best = any(r.get("accuracy_best_on_test") is not None for r in runs)
    header = ("method", "sparsity", "actual", "acc %", "acc+VP %", "epochs", "steps", "time s")
    header += (BEST_LABEL,) if best else ()
    structured = any(r.get("params") is not None for r in runs)
    header += STRUCTURED_HEADER if structured else ()
    rows = [header]
    for r in sorted(runs, key=lambda r: (r["method"] != "dense", r["method"], r["sparsity"])):
        stages = r["epochs"].values() if isinstance(r["epochs"], dict) else r["epochs"]
        epochs = "+".join(str(v) for v in stages)
        without = r.get("accuracy_without_prompt", r["accuracy"])
        with_prompt = _pct(r["accuracy_with_prompt"]) + ("*" if r.get("prompt_at_test") else "")
        rows.append((method_label(r), f"{r['sparsity']:.3f}", f"{r['actual_sparsity']:.4f}",
                     _pct(without), with_prompt, epochs,
                     str(r["gradient_steps"]), f"{r['seconds']:.0f}")
                    + ((_pct(r.get("accuracy_best_on_test")),) if best else ())
                    + (structured_cells(r) if structured else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=False)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if best:
        lines.append(BEST_NOTE)
    if structured:
        lines.append(structured_note(runs))
    return "\n".join(lines)


BEST_LABEL = "best %, selected on test"
BEST_NOTE = ("best %, selected on test: the maximum test accuracy over the last stage's evaluations "
             "(config.eval_every_epochs), as the released code reports; chosen on the test set, so "
             "biased upwards: 'acc %' is the result.")
COST_FILE = "cost.md"
STRUCTURED_HEADER = ("channel sp.", "params", "MFLOPs", "speedup")


def structured_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """The structured columns of a row (`vpns_jax.structured_rows`): channel sparsity, parameters
    and MFLOPs of the slimmed network, measured latency speedup over the dense one ('-' for rows
    without them)."""
    if row.get("params") is None:
        return ("-",) * len(STRUCTURED_HEADER)
    return (f"{row['channel_sparsity']:.3f}", f"{row['params']:,}", f"{row['flops'] / 1e6:.2f}",
            f"{row['speedup']:.2f}x")


def structured_note(runs: Sequence[dict[str, Any]]) -> str:
    """The footnote of the structured columns (the setup of the latency measurement)."""
    setup = next((r.get("latency_setup") for r in runs if r.get("latency_setup")), "")
    return ("params, MFLOPs (multiply-adds per image at the input size): the physically slimmed "
            "network; speedup: dense / slimmed latency" + (f" ({setup})" if setup else "") + ".")


def cost_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training cost per (dataset, arch, method, sparsity), from results rows (several seeds or
    workdirs: `n` rows; times are means, counts those of the first row, they do not depend on the
    seed). Rows from before a field was recorded give None for it."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        key = (r.get("dataset"), r.get("arch"), r["method"], float(r["sparsity"]))
        groups.setdefault(key, []).append(r)

    def mean(rows: list[dict[str, Any]], field: str) -> float | None:
        values = [r.get(field) for r in rows]
        return None if any(v is None for v in values) else sum(values) / len(values)

    out = []
    for (dataset, arch, method, sp), rows in sorted(
            groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), kv[0][2] != "dense",
                                            kv[0][2], kv[0][3])):
        first = rows[0]
        stages = first["epochs"].values() if isinstance(first["epochs"], dict) else first["epochs"]
        out.append({"dataset": dataset, "arch": arch, "method": method, "sparsity": sp,
                    "n": len(rows), "epochs": [int(e) for e in stages],
                    "gradient_steps": first.get("gradient_steps"), "images": first.get("images"),
                    "seconds": mean(rows, "seconds"), "compile_seconds": mean(rows, "compile_seconds")})
    return out


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_cost_table(runs: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `cost_rows` in the style of the paper's Table A3: per method and
    sparsity, epochs (per stage), gradient steps, images seen, wall time and compile time."""
    lines = ["| dataset | arch | method | sparsity | n | epochs | gradient steps | images seen "
             "| wall time s | compile s |", "|" + "---|" * 10]
    for c in cost_rows(runs):
        lines.append(f"| {c['dataset']} | {c['arch']} | {c['method']} | {c['sparsity']:g} | {c['n']} "
                     f"| {'+'.join(str(e) for e in c['epochs'])} = {sum(c['epochs'])} "
                     f"| {_count(c['gradient_steps'])} | {_count(c['images'])} "
                     f"| {_secs(c['seconds'])} | {_secs(c['compile_seconds'])} |")
    lines.append("")
    lines.append("Each run's whole chain of stages, shared stages included (OMP/LTH's dense fine-tune "
                 "is computed once per workdir but counted in every run that uses it). Gradient steps: "
                 "iterations x passes (two per iteration for VPNs); images seen: training images the "
                 "passes' loaders read; wall time: training + evaluation, summed over resumed sessions; "
                 "compile: the stages' first iterations (tracing + XLA compile or a persistent-cache "
                 "load, + one iteration; a step shared with an earlier stage compiles once).")
    return "\n".join(lines)


def write_cost(workdir: str, runs: Sequence[dict[str, Any]]) -> str:
    """`WORKDIR/cost.md`: the cost table of `runs`; returns its path."""
    return workdir_lib.write_text(os.path.join(workdir, COST_FILE),
                                  "# Training cost\n\n" + format_cost_table(runs) + "\n")


def cost_table_for(workdirs: Sequence[str]) -> str:
    """The cost table over the results of several workdirs (a sweep's cells, seeds)."""
    runs = [r for w in workdirs for r in load_results(w)["runs"]]
    return format_cost_table(runs)


def plot_accuracy(workdir: str, results: dict[str, Any]) -> str | None:
    """Accuracy against sparsity per method (dense as a line); returns the PNG path or None."""
    runs = [r for r in results["runs"] if r["method"] != "dense"]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["method"] for r in runs})
    many = len(names) > 6
    fig, ax = plt.subplots(figsize=(8, 4.5) if many else (5, 3.5), dpi=120)
    colors = plt.get_cmap("tab20").colors if many else [None] * len(names)
    for method, color in zip(names, colors, strict=False):
        pts = sorted((r["sparsity"], r["accuracy"]) for r in runs if r["method"] == method)
        ax.plot([100 * s for s, _ in pts], [100 * a for _, a in pts], marker="o", label=method,
                color=color)
    if results.get("dense"):
        ax.axhline(100 * results["dense"]["accuracy"], color="gray", ls="--", label="dense")
    first = runs[0]
    ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)",
           title=f"{first['arch']} on {first['dataset']}")
    ax.grid(alpha=0.3)
    if many:  # outside the axes, so no curve is hidden
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "accuracy_vs_sparsity.png")
    try:
        workdir_lib.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path
