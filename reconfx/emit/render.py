"""Rendering Python values and calls as source text, wrapped to the line length."""

from __future__ import annotations

import keyword
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "assign", "bracketed", "chain", "comment", "identifier", "infix", "LINE", "LOCAL",
    "local_name", "NAME", "render_arg", "render_index", "render_value", "Source", "statement",
    "unique_name"
]

LINE = 99
NAME = 48  # the longest method name written; longer ones keep their tail
LOCAL = 32  # the longest local name written (before a task suffix), see local_name


def unique_name(base: str, taken: set[str], suffix: str = "") -> str:
    """``base + suffix``, or with a counter before the suffix (``base_1``, ``base_2``, ...)
    where that is in ``taken``; the name returned is added to ``taken``."""
    candidate, n = base + suffix, 1
    while candidate in taken:
        candidate, n = f"{base}_{n}{suffix}", n + 1
    taken.add(candidate)
    return candidate


def identifier(text: str, limit: int = NAME) -> str:
    """``text`` as a Python identifier of at most ``limit`` characters: other characters become
    ``_``; a longer name keeps its last ``_``-separated words (a module path's informative end,
    ``..._attention_output_dense_a``), never starting with a digit."""
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in text) or "value"
    if len(name) > limit:
        words = name.split("_")
        kept: list[str] = []
        while words and len("_".join([words[-1], *kept])) <= limit:
            kept.insert(0, words.pop())
        while kept and (not kept[0] or kept[0][0].isdigit()):
            kept.pop(0)
        name = "_".join(kept) or name[-limit:].lstrip("_0123456789") or "value"
    if name[0].isdigit():
        name = f"v_{name}"
    return f"{name}_" if keyword.iskeyword(name) else name


@dataclass(frozen=True)
class Source:
    """A value that has source text of its own (a class, a function, a settings object), with the
    import lines that text needs."""

    text: str
    imports: tuple[str, ...] = ()


def local_name(text: str, limit: int = LOCAL) -> str:
    """A local variable's name from a module path (``backbone_encoder_layer_5_attention_self_
    view``): when too long, the words before the last index are dropped but the index and the
    word it numbers are kept (``layer_5``), then words after it from the left, so the name still
    says which layer it belongs to (``layer_5_self_view``); without an index, :func:`identifier`
    keeps the tail."""
    name = identifier(text, limit=len(text) + 1)
    words = name.split("_")
    if len(name) <= limit:
        return name
    indices = [i for i, w in enumerate(words[:-1]) if w.isdigit() and i > 0]
    if indices:
        head, rest = words[indices[-1] - 1:indices[-1] + 1], words[indices[-1] + 1:]
        while len(rest) > 1 and len("_".join(head + rest)) > limit:
            rest.pop(0)
        shortened = "_".join(head + rest)
        if len(shortened) <= limit and not shortened[0].isdigit():
            return shortened
    return identifier(name, limit)


def render_value(value: Any, name_of: Callable[[Any], str] | None = None) -> str:
    """Source text for a constant, or for a graph node through ``name_of``."""
    if name_of is not None and isinstance(value, torch.fx.Node):
        return name_of(value)
    if isinstance(value, Source):
        return value.text
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


def render_arg(value: Any, name_of: Callable[[Any], str] | None = None,
               width: int = LINE - 16) -> str:
    """:func:`render_value` for one argument of :func:`statement`: a list, tuple or dict too
    long for ``width`` is written one item per line (recursively, see :func:`bracketed`)."""
    if isinstance(value, torch.Size) or not isinstance(value, list | tuple | dict):
        return render_value(value, name_of)
    if isinstance(value, dict):
        items = [f"{render_value(k, name_of)}: {render_arg(v, name_of, width - 4)}"
                 for k, v in value.items()]
        return bracketed("{", items, "}", width)
    items = [render_arg(v, name_of, width - 4) for v in value]
    if isinstance(value, list):
        return bracketed("[", items, "]", width)
    return bracketed("(", items, ",)" if len(items) == 1 else ")", width)


def chain(text: str, width: int = LINE - 16) -> str:
    """An attribute path (``self.a.b[0].c``) longer than ``width``, broken before its dots
    inside parentheses, continuation lines indented relative to where it starts."""
    if len(text) <= width:
        return text
    pieces, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "." and depth == 0 and i > start:
            pieces.append(text[start:i])
            start = i
    pieces.append(text[start:])
    lines = [pieces[0]]
    for piece in pieces[1:]:
        if len(lines[-1]) + len(piece) <= width - 4:
            lines[-1] += piece
        else:
            lines.append(piece)
    if len(lines) == 1:
        return text
    return "(\n" + "".join(f"    {line}\n" for line in lines) + ")"


def _slice(value: slice, name_of: Callable[[Any], str] | None) -> str:
    parts = [("" if v is None else render_value(v, name_of))
             for v in (value.start, value.stop, value.step)]
    return f"{parts[0]}:{parts[1]}" + (f":{parts[2]}" if parts[2] else "")


def render_index(index: Any, name_of: Callable[[Any], str]) -> str:
    """``x[:, 0]`` instead of ``x[(slice(None, None, None), 0)]``; ``x[:]`` for
    ``x[(slice(None),)]``."""
    items = index if isinstance(index, tuple) and index else (index,)
    text = ", ".join(_slice(i, name_of) if isinstance(i, slice) else render_value(i, name_of)
                     for i in items)
    if len(items) > 1 or not isinstance(index, tuple) or isinstance(items[0], slice):
        return text  # (``x[(slice(None),)]`` is ``x[:]``: only a tensor takes a slice)
    return f"{text},"


def statement(indent: str, lhs: str, opener: str, args: list[str], closer: str = ")") -> str:
    """``lhs = opener args closer`` (``opener`` ends with its bracket, e.g. ``f(``); wrapped with
    all arguments on one indented line, or one per line, when it does not fit; a right-hand side
    whose head alone is too long goes inside parentheses on its own line, and so does a target
    too long for a line (see :func:`chain`)."""
    prefix = f"{_target(indent, lhs)} = " if lhs else indent
    head = len(prefix.rpartition("\n")[2])  # the column the right-hand side starts at
    multiline = any("\n" in a for a in args)  # nested brackets (see ``bracketed``)
    line = f"{prefix}{opener}{', '.join(args)}{closer}"
    if not multiline and head + len(line) - len(prefix) <= LINE:
        return line
    if not args:
        return assign(indent, lhs, f"{opener}{closer}") if lhs else line
    if lhs and head + len(opener) > LINE - 8:
        inner = statement(indent + "    ", "", opener, args, closer)
        return f"{prefix}(\n{inner}\n{indent})"
    inner = indent + "    "
    joined = f"{inner}{', '.join(args)}"
    if not multiline and len(joined) <= LINE:
        return f"{prefix}{opener}\n{joined}\n{indent}{closer}"
    body = "\n".join(f"{inner}{a.replace(chr(10), chr(10) + inner)}," for a in args)
    return f"{prefix}{opener}\n{body}\n{indent}{closer}"


def _target(indent: str, lhs: str) -> str:
    """``indent lhs``, the target broken inside parentheses when ``lhs = (`` does not fit."""
    if len(f"{indent}{lhs} = (") <= LINE:
        return f"{indent}{lhs}"
    return indent + chain(lhs, LINE - len(indent)).replace("\n", "\n" + indent)


def bracketed(opener: str, items: list[str], closer: str, width: int = LINE - 16) -> str:
    """``(a, b)`` as one argument of :func:`statement`: on one line when it fits in ``width``,
    else one item per line, indented relative to where the argument starts."""
    line = f"{opener}{', '.join(items)}{closer}"
    if "\n" not in line and len(line) <= width:
        return line
    lines = "".join(f"\n    {item.replace(chr(10), chr(10) + '    ')}," for item in items)
    return f"{opener}{lines}\n{closer.lstrip(',')}"


def infix(indent: str, lhs: str, left: str, op: str, right: str) -> str:
    """``lhs = left op right``, broken inside parentheses when too long."""
    if not lhs:
        return assign(indent, lhs, f"{left} {op} {right}")
    line = f"{indent}{lhs} = {left} {op} {right}"
    if len(line) <= LINE:
        return line
    inner = indent + "    "
    if len(f"{inner}{left} {op} {right}") <= LINE:
        return f"{indent}{lhs} = (\n{inner}{left} {op} {right}\n{indent})"
    return f"{indent}{lhs} = (\n{inner}{left}\n{inner}{op} {right}\n{indent})"


def assign(indent: str, lhs: str, rhs: str) -> str:
    """``lhs = rhs``, with ``rhs`` in parentheses on its own line when too long (an attribute
    path too long even there broken at its dots, see :func:`chain`), and a target too long for a
    line broken the same way; without ``lhs``, the expression statement ``rhs``."""
    if not lhs:
        line = f"{indent}{rhs}"
        if len(line) <= LINE or "\n" in rhs:
            return line
        return f"{indent}(\n{indent}    {rhs}\n{indent})"
    target = _target(indent, lhs)
    line = f"{target} = {rhs}"
    if "\n" not in rhs and len(line.rpartition("\n")[2]) <= LINE:
        return line
    inner = indent + "    "
    if "\n" not in rhs and len(inner + rhs) > LINE:
        broken = chain(rhs, LINE - len(indent))
        if broken != rhs:
            return f"{target} = {broken.replace(chr(10), chr(10) + indent)}"
    return f"{target} = (\n{inner}{rhs.replace(chr(10), chr(10) + inner)}\n{indent})"


def comment(indent: str, text: str) -> str:
    """A ``#`` comment wrapped to the line length."""
    return "\n".join(textwrap.wrap(text, width=LINE - len(indent), initial_indent=f"{indent}# ",
                                    subsequent_indent=f"{indent}#   ", break_on_hyphens=False))
