"""What reconfx records about one graph node: a typed, frozen record in ``node.meta["reconfx"]``.

Passes that copy nodes (branching, stream batching, task rows, generated classes) carry the
record along; a pass that learns something new about a node replaces its record (:func:`note`)
rather than changing it in place, so a copy never sees a change made to its original. As with
``shape_prop``'s ``TensorMetadata`` in ``node.meta["tensor_meta"]``, every reader goes through
one accessor (:func:`facts`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx

__all__ = ["Conflict", "NodeFacts", "facts", "note"]

KEY = "reconfx"


@dataclass(frozen=True)
class Conflict:
    """A profiled layer's conflict score and its valid observations (None: not recorded)."""

    score: float
    valid: int | None = None


@dataclass(frozen=True)
class NodeFacts:
    """What the passes know about one node; every field is optional."""

    # the value's readable name in model.py, from module paths (``layer1_0_conv1``); a
    # placeholder's is its parameter name
    name: str | None = None
    type: str | None = None  # a placeholder's annotation in model.py (``torch.Tensor``, ``int``)
    task: str | None = None  # the task stream of a per-task clone
    origin: str | None = None  # the node a per-task clone stands for (stream batching)
    branch_point: str | None = None  # the layer whose branch point the node's stream starts at
    # a call whose tuple result has this many items (model.py unpacks them where all are used)
    items: int | None = None
    streams: bool = False  # a shared value repeated into the task rows (``x_streams``)
    region: str | None = None  # a stream-batched region's call: the region's name
    conflict: Conflict | None = None  # the profiled score of the layer the node calls or reads
    # a submodule call's key -> (the node's index among the call's nodes, the call record)
    sites: Mapping[str, tuple[int, Any]] = field(default_factory=dict)
    feeds: Mapping[str, int] = field(default_factory=dict)  # call key -> input position


_NONE = NodeFacts()


def facts(node: fx.Node) -> NodeFacts:
    """The node's record (an empty one where no pass recorded anything)."""
    return node.meta.get(KEY, _NONE)


def note(node: fx.Node, base: NodeFacts | None = None, **changes: Any) -> NodeFacts:
    """Give ``node`` the record ``base`` (default: its own) with ``changes``; returns it."""
    record = dataclasses.replace(facts(node) if base is None else base, **changes)
    node.meta[KEY] = record
    return record

