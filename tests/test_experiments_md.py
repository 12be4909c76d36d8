"""EXPERIMENTS.md generator: seed noise, the claim's pair tests and the document, on hand-made sweeps."""

import json
import math
import os
import statistics

import pytest

from vpns_jax import experiments_md, report
from vpns_jax.errors import VpnsError

ACCURACIES = {  # (method, sparsity) -> accuracy per seed 0, 1, 2
    ("dense", 0.0): [0.93, 0.94, 0.95],
    ("vpns", 0.99): [0.90, 0.92, 0.91],
    ("hydra", 0.99): [0.80, 0.84, 0.82],
    ("omp", 0.99): [0.83, 0.79, 0.81],  # OMP ≈ HYDRA: within noise
    ("random", 0.99): [0.20, 0.30, 0.10],
    ("vpns", 0.999): [0.40, 0.60, 0.50],
    ("hydra", 0.999): [0.45, 0.55, 0.50],
    ("omp", 0.999): [0.70, 0.71, 0.72],  # OMP > HYDRA: reversed
    ("random", 0.999): [0.10, 0.10, 0.10],
}


def _row(method, sparsity, seed, accuracy):
    return report.run_record(
        method=method, arch="resnet18", dataset="digits", seed=seed, sparsity=sparsity,
        actual_sparsity=sparsity, accuracy=accuracy,
        accuracy_with_prompt=accuracy + 0.01 if method == "vpns" else None,
        accuracy_without_prompt=accuracy, epochs=[4, 4], gradient_steps=88, seconds=10.0 + seed,
        images=5632, compile_seconds=1.0)


def _config():
    block = {"epochs": 4}
    return {"arch": "resnet18", "model": {"width": 0.25, "dtype": "float32", "small_input": False},
            "proxy": {"dataset": "fashion_mnist", "epochs": 2, "steps_per_epoch": 200,
                      "batch_size": 128},
            "seed": 7, "dataset": "digits", "input_size": 32, "batch_size": 64,
            "label_mapping": "flm", "prompt": {"method": "pad", "pad_size": 4},
            "dense": {"epochs": 8}, "hydra": {"mask_finding": block, "tuning": block},
            "vpns": {"mask_finding": {"epochs": 2}, "tuning": {"epochs": 2}}, "bip": {"epochs": 4},
            "omp": {"tuning": {"epochs": 8}}, "lth": {"rounds": 3, "rate": 0.9}}


def _sweep(tmp_path, skip=()):
    """A sweep directory as `vpns_jax.sweep` leaves it: sweep.json and one results.json per cell
    (cell = method group x seed); `skip` = (method, seed) cells not run yet."""
    cells = []
    groups = {"dense,omp": ("dense", "omp"), "hydra": ("hydra",), "vpns": ("vpns",),
              "random": ("random",)}
    for seed in range(3):
        for group, members in groups.items():
            name = f"proxy/{group.replace(',', '+')}/seed_{seed}"
            runs = [[m, s] for (m, s) in ACCURACIES if m in members]
            cells.append({"name": name, "dir": f"cells/{name}", "config": "proxy", "methods": group,
                          "seed": seed, "runs": runs})
            if (members[0], seed) in skip:
                continue
            workdir = tmp_path / "cells" / name
            workdir.mkdir(parents=True)
            rows = [_row(m, s, seed, ACCURACIES[(m, s)][seed]) for m, s in runs]
            report.save_results(str(workdir), {"runs": rows, "dense": None})
    grid = {"configs": {"proxy": _config()}, "methods": list(groups), "sparsities": [0.99, 0.999],
            "seeds": [0, 1, 2], "overrides": {"lth.rounds": 3}}
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": grid, "cells": cells}))
    return str(tmp_path)


def _groups(directory):
    from vpns_jax import sweep
    return sweep.summarize_dir(directory, write=False)["groups"]


def test_pair_verdict_by_hand():
    better = {"accuracy": {"mean": 0.91, "std": 0.01, "n": 3}}
    worse = {"accuracy": {"mean": 0.82, "std": 0.02, "n": 3}}
    v = experiments_md.pair_verdict(better, worse)
    se = 100 * math.sqrt(0.01 ** 2 / 3 + 0.02 ** 2 / 3)
    assert v["diff"] == pytest.approx(9.0)
    assert v["se"] == pytest.approx(se)
    assert v["verdict"] == "holds"
    assert experiments_md.pair_verdict(worse, better)["verdict"] == "reversed"
    close = {"accuracy": {"mean": 0.815, "std": 0.02, "n": 3}}
    assert experiments_md.pair_verdict(close, worse)["verdict"] == "within noise"
    one = {"accuracy": {"mean": 0.9, "std": None, "n": 1}}
    assert experiments_md.pair_verdict(one, worse)["verdict"] == "one seed"


def test_noise_spread_and_claim_from_a_sweep(tmp_path):
    groups = _groups(_sweep(tmp_path))
    rows = {r["sparsity"]: r for r in experiments_md.noise_and_spread(groups)}
    assert set(rows) == {0.99, 0.999}  # dense is not a sparsity of the comparison
    means = {m: statistics.fmean(ACCURACIES[(m, 0.99)]) for m in ("vpns", "hydra", "omp", "random")}
    assert rows[0.99]["spread"] == pytest.approx(100 * (means["vpns"] - means["random"]))
    stds = sorted(100 * statistics.stdev(ACCURACIES[(m, 0.99)]) for m in means)
    assert rows[0.99]["max_std"] == pytest.approx(stds[-1])
    assert rows[0.99]["median_std"] == pytest.approx((stds[1] + stds[2]) / 2)
    assert (rows[0.99]["best"], rows[0.99]["worst"]) == ("vpns", "random")
    assert rows[0.999]["best"] == "omp"
    verdicts = {(c["sparsity"], c["better"], c["worse"]): c["verdict"]
                for c in experiments_md.claim_checks(groups)}
    assert verdicts == {
        (0.99, "vpns", "hydra"): "holds", (0.99, "hydra", "omp"): "within noise",
        (0.99, "omp", "random"): "holds",
        (0.999, "vpns", "hydra"): "within noise", (0.999, "hydra", "omp"): "reversed",
        (0.999, "omp", "random"): "holds"}


def test_findings_and_variants(tmp_path):
    groups = _groups(_sweep(tmp_path))
    lines = experiments_md.findings(groups)
    assert len(lines) == 2
    # ranked by mean: VPNs 91.00 > HYDRA 82.00 > OMP 81.00 > Random 20.00
    assert lines[0].startswith("- **99%**: VPNs 91.00 ± 1.00, HYDRA 82.00 ± 2.00, OMP 81.00 ± 2.00, "
                               "Random 20.00 ± 10.00.")
    assert "holds only in part" in lines[0] and "HYDRA ≥ OMP within noise (+1.0 ± 1.6 pp)" in lines[0]
    assert lines[1].startswith("- **99.9%**: OMP 71.00 ± 1.00,") and "is contradicted" in lines[1]
    extra = dict(groups[1], method="vpns_w_omp")
    main, variants = experiments_md.split_variants(groups + [extra])
    assert [g["method"] for g in main][:3] == ["dense", "vpns", "vpns"]
    assert [g["method"] for g in main][-2:] == ["random", "random"]
    assert [g["method"] for g in variants] == ["vpns_w_omp"]


def test_document_tables_and_unfinished_sweep(tmp_path):
    directory = _sweep(tmp_path, skip={("vpns", 2)})
    text = experiments_md.build(directory, figure_path=None)
    assert "**This is a proxy, not the paper's setting.**" in text
    assert "**Unfinished:** 11/12 cells, 2 rows missing" in text
    # vpns has 2 seeds left: mean ± std of seeds 0 and 1 in the table, n = 2
    v = ACCURACIES[("vpns", 0.99)][:2]
    cell = f"{100 * statistics.fmean(v):.2f} ± {100 * statistics.stdev(v):.2f}"
    line = next(ln for ln in text.splitlines() if ln.startswith("| vpns | "))
    assert line.split(" | ")[1] == "2" and cell in line
    assert "| 99.9% | hydra ≥ omp |" in text and "reversed" in text
    assert "digits at 32 px" in text and "LTH: 3 rounds at rate 0.9" in text
    # the cost table is built from the rows: 8 runs per seed
    assert "| digits | resnet18 | hydra | 0.99 | 3 |" in text


def test_cli_writes_file_and_refuses_a_non_sweep(tmp_path, capsys):
    directory = _sweep(tmp_path / "s")
    out = tmp_path / "EXPERIMENTS.md"
    figure = tmp_path / "figures" / "acc.png"
    assert experiments_md.main(["--dir", directory, "--out", str(out), "--figure", str(figure)]) == 0
    text = out.read_text()
    assert text.startswith("# Experiments") and "![accuracy against sparsity](figures/acc.png)" in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert experiments_md.main(["--dir", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sweep.json is missing" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty"
    os.makedirs(empty)
    (empty / "sweep.json").write_text(json.dumps({"grid": {}, "cells": []}))
    with pytest.raises(VpnsError, match="no finished runs"):
        experiments_md.build(str(empty))
