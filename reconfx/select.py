"""Selection policies: which shared layers to branch (policy; :mod:`reconfx.rewrite` is the
mechanism). Candidates are the shared layers, narrowed by ``include``/``exclude`` globs."""

from __future__ import annotations

from reconfx.errors import SelectionError
from reconfx.layers import Layer, match_layers
from reconfx.spec import SelectSpec


def candidates(layers: list[Layer], spec: SelectSpec) -> list[Layer]:
    shared = [layer for layer in layers if layer.shared]
    if spec.include:
        shared = match_layers(shared, spec.include)[0]
    if spec.exclude:
        excluded = {layer.name for layer in match_layers(shared, spec.exclude)[0]}
        shared = [layer for layer in shared if layer.name not in excluded]
    return shared


def select_layers(layers: list[Layer], spec: SelectSpec | None, where: str = "spec") -> list[Layer]:
    """The layers to branch, in graph order. Only the explicit ``layers`` policy needs no
    conflict profile."""
    if spec is None:
        return []
    if spec.policy != "layers":
        raise SelectionError(
            f"select.{spec.policy} ranks layers by conflict score, and this version of reconfx "
            "has no profiling pass yet", where=f"{where}: select.{spec.policy}",
            fix="name the layers to branch with select.layers (paths or globs; see "
                "`reconfx inspect`)")
    pool = candidates(layers, spec)
    chosen, unmatched = match_layers(pool, spec.layers or [])
    if unmatched:
        everywhere, _ = match_layers(layers, unmatched)
        detail = ""
        if everywhere:
            single = everywhere[0]
            reason = ("is excluded by select.include/exclude" if single.shared else
                      f"is used by task '{','.join(single.tasks)}' only, so it is task-specific "
                      "already")
            detail = f"; '{single.name}' {reason}"
        raise SelectionError(
            f"pattern '{unmatched[0]}' matches no shared layer{detail}",
            where=f"{where}: select.layers",
            fix="run `reconfx inspect SPEC` for the layer paths")
    return chosen
