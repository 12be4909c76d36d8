"""The paper's accuracy numbers (VPNs, figures 4, 5, 6, 7 and 9) as plain data, for drawing beside a run's.

Typed from ../shared/reference/vpns_reference.md §9, which recovered them from the authors' plotting
scripts (`jincan333/ILM-VP@develop-can:plot/...`, the data behind the figures; each curve names its
script). Accuracies in %, mean (std over seeds 7/9/17) where the script has a std, else the single
value. Sparsities as fractions; LTH's are its IMP rounds 1 - 0.8^k as the scripts label them (CIFAR-10,
Flowers-102, DTD and Stanford Cars: 19 points, 20 % ... 98.85 %, as the scripts label them: rounds
1-15 and 17-20, their 96.50 standing for round 15's 96.48). tests/test_figures.py parses the reference
text and checks every curve against it.

`setting` separates results that share a (dataset, arch, method) but not a protocol: 'standard' (the
mask found and tuned on the dataset itself), 'transfer' (Fig. 6: the mask found on ImageNet-1K, then
tuned on the dataset), 'structured' (Fig. 9: channel sparsity). `prompted`: the script's number is
measured with the prompt at test time (Fig. 7's VPNs w. Random/OMP/LTH; VPNs itself is evaluated
without it, reference §4.4).
"""

from __future__ import annotations

import dataclasses
import re

FIG4 = "Fig. 4"
FIG5 = "Fig. 5"
FIG6 = "Fig. 6"
FIG7 = "Fig. 7"
FIG9 = "Fig. 9"
SETTINGS = ("standard", "transfer", "structured")
STRUCTURED_METHODS = frozenset({"channel_vpns", "slim", "depgraph"})  # channel sparsity (Fig. 9)
# The paper's VGG-16 (Fig. 5) is the research copy's VGG-16-BN (reference §7); the released code's
# VGG-16 without BN is the same figure's closest setting, so both match it.
ARCH_ALIASES = {"vgg16": "vgg16_bn"}


@dataclasses.dataclass(frozen=True)
class PaperCurve:
    """One method's curve in one of the paper's figures: accuracy (%) against sparsity (fraction)."""

    figure: str
    script: str  # the plotting script in jincan333/ILM-VP@develop-can the numbers come from
    dataset: str  # vpns_jax.data registry name
    arch: str  # vpns_jax.models name
    method: str  # vpns_jax.methods name (results rows' 'method')
    sparsities: tuple[float, ...]
    accuracy: tuple[float, ...]  # %
    std: tuple[float, ...] | None  # % over 3 seeds; None where the script has single values
    setting: str = "standard"
    prompted: bool = False

    @property
    def label(self) -> str:
        """The legend label: 'paper: <method's name in the paper>'."""
        return f"paper: {PAPER_NAMES.get(self.method, self.method)}"


PAPER_NAMES = {"vpns": "VPNs", "hydra": "HYDRA", "bip": "BiP", "omp": "OMP", "snip": "SNIP",
               "grasp": "GraSP", "synflow": "SynFlow", "random": "Random", "lth": "LTH",
               "vpns_w_random": "Random+VP", "vpns_w_omp": "OMP+VP", "vpns_w_lth": "LTH+VP",
               "channel_vpns": "VPNs", "slim": "Slim", "depgraph": "DepGraph", "dense": "dense"}

S6 = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
S8 = S6 + (0.95, 0.99)
LTH10 = (0.2, 0.36, 0.488, 0.59, 0.672, 0.738, 0.7903, 0.8322, 0.8658, 0.8926)
LTH19 = LTH10 + (0.9141, 0.9313, 0.9450, 0.9560, 0.9650, 0.9775, 0.9820, 0.9856, 0.9885)
CHANNELS = (0.1, 0.2, 0.3, 0.4, 0.5)

_VALUE = re.compile(r"(\d+\.\d+)(?:\((\d+\.\d+)\))?")


def parse_values(text: str) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """'83.31(0.20) 83.18(0.13)' -> ((83.31, 83.18), (0.2, 0.13)); '80.89 79.42' -> (..., None)."""
    found = _VALUE.findall(text)
    means = tuple(float(m) for m, _ in found)
    stds = tuple(float(s) for _, s in found) if all(s for _, s in found) else None
    return means, stds


# (dataset, script file, {method: values}); sparsities: S8 for the datasets that go to 99 %, else S6.
_FIG4 = {
    "cifar100": ("cifar100", S6, LTH10, {
        "vpns": "83.31(0.20) 83.18(0.13) 83.16(0.21) 82.74(0.21) 82.00(0.16) 80.58(0.37)",
        "hydra": "81.59(0.17) 81.11(0.15) 80.88(0.27) 80.01(0.10) 78.86(0.15) 77.12(0.16)",
        "bip": "81.89(0.14) 81.91(0.27) 82.17(0.15) 81.81(0.34) 80.78(0.29) 79.52(0.05)",
        "omp": "81.60(0.22) 81.43(0.31) 81.26(0.07) 81.09(0.14) 80.03(0.15) 77.65(0.42)",
        "snip": "80.89 79.42 78.35 76.53 74.39 70.22",
        "grasp": "77.30 76.33 75.34 73.89 71.26 69.09",
        "synflow": "80.47 79.32 78.78 77.31 75.65 71.49",
        "random": "78.57 76.03 73.94 71.03 68.35 66.14",
        "lth": "82.02 81.72 81.36 81.16 80.76 80.35 79.70 79.23 78.91 78.50"}),
    "tiny_imagenet": ("tiny_imagenet", S6, LTH10, {
        "vpns": "73.53(0.16) 73.59(0.20) 72.83(0.02) 71.98(0.15) 70.11(0.43) 67.89(0.25)",
        "hydra": "73.15 73.12 72.54 70.88 67.97 64.48",
        "bip": "72.26 72.01 71.60 71.07 69.07 66.20",
        "omp": "72.74 72.44 72.12 71.09 69.04 63.89",
        "snip": "69.88 66.38 62.75 59.53 54.40 49.18",
        "grasp": "66.42 65.05 63.46 60.55 57.24 52.91",
        "synflow": "70.55 69.27 67.00 64.11 61.41 56.92",
        "random": "67.13 65.32 62.20 57.25 53.50 50.28",
        "lth": "73.01 72.72 72.36 71.97 71.18 70.49 69.52 68.43 67.17 65.89"}),
    "cifar10": ("cifar10", S8, LTH19, {
        "vpns": "96.56 96.47 96.51 96.51 96.55 96.29 95.58 92.53",
        "hydra": "96.00 95.98 95.86 95.63 95.31 94.67 93.53 89.36",
        "bip": "96.22 96.25 96.18 96.09 96.07 95.95 95.14 91.96",
        "omp": "95.98 95.86 95.89 95.79 95.76 95.01 93.65 84.33",
        "snip": "95.90 95.71 95.39 95.20 94.72 93.77 92.29 87.31",
        "grasp": "94.79 94.25 93.83 93.35 92.50 91.60 90.62 87.37",
        "synflow": "95.69 95.81 95.51 95.38 94.94 93.81 92.21 87.30",
        "random": "95.05 94.19 93.26 92.06 90.59 89.75 88.62 83.21",
        "lth": "96.16 96.07 95.98 95.92 95.80 95.66 95.78 95.62 95.39 95.18 94.94 94.79 94.48 "
               "94.07 93.54 92.39 91.52 90.86 88.68"}),
    "food101": ("food101", S6, LTH10, {
        "vpns": "80.03 80.25 80.44 80.22 80.11 79.34",
        "hydra": "78.74 78.46 78.00 77.61 77.33 76.76",
        "bip": "79.80 79.84 79.94 79.52 79.67 79.05",
        "omp": "79.54 79.57 79.36 79.25 78.77 77.14",
        "snip": "78.82 75.30 73.35 73.37 71.11 69.82",
        "grasp": "76.87 76.32 76.11 75.25 73.53 70.80",
        "synflow": "78.93 78.51 78.03 77.44 76.08 73.43",
        "random": "77.73 76.52 73.93 70.72 67.55 63.72",
        "lth": "79.91 79.55 79.17 78.82 78.45 78.40 78.10 77.92 77.83 77.54"}),
    "oxford_flowers102": ("flowers102", S8, LTH19, {
        "vpns": "97.22 97.00 97.48 97.54 96.80 96.71 96.93 91.92",
        "hydra": "96.70 96.02 95.98 96.01 96.25 95.65 95.81 86.55",
        "bip": "96.39 96.00 95.68 96.00 95.50 95.45 94.14 84.17",
        "omp": "96.79 96.59 96.86 96.95 96.24 95.41 94.22 75.37",
        "snip": "95.54 90.91 90.44 80.62 81.93 75.70 74.30 58.93",
        "grasp": "92.19 92.11 91.54 90.30 88.13 86.34 85.95 81.13",
        "synflow": "95.83 95.41 95.08 94.59 93.92 91.99 89.93 80.15",
        "random": "93.57 91.31 88.35 84.40 83.54 82.21 81.53 69.67",
        "lth": "97.01 96.66 96.74 96.50 96.01 96.36 96.32 96.24 96.16 95.91 95.87 95.99 95.76 "
               "95.50 94.56 93.37 93.22 91.08 88.19"}),
    "oxford_iiit_pet": ("oxfordpets", S6, LTH10, {
        "vpns": "90.86 90.60 90.06 89.78 87.95 85.41",
        "hydra": "90.51 90.23 90.00 89.53 87.39 84.67",
        "bip": "88.52 88.50 88.06 88.09 86.34 85.41",
        "omp": "89.86 89.94 89.89 89.09 86.56 81.95",
        "snip": "88.54 85.32 79.49 74.16 71.36 70.64",
        "grasp": "74.38 70.69 67.23 66.01 62.39 58.93",
        "synflow": "88.16 87.91 87.07 85.17 83.33 80.20",
        "random": "77.36 68.06 58.98 51.83 46.22 46.45",
        "lth": "89.93 90.13 90.11 89.87 89.51 88.55 87.72 86.31 84.87 82.69"}),
    "dtd": ("dtd", S8, LTH19, {
        "vpns": "69.20 69.57 69.40 69.46 68.74 67.80 66.12 59.31",
        "hydra": "68.74 69.22 68.90 68.39 68.60 66.84 65.44 56.82",
        "bip": "66.90 67.82 67.71 67.84 67.86 67.31 65.80 59.08",
        "omp": "68.28 68.42 68.51 68.56 68.30 67.40 64.40 51.05",
        "snip": "68.30 68.12 68.24 65.68 61.22 56.03 52.64 43.97",
        "grasp": "60.76 60.06 59.18 57.98 54.73 51.70 49.38 41.65",
        "synflow": "66.69 65.81 65.02 63.79 63.10 61.53 57.84 48.65",
        "random": "62.37 59.38 52.69 46.97 42.00 41.61 39.91 31.84",
        "lth": "68.37 68.37 68.92 68.88 69.02 68.83 68.97 68.05 68.31 66.99 67.20 66.47 66.38 "
               "64.91 64.08 62.66 61.75 58.69 55.92"}),
    "stanford_cars": ("stanfordcars", S8, LTH19, {
        "vpns": "85.69 85.60 85.79 85.92 86.02 84.51 82.55 63.74",
        "hydra": "83.67 83.88 83.36 83.12 83.26 82.60 82.06 63.70",
        "bip": "83.42 83.46 83.30 83.06 82.55 80.79 78.22 56.82",
        "omp": "70.61 68.25 64.32 63.51 60.23 58.98 57.17 42.70",
        "snip": "50.57 42.87 43.79 40.77 41.33 38.99 36.52 17.40",
        "grasp": "81.12 79.03 78.25 76.96 73.15 70.29 65.47 35.61",
        "synflow": "84.34 84.75 84.58 84.16 83.32 79.91 75.37 50.52",
        "random": "81.81 79.44 73.16 67.05 63.42 52.37 45.53 15.88",
        "lth": "77.24 72.31 67.64 64.45 62.09 58.77 58.24 58.40 58.59 58.53 58.40 58.23 58.01 "
               "57.91 57.39 56.28 55.57 54.71 53.28"}),
}

# (setting, dataset, arch) -> the dense (full fine-tune) accuracy the same script draws, %.
DENSE: dict[tuple[str, str, str], tuple[float, str, str]] = {}


def _build() -> list[PaperCurve]:
    curves = []

    def add(figure, script, dataset, arch, method, sparsities, text, setting="standard",
            prompted=False):
        accuracy, std = parse_values(text)
        if len(accuracy) != len(sparsities):
            raise AssertionError(f"{figure} {dataset} {method}: {len(accuracy)} values for "
                                 f"{len(sparsities)} sparsities")
        curves.append(PaperCurve(figure, script, dataset, arch, method, tuple(sparsities),
                                 accuracy, std, setting, prompted))

    fig4_dense = {"cifar10": 96.09, "cifar100": 82.10, "tiny_imagenet": 73.03, "food101": 79.80,
                  "oxford_flowers102": 96.85, "oxford_iiit_pet": 90.36, "dtd": 67.75,
                  "stanford_cars": 85.39}
    for dataset, (stem, grid, lth_grid, rows) in _FIG4.items():
        script = f"plot/superior_performance/{stem}.py"
        DENSE[("standard", dataset, "resnet18")] = (fig4_dense[dataset], FIG4, script)
        for method, text in rows.items():
            add(FIG4, script, dataset, "resnet18", method, lth_grid if method == "lth" else grid,
                text)

    script = "plot/architecture_transfer/resnet50.py"
    DENSE[("standard", "tiny_imagenet", "resnet50")] = (83.59, FIG5, script)
    add(FIG5, script, "tiny_imagenet", "resnet50", "vpns", S6, "83.85 82.86 81.96 80.47 78.92 74.10")
    add(FIG5, script, "tiny_imagenet", "resnet50", "hydra", S6, "83.64 82.42 81.40 80.16 78.09 73.66")
    add(FIG5, script, "tiny_imagenet", "resnet50", "omp", S6, "83.05 82.58 81.08 77.40 66.69 4.58")
    script = "plot/architecture_transfer/vgg.py"
    DENSE[("standard", "tiny_imagenet", "vgg16_bn")] = (70.87, FIG5, script)
    add(FIG5, script, "tiny_imagenet", "vgg16_bn", "vpns", S6, "71.85 71.70 71.79 71.11 70.98 70.84")
    add(FIG5, script, "tiny_imagenet", "vgg16_bn", "hydra", S6, "70.74 70.41 70.62 68.89 67.16 58.97")
    add(FIG5, script, "tiny_imagenet", "vgg16_bn", "omp", S6, "70.98 70.76 70.76 70.96 70.67 70.04")

    for dataset, dense, rows in (
            ("tiny_imagenet", 73.03, {"vpns": "73.37 73.51 73.17 72.08 71.34 67.49",
                                      "hydra": "72.55 72.92 72.42 72.02 69.52 66.12",
                                      "omp": "73.12 72.30 72.16 70.46 67.37 62.71"}),
            ("cifar100", 82.10, {"vpns": "81.77 81.58 81.38 81.70 80.79 79.35",
                                 "hydra": "81.02 80.88 80.67 80.91 80.25 78.50",
                                 "omp": "81.46 81.14 81.22 80.46 79.31 76.61"})):
        script = f"plot/dataset_transfer/{dataset}.py"
        DENSE[("transfer", dataset, "resnet18")] = (dense, FIG6, script)
        for method, text in rows.items():
            add(FIG6, script, dataset, "resnet18", method, S6, text, setting="transfer")

    for source, grid, text in (
            ("random", S6, "79.37 76.84 74.56 70.93 69.51 67.20"),
            ("omp", S6, "82.46 82.29 82.02 81.81 80.84 78.53"),
            ("lth", LTH10, "82.84 82.65 81.84 81.90 81.55 81.07 80.57 80.65 80.28 79.56")):
        add(FIG7, f"plot/algorithm_transfer/vpns_{source}.py", "cifar100", "resnet18",
            f"vpns_w_{source}", grid, text, prompted=True)

    script = "plot/structured/cifar100.py"
    DENSE[("structured", "cifar100", "resnet18")] = (81.90, FIG9, script)
    add(FIG9, script, "cifar100", "resnet18", "channel_vpns", CHANNELS,
        "82.60 81.21 79.97 77.34 75.58", setting="structured")
    add(FIG9, script, "cifar100", "resnet18", "depgraph", CHANNELS,
        "81.40 80.11 79.31 77.32 75.36", setting="structured")
    add(FIG9, script, "cifar100", "resnet18", "slim", CHANNELS,
        "81.38 80.17 74.94 69.88 65.94", setting="structured")
    return curves


CURVES: tuple[PaperCurve, ...] = tuple(_build())


def _arch(arch: str) -> str:
    return ARCH_ALIASES.get(arch, arch)


def curves_for(dataset: str, arch: str, *, setting: str = "standard",
               methods: set[str] | None = None) -> list[PaperCurve]:
    """The paper's curves for one (dataset, arch) setting (of `methods` when given); [] when the
    paper has none (e.g. the offline proxy on digits)."""
    if setting not in SETTINGS:
        raise ValueError(f"paper_numbers: setting {setting!r}; known settings: {', '.join(SETTINGS)}")
    return [c for c in CURVES if c.dataset == dataset and c.arch == _arch(arch)
            and c.setting == setting and (methods is None or c.method in methods)]


def dense_for(dataset: str, arch: str, *, setting: str = "standard") -> float | None:
    """The dense accuracy (%) the paper's figure draws for this setting, or None."""
    entry = DENSE.get((setting, dataset, _arch(arch)))
    return None if entry is None else entry[0]
