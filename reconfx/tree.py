"""Paths into nested model outputs: ``{"a": {"b": t}}`` has the leaf ``a.b``, a tuple ``(x, y)``
has ``0`` and ``1``. Built on torch's pytree, so HF ``ModelOutput`` and namedtuples work too."""

from __future__ import annotations

from typing import Any

from torch.utils import _pytree as pytree

__all__ = [
    "is_sequence_root", "key_str", "output_leaves", "task_outputs"
]


def key_str(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def output_leaves(output: Any) -> dict[str, Any]:
    """Every leaf of ``output`` by its dotted path, in pytree (= flattening) order."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    if len(leaves) == 1 and not leaves[0][0]:
        return {"": leaves[0][1]}
    return {".".join(key_str(k) for k in path): leaf for path, leaf in leaves}


def is_sequence_root(output: Any) -> bool:
    """True when the top level is a plain tuple/list (tasks are then matched by position)."""
    leaves, _ = pytree.tree_flatten_with_path(output)
    return bool(leaves) and bool(leaves[0][0]) and hasattr(leaves[0][0][0], "idx")


def task_outputs(output: Any, paths: dict[str, str]) -> dict[str, Any]:
    """Each task's value in a model's ``output`` (a tensor, or nested dicts, lists, tuples
    and dataclasses of them), found by its path (see :func:`output_leaves`)."""
    leaves = output_leaves(output)
    return {task: leaves[path] for task, path in paths.items()}
