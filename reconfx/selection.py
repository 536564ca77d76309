"""Selection policies: which shared layers to branch (policy; :mod:`reconfx.rewrite` is the
mechanism). Candidates are the shared layers, narrowed by ``include``/``exclude`` globs."""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from reconfx.cost import CostModel
from reconfx.errors import SelectionError
from reconfx.layers import Layer, is_glob, match_layers, path_matches
from reconfx.spec import SelectSpec
from reconfx.tracing import COARSE_KEPT

__all__ = [
    "budget_lines", "candidates", "check_patterns", "explicit_choice", "matched_random",
    "random_within", "select_layers"
]


def candidates(layers: list[Layer], spec: SelectSpec) -> list[Layer]:
    shared = [layer for layer in layers if layer.shared]
    if spec.include:
        shared = match_layers(shared, spec.include)[0]
    if spec.exclude:
        excluded = {layer.name for layer in match_layers(shared, spec.exclude)[0]}
        shared = [layer for layer in shared if layer.name not in excluded]
    return shared


def explicit_choice(spec: SelectSpec | None) -> Callable[[str], bool] | None:
    """Whether the spec's explicit selection (``select.layers``, narrowed by include/exclude)
    branches the layer at a module path; None when the policy chooses only after tracing (by
    score or at random among the traced layers). Tracing uses it to keep tier 1 where a coarse
    leaf is branched whole or not at all."""
    if spec is None or spec.policy != "layers":
        return None

    def chosen(path: str) -> bool:
        def named(patterns: list[str]) -> bool:
            return any(path_matches(path, p) for p in patterns)
        return (named(spec.layers or []) and (not spec.include or named(spec.include))
                and not named(spec.exclude))

    return chosen


def select_layers(layers: list[Layer], spec: SelectSpec | None, *, where: str = "spec",
                  scores: dict[str, int] | None = None, tasks: int = 2,
                  cost: CostModel | None = None, notes: Sequence[str] = ()) -> list[Layer]:
    """The layers to branch, in graph order.

    Score-based policies rank the candidates by conflict score (``scores``, from a profile),
    ties broken by graph order: ``top_k`` takes the first k (all, with a warning, when k exceeds
    the candidates), ``fraction`` the first ceil(f × candidates), ``min_score`` every candidate
    scoring at least that. The budgets buy the most conflict they can afford (layers scoring 0
    buy none): ``param_budget`` the set of layers with the highest total score whose added
    parameters ((T−1) × theirs) stay within the given percent of the candidates' parameters (an
    exact 0/1 knapsack; among equal totals the fewest parameters), ``flops_budget`` a set of
    the highest total score found whose FLOP increase (``cost``; a layer after a branch point
    adds nothing more) stays within the given percent of the original's FLOPs
    (:func:`_afforded`), so a costly top layer is passed over for the next ones
    (:func:`budget_lines` says what was bought and what was left out).
    ``random`` draws k candidates with its seed and needs no profile; ``layers`` names them
    (a name inside a module tracing kept as one leaf is refused naming the leaf, and why from
    the tracer's ``notes``).
    """
    if spec is None:
        return []
    pool = candidates(layers, spec)
    policy = spec.policy
    if policy == "layers":
        return _explicit(layers, pool, spec, where, notes)
    if policy == "random":
        import random

        k = min(spec.random.k, len(pool))
        picked = set(random.Random(spec.random.seed).sample(range(len(pool)), k))
        return [layer for i, layer in enumerate(pool) if i in picked]
    if scores is None:
        raise SelectionError(
            f"select.{policy} ranks layers by conflict score and there is no profile yet",
            where=f"{where}: select.{policy}",
            fix="run `reconfx profile SPEC` first (it writes conflicts.json), or name the layers "
                "with select.layers")
    missing = [layer.name for layer in pool if layer.name not in scores]
    if missing:
        raise SelectionError(f"conflicts.json has no score for {len(missing)} candidate "
                             f"layer(s) (e.g. {missing[0]}); it is from another model or spec",
                             where=f"{where}: select.{policy}", fix="re-run `reconfx profile`")
    ranked = sorted(pool, key=lambda layer: (-scores[layer.name], layer.order))
    if policy == "top_k":
        if spec.top_k > len(ranked):
            warnings.warn(f"select.top_k = {spec.top_k} exceeds the {len(ranked)} candidate "
                          "layers; all are branched", stacklevel=2)
        chosen = ranked[:spec.top_k]
    elif policy == "fraction":
        chosen = ranked[:math.ceil(spec.fraction * len(ranked))]
    elif policy == "param_budget":
        budget = spec.param_budget / 100 * sum(layer.num_params for layer in pool)
        chosen = _knapsack([x for x in ranked if scores[x.name] > 0], scores, tasks, budget)
    elif policy == "flops_budget":
        if cost is None:
            raise ValueError("select.flops_budget needs the cost model")
        chosen = _afforded([x for x in ranked if scores[x.name] > 0], scores, cost,
                           spec.flops_budget / 100 * cost.total)
    else:
        chosen = [layer for layer in ranked if scores[layer.name] >= spec.min_score]
    return sorted(chosen, key=lambda layer: layer.order)


def _afforded(ranked: list[Layer], scores: dict[str, int], cost: CostModel, limit: float,
              starts: int = 16) -> list[Layer]:
    """The layers of ``ranked`` with the highest total score whose FLOP increase together fits
    ``limit``. Costs interact: a layer downstream of a branched one adds nothing more, so the
    question is which branch points to buy. Searched greedily, by score per added FLOP (a
    layer that adds none taken at once), from no layer and from each of the ``starts``
    highest-scoring layers that fit alone; the ranking taken in order (each layer where it
    still fits) is a candidate too. The best total wins, the fewer FLOPs among equals."""
    import numpy as np

    if not ranked:
        return []
    reaches = [cost.reach([layer]) for layer in ranked]
    nodes = list(set().union(*reaches))
    index = {node: i for i, node in enumerate(nodes)}
    downstream = np.zeros((len(ranked), len(nodes)))
    for row, reach in enumerate(reaches):
        downstream[row, [index[n] for n in reach]] = 1.0
    weight = np.array([float(cost.added(n)) for n in nodes])  # (exact: sums below 2**53)
    values = np.array([float(scores[x.name]) for x in ranked])

    def price(taken: list[int]) -> float:  # the FLOPs a set adds: its layers' reaches joined
        return float(weight @ downstream[taken].max(axis=0)) if taken else 0.0

    def completed(taken: list[int]) -> list[int]:
        open_ = 1.0 - downstream[taken].max(axis=0) if taken else np.ones(len(nodes))
        spent = price(taken)
        left = [i for i in range(len(ranked)) if i not in taken]
        while left:
            extra = downstream[left] @ (weight * open_)
            fits = [k for k in range(len(left)) if spent + extra[k] <= limit]
            if not fits:
                break
            free = [k for k in fits if extra[k] == 0]
            pick = free or [max(fits, key=lambda k: (values[left[k]] / extra[k], -left[k]))]
            for k in pick:
                taken.append(left[k])
                open_[downstream[left[k]] > 0] = 0.0
            spent += float(extra[pick[0]]) if not free else 0.0
            left = [i for i in left if i not in taken]
        return taken

    in_order: list[int] = []
    for i in range(len(ranked)):
        if price([*in_order, i]) <= limit:
            in_order.append(i)
    alone = [i for i in range(len(ranked)) if price([i]) <= limit][:starts]
    found = [in_order, completed([]), *(completed([i]) for i in alone)]
    best = max(found, key=lambda taken: (values[taken].sum(), -price(taken)))
    return [ranked[i] for i in best]


def _knapsack(ranked: list[Layer], scores: dict[str, int], tasks: int, budget: float,
              cells: int = 50_000_000) -> list[Layer]:
    """The subset of ``ranked`` with the highest total score whose added parameters fit
    ``budget`` (fewest parameters among equal totals), by dynamic programming over the total
    score; where that table would exceed ``cells``, the ranking taken greedily instead."""
    import numpy as np

    values = [int(scores[x.name]) for x in ranked]
    weights = [(tasks - 1) * x.num_params for x in ranked]
    total = sum(values)
    if len(ranked) * (total + 1) > cells:
        chosen, added = [], 0
        for layer, weight in zip(ranked, weights, strict=True):
            if added + weight <= budget:
                chosen.append(layer)
                added += weight
        return chosen
    unreachable = np.iinfo(np.int64).max
    lightest = np.full(total + 1, unreachable, dtype=np.int64)  # score -> fewest parameters
    lightest[0] = 0
    took = np.zeros((len(ranked), total + 1), dtype=bool)
    for i, (value, weight) in enumerate(zip(values, weights, strict=True)):
        candidate = np.full(total + 1, unreachable, dtype=np.int64)
        reachable = lightest[:total + 1 - value] != unreachable
        candidate[value:][reachable] = lightest[:total + 1 - value][reachable] + weight
        took[i] = candidate < lightest
        lightest = np.minimum(candidate, lightest)
    best = int(np.flatnonzero(lightest <= budget).max())
    chosen = []
    for i in reversed(range(len(ranked))):
        if took[i, best]:
            chosen.append(ranked[i])
            best -= values[i]
    return chosen


def budget_lines(layers: list[Layer], spec: SelectSpec, *, scores: dict[str, int],
                 chosen: list[Layer], tasks: int, cost: CostModel, limit: int = 3) -> list[str]:
    """For a budget policy: what it bought (the chosen layers' share of the candidates' total
    score, and their cost) and the highest-scoring candidates it left out, each with what
    branching it alone would cost; empty for the other policies."""
    if spec.policy not in ("param_budget", "flops_budget"):
        return []
    pool = candidates(layers, spec)
    names = {x.name for x in chosen}
    params = sum(x.num_params for x in pool)

    def price(picked: list[Layer]) -> str:  # (in the budget's own measure)
        if spec.policy == "flops_budget":
            return f"+{100 * cost.extra_flops(picked) / max(cost.total, 1):.1f}% FLOPs"
        added = (tasks - 1) * sum(x.num_params for x in picked)
        return f"+{100 * added / max(params, 1):.1f}% of the candidates' parameters"

    budget = f"select.{spec.policy} {getattr(spec, spec.policy):g}%"
    total = sum(scores[x.name] for x in pool)
    bought = sum(scores[x.name] for x in chosen)
    lines = [f"{budget} bought {len(chosen)} of {len(pool)} candidate layers, conflict score "
             f"{bought:,} of {total:,} ({100 * bought / max(total, 1):.0f}%): {price(chosen)}"]
    ranked = sorted(pool, key=lambda x: (-scores[x.name], x.order))
    left = [x for x in ranked if x.name not in names and scores[x.name] > 0][:limit]
    lines += [f"left out: `{x.name}` (score {scores[x.name]:,}; alone {price([x])})"
              for x in left]
    return lines


def matched_random(pool: list[Layer], target: int, *, seed: int, tasks: int = 2,
                   tolerance: float = 0.1, draws: int = 10_000) -> list[Layer]:
    """Random layers whose added parameters ((T−1) × theirs) are within ``tolerance`` of
    ``target`` (a parameter-matched ablation of a chosen set): each draw shuffles the pool
    (seeded) and takes layers in that order, skipping any that would overshoot, until the sum
    reaches the band; the first draw that lands in it is returned, in graph order."""
    import random

    rng = random.Random(seed)
    low, high = (1 - tolerance) * target, (1 + tolerance) * target
    for _ in range(draws):
        order = rng.sample(pool, len(pool))
        chosen, added = [], 0
        for layer in order:
            extra = (tasks - 1) * layer.num_params
            if added + extra <= high:
                chosen.append(layer)
                added += extra
            if added >= low:
                return sorted(chosen, key=lambda layer: layer.order)
    raise SelectionError(f"no random set of the {len(pool)} candidate layers adds "
                         f"{target:,} parameters within {tolerance:.0%} in {draws} draws")


def random_within(pool: list[Layer], cost: CostModel, *, flops_limit: float, params_limit: int,
                  seed: int, tasks: int = 2) -> list[Layer]:
    """Random layers within a FLOP and a parameter budget (the ablation of a budgeted choice):
    the pool shuffled (seeded) and each layer taken in that order while the FLOP increase of
    those taken (``cost``) stays within ``flops_limit`` and their added parameters ((T−1) ×
    theirs) within ``params_limit``; in graph order."""
    import random

    chosen: list[Layer] = []
    added = 0
    for layer in random.Random(seed).sample(pool, len(pool)):
        extra = (tasks - 1) * layer.num_params
        if added + extra <= params_limit and cost.extra_flops([*chosen, layer]) <= flops_limit:
            chosen.append(layer)
            added += extra
    return sorted(chosen, key=lambda layer: layer.order)


def _explicit(layers: list[Layer], pool: list[Layer], spec: SelectSpec,
              where: str, notes: Sequence[str] = ()) -> list[Layer]:
    chosen, unmatched = match_layers(pool, spec.layers or [])
    if unmatched:
        everywhere, _ = match_layers(layers, unmatched)
        detail, fix = "", "run `reconfx inspect SPEC` for the layer paths"
        leaf = _enclosing(layers, unmatched[0])
        if everywhere:
            single = everywhere[0]
            reason = ("is excluded by select.include/exclude" if single.shared else
                      f"is used by task '{','.join(single.tasks)}' only, so it is task-specific "
                      "already")
            detail = f"; '{single.name}' {reason}"
        elif leaf is not None:
            path = next(p for p in leaf.modules if unmatched[0].startswith(p + "."))
            why = [n for n in notes if f"'{path}'" in n][:1] + [  # (and tier 2's failure)
                n.removeprefix(COARSE_KEPT) for n in notes if n.startswith(COARSE_KEPT)]
            detail = (f": it lies inside '{path}' ({leaf.type}), which tracing keeps as one "
                      "leaf" + (f" ({'; '.join(why)})" if why else "") + ", so only the whole "
                      "leaf can be branched")
            fix = (f"select '{path}' whole, or make its forward traceable (then `reconfx "
                   "inspect SPEC` lists the layers inside it)")
        raise SelectionError(
            f"pattern '{unmatched[0]}' matches no shared layer{detail}",
            where=f"{where}: select.layers", fix=fix)
    return chosen


def _enclosing(layers: list[Layer], pattern: str) -> Layer | None:
    """The layer of a leaf module that holds the module ``pattern`` names (tracing did not
    open it)."""
    return next((layer for layer in layers for p in layer.modules
                 if pattern.startswith(p + ".")), None)


def check_patterns(spec: SelectSpec | None, model: nn.Module, where: str = "spec") -> None:
    """Before tracing: each name or glob in ``select.layers``, ``include`` and ``exclude`` must
    name a module or parameter of the built model (a module stands for every layer under it);
    one naming nothing is refused with the closest names."""
    if spec is None:
        return
    names = [n for n, _m in model.named_modules() if n]
    names += [n for n, _p in model.named_parameters()]
    if any("." not in n for n, _p in model.named_parameters()):
        names.append("root")  # (the layer of the parameters the model itself holds)
    for field in ("layers", "include", "exclude"):
        for pattern in getattr(spec, field) or []:
            if any(path_matches(n, pattern) for n in names):
                continue
            plain = pattern.rstrip(".*") if is_glob(pattern) else pattern
            close = difflib.get_close_matches(plain, [n for n, _m in model.named_modules() if n],
                                              n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise SelectionError(
                f"pattern '{pattern}' names no module or parameter of the model",
                where=f"{where}: select.{field}",
                fix=f"{hint}a module path stands for every layer under it; `reconfx inspect "
                    "SPEC` lists the layers")
