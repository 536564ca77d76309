"""Source text for Python values a constructor call passes: classes and functions by their
public import path, enum members, settings objects (dataclasses, classes with ``to_dict`` such
as Hugging Face configs) rebuilt from their fields and verified to compare equal."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from reconfx.emit.render import Source, render_value

__all__ = [
    "class_source", "defined", "defining", "importable", "imports_of", "namespace",
    "object_source", "PLAIN", "SETTINGS", "settings_key", "sourced"
]

PLAIN = (int, float, bool, str, tuple, type(None), torch.dtype, torch.device)


def class_source(cls: type) -> Source | None:
    """``nn.Conv2d`` for torch.nn's classes, else the name imported from its public module (the
    shortest parent package that exports the same object), or None when not importable."""
    if getattr(nn, cls.__name__, None) is cls and cls.__module__.startswith("torch.nn"):
        return Source(f"nn.{cls.__name__}")
    return importable(cls)


# The names the file being written defines itself (its classes, a set that grows as classes are
# generated): a class imported under one of them is imported under an alias instead.
_DEFINED: contextvars.ContextVar[set[str] | frozenset[str]] = contextvars.ContextVar(
    "defined", default=frozenset())


@contextlib.contextmanager
def defining(names: set[str]) -> Iterator[None]:
    """While the file defining ``names`` is written, a class of the same name is imported as
    ``Name_`` (``from reconfx.zoo import Bottleneck as Bottleneck_``), so the source text of
    every call is right where it is made."""
    token = _DEFINED.set(names)
    try:
        yield
    finally:
        _DEFINED.reset(token)


def defined() -> frozenset[str]:
    """The names the file being written defines (see :func:`defining`)."""
    return frozenset(_DEFINED.get())


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
            alias = name
            while alias in _DEFINED.get():
                alias += "_"
            bound = name if alias == name else f"{name} as {alias}"
            return Source(alias, (f"from {candidate} import {bound}",))
    return None


def _resolves(module: str, name: str, obj: Any) -> bool:
    try:
        return getattr(importlib.import_module(module), name, None) is obj
    except Exception:
        return False


def sourced(value: Any) -> Any:
    """``value``, or its :class:`Source` when it is a class, a function or a settings object
    (so it renders); raises TypeError when it has no source form."""
    if isinstance(value, PLAIN + (Source,)) and not isinstance(value, tuple | enum.Enum):
        return value  # (an enum member that is also a str is written as the member)
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


# Fields a settings object records about where it came from, not how to build modules (a Hugging
# Face config's source architecture, library version and saved dtype; the legacy checkpointing
# flag): left out of the call and of the comparison. A module built from the settings is
# verified on its own (reconfx.emit.constructors), so a field that did matter would show there.
_BOOKKEEPING = {"architectures", "transformers_version", "dtype", "torch_dtype",
                "gradient_checkpointing", "model_type"}


def _settings_source(value: Any) -> Source | None:
    cls = importable(type(value))
    fields = _fields(value)
    if cls is None or fields is None:
        return None
    # A model passes the same settings to each of its layers (or copies of them): a settings
    # object whose fields and state are plain values is rebuilt and verified once per content.
    key = _content_key(value, fields)
    if key is None:
        return _verified_settings(value, cls, fields)
    key = (key, cls, defined())
    if key not in _SOURCES:
        _SOURCES[key] = _verified_settings(value, cls, fields)
    source = _SOURCES[key]
    if source is not None:
        SETTINGS[source.text] = type(value).__name__
    return source


# Verified settings sources by content (see settings_key) and the import aliases in force.
_SOURCES: dict[tuple, Source | None] = {}


def _fields(value: Any) -> dict[str, Any] | None:
    """A settings object's public fields (bookkeeping left out); None for anything else."""
    if callable(getattr(value, "to_dict", None)):  # (Hugging Face configs are dataclasses too)
        fields = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    else:
        return None
    # Private fields are bookkeeping (a config's _name_or_path, the folder it was read from).
    return {k: v for k, v in fields.items()
            if not str(k).startswith("_") and k not in _BOOKKEEPING}


def settings_key(value: Any) -> tuple | None:
    """A settings object's content as a hashable key (its class, its fields and its plain
    instance state, bookkeeping left out): equal keys, equal settings. None when it is no
    settings object or a field holds something other than plain values (an object of its
    own)."""
    fields = _fields(value)
    return None if fields is None else _content_key(value, fields)


def _content_key(value: Any, fields: dict[str, Any]) -> tuple | None:
    def plain(v: Any) -> bool:
        if isinstance(v, list | tuple):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str | int) and plain(x) for k, x in v.items())
        return isinstance(v, PLAIN) and not isinstance(v, enum.Enum)

    state = {k: v for k, v in vars(value).items()
             if isinstance(v, PLAIN) and k not in _BOOKKEEPING}
    if not plain(fields) or not plain(state):
        return None
    return type(value), repr(sorted(fields.items())), repr(sorted(state.items()))


def _verified_settings(value: Any, cls: Source, fields: dict[str, Any]) -> Source | None:
    defaults = _default_fields(type(value))
    try:
        items = {k: sourced(v) for k, v in fields.items()}
        args = [f"{k}={render_value(v)}" for k, v in items.items() if str(k).isidentifier()
                and not (k in defaults and _same_value(defaults[k], fields[k]))]
    except TypeError:
        return None
    if any(not str(k).isidentifier() for k in items):
        return None
    imports = set(cls.imports) | {i for v in items.values() for i in imports_of(v)}
    rebuilt = _rebuilt(cls.text, args, imports)
    if rebuilt is None or _public(rebuilt, fields) != fields:
        return None
    # Private settings outside the fields (a Hugging Face config's attention implementation,
    # kept as ``_attn_implementation_internal``) are passed by their public keyword
    # (``attn_implementation=``) when they differ.
    # (how experts are run matters only to a config that has experts)
    moot = set() if any("expert" in str(k) for k in fields) else {
        "_experts_implementation_internal"}
    differing = [k for k in _state_differences(value, rebuilt) if k not in moot]
    for key in differing:
        args.append(f"{key.strip('_').removesuffix('_internal')}={render_value(vars(value)[key])}")
    if differing:
        rebuilt = _rebuilt(cls.text, args, imports)
        if rebuilt is None or _public(rebuilt, fields) != fields or set(_state_differences(
                value, rebuilt)) - moot:
            return None
    return Source(f"{cls.text}({', '.join(args)})", tuple(sorted(imports)))


def _rebuilt(head: str, args: list[str], imports: set[str]) -> Any:
    try:
        return eval(f"{head}({', '.join(args)})", namespace(imports))  # noqa: S307 - ours
    except Exception:
        return None


def _public(rebuilt: Any, fields: dict[str, Any]) -> dict[str, Any]:
    if hasattr(rebuilt, "to_dict"):
        return {k: v for k, v in rebuilt.to_dict().items()
                if not str(k).startswith("_") and k not in _BOOKKEEPING}
    return {k: getattr(rebuilt, k, None) for k in fields}


def _state_differences(value: Any, rebuilt: Any) -> list[str]:
    """Plain instance attributes (besides bookkeeping and a path the settings were read from)
    that differ."""
    mine, theirs = vars(value), vars(rebuilt)
    return [k for k, v in mine.items() if isinstance(v, PLAIN) and not isinstance(v, tuple)
            and not k.endswith("name_or_path") and k not in _BOOKKEEPING
            and not _same_value(v, theirs.get(k))]


# The source text of every settings object written so far -> its class name (the emitter
# writes a long one once, as a module-level constant).
SETTINGS: dict[str, str] = {}


@functools.cache
def _default_fields(cls: type) -> dict[str, Any]:
    """The fields of ``cls()`` (the class's defaults), empty when it needs arguments (one dict
    per class, read only)."""
    try:
        default = cls()
    except Exception:
        return {}
    if callable(getattr(default, "to_dict", None)):
        return default.to_dict()
    if dataclasses.is_dataclass(default):
        return {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}
    return {}


def _same_value(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


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
            module, _, name = line.removeprefix("from ").partition(" import ")
            name, _, alias = name.partition(" as ")
            namespace[alias or name] = getattr(importlib.import_module(module), name)
    return namespace
