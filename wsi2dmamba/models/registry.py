"""The model registry: build any MIL model by name, like ``timm.create_model``.

A *model key* names a registered model and, after a colon, one of its presets: ``2dmambamil``,
``2dmambamil:paper``, ``2dmambamil:noscan``. Keys are accepted wherever a model is named (``train
--model``, the pipeline's ``[train] models``, :func:`create`); ``wsi2dmamba models --presets`` lists them.

>>> from wsi2dmamba.models import create
>>> model = create("2dmambamil", in_dim=1024, n_classes=2)                  # our default configuration
>>> paper = create("2dmambamil:paper", in_dim=1024, n_classes=2)            # the published model
>>> again = create_from_config(paper.config_dict())                         # rebuilt from its JSON
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from ..errors import ConfigError
from ..validation import validated
from .base import MILConfig, MILModel

PRESET_SEPARATOR = ":"


@dataclass(frozen=True)
class Preset:
    """A named configuration of a model: the fields it overrides and what it is for, in one line."""

    overrides: dict[str, Any]
    description: str


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, a one-line description and its named presets."""

    name: str
    cls: type[MILModel]
    description: str
    presets: dict[str, Preset] = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, presets: dict[str, Preset] | None = None):
    """Class decorator that adds a :class:`MILModel` subclass to the registry under ``name``."""

    def add(cls: type[MILModel]) -> type[MILModel]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        if PRESET_SEPARATOR in name:
            raise RuntimeError(f"model name {name!r} may not contain {PRESET_SEPARATOR!r}")
        cls.name = name
        _REGISTRY[name] = ModelEntry(name, cls, description, dict(presets or {}))
        return cls

    return add


def split_model_key(key: str) -> tuple[str, str | None]:
    """``"2dmambamil:paper"`` → ``("2dmambamil", "paper")``; ``"abmil"`` → ``("abmil", None)``.

    ``default`` names the model's own configuration and gives None.
    """
    name, _, preset = key.partition(PRESET_SEPARATOR)
    return name, (None if preset in ("", "default") else preset)


def model_key(name: str, preset: str | None = None) -> str:
    """The key of ``name`` with ``preset`` (``"2dmambamil", "noscan"`` → ``"2dmambamil:noscan"``)."""
    return name if preset in (None, "default") else f"{name}{PRESET_SEPARATOR}{preset}"


def model_folder(key: str) -> str:
    """Folder name of a model key in ``RUN/train`` (``2dmambamil:paper`` → ``2dmambamil-paper``)."""
    name, preset = split_model_key(key)
    return name if preset is None else f"{name}-{preset}"


def _entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def _preset(entry: ModelEntry, preset: str | None) -> dict[str, Any]:
    if preset is None:
        return {}
    if preset not in entry.presets:
        raise ConfigError(f"model {entry.name!r} has no preset {preset!r}; available: "
                          f"{', '.join(model_key(entry.name, p) for p in ['default', *entry.presets])}")
    return dict(entry.presets[preset].overrides)


def list_models() -> list[str]:
    """Names of every registered model, in registration order."""
    return list(_REGISTRY)


def list_model_keys() -> list[str]:
    """Every model key: each registered model, then each of its presets (``name:preset``)."""
    return [model_key(name, p) for name, e in _REGISTRY.items() for p in ["default", *e.presets]]


def check_model_key(key: str) -> tuple[str, str | None]:
    """Split a model key and check that its model and preset exist; :class:`ConfigError` otherwise."""
    name, preset = split_model_key(key)
    _preset(_entry(name), preset)
    return name, preset


def resolve_model_key(key: str, preset: str | None = None) -> tuple[str, str | None]:
    """(registry name, preset) of a model key and a preset given beside it, both checked; the two must
    not name different presets."""
    name, key_preset = split_model_key(key)
    preset = None if preset in (None, "default") else preset
    if key_preset is not None and preset is not None and key_preset != preset:
        raise ConfigError(f"preset {preset!r} given beside the key's preset {key_preset!r} contradicts the model "
                          f"key {key!r}; give the preset once")
    return check_model_key(model_key(name, key_preset or preset))


def model_info(name: str) -> dict[str, Any]:
    """Description, presets (overrides and description each) and the default configuration's fields."""
    entry = _entry(name)
    cfg_cls = entry.cls.config_class
    defaults = {k: f.default for k, f in cfg_cls.model_fields.items() if not f.is_required()}
    presets = {"default": {"overrides": {}, "description": entry.description}}
    presets.update({k: {"overrides": dict(p.overrides), "description": p.description}
                    for k, p in entry.presets.items()})
    return {
        "name": name,
        "description": entry.description,
        "presets": presets,
        "config": defaults,
        "config_class": cfg_cls.__name__,
    }


def config_class(name: str) -> type[MILConfig]:
    """The configuration class of the registered model ``name`` (a registry name, without preset)."""
    return _entry(name).cls.config_class


def build_config(name: str, values: dict[str, Any]) -> MILConfig:
    """Validate ``values`` against the model's config class; bad values raise :class:`ConfigError`."""
    return validated(_entry(name).cls.config_class, values, f"model {name!r}: invalid configuration")


def create(name: str, *, in_dim: int, n_classes: int | None = None, task: str = "classification",
           n_bins: int = 4, preset: str | None = None, **overrides: Any) -> MILModel:
    """Build a registered model.

    Args:
        name: a model key: registry name (see :func:`list_models`), optionally ``name:preset``.
        in_dim: feature dimension of the grid files.
        n_classes: number of classes (classification).
        task: ``classification`` or ``survival`` (then ``n_bins`` hazard logits).
        n_bins: number of survival time bins.
        preset: a named configuration of the model (e.g. ``paper``); None or ``default`` is the model's
            own. Give it here or in the key, not both.
        **overrides: any field of the model's configuration, applied after the preset.
    """
    name, preset = resolve_model_key(name, preset)
    entry = _entry(name)
    values: dict[str, Any] = {"in_dim": in_dim, "n_classes": n_classes, "task": task, "n_bins": n_bins}
    values.update(_preset(entry, preset))
    values.update(overrides)
    return entry.cls(build_config(name, values))


def create_from_config(config: dict[str, Any]) -> MILModel:
    """Rebuild a model from ``model.config_dict()`` (e.g. read from the JSON beside a checkpoint)."""
    if "model" not in config:
        raise ConfigError("model configuration has no 'model' key naming the architecture")
    values = dict(config)
    name = values.pop("model")
    return _entry(name).cls(build_config(name, values))
