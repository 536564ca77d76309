"""Source expressions that build a module: ``nn.Conv2d(1, 16, 3, padding=1, bias=False)``.

Most modules keep their constructor arguments as attributes of the same name, so the generic
handler reads them back (a tensor-valued attribute such as ``bias`` stands for the flag
``bias=True``). Kinds whose constructor differs record how to read its arguments in the
module-kind registry (:func:`reconfx.kinds.register`, ``constructor=``). An argument
the instance does not keep is searched for: a required one among the instance's own values
(``LayerNorm2d(num_channels)`` keeps ``normalized_shape=(64,)``), a class-valued one among its
children's types (``BatchNormAct2d(16, act_layer=nn.Hardswish)``). Every call is verified: it is
evaluated on the meta device, and the module it builds must match the original in its whole
subtree (module names and types, parameter and buffer shapes, each module's plain attributes).

A module whose constructor cannot be recovered is *restored* instead (:mod:`reconfx.emit.restore`);
values passed to constructors get their source forms from :mod:`reconfx.emit.sources`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from reconfx.emit.render import LINE, Source, bracketed, render_value
from reconfx.emit.sources import (
    PLAIN,
    class_source,
    defined,
    imports_of,
    namespace,
    settings_key,
    sourced,
)
from reconfx.graph import named_tensors
from reconfx.kinds import (
    constructor_values,
    is_torch_nn,
    own_attributes,
    settings_in,
)

__all__ = [
    "Bracket", "Constructor", "constructor", "differences", "remembered"
]

# A required argument is searched among this many of the instance's values at most, and at most
# two required arguments are searched together (each trial is one build on the meta device).
_MAX_VALUES, _MAX_MISSING = 24, 2
_SKIPPED = {"device", "dtype", "factory_kwargs"}
_MISSING = object()  # a required argument the instance does not keep


@dataclass(frozen=True)
class Bracket:
    """A list, dict or keyword-mapping argument whose items are source text or nested calls,
    wrapped when it is written (nested items get the width left at their depth)."""

    opener: str
    items: tuple[Any, ...]
    closer: str

    def text(self, width: int = LINE - 16) -> str:
        items = [_rendered(item, width - 4) for item in self.items]
        return bracketed(self.opener, items, self.closer, width)


@dataclass(frozen=True)
class Constructor:
    """How to build one module: the call (its arguments source text, nested calls, or
    ``(prefix, call)`` pairs such as ``("norm=", LayerNorm2d(...))``), the imports it needs and
    how it was found (``constructor``: its own class's constructor; ``restored``: the restoring
    helper)."""

    head: str
    args: tuple[Any, ...]
    imports: tuple[str, ...]
    how: str = "constructor"

    def arguments(self, width: int = LINE - 16) -> list[str]:
        """The arguments as text, each fitted to the width left one indentation deeper."""
        return [_rendered(arg, width - 4) for arg in self.args]

    def text(self, width: int = LINE - 16) -> str:
        """The call as one argument of a statement: one line, or one argument a line."""
        return bracketed(f"{self.head}(", self.arguments(width), ")", width)

    @property
    def call(self) -> str:
        return self.text()


def _rendered(arg: Any, width: int) -> str:
    if isinstance(arg, Constructor | Bracket):
        return arg.text(width)
    if isinstance(arg, tuple):
        prefix, inner = arg
        return prefix + _rendered(inner, width - len(prefix))
    return arg


def _signature(cls: type) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in _SKIPPED]


def _generic(m: nn.Module) -> dict[str, Any]:
    """Constructor arguments read back from same-named attributes; a required one the instance
    does not keep is ``_MISSING``."""
    values: dict[str, Any] = {}
    for p in _signature(type(m)):
        if hasattr(m, p.name):
            value = getattr(m, p.name)
            if isinstance(value, torch.Tensor) or (value is None and isinstance(p.default, bool)):
                value = value is not None  # e.g. bias: the flag that created the tensor
            elif isinstance(value, nn.Module):
                continue  # a submodule passed in: the search below may find its class
            values[p.name] = value
        elif p.default is inspect.Parameter.empty:
            values[p.name] = _MISSING
    return values


def _call(m: nn.Module, values: dict[str, Any], simplify: bool) -> list[str]:
    params = {p.name: p for p in _signature(type(m))}
    if not params and constructor_values(m) is not None:  # *args constructors (RNNs)
        params = {p.name: p for p in _signature(nn.RNNBase)} | {
            "nonlinearity": inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY,
                                              default="tanh")}
    positional, keywords = [], []
    for name, value in values.items():
        p = params.get(name)
        if simplify and isinstance(value, tuple) and value and all(v == value[0] for v in value):
            value = value[0]
        if p is not None and p.default is not inspect.Parameter.empty and _equal(value, p.default):
            continue
        value = sourced(value)
        required = p is not None and p.default is inspect.Parameter.empty and p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if required and not keywords:
            positional.append(render_value(value))
        else:
            keywords.append(f"{name}={render_value(value)}")
    return positional + keywords


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, type) or callable(a) and not isinstance(a, nn.Module):
        return a is b
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _own_differences(a: nn.Module, b: nn.Module) -> int:
    """Public attributes only: libraries mark instances with private flags after building them
    (transformers' ``_is_hf_initialized``), which a rebuild need not reproduce."""
    count = 0
    other = vars(b)
    for key, value in own_attributes(a).items():
        if key.startswith("_"):
            continue
        comparable = isinstance(value, PLAIN) or isinstance(value, type) or callable(value)
        if comparable and not isinstance(value, nn.Module) and not _equal(value, other.get(key)):
            count += 1
    if is_torch_nn(a) and a.extra_repr() != b.extra_repr():
        count += 1
    return count


def differences(a: nn.Module, b: nn.Module) -> int:
    """How many things differ between two modules' subtrees (0: the same structure): module
    names and types, parameter and buffer names, shapes and dtypes (:func:`_shapes`), each
    module's plain attributes (so a norm layer rebuilt with another activation child is told
    apart)."""
    if _kind(a) is not _kind(b):
        return 1 << 20
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    count = len(mods_a.keys() ^ mods_b.keys())
    for name in mods_a.keys() & mods_b.keys():
        x, y = mods_a[name], mods_b[name]
        count += 1 if _kind(x) is not _kind(y) else _own_differences(x, y)
    shapes_a, shapes_b = _shapes(a), _shapes(b)
    count += len(shapes_a.keys() ^ shapes_b.keys())
    return count + sum(shapes_a[k] != shapes_b[k] for k in shapes_a.keys() & shapes_b.keys())


def _kind(m: nn.Module) -> type:
    """A module's class; for a parametrized one (``weight_norm``), the class it was made from:
    torch gives each parametrized instance a class of its own, ``ParametrizedConv1d``. Its
    parametrizations are children, compared as such."""
    return type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)


def _shapes(m: nn.Module) -> dict[str, tuple]:
    """Each tensor's shape and dtype, floating dtypes alike for the tensors of the state dict:
    the weights a model is loaded with decide those (a bf16 checkpoint makes the module bf16;
    ``reconfx.load`` keeps its dtype); a buffer the module computes keeps its own."""
    stored = m.state_dict(keep_vars=True).keys()
    return {k: (tuple(v.shape), "floating" if v.is_floating_point() and k in stored else v.dtype)
            for k, v in named_tensors(m)}


def _dtype(m: nn.Module) -> torch.dtype | None:
    """The ``dtype=`` a factory-kwargs constructor needs: the one floating dtype of the module's
    own tensors when it is not the default (a layer moved to float64 or bfloat16)."""
    floating = {t.dtype for t in m.state_dict().values() if t.is_floating_point()}
    if len(floating) != 1 or floating == {torch.get_default_dtype()}:
        return None
    try:
        accepts = "dtype" in inspect.signature(type(m).__init__).parameters
    except (TypeError, ValueError):
        return None
    return next(iter(floating)) if accepts else None


# Constructors found while one model's files are written, by what decides them (see _likeness):
# a model repeats its layers, and each search builds candidates on the meta device.
_FOUND: contextvars.ContextVar[dict | None] = contextvars.ContextVar("found", default=None)


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """While open, a module indistinguishable from one already given a constructor (same
    classes, attributes, tensor shapes and dtypes in its whole subtree; the same settings
    objects) gets the same constructor without a second search."""
    token = _FOUND.set({})
    try:
        yield
    finally:
        _FOUND.reset(token)


def constructor(m: nn.Module, settings: Sequence[Any] = ()) -> Constructor | None:
    """A verified constructor call for ``m``, or None when no form rebuilds it exactly.
    ``settings``: settings objects of the model ``m`` belongs to (a Hugging Face model's
    config), tried for a required argument ``m`` does not keep (``BertLayer(config)``)."""
    found = _FOUND.get()
    if found is None:
        return _constructor(m, settings)
    key = _likeness(m, settings)
    if key not in found:
        found[key] = _constructor(m, settings)
    return found[key]


def _likeness(m: nn.Module, settings: Sequence[Any]) -> tuple:
    """Everything a constructor search reads from ``m``, as a key: each module of the subtree
    with its class and its own attributes (plain values by value; anything else, a settings
    object or a function, by identity), each tensor's shape and dtype, and the settings objects
    and import aliases in force. Two modules with equal keys are the same to the search and to
    its verification (:func:`differences` compares a subset of this). Settings objects count by
    content: the layers of a model copied per task hold copies of its config."""
    def value(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(value(x) for x in v)
        if isinstance(v, PLAIN):
            return type(v), v
        return settings_key(v) or ("id", id(v))

    modules = tuple((name, type(sub), tuple((k, value(v)) for k, v in own_attributes(sub).items()))
                    for name, sub in m.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, isinstance(t, nn.Parameter))
                    for name, t in named_tensors(m))
    return (modules, tensors, tuple(value(x) for x in settings), defined(),
            torch.get_default_dtype())


def _constructor(m: nn.Module, settings: Sequence[Any]) -> Constructor | None:
    if parametrize.is_parametrized(m):
        return _parametrized(m, settings)
    cls = type(m)
    head = class_source(cls)
    if head is None:
        return None
    values = constructor_values(m)
    values = _generic(m) if values is None else values
    dtype = _dtype(m)
    if dtype is not None:
        values = {**values, "dtype": dtype}
    best: tuple[int, dict[str, Any]] | None = None
    for candidate in _filled(m, values, settings):
        found = _verified(m, head, candidate)
        if found is not None:
            return found
        score = _score(m, head, candidate)
        if score is not None and (best is None or score < best[0]):
            best = (score, candidate)
    if best is None:
        return None
    return _verified(m, head, _searched(m, head, best[1], best[0]))


_PARAMETRIZATIONS = {  # torch's parametrization class -> its public function and arguments
    "_WeightNorm": ("weight_norm", ("dim",)),
    "_SpectralNorm": ("spectral_norm", ("n_power_iterations", "eps", "dim")),
}


def _parametrized(m: nn.Module, settings: Sequence[Any]) -> Constructor | None:
    """A parametrized module (``weight_norm(nn.Conv1d(...), name="weight", dim=2)``): its own
    class's constructor, found on a plain stand-in holding each parametrized tensor's value,
    wrapped in one call per parametrization, in the order they apply: torch's public
    ``weight_norm``/``spectral_norm``, or ``register_parametrization`` with the
    parametrization's own constructor. Verified on the meta device as any constructor is."""
    cls = type(m).__bases__[0]
    plain = cls.__new__(cls)
    plain.__dict__ = {**vars(m), "_parameters": dict(m._parameters),
                      "_modules": {k: v for k, v in m._modules.items() if k != "parametrizations"}}
    for name in m.parametrizations:
        plain._parameters[name] = nn.Parameter(getattr(m, name).detach(), requires_grad=False)
    found = constructor(plain, settings)
    if found is None:
        return None
    for name, chain in m.parametrizations.items():
        for step in chain:
            found = _wrapped(found, name, step, settings)
            if found is None:
                return None
    return found if _rebuilds(m, found.text(10**6), found.imports) else None


def _wrapped(inner: Constructor, name: str, step: nn.Module, settings: Sequence[Any]
             ) -> Constructor | None:
    """``inner`` with one more parametrization of its tensor ``name``."""
    known = _PARAMETRIZATIONS.get(type(step).__name__)
    if known is not None and type(step).__module__ == "torch.nn.utils.parametrizations":
        function, keys = known
        own = {k: getattr(step, k) for k in keys}
        args = (inner, f"name={render_value(name)}",
                *(f"{k}={render_value(sourced(v))}" for k, v in own.items()))
        return Constructor(function, args, tuple(sorted(
            {*inner.imports, f"from torch.nn.utils.parametrizations import {function}"})))
    made = constructor(step, settings)
    if made is None:
        return None
    return Constructor("parametrize.register_parametrization", (
        inner, render_value(name), made), tuple(sorted(
            {*inner.imports, *made.imports, "from torch.nn.utils import parametrize"})))


def _filled(m: nn.Module, values: dict[str, Any], settings: Sequence[Any] = ()
            ) -> Iterator[dict[str, Any]]:
    """``values``, or with its missing required arguments taken from the settings objects in
    and around the instance, then its own values (each assignment in turn)."""
    missing = [k for k, v in values.items() if v is _MISSING]
    if not missing:
        yield values
        return
    found = settings_in(m) + [s for s in settings if all(s is not f for f in settings_in(m))]
    pool = (found + _own_values(m))[: _MAX_VALUES if len(missing) == 1 else _MAX_VALUES // 3]
    if len(missing) > _MAX_MISSING or not pool:
        return
    for chosen in itertools.product(pool, repeat=len(missing)):
        yield {**values, **dict(zip(missing, chosen, strict=True))}


def _own_values(m: nn.Module) -> list[Any]:
    """Candidate values for a required argument: the plain attribute values (and their items)
    of the instance, then of its submodules, and its own then its submodules' tensors' sizes."""
    found: list[Any] = []
    modules = list(m.modules())
    for sub in modules:
        for value in own_attributes(sub).values():
            if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
                found += [value, *value]
            elif isinstance(value, int | float) and not isinstance(value, bool):
                found.append(value)
    for sub in modules:
        for tensor in itertools.chain(sub._parameters.values(), sub._buffers.values()):
            if tensor is not None:
                found += list(tensor.shape)
    unique = list(dict.fromkeys((type(v), v) for v in found))
    return [v for _t, v in unique][:_MAX_VALUES]


def _searched(m: nn.Module, head: Source, values: dict[str, Any], score: int
              ) -> dict[str, Any]:
    """Greedily set arguments the instance does not keep (class-valued ones to its submodules'
    types, flags to their other value) while that lowers the number of differences."""
    options = _options(m, values)
    while score and options:
        trials = []
        for name, value in options:
            candidate = {**values, name: value}
            s = _score(m, head, candidate)
            if s is not None and s < score:
                trials.append((s, name, value))
        if not trials:
            break
        score, name, value = min(trials, key=lambda t: t[0])
        values = {**values, name: value}
        options = [(n, v) for n, v in options if n != name]
    return values


def _options(m: nn.Module, values: dict[str, Any]) -> list[tuple[str, Any]]:
    """Values to try for arguments the instance does not keep: its submodules' types for a
    class-valued one, the other value of a flag, the instance's integers for an integer one
    (``kernel=1``)."""
    types = list(dict.fromkeys(type(sub) for _n, sub in m.named_modules() if sub is not m))
    ints = [v for v in _own_values(m) if type(v) is int][:_MAX_VALUES // 3]
    options = []
    for p in _signature(type(m)):
        if p.name in values:
            continue
        if isinstance(p.default, type) or p.default is None:
            options += [(p.name, t) for t in types]
        if isinstance(p.default, bool):
            options.append((p.name, not p.default))
        elif type(p.default) is int or p.default is None:
            options += [(p.name, v) for v in ints if v != p.default]
    return options


def _score(m: nn.Module, head: Source, values: dict[str, Any]) -> int | None:
    try:
        args = _call(m, values, simplify=False)
    except TypeError:
        return None
    built = _build(f"{head.text}({', '.join(args)})", _imports(head, values))
    return None if built is None else differences(m, built)


def _imports(head: Source, values: dict[str, Any]) -> tuple[str, ...]:
    found = set(head.imports)
    for value in values.values():
        try:
            found |= imports_of(sourced(value))
        except TypeError:
            pass
    return tuple(sorted(found))


def _verified(m: nn.Module, head: Source, values: dict[str, Any]) -> Constructor | None:
    imports = _imports(head, values)
    for simplify in (True, False):
        try:
            args = _call(m, values, simplify)
        except TypeError:  # an argument with no source form (e.g. an unregistered object)
            return None
        if _rebuilds(m, f"{head.text}({', '.join(args)})", imports):
            return Constructor(head.text, tuple(args), imports)
    return None


def _rebuilds(m: nn.Module, call: str, imports: tuple[str, ...]) -> bool:
    """The call, built on the meta device, has ``m``'s structure exactly."""
    built = _build(call, imports)
    return built is not None and differences(m, built) == 0


_BUILT: dict[tuple[str, tuple[str, ...]], nn.Module | None] = {}


def _build(call: str, imports: tuple[str, ...]) -> nn.Module | None:
    """Evaluate a constructor call on the meta device (cached: models repeat their layers)."""
    key = (call, imports)
    if key not in _BUILT:
        try:
            with torch.device("meta"):
                _BUILT[key] = eval(call, namespace(imports))  # noqa: S307 - text we generated
        except Exception:
            _BUILT[key] = None
    return _BUILT[key]


