"""Mean ± std over seeds of a sweep's (or a seeds workdir's) results rows: `summary.json`, `summary.md`.

Rows are grouped by (config, dataset, arch, method, sparsity); each group gets, for the reported
accuracy, the accuracy with and without the prompt and the actual sparsity, the mean, the sample standard
deviation (n − 1 in the denominator; None for n = 1), n, and the per-seed values (so a figure can
be drawn from `summary.json` alone). A row that two cells computed identically (e.g. `dense` in two
method groups) counts once. What the grid expects but no cell has produced yet is listed as missing.

`python -m vpns_jax.sweep summarize --dir DIR` prints the table and writes both files.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from vpns_jax import report
from vpns_jax import workdir as workdir_lib

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
METRICS = ("accuracy", "accuracy_with_prompt", "accuracy_without_prompt", "actual_sparsity")
GROUP_KEY = ("config", "dataset", "arch", "method", "sparsity", "mask_from")
_OPTIONAL = ("config", "mask_from")  # '' when a row has none


def stats(values: Sequence[float | None]) -> dict[str, Any] | None:
    """{'mean', 'std' (n − 1; None when n = 1), 'n', 'values'} of the non-None `values`; None if none."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    std = statistics.stdev(kept) if len(kept) > 1 else None
    return {"mean": statistics.fmean(kept), "std": std, "n": len(kept), "values": kept}


def group_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (config, dataset, arch, method, sparsity, mask_from) of results rows
    (`report.run_record` rows, plus 'config': the sweep's config name, '' when there is one; a
    transferred mask's rows, 'mask_from', are a group of their own): seeds, and `stats` of each of
    METRICS. Rows with the same group and seed count once. Sorted by config, dataset, arch, dense
    first, method, sparsity."""
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for row in rows:
        key = tuple(row.get(k, "") if k in _OPTIONAL else row[k] for k in GROUP_KEY)
        groups.setdefault(key, {}).setdefault(int(row["seed"]), row)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3] != "dense", k[3], k[5], k[4])):
        by_seed = groups[key]
        seeds = sorted(by_seed)
        entry: dict[str, Any] = dict(zip(GROUP_KEY, key, strict=True))
        entry["seeds"] = seeds
        entry["n"] = len(seeds)
        entry["prompt_at_test"] = any(by_seed[s].get("prompt_at_test") for s in seeds)
        for metric in METRICS:
            entry[metric] = stats([by_seed[s].get(metric) for s in seeds])
        out.append(entry)
    return out


def format_stat(value: dict[str, Any] | None, scale: float = 100, digits: int = 2) -> str:
    """A `stats` dict as 'mean ± std' (scaled, e.g. 100 for %); '-' for None, the mean alone for n = 1."""
    if value is None:
        return "-"
    mean = f"{scale * value['mean']:.{digits}f}"
    if value["std"] is None:
        return mean
    return f"{mean} ± {scale * value['std']:.{digits}f}"


def markdown_table(groups: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of `group_rows` output: accuracies in % (mean ± std over n seeds, 2
    decimals), actual sparsity as a fraction (4 decimals); `*` marks the prompted accuracy a method
    reports. The config column appears only when the groups come from several configs."""
    configs = len({g["config"] for g in groups}) > 1
    header = (["config"] if configs else []) + [
        "dataset", "arch", "method", "sparsity", "n", "acc %", "acc + VP %", "actual sparsity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        with_prompt = format_stat(g["accuracy_with_prompt"], 100, 2)
        if g["prompt_at_test"] and with_prompt != "-":
            with_prompt += "*"
        cells = ([g["config"]] if configs else []) + [
            g["dataset"], g["arch"], report.method_label(g), f"{g['sparsity']:.3f}", str(g["n"]),
            format_stat(g["accuracy"], 100, 2), with_prompt, format_stat(g["actual_sparsity"], 1, 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def missing_rows(cells: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """The expected (cell, method, sparsity, seed) with no results row: `cells` as recorded in a
    sweep's grid file ({'name', 'config', 'seed', 'runs': [[method, sparsity], ...]})."""
    have = {(r.get("config", ""), r["method"], float(r["sparsity"]), int(r["seed"])) for r in rows}
    out = []
    for cell in cells:
        for method, sparsity in cell["runs"]:
            if (cell["config"], method, float(sparsity), int(cell["seed"])) not in have:
                out.append({"cell": cell["name"], "config": cell["config"], "method": method,
                            "sparsity": float(sparsity), "seed": int(cell["seed"])})
    return out


def cell_rows(directory: str, cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every results row of the cells' workdirs (`directory`/<cell 'dir'>/results.json), each with
    its cell's 'config' name; a cell without results.json has none yet."""
    rows = []
    for cell in cells:
        path = os.path.join(directory, cell["dir"])
        if not os.path.exists(os.path.join(path, report.RESULTS_FILE)):
            continue
        for row in report.load_results(path)["runs"]:
            rows.append({**row, "config": cell["config"]})
    return rows


def summarize(directory: str, cells: Sequence[dict[str, Any]], *, write: bool = True
              ) -> dict[str, Any]:
    """Aggregate what the cells have produced so far; with `write`, `summary.json` and
    `summary.md` in `directory`. Returns the summary dict ('groups', 'missing', 'complete', ...)."""
    rows = cell_rows(directory, cells)
    groups = group_rows(rows)
    missing = missing_rows(cells, rows)
    done = {c["name"] for c in cells} - {m["cell"] for m in missing}
    summary = {"directory": os.path.abspath(directory), "rows": len(rows), "groups": groups,
               "cells": len(cells), "cells_done": len(done), "missing": missing,
               "complete": not missing,
               "std": "sample standard deviation over seeds (n - 1); null when n = 1",
               "units": "accuracies as fractions in [0, 1]; the table shows them in %"}
    if write:
        workdir_lib.write_json(os.path.join(directory, SUMMARY_JSON), summary)
        workdir_lib.write_text(os.path.join(directory, SUMMARY_MD), format_summary(summary) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The Markdown table and, for an unfinished sweep, a list of what is missing."""
    parts = [markdown_table(summary["groups"]) if summary["groups"] else "(no finished runs yet)"]
    parts.append(f"\n{summary['cells_done']}/{summary['cells']} cells finished, "
                 f"{summary['rows']} results rows; mean ± sample std (n − 1) over n seeds.")
    missing = summary["missing"]
    if missing:
        shown = [f"- {m['cell']}: {m['method']} at sparsity {m['sparsity']:g}" for m in missing[:40]]
        more = [f"- ... and {len(missing) - 40} more"] if len(missing) > 40 else []
        parts.append(f"Missing ({len(missing)} rows):\n" + "\n".join(shown + more))
    return "\n".join(parts)
