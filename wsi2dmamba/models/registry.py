"""The model registry: build any MIL model by name, like ``timm.create_model``.

>>> from wsi2dmamba.models import create
>>> model = create("2dmambamil", in_dim=1024, n_classes=2)                  # our default configuration
>>> paper = create("2dmambamil", in_dim=1024, n_classes=2, preset="paper")  # the published model
>>> again = create_from_config(paper.config_dict())                         # rebuilt from its JSON
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from .base import MILConfig, MILModel


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, a one-line description and its named presets (config overrides)."""

    name: str
    cls: type[MILModel]
    description: str
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, presets: dict[str, dict[str, Any]] | None = None):
    """Class decorator that adds a :class:`MILModel` subclass to the registry under ``name``."""

    def add(cls: type[MILModel]) -> type[MILModel]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = ModelEntry(name, cls, description, dict(presets or {}))
        return cls

    return add


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    """Names of every registered model, in registration order."""
    return list(_REGISTRY)


def model_info(name: str) -> dict[str, Any]:
    """Description, presets and the default configuration's fields of a registered model."""
    entry = _entry(name)
    cfg_cls = entry.cls.config_class
    defaults = {k: f.default for k, f in cfg_cls.model_fields.items() if not f.is_required()}
    return {
        "name": name,
        "description": entry.description,
        "presets": {"default": {}, **entry.presets},
        "config": defaults,
        "config_class": cfg_cls.__name__,
    }


def build_config(name: str, values: dict[str, Any]) -> MILConfig:
    """Validate ``values`` against the model's config class; bad values raise :class:`ConfigError`."""
    cfg_cls = _entry(name).cls.config_class
    try:
        return cfg_cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"model {name!r}: invalid configuration ({problems})") from None


def create(name: str, *, in_dim: int, n_classes: int | None = None, task: str = "classification",
           n_bins: int = 4, preset: str | None = None, **overrides: Any) -> MILModel:
    """Build a registered model.

    Args:
        name: registry name (see :func:`list_models`).
        in_dim: feature dimension of the grid files.
        n_classes: number of classes (classification).
        task: ``classification`` or ``survival`` (then ``n_bins`` hazard logits).
        n_bins: number of survival time bins.
        preset: a named configuration of the model (e.g. ``paper`` for 2DMambaMIL); None is ``default``.
        **overrides: any field of the model's configuration, applied after the preset.
    """
    entry = _entry(name)
    if preset is not None and preset != "default" and preset not in entry.presets:
        raise ConfigError(f"model {name!r} has no preset {preset!r}; "
                          f"available: {', '.join(['default', *entry.presets])}")
    values: dict[str, Any] = {"in_dim": in_dim, "n_classes": n_classes, "task": task, "n_bins": n_bins}
    values.update(entry.presets.get(preset or "default", {}))
    values.update(overrides)
    return entry.cls(build_config(name, values))


def create_from_config(config: dict[str, Any]) -> MILModel:
    """Rebuild a model from ``model.config_dict()`` (e.g. read from the JSON beside a checkpoint)."""
    if "model" not in config:
        raise ConfigError("model configuration has no 'model' key naming the architecture")
    values = dict(config)
    name = values.pop("model")
    return _entry(name).cls(build_config(name, values))
