"""Figures: the plotted means / error bars read back from the matplotlib Axes equal hand-computed ones,
the paper's numbers equal the reference text (parsed here), IoU on hand-made masks, the prompt image's
pixels, per-layer bars, training curves, and a half-finished sweep directory (hand-made files)."""

from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402

from vpns_jax import aggregate, figures, paper_numbers, report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "..", "shared", "reference", "vpns_reference.md")
EXCERPT = os.path.join(HERE, "data", "paper_numbers_reference.md")


def _row(method, sparsity, seed, acc, with_prompt=None, without=None, dataset="digits",
         arch="resnet18", prompt_at_test=False):
    return report.run_record(method=method, arch=arch, dataset=dataset, seed=seed, sparsity=sparsity,
                             actual_sparsity=sparsity, accuracy=acc, accuracy_with_prompt=with_prompt,
                             accuracy_without_prompt=acc if without is None else without,
                             epochs=[1], gradient_steps=2, seconds=1.0,
                             prompt_at_test=prompt_at_test)


def _summary(rows):
    groups = aggregate.group_rows(rows)
    return {"groups": groups, "missing": []}


def _errorbars(ax):
    """{label: (x, y, yerr)} of the Axes' ErrorbarContainers, read from the drawn artists."""
    out = {}
    for c in ax.containers:
        if not isinstance(c, ErrorbarContainer):
            continue
        line, _, (bars,) = c.lines
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        segs = bars.get_segments()  # one vertical segment per point: [[x, y - e], [x, y + e]]
        yerr = np.array([(s[1][1] - s[0][1]) / 2 for s in segs])
        centres = np.array([(s[1][1] + s[0][1]) / 2 for s in segs])
        np.testing.assert_allclose(centres, y)
        out[c.get_label()] = (x, y, yerr)
    return out


# ----------------------------------------------------------------------------------------------------
# 1. Accuracy against sparsity


def test_accuracy_vs_sparsity_plots_hand_computed_means_and_stds(tmp_path, monkeypatch):
    rows = [_row("vpns", 0.9, 0, 0.90, 0.95), _row("vpns", 0.9, 1, 0.80, 0.91),
            _row("vpns", 0.9, 2, 0.73, None), _row("vpns", 0.99, 0, 0.60, 0.62),
            _row("hydra", 0.9, 0, 0.70), _row("hydra", 0.9, 1, 0.76),
            _row("dense", 0.0, 0, 0.97), _row("dense", 0.0, 1, 0.95),
            # reported with the prompt: its un-prompted accuracy is another number
            _row("vpns_w_omp", 0.9, 0, 0.88, 0.88, without=0.50, prompt_at_test=True)]
    captured = {}
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path))
    out = figures.accuracy_vs_sparsity(_summary(rows), str(tmp_path / "acc.png"), title="t")
    assert out == str(tmp_path / "acc.png") and os.path.getsize(out) > 1000
    without, with_prompt = captured["fig"].axes
    bars = _errorbars(without)
    assert set(bars) == {"hydra (n=2)", "vpns (n=1-3)", "vpns_w_omp (n=1)"}
    x, y, e = bars["vpns (n=1-3)"]
    np.testing.assert_allclose(x, [90, 99])
    np.testing.assert_allclose(y, [100 * (0.90 + 0.80 + 0.73) / 3, 60.0])
    sd = 100 * np.sqrt(((0.90 - 0.81) ** 2 + (0.80 - 0.81) ** 2 + (0.73 - 0.81) ** 2) / 2)
    np.testing.assert_allclose(e, [sd, 0.0], atol=1e-9)
    x, y, e = bars["hydra (n=2)"]
    np.testing.assert_allclose([y[0], e[0]], [73.0, 100 * np.sqrt(2 * 0.03 ** 2)])
    np.testing.assert_allclose(bars["vpns_w_omp (n=1)"][1], [50.0])  # its without-prompt number
    prompted = _errorbars(with_prompt)
    assert set(prompted) == {"vpns (n=1-2)", "vpns_w_omp (n=1)"}  # hydra has no prompted accuracy
    np.testing.assert_allclose(prompted["vpns (n=1-2)"][1], [93.0, 62.0])
    np.testing.assert_allclose(prompted["vpns (n=1-2)"][2], [100 * np.sqrt(2 * 0.02 ** 2), 0.0],
                               atol=1e-9)
    # dense: a line at the mean and a band of ± std, in both panels
    for ax in (without, with_prompt):
        line = [ln for ln in ax.lines if ln.get_label().startswith("dense")][0]
        np.testing.assert_allclose(line.get_ydata(), [96.0, 96.0])
        (band,) = ax.patches  # axhspan: a rectangle from mean - std to mean + std in data units
        np.testing.assert_allclose([band.get_y(), band.get_y() + band.get_height()],
                                   [96.0 - 100 * np.sqrt(2e-4), 96.0 + 100 * np.sqrt(2e-4)])
    # no paper numbers for digits: no paper curve, and the caption says so
    assert not [ln for ax in (without, with_prompt) for ln in ax.lines
                if ln.get_label().startswith("paper")]
    caption = " ".join(t.get_text() for t in captured["fig"].texts)
    assert "no paper numbers for resnet18 on digits" in caption and "no paper curve" in caption
    plt.close("all")


def test_paper_curve_drawn_beside_the_run_in_its_panel(tmp_path, monkeypatch):
    rows = [_row("vpns", s, seed, 0.8, 0.81, dataset="cifar100") for s in (0.5, 0.9) for seed in (0, 1)]
    rows += [_row("vpns_w_omp", 0.9, 0, 0.8, 0.8, dataset="cifar100", prompt_at_test=True)]
    captured = {}
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path))
    figures.accuracy_vs_sparsity(_summary(rows), str(tmp_path / "acc.png"))
    without, with_prompt = captured["fig"].axes
    vpns = [ln for ln in without.lines if ln.get_label() == "paper: VPNs"]
    assert len(vpns) == 1 and vpns[0].get_linestyle() == "--"
    np.testing.assert_allclose(vpns[0].get_xdata(), [40, 50, 60, 70, 80, 90])
    np.testing.assert_allclose(vpns[0].get_ydata(), [83.31, 83.18, 83.16, 82.74, 82.00, 80.58])
    assert vpns[0].get_color() == figures.color_of("vpns")
    # Fig. 7's OMP+VP is measured with the prompt: drawn in the with-prompt panel only
    assert [ln.get_label() for ln in with_prompt.lines if ln.get_label().startswith("paper")] == [
        "paper: OMP+VP"]
    assert not [ln for ln in without.lines if ln.get_label() == "paper: OMP+VP"]
    assert [ln.get_ydata()[0] for ln in without.lines if ln.get_label() == "paper: dense"] == [82.10]
    # HYDRA is not in the runs: no paper HYDRA curve either
    assert not [ln for ln in without.lines if ln.get_label() == "paper: HYDRA"]
    with pytest.raises(ValueError, match="no results groups"):
        figures.accuracy_vs_sparsity({"groups": []}, str(tmp_path / "none.png"))
    plt.close("all")


# ----------------------------------------------------------------------------------------------------
# The paper's numbers against the reference text


_NAMES = {"VPNs": "vpns", "HYDRA": "hydra", "BiP": "bip", "OMP": "omp", "SNIP": "snip",
          "GraSP": "grasp", "SynFlow": "synflow", "Random": "random", "LTH": "lth",
          "Random+VP": "vpns_w_random", "OMP+VP": "vpns_w_omp", "LTH+VP": "vpns_w_lth",
          "DepGraph": "depgraph", "Slim": "slim"}
_DATASETS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "Tiny-ImageNet": "tiny_imagenet",
             "Food-101": "food101", "Flowers-102": "oxford_flowers102", "OxfordPets": "oxford_iiit_pet",
             "DTD": "dtd", "StanfordCars": "stanford_cars"}
_ENTRY = re.compile(r"([A-Za-z][A-Za-z+\-]*)\s+((?:\d+\.\d+(?:\(\d+\.\d+\))?[\s;.]*)+)")


def _reference_text() -> str:
    """§9.1-9.5 of the reference sheet (../shared when this checkout has it; its excerpt in tests/data
    otherwise, which must then equal it)."""
    excerpt = open(EXCERPT).read()
    if os.path.exists(REFERENCE):
        full = open(REFERENCE).read()
        start = full.index("## 9. Numbers recovered")
        assert full[start:full.index("### 9.6", start)] == excerpt, \
            "tests/data/paper_numbers_reference.md no longer equals the reference's §9.1-9.5"
    return excerpt


def _parse_reference(text: str) -> dict[tuple, tuple]:
    """{(figure, setting, dataset, arch, method): (means, stds or None)}; {(..., 'dense'): value}."""
    lines = []
    for line in text.splitlines():  # continuation lines join their bullet or paragraph
        if (line.strip() and not line.startswith(("-", "#")) and lines and lines[-1].strip()
                and not lines[-1].startswith("#")):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    out: dict[tuple, tuple] = {}
    section = dataset = None
    for line in lines:
        if line.startswith("### "):
            section, dataset = line.split()[1], None
            continue
        if section is None or line.startswith("Derived") or line.startswith("- Scripts"):
            continue
        fig = {"9.1": "Fig. 4", "9.2": "Fig. 5", "9.3": "Fig. 6", "9.4": "Fig. 7", "9.5": "Fig. 9"}[section]
        setting = {"9.3": "transfer", "9.5": "structured"}.get(section, "standard")
        arch, ds = "resnet18", {"9.1": None, "9.2": "tiny_imagenet", "9.4": "cifar100",
                                "9.5": "cifar100"}.get(section)
        if section == "9.1" and line.startswith("Dense"):
            for name, value in re.findall(r"([A-Za-z][A-Za-z0-9\-]*) (\d+\.\d+)", line.split(":")[1]):
                out[(fig, setting, _DATASETS[name], arch, "dense")] = float(value)
            continue
        header = re.match(r"^([A-Za-z0-9\-]+) \((?:40|20)…", line)
        if section == "9.1" and header:
            dataset = _DATASETS[header.group(1)]
            continue
        if section in ("9.2", "9.3"):
            m = re.match(r"^- ([A-Za-z0-9\-]+) \(dense (\d+\.\d+)\): (.*)$", line)
            if not m:
                continue
            name, dense, line = m.groups()
            arch = {"ResNet-50": "resnet50", "VGG-16": "vgg16_bn"}.get(name, "resnet18")
            ds = _DATASETS.get(name, ds)
            out[(fig, setting, ds, arch, "dense")] = float(dense)
        if section == "9.5" and line.startswith("Dense"):
            out[(fig, setting, ds, arch, "dense")] = float(line.split()[1].rstrip("."))
        line = re.sub(r"LTH( at sparsity [^:]*:| \([^)]*\):?)", "LTH", line)
        line = re.sub(r"LTH\+VP \([^)]*\)", "LTH+VP", line)
        for name, values in _ENTRY.findall(line):
            if name in _NAMES:
                method = "channel_vpns" if (section, name) == ("9.5", "VPNs") else _NAMES[name]
                out[(fig, setting, dataset or ds, arch, method)] = paper_numbers.parse_values(values)
    return out


def test_paper_numbers_equal_the_reference_text():
    parsed = _parse_reference(_reference_text())
    curves = {(c.figure, c.setting, c.dataset, c.arch, c.method): (c.accuracy, c.std)
              for c in paper_numbers.CURVES}
    assert len(curves) == len(paper_numbers.CURVES)  # no curve typed twice
    expected = {k: v for k, v in parsed.items() if k[-1] != "dense"}
    assert len(expected) == 90  # 8 datasets x 9 methods, 6 (Fig. 5), 6 (Fig. 6), 3 (Fig. 7), 3 (Fig. 9)
    assert curves == expected
    dense = {(f, s, d, a): v for (f, s, d, a, m), v in parsed.items() if m == "dense"}
    assert {(f, *k): v for k, (v, f, _) in paper_numbers.DENSE.items()} == dense
    # a few entries spelled out, and the sparsities each curve is drawn at
    c = paper_numbers.curves_for("cifar100", "resnet18", methods={"vpns"})[0]
    assert c.accuracy[-1] == 80.58 and c.std[-1] == 0.37 and c.sparsities[-1] == 0.9
    lth = paper_numbers.curves_for("cifar10", "resnet18", methods={"lth"})[0]
    assert len(lth.sparsities) == 19 and lth.sparsities[:3] == (0.2, 0.36, 0.488)
    listed = re.search(r"LTH at sparsity ([\d./]+):", _reference_text()).group(1).split("/")
    assert paper_numbers.LTH10 == tuple(round(float(v) / 100, 6) for v in listed)
    assert lth.sparsities[:10] == paper_numbers.LTH10
    np.testing.assert_allclose(lth.sparsities, 1 - 0.8 ** np.r_[1:16, 17:21], atol=5e-4)  # IMP rounds
    assert paper_numbers.curves_for("tiny_imagenet", "vgg16", methods={"omp"})[0].accuracy[-1] == 70.04
    assert paper_numbers.curves_for("digits", "resnet18") == []
    assert paper_numbers.dense_for("cifar100", "resnet18", setting="structured") == 81.90


# ----------------------------------------------------------------------------------------------------
# 2.-5. Per-layer bars, prompt, mask overlap, training curves


def _layers(sparsities, sizes=(100, 10)):
    paths = ("layer1_0/conv1/kernel", "fc/kernel")
    layers = {p: {"size": n, "nonzero": round(n * (1 - s)), "sparsity": s}
              for p, n, s in zip(paths, sizes, sparsities, strict=True)}
    total = sum(v["size"] - v["nonzero"] for v in layers.values()) / sum(sizes)
    return {"total": {"sparsity": total}, "layers": layers}


def test_layer_sparsity_bars_heights_and_order(tmp_path, monkeypatch):
    captured = {}
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path))
    per_method = {"vpns": [_layers((0.9, 0.5)), _layers((0.8, 0.7))], "hydra": [_layers((0.95, 0.1))]}
    figures.layer_sparsity_bars(per_method, str(tmp_path / "bars.png"))
    (ax,) = captured["fig"].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["layer1_0/conv1", "fc"]  # head last
    hydra, vpns = ax.containers[0], ax.containers[-1]  # methods in sorted order
    assert hydra.get_label().startswith("hydra (n=1") and vpns.get_label().startswith("vpns (n=2")
    np.testing.assert_allclose([b.get_height() for b in hydra.patches], [95.0, 10.0])
    np.testing.assert_allclose([b.get_height() for b in vpns.patches], [85.0, 60.0])
    errs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (_, _, (segments,)) = errs[0].lines  # vpns: ± sample std over its 2 seeds
    np.testing.assert_allclose([s[1][1] - s[0][1] for s in segments.get_segments()],
                               [2 * np.std([90, 80], ddof=1), 2 * np.std([50, 70], ddof=1)])
    assert figures.layer_order(["fc/kernel", "layer2_0/conv1/kernel", "layer10_0/conv1/kernel",
                                "conv1/kernel", "features_10/kernel", "features_2/kernel"]) == [
        "conv1/kernel", "features_2/kernel", "features_10/kernel", "layer2_0/conv1/kernel",
        "layer10_0/conv1/kernel", "fc/kernel"]
    plt.close("all")


def test_mask_iou_on_hand_made_masks():
    a = {"l/kernel": np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool), "fc/kernel": np.zeros(3, bool)}
    b = {"l/kernel": np.array([[1, 0, 1, 0], [1, 0, 0, 1]], bool), "fc/kernel": np.zeros(3, bool)}
    iou = figures.mask_iou(a, b)
    assert iou["l/kernel"] == pytest.approx(2 / 5)  # both keep (0,0), (1,0); either keeps 5
    assert iou["fc/kernel"] == 1.0  # both keep nothing: the same set
    assert iou["total"] == pytest.approx(2 / 5)
    assert figures.mask_iou(a, a)["total"] == 1.0
    b["fc/kernel"] = np.array([1, 1, 0], bool)
    assert figures.mask_iou(a, b)["fc/kernel"] == 0.0 and figures.mask_iou(a, b)["total"] == 2 / 7
    rng = np.random.default_rng(0)
    x, y = rng.random(200_000) < 0.1, rng.random(200_000) < 0.3
    assert figures.mask_iou({"w": x}, {"w": y})["w"] == pytest.approx(figures.random_iou(0.1, 0.3),
                                                                      abs=0.01)
    with pytest.raises(ValueError, match="different layers"):
        figures.mask_iou(a, {"l/kernel": a["l/kernel"]})


def test_prompt_image_pixels_are_grey_plus_program_times_mask(tmp_path, monkeypatch):
    from vpns_jax import prompts

    captured = []
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.append(fig) or real_save(fig, path))
    rng = np.random.default_rng(1)
    program = rng.normal(0, 0.4, (8, 8, 3)).astype(np.float32)
    image = rng.random((8, 8, 3)).astype(np.float32)
    spec = prompts.PromptSpec("pad", input_size=8, output_size=8, pad_size=2)
    figures.prompt_image(program, spec, str(tmp_path / "p.png"), image=image)
    shown = [im.get_array() for im in captured[0].axes[1].images + captured[0].axes[3].images]
    grey, prompted = (np.asarray(s) for s in shown)
    mask = np.zeros((8, 8, 1))
    mask[:2] = mask[-2:] = mask[:, :2] = mask[:, -2:] = 1
    for r, c in [(0, 0), (1, 5), (7, 7), (3, 1), (4, 4), (2, 2)]:  # border and centre pixels
        np.testing.assert_allclose(grey[r, c], np.clip(0.5 + program[r, c] * mask[r, c], 0, 1),
                                   atol=1e-6)
        np.testing.assert_allclose(prompted[r, c], np.clip(image[r, c] + program[r, c] * mask[r, c],
                                                           0, 1), atol=1e-6)
    assert np.all(grey[2:6, 2:6] == 0.5)  # no prompt inside the frame
    # fix: sigmoid of the program on the top-left square; input 6 zero-padded to 8 (1 px each side)
    spec = prompts.PromptSpec("fix", input_size=6, output_size=8, mask_size=3)
    views = figures.prompt_views(program, spec, image[:6, :6])
    sig = 1 / (1 + np.exp(-program))
    np.testing.assert_allclose(views["grey"][1, 2], np.clip(0.5 + sig[1, 2], 0, 1), atol=1e-6)
    np.testing.assert_allclose(views["grey"][0, 0], np.clip(0.0 + sig[0, 0], 0, 1), atol=1e-6)
    np.testing.assert_allclose(views["grey"][5, 5], [0.5] * 3)
    np.testing.assert_allclose(views["prompted"][4, 4], image[3, 3], atol=1e-6)
    plt.close("all")


def test_training_curves_read_the_metrics_rows(tmp_path, monkeypatch):
    rows = [{"kind": "step", "run": "r", "stage": "mask_finding", "step": s,
             "train/pass0/loss": 2.0 / s, "train/pass0/accuracy": 0.1 * s} for s in (1, 2, 3)]
    rows += [{"kind": "epoch", "run": "r", "stage": "mask_finding", "epoch": 1, "step": 3,
              "pass0/loss": 1.2, "pass0/accuracy": 0.2},
             {"kind": "test", "run": "r", "stage": "mask_finding", "step": 3, "accuracy": 0.25,
              "prompted": False},
             {"kind": "step", "run": "r", "stage": "tuning", "step": 4, "train/pass0/loss": 0.4,
              "train/pass0/accuracy": 0.8},
             {"kind": "test", "run": "r", "stage": "tuning", "step": 4, "accuracy": 0.5}]
    data = figures.curve_data(rows)
    assert data["loss"]["pass0 (step)"] == ([1, 2, 3, 4], [2.0, 1.0, 2.0 / 3, 0.4])
    assert data["loss"]["pass0 (epoch mean)"] == ([3], [1.2])
    assert data["accuracy"]["pass0 (step)"][1] == pytest.approx([10, 20, 30, 80])
    assert data["test"] == {"test": ([3, 4], [25.0, 50.0])}
    assert data["stages"] == [(0.0, "mask_finding"), (3.0, "tuning")]
    captured = []
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.append(fig) or real_save(fig, path))
    figures.training_curves(rows, str(tmp_path / "c.png"), title="r")
    test_line = [ln for ln in captured[0].axes[2].lines if ln.get_label() == "test"][0]
    np.testing.assert_allclose(test_line.get_ydata(), [25.0, 50.0])
    old = [{"run": "r", "stage": "finetune", "epoch": e, "pass0/loss": 1.0 / e} for e in (1, 2)]
    assert figures.curve_data(old)["loss"] == {"pass0 (epoch mean)": ([1, 2], [1.0, 0.5])}
    plt.close("all")


# ----------------------------------------------------------------------------------------------------
# A half-finished sweep directory, made by hand (no training)


def _masks(seed, density):
    rng = np.random.default_rng(seed)
    return {"layer1_0/conv1/kernel": rng.random((3, 3, 2, 4)) < density,
            "fc/kernel": rng.random((4, 3)) < density}


def test_half_finished_sweep_plots_what_exists_and_lists_the_rest(tmp_path, capsys, monkeypatch):
    from vpns_jax import checkpoint, sweep
    from vpns_jax import sparsity as sparsity_lib
    from vpns_jax import workdir as workdir_lib

    cells = [{"name": f"proxy/{m}/seed_0", "dir": f"cells/proxy/{m}/seed_0", "config": "proxy",
              "methods": m.replace("+", ","), "seed": 0, "runs": runs}
             for m, runs in (("dense+hydra", [["dense", 0.0], ["hydra", 0.9]]), ("vpns", [["vpns", 0.9]]))]
    cells.append({**cells[1], "name": "proxy/vpns/seed_1", "dir": "cells/proxy/vpns/seed_1", "seed": 1})
    workdir_lib.write_json(str(tmp_path / "sweep.json"), {"grid": {}, "cells": cells})
    program = np.random.default_rng(3).normal(0, 0.3, (8, 8, 3)).astype(np.float32)
    masks = {"hydra": _masks(1, 0.1), "vpns": _masks(2, 0.1)}
    for cell, methods in ((cells[0], (("dense", 0.0, 0.9, None), ("hydra", 0.9, 0.7, None))),
                          (cells[1], (("vpns", 0.9, 0.8, 0.85),))):
        wd = tmp_path / cell["dir"]
        rows = [_row(m, s, 0, acc, wp) for m, s, acc, wp in methods]
        report.save_results(str(wd.mkdir(parents=True) or wd), {"runs": rows, "dense": None})
        for m, s, _, _ in methods:
            if m == "dense":
                continue
            report.save_layer_sparsity(str(wd), m, s, sparsity_lib.sparsity_summary(masks[m]))
            tree = {"masks": masks[m]} | ({"prompt": {"program": program}} if m == "vpns" else {})
            checkpoint.save_final(str(wd / "final" / f"{m}_s{s:g}"), tree,
                                  {"method": m, "sparsity": s, "dataset": "digits",
                                   "prompt": {"method": "pad", "input_size": 8, "output_size": 8,
                                              "pad_size": 2, "mask_size": 115}})
            report.append_metrics(str(wd), {"kind": "epoch", "run": f"{m}_s{s:g}", "stage": "tuning",
                                            "epoch": 1, "step": 2, "pass0/loss": 1.0})
    monkeypatch.setattr(figures, "_test_image", lambda *a: "digits is not prepared here")
    captured = []
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.append((os.path.basename(path), fig))
                        or real_save(fig, path))
    assert sweep.main(["plot", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    written = sorted(os.path.relpath(line.split(" ", 1)[1], tmp_path / "figures") for line in out
                     if line.startswith("wrote "))
    assert written == ["acc_vs_sparsity_proxy.png", "curves/proxy_seed_0_hydra_s0.9.png",
                       "curves/proxy_seed_0_vpns_s0.9.png", "layer_sparsity_proxy_s0.9.png",
                       "mask_overlap_proxy_s0.9.png", "prompt_proxy_seed_0_vpns_s0.9.png"]
    missing = [line for line in out if line.startswith("missing: ")]
    assert "missing: acc_vs_sparsity: proxy/vpns/seed_1 not finished (vpns at 0.9)" in missing
    assert "missing: training_curves: proxy/vpns/seed_1 vpns_s0.9: no metrics rows yet" in missing
    assert "missing: training_curves: proxy/dense+hydra/seed_0 dense_s0: no metrics rows yet" in missing
    assert ("missing: prompt: no test image of digits readable here (digits is not prepared here); "
            "prompts drawn on grey only") in missing
    assert len(missing) == 4, missing
    assert all(os.path.getsize(tmp_path / "figures" / w) > 1000 for w in written)
    # the heatmap shows the IoU of the two hand-made masks, layer by layer
    fig = dict(captured)["mask_overlap_proxy_s0.9.png"]
    expected = figures.mask_iou(masks["hydra"], masks["vpns"])
    per_layer = np.asarray(fig.axes[1].images[0].get_array())
    np.testing.assert_allclose(per_layer[:, 0], [expected["layer1_0/conv1/kernel"],
                                                 expected["fc/kernel"], expected["total"]])
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()),  # hydra, vpns
                               [[1.0, expected["total"]], [expected["total"], 1.0]])
    # the prompt figure comes from the final export: grey + program on the frame
    prompt_fig = dict(captured)["prompt_proxy_seed_0_vpns_s0.9.png"]
    assert len(prompt_fig.axes) == 2  # program ⊙ mask and the grey image: no test image here
    grey = np.asarray(prompt_fig.axes[1].images[0].get_array())
    np.testing.assert_allclose(grey[0, 3], np.clip(0.5 + program[0, 3], 0, 1), atol=1e-6)

    # nothing at all: one line, exit 2
    empty = tmp_path / "empty"
    empty.mkdir()
    workdir_lib.write_json(str(empty / "sweep.json"), {"grid": {}, "cells": cells[1:2]})
    assert sweep.main(["plot", "--dir", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: nothing to plot in {empty}")
    assert figures.main(["--workdir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    plt.close("all")
