"""Method registry: every pruning method of the paper is ONE module that turns its config into runs.

A method module (or any object) has
- ``NAME``: the name in ``config.methods`` and of its config subtree ``config.<NAME>``;
- ``default_config() -> ml_collections.ConfigDict``: its options with the reference's defaults;
- ``plan(config) -> list[plan.Run]``: the runs (chains of stages, one result row each) for the
  configured sparsities, validating its options as it reads them;
and optionally ``mask_source(config, sparsity) -> plan.MaskSource`` (how it makes a mask, for the
methods that reuse it: VPNs w. X, the post-pruning-prompt pilot), ``levels(config)`` (its own sparsity
series, LTH), ``research(dataset) -> {dotted field: value}`` (the authors' per-dataset scripts) and
``transfer(config, mask: plan.MaskSource, sparsity) -> plan.Run`` (its tuning stage on a given mask:
`config.mask_from`, `vpns_jax.transfer`; ``MASKLESS = True``: a method without a mask, dense, that
runs as usual beside a transfer as its reference).
`register` adds one; nothing else in the package needs to change.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections as mlc

from vpns_jax.errors import ConfigError
from vpns_jax.methods import (
    bip,
    channel_vpns,
    dense,
    depgraph,
    grasp,
    hydra,
    lth,
    omp,
    post_prompt,
    random,
    slim,
    snip,
    synflow,
    vpns,
    vpns_with,
)
from vpns_jax.methods.plan import Run

_REQUIRED = ('NAME', 'default_config', 'plan')
REGISTRY: dict[str, Any] = {}


def register(method: Any) -> Any:
    """Add a method (module or object with NAME, default_config, plan); returns it."""
    missing = [a for a in _REQUIRED if not hasattr(method, a)]
    if missing:
        raise TypeError(f'method {method!r} lacks {missing}')
    REGISTRY[method.NAME] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests)."""
    REGISTRY.pop(name, None)


for _m in (dense, vpns, hydra, random, omp, lth, snip, grasp, synflow, bip, vpns_with, post_prompt):
    register(_m)
for _m in (channel_vpns, slim, depgraph):  # structured: whole channels (vpns_jax.structured)
    register(_m)


def names() -> list[str]:
    """Registered method names, in registration order."""
    return list(REGISTRY)


def get(name: str) -> Any:
    """The method `name`; unknown names raise ConfigError listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f'unknown method {name!r} in config.methods; known: {", ".join(names())}.')
    return REGISTRY[name]


def default_configs() -> dict[str, mlc.ConfigDict]:
    """``{name: its default config subtree}`` of every registered method."""
    return {name: m.default_config() for name, m in REGISTRY.items()}


def runs(config: mlc.ConfigDict, name: str) -> list[Run]:
    """The runs of method `name` under `config` (its options validated); with `config.mask_from`
    its one run on that mask (`vpns_jax.transfer`)."""
    from vpns_jax import transfer  # it reads checkpoints; imported here, not at package import

    method = get(name)
    if name not in config:
        raise ConfigError(f'config has no subtree config.{name} for method {name!r}; build the config '
                          'with vpns_jax.config.default_config() after registering the method.')
    source = transfer.source(config)
    if source is None or getattr(method, 'MASKLESS', False):  # dense: the transfer's reference
        return list(method.plan(config))
    if not hasattr(method, 'transfer'):
        able = [n for n, m in REGISTRY.items() if hasattr(m, 'transfer')]
        raise ConfigError(f'config.mask_from: method {name!r} cannot tune a given (unstructured) '
                          f'mask; the methods that tune a transferred mask: {", ".join(able)}.')
    run = method.transfer(config, source.mask_source(), source.sparsity)
    return [dataclasses.replace(run, mask_from=source.label)]


def mask_source(config: mlc.ConfigDict, name: str, sparsity: float) -> Any:
    """How method `name` makes its mask at `sparsity` (for methods built on another's mask)."""
    method = get(name)
    if not hasattr(method, 'mask_source'):
        raise ConfigError(f'method {name!r} cannot provide a mask to another method.')
    return method.mask_source(config, sparsity)


def levels(config: mlc.ConfigDict, name: str) -> tuple[float, ...]:
    """The sparsities method `name` runs at (its own series, or config.sparsities)."""
    method = get(name)
    if hasattr(method, 'levels'):
        return tuple(method.levels(config))
    return tuple(float(s) for s in config.sparsities)


__all__ = ['REGISTRY', 'default_configs', 'get', 'levels', 'mask_source', 'names', 'register',
           'runs', 'unregister']
