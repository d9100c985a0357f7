"""What a result *is* versus how it was *run*: the two kinds of configuration field.

Every configuration is a frozen pydantic model. A field declared ``Field(exclude=True)`` is a *runtime*
field (a device, a number of workers, a backend, a memory knob, a rescue switch): it is left out of
``model_dump`` and so of every parameter hash, and changing it never makes finished work be done again.
Every other field is an *identity* field: changing it makes another result, which is made anew (a slide
stage) or refused without ``--force`` (a trained fold).

>>> from wsi2dmamba.tiling import TileConfig
>>> runtime_fields(TileConfig)
('segment_missing',)
>>> "segment_missing" in TileConfig(segment_missing=True).model_dump()
False
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel


def _model_class(config: type[BaseModel] | BaseModel) -> type[BaseModel]:
    return config if isinstance(config, type) else type(config)


def runtime_fields(config: type[BaseModel] | BaseModel) -> tuple[str, ...]:
    """Names of the runtime fields (declared ``Field(exclude=True)``) of a configuration class."""
    return tuple(name for name, f in _model_class(config).model_fields.items() if f.exclude)


def identity_fields(config: type[BaseModel] | BaseModel) -> tuple[str, ...]:
    """Names of the identity fields (every field that is not runtime) of a configuration class."""
    return tuple(name for name, f in _model_class(config).model_fields.items() if not f.exclude)


def without_runtime(config: type[BaseModel] | BaseModel, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (field name → value, e.g. command-line overrides) without the class's runtime fields."""
    drop = set(runtime_fields(config))
    return {k: v for k, v in values.items() if k not in drop}


def runtime_part(config: type[BaseModel] | BaseModel, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are runtime fields of the class."""
    keep = set(runtime_fields(config))
    return {k: v for k, v in values.items() if k in keep}


def fields_table(classes: Iterable[type[BaseModel]]) -> str:
    """A Markdown table of each class's identity and runtime fields (the docs' table is checked against it)."""
    lines = ["| Configuration | Identity (hashed: changing one makes another result) | Runtime (not hashed) |",
             "|---|---|---|"]
    for cls in classes:
        ident = ", ".join(f"`{n}`" for n in identity_fields(cls)) or "–"
        runtime = ", ".join(f"`{n}`" for n in runtime_fields(cls)) or "–"
        lines.append(f"| `{cls.__name__}` | {ident} | {runtime} |")
    return "\n".join(lines) + "\n"
