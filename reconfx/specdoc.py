"""The spec reference (``docs/spec.md``), written from the Pydantic models themselves: every
field with its type, default and description, one table per model, so the reference cannot
drift from what ``reconfx validate`` accepts (``reconfx schema --markdown`` prints it; a test
compares it with the committed file)."""

from __future__ import annotations

import enum
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from reconfx.spec import Spec

__all__ = [
    "INTRO", "render"
]

INTRO = """# Spec reference

Generated from `reconfx/spec.py` by `reconfx schema --markdown` (do not edit; `make test`
checks it is current). A spec is a YAML file validated by these models: unknown keys are
errors, and every error names the file, the line, the field and what is accepted. `reconfx
schema` prints the same as JSON Schema.
"""


def render() -> str:
    sections: list[str] = [INTRO]
    seen: set[type[BaseModel]] = set()
    queue: list[type[BaseModel]] = [Spec]
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        sections.append(_section(model))
        for field in model.model_fields.values():
            queue += [m for m in _models(field.annotation) if m not in seen]
    return "\n".join(sections)


def _section(model: type[BaseModel]) -> str:
    doc = " ".join((model.__doc__ or "").split())
    rows = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        description = " ".join((field.description or "").split())
        rows.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | "
                    f"{description.replace('|', '&#124;')} |")
    lines = [f"## {model.__name__}", ""]
    if doc:
        lines += [doc, ""]
    lines += ["| field | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " &#124; ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " &#124; ".join(parts) + (" &#124; null" if type(None) in args else "")
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " &#124; ".join(f"`{m.value}`" for m in annotation)
    name = getattr(annotation, "__name__", str(annotation))
    return re.sub(r"^(Positive|NonNegative)(Int|Float)$", lambda m: f"{m[2].lower()} "
                  f"({'> 0' if m[1] == 'Positive' else '>= 0'})", name)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if value is None:
        return "–"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"
