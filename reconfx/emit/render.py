"""Rendering Python values and calls as source text, wrapped to the line length."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any

import torch

LINE = 99


def render_value(value: Any, name_of: Callable[[Any], str] | None = None) -> str:
    """Source text for a constant, or for a graph node through ``name_of``."""
    if name_of is not None and isinstance(value, torch.fx.Node):
        return name_of(value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        if math.isnan(value):
            return 'float("nan")'
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        # Prefer double quotes; repr picks single quotes only when the string has no ' in it.
        return f'"{text[1:-1]}"' if text[0] == "'" and '"' not in value else text
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, torch.dtype | torch.memory_format | torch.layout):
        return str(value)
    if isinstance(value, torch.device):
        return f'torch.device("{value}")'
    if isinstance(value, torch.Size):
        return f"torch.Size([{', '.join(render_value(v, name_of) for v in value)}])"
    if isinstance(value, slice):  # outside an index: x[:2] is written by render_index
        parts = (render_value(v, name_of) for v in (value.start, value.stop, value.step))
        return f"slice({', '.join(parts)})"
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple):
        items = [render_value(v, name_of) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(render_value(v, name_of) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{render_value(k, name_of)}: {render_value(v, name_of)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write a {type(value).__name__} constant ({value!r}) as source")


def _slice(value: slice, name_of: Callable[[Any], str] | None) -> str:
    parts = [("" if v is None else render_value(v, name_of))
             for v in (value.start, value.stop, value.step)]
    return f"{parts[0]}:{parts[1]}" + (f":{parts[2]}" if parts[2] else "")


def render_index(index: Any, name_of: Callable[[Any], str]) -> str:
    """``x[:, 0]`` instead of ``x[(slice(None, None, None), 0)]``."""
    items = index if isinstance(index, tuple) and index else (index,)
    text = ", ".join(_slice(i, name_of) if isinstance(i, slice) else render_value(i, name_of)
                     for i in items)
    return text if len(items) > 1 or not isinstance(index, tuple) else f"{text},"


def statement(indent: str, lhs: str, opener: str, args: list[str], closer: str = ")") -> str:
    """``lhs = opener args closer`` (``opener`` ends with its bracket, e.g. ``f(``); wrapped with
    all arguments on one indented line, or one per line, when it does not fit; a right-hand side
    whose head alone is too long goes inside parentheses on its own line."""
    prefix = f"{indent}{lhs} = " if lhs else indent
    multiline = any("\n" in a for a in args)  # nested brackets (see ``bracketed``)
    line = f"{prefix}{opener}{', '.join(args)}{closer}"
    if not multiline and len(line) <= LINE:
        return line
    if lhs and len(f"{prefix}{opener}") > LINE - 8:
        inner = statement(indent + "    ", "", opener, args, closer)
        return f"{prefix}(\n{inner}\n{indent})"
    inner = indent + "    "
    joined = f"{inner}{', '.join(args)}"
    if not multiline and len(joined) <= LINE:
        return f"{prefix}{opener}\n{joined}\n{indent}{closer}"
    body = "\n".join(f"{inner}{a.replace(chr(10), chr(10) + inner)}," for a in args)
    return f"{prefix}{opener}\n{body}\n{indent}{closer}"


def bracketed(opener: str, items: list[str], closer: str, width: int = LINE - 16) -> str:
    """``(a, b)`` as one argument of :func:`statement`: on one line when it fits in ``width``,
    else one item per line, indented relative to where the argument starts."""
    line = f"{opener}{', '.join(items)}{closer}"
    if len(line) <= width:
        return line
    lines = "".join(f"\n    {item.replace(chr(10), chr(10) + '    ')}," for item in items)
    return f"{opener}{lines}\n{closer.lstrip(',')}"


def infix(indent: str, lhs: str, left: str, op: str, right: str) -> str:
    """``lhs = left op right``, broken inside parentheses when too long."""
    line = f"{indent}{lhs} = {left} {op} {right}"
    if len(line) <= LINE:
        return line
    inner = indent + "    "
    if len(f"{inner}{left} {op} {right}") <= LINE:
        return f"{indent}{lhs} = (\n{inner}{left} {op} {right}\n{indent})"
    return f"{indent}{lhs} = (\n{inner}{left}\n{inner}{op} {right}\n{indent})"


def assign(indent: str, lhs: str, rhs: str) -> str:
    """``lhs = rhs``, with ``rhs`` in parentheses on its own line when too long."""
    line = f"{indent}{lhs} = {rhs}"
    return line if len(line) <= LINE else f"{indent}{lhs} = (\n{indent}    {rhs}\n{indent})"


def comment(indent: str, text: str) -> str:
    """A ``#`` comment wrapped to the line length."""
    return "\n".join(textwrap.wrap(text, width=LINE - len(indent), initial_indent=f"{indent}# ",
                                    subsequent_indent=f"{indent}#   ", break_on_hyphens=False))
