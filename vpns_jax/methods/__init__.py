"""Method registry: name -> recipe (a config dataclass, the first scores, and a list of stages).

Each method module defines ``NAME``, ``USES_PROMPT``, ``Config`` (frozen dataclass),
``init_scores(params)`` (how the first mask is made; ``{}`` for dense) and
``recipe(config) -> list[Stage]``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from vpns_jax.errors import ConfigError
from vpns_jax.methods import dense, hydra, vpns
from vpns_jax.train.stages import Stage

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (vpns, hydra, dense)}


def names() -> list[str]:
    return sorted(METHODS)


def get(name: str) -> ModuleType:
    """The recipe module of `name`; unknown names raise ConfigError listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f'unknown method {name!r}; known: {", ".join(names())}.')
    return METHODS[name]


def make_config(name: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The method's Config with `overrides` (unknown fields raise ConfigError naming them)."""
    cls = get(name).Config
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ConfigError(f'method {name!r} has no option(s) {unknown}; known: {sorted(fields)}.')
    return cls(**dict(overrides or {}))


def stages(name: str, overrides: Mapping[str, Any] | None = None) -> list[Stage]:
    """Shortcut: ``get(name).recipe(make_config(name, overrides))``."""
    return get(name).recipe(make_config(name, overrides))


__all__ = ['METHODS', 'get', 'make_config', 'names', 'stages']
