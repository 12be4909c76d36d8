"""The VPNs ablations of the paper (reference §9.7, Fig. A11) as ready configs on the offline proxy task.

Each ablation is one knob with named variants; `configs/ablations/<name>.py:<arg>=<variant>` is the
config (`get_config(name, arg)`), `configs/sweeps/ablation_<name>.py` runs every variant over seeds
(`python -m vpns_jax.sweep --sweep configs/sweeps/ablation_<name>.py --dir DIR`, then
`python -m vpns_jax.sweep summarize --dir DIR`).

The base is the quickstart's proxy task (`config.proxy_task_config`: a width-0.25 ResNet-18 trained
here on Fashion-MNIST as the source model, digits at 32 px, pad prompt 4, batch 64), VPNs only, 8 + 8
epochs with the quickstart's learning rates, sparsities 0.5, 0.9 and 0.99. Sizes are the paper's
scaled from 224 px to 32 px (x 1/7): pad 16/32/48/64 -> 2/4/6/8 px, input 128/160/192/224 -> 18/23/
27/32 px; the fix and random prompts' square is 21 px (441 pixels per channel, as the pad-4 frame's
448: the paper gives every prompt type about the same number of tunable parameters, §1.2). The
source model is always trained at 32 px (`proxy.input_size`), whatever the input size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections as mlc

from vpns_jax.config import apply_overrides, parse_arg, proxy_task_config
from vpns_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One knob: the config argument naming the variant, the variants (name -> the fields they
    set), the default variant (the released code's choice, scaled) and what the paper compares."""

    arg: str
    variants: Mapping[str, Mapping[str, Any]]
    default: str
    about: str


def _pad(size: int) -> dict[str, Any]:
    return {"prompt.pad_size": size}


ABLATIONS: dict[str, Ablation] = {
    "prompt_type": Ablation("type", {
        "pad": {"prompt.method": "pad"},
        "fix": {"prompt.method": "fix", "prompt.mask_size": 21},
        "random": {"prompt.method": "random", "prompt.mask_size": 21},
    }, "pad", "prompt type: pad frame / fixed square / square at a random place every forward"),
    "pad_size": Ablation("pad", {str(p): _pad(p) for p in (2, 4, 6, 8)}, "4",
                         "pad prompt width in pixels (the paper's 16/32/48/64 of 224)"),
    "input_size": Ablation("size", {str(s): {"input_size": s} for s in (18, 23, 27, 32)}, "32",
                           "image size before the zero padding to 32 px (the paper's "
                           "128/160/192/224 of 224)"),
    "prompt_stages": Ablation("stages", {s: {"vpns.prompt_stages": s}
                                         for s in ("both", "mask_finding", "tuning")}, "both",
                              "which VPNs stages train the prompt (Fig. A11)"),
    "passes": Ablation("passes", {p: {"vpns.passes": p} for p in ("two", "prompted_only")}, "two",
                       "per iteration: prompted + un-prompted augmented pass (released code) or "
                       "the prompted pass only (paper Eq. 5/6)"),
    "label_mapping": Ablation("mapping", {m: {"label_mapping": m}
                                          for m in ("flm", "ilm", "new_head")}, "flm",
                              "frequency label mapping once / re-mapped every epoch / a new head"),
}


def variants(name: str) -> tuple[str, ...]:
    """The variant names of ablation `name`."""
    return tuple(_get(name).variants)


def _get(name: str) -> Ablation:
    if name not in ABLATIONS:
        raise ConfigError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}.")
    return ABLATIONS[name]


def base_config() -> mlc.ConfigDict:
    """VPNs on the proxy task with the quickstart's epochs and learning rates (the default of every
    ablation), sparsities 0.5 / 0.9 / 0.99."""
    c = proxy_task_config()
    c.methods = "vpns"
    c.sparsities = (0.5, 0.9, 0.99)
    c.proxy.input_size = c.prompt.output_size  # one source model whatever the input size
    c.vpns.mask_finding.update(epochs=8, lr=1e-2, prompt_lr=1e-2)
    c.vpns.tuning.update(epochs=8, lr=0.05, prompt_lr=0.05)
    c.log_every_steps = 20
    return c


def get_config(name: str, arg: str | None = None,
               base: Callable[[], mlc.ConfigDict] = base_config) -> mlc.ConfigDict:
    """Ablation `name` at the variant `arg` names ('type=fix'; none: the default); an unknown
    variant is one ConfigError line naming the known ones."""
    ablation = _get(name)
    args = parse_arg(arg, **{ablation.arg: ablation.default})
    variant = str(args[ablation.arg])
    if variant not in ablation.variants:
        raise ConfigError(f"configs/ablations/{name}.py: unknown {ablation.arg} {variant!r}; known: "
                          f"{', '.join(ablation.variants)} (e.g. "
                          f"configs/ablations/{name}.py:{ablation.arg}={ablation.default}).")
    c = base()
    apply_overrides(c, dict(ablation.variants[variant]))
    return c


def sweep_configs(name: str) -> dict[str, str]:
    """A sweep's `configs` for ablation `name`: variant -> 'configs/ablations/<name>.py:<arg>=<v>'."""
    ablation = _get(name)
    return {v: f"configs/ablations/{name}.py:{ablation.arg}={v}" for v in ablation.variants}
