"""Source text for Python values a constructor call passes: classes and functions by their
public import path, enum members, settings objects (dataclasses, classes with ``to_dict`` such
as Hugging Face configs) rebuilt from their fields and verified to compare equal."""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
from typing import Any

import torch
from torch import nn

from reconfx.emit.render import Source, render_value

PLAIN = (int, float, bool, str, tuple, type(None), torch.dtype, torch.device)


def class_source(cls: type) -> Source | None:
    """``nn.Conv2d`` for torch.nn's classes, else the name imported from its public module (the
    shortest parent package that exports the same object), or None when not importable."""
    if getattr(nn, cls.__name__, None) is cls and cls.__module__.startswith("torch.nn"):
        return Source(f"nn.{cls.__name__}")
    return importable(cls)


def importable(obj: Any) -> Source | None:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or not name.isidentifier() or module == "__main__":
        return None
    if module.startswith("torch") and _resolves(module, name, obj):
        return Source(f"{module}.{name}", ("import torch",))
    parts = module.split(".")
    for end in range(1, len(parts) + 1):  # the public path: timm.layers, not timm.layers.norm
        candidate = ".".join(parts[:end])
        if _resolves(candidate, name, obj):
            return Source(name, (f"from {candidate} import {name}",))
    return None


def _resolves(module: str, name: str, obj: Any) -> bool:
    try:
        return getattr(importlib.import_module(module), name, None) is obj
    except Exception:
        return False


def sourced(value: Any) -> Any:
    """``value``, or its :class:`Source` when it is a class, a function or a settings object
    (so it renders); raises TypeError when it has no source form."""
    if isinstance(value, PLAIN + (Source,)) and not isinstance(value, tuple):
        return value
    if isinstance(value, tuple | list):
        return type(value)(sourced(v) for v in value)
    if isinstance(value, dict):
        return {k: sourced(v) for k, v in value.items()}
    source = object_source(value)
    if source is None:
        raise TypeError(f"no source form for {type(value).__name__}")
    return source


def object_source(value: Any) -> Source | None:
    """Source for a class, a function or enum member importable by name, or a settings object
    (a dataclass or a class with ``to_dict``, such as a Hugging Face config) rebuilt from its
    fields and verified to compare equal."""
    if isinstance(value, type):
        return class_source(value)
    if isinstance(value, enum.Enum):
        cls = importable(type(value))
        return cls and Source(f"{cls.text}.{value.name}", cls.imports)
    if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(
            value, functools.partial | torch._ops.OpOverload):
        return None if isinstance(value, functools.partial) else importable(value)
    return _settings_source(value)


def _settings_source(value: Any) -> Source | None:
    cls = importable(type(value))
    if cls is None:
        return None
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    elif callable(getattr(value, "to_dict", None)):
        fields = value.to_dict()
    else:
        return None
    try:
        items = {k: sourced(v) for k, v in fields.items()}
        args = [f"{k}={render_value(v)}" for k, v in items.items() if str(k).isidentifier()]
    except TypeError:
        return None
    if len(args) != len(items):
        return None
    text = f"{cls.text}({', '.join(args)})"
    imports = set(cls.imports) | {i for v in items.values() for i in imports_of(v)}
    try:
        rebuilt = eval(text, namespace(imports))  # noqa: S307 - text we generated
    except Exception:
        return None
    same = rebuilt.to_dict() == fields if hasattr(rebuilt, "to_dict") else rebuilt == value
    return Source(text, tuple(sorted(imports))) if same else None


def imports_of(value: Any) -> set[str]:
    if isinstance(value, Source):
        return set(value.imports)
    if isinstance(value, tuple | list):
        return {i for v in value for i in imports_of(v)}
    if isinstance(value, dict):
        return {i for v in value.values() for i in imports_of(v)}
    return set()


def namespace(imports: set[str] | tuple[str, ...]) -> dict[str, Any]:
    namespace: dict[str, Any] = {"torch": torch, "nn": nn}
    for line in imports:
        if line.startswith("from "):
            _from, module, _import, name = line.split()
            namespace[name] = getattr(importlib.import_module(module), name)
    return namespace
