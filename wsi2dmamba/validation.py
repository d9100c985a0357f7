"""Configuration checked once, where it enters: a configuration class's own validation, reported as a
:class:`~wsi2dmamba.errors.ConfigError` that names each key the way the user wrote it.

The choices and ranges of a setting live on its configuration class (a ``Literal`` type, ``Field(ge=…)``);
the command line, pipeline files, model options and bundle manifests all validate through
:func:`validated`, so a setting is checked in one place and explained the same way everywhere.

>>> from pydantic import BaseModel, Field
>>> class Config(BaseModel):
...     epochs: int = Field(20, ge=1)
>>> validated(Config, {"epochs": 0}, "Invalid options", key_style="flag")
Traceback (most recent call last):
...
wsi2dmamba.errors.ConfigError: Invalid options:
  - --epochs: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)
KeyStyle = Literal["dotted", "flag"]


def key_name(loc: Sequence[Any], style: KeyStyle = "dotted") -> str:
    """A pydantic error location as the user spells the key: ``a.b``, or ``--a-b`` for a command-line flag.

    >>> key_name(("clip_grad",), "flag"), key_name(("model", "d_state"))
    ('--clip-grad', 'model.d_state')
    """
    if style == "flag":
        return "--" + "-".join(str(p) for p in loc).replace("_", "-") if loc else ""
    return ".".join(str(p) for p in loc)


def problem_lines(exc: ValidationError, *, key_style: KeyStyle = "dotted", table: str | None = None,
                  allowed: Sequence[str] = ()) -> list[str]:
    """One line per problem: ``[table] key: what is wrong (got value)``; an unknown key by name.

    Args:
        exc: the validation error of a configuration class.
        key_style: how keys are spelled (see :func:`key_name`).
        table: the pipeline-file table the values came from, shown before each key.
        allowed: the keys that exist, listed after an unknown one.
    """
    prefix = f"[{table}] " if table else ""
    lines = []
    for err in exc.errors():
        key = key_name(err["loc"], key_style)
        if err["type"] == "extra_forbidden":
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{prefix}unknown key '{key}'{hint}")
        elif err["type"] == "missing":
            lines.append(f"{prefix}{key}: {err['msg']}")
        elif key:
            lines.append(f"{prefix}{key}: {err['msg']} (got {err.get('input')!r})")
        else:  # a rule across several keys
            lines.append(f"{prefix}{err['msg']}")
    return lines


def validated(cls: type[M], values: Mapping[str, Any], context: str, *, key_style: KeyStyle = "dotted",
              table: str | None = None, allowed: Sequence[str] | None = None, limit: int = 20) -> M:
    """``cls(**values)``, or a :class:`ConfigError` that starts with ``context`` and lists every problem.

    Args:
        cls: a configuration class (pydantic model).
        values: the settings given.
        context: what was being read, e.g. ``"Invalid training options"`` or ``"pipeline.toml: invalid
            pipeline file"``.
        key_style, table: how keys are named (see :func:`problem_lines`).
        allowed: keys listed after an unknown one (default: the class's fields).
        limit: at most this many problems are listed.
    """
    try:
        return cls(**values)
    except ValidationError as exc:
        keys = sorted(cls.model_fields) if allowed is None else list(allowed)
        lines = problem_lines(exc, key_style=key_style, table=table, allowed=keys)
        more = [f"… and {len(lines) - limit} more"] if len(lines) > limit else []
        raise ConfigError(f"{context}:\n  - " + "\n  - ".join(lines[:limit] + more)) from None
