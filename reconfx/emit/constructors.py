"""Source expressions that build a module: ``nn.Conv2d(1, 16, 3, padding=1, bias=False)``.

Most modules keep their constructor arguments as attributes of the same name, so the generic
handler reads them back (a tensor-valued attribute such as ``bias`` stands for the flag
``bias=True``). Types whose constructor differs register a handler in ``HANDLERS``. An argument
the instance does not keep is searched for: a required one among the instance's own values
(``LayerNorm2d(num_channels)`` keeps ``normalized_shape=(64,)``), a class-valued one among its
children's types (``BatchNormAct2d(16, act_layer=nn.Hardswish)``). Every call is verified: it is
evaluated on the meta device, and the module it builds must match the original in its whole
subtree (module names and types, parameter and buffer shapes, each module's plain attributes).

A module whose constructor cannot be recovered is *restored* instead: a helper in ``model.py``
creates it without calling ``__init__`` and sets its recorded attributes, tensors and children
(each built the same way), so ``model.py`` never needs the code that built the original.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import itertools
import keyword
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reconfx.emit.render import LINE, Source, bracketed, render_arg, render_value

HANDLERS: dict[type[nn.Module], Callable[[nn.Module], dict[str, Any]]] = {}
PLAIN = (int, float, bool, str, tuple, type(None), torch.dtype, torch.device)
# A required argument is searched among this many of the instance's values at most, and at most
# two required arguments are searched together (each trial is one build on the meta device).
_MAX_VALUES, _MAX_MISSING = 24, 2


def handler(*types: type[nn.Module]) -> Callable[[Callable[[nn.Module], dict[str, Any]]], Any]:
    def register(fn: Callable[[nn.Module], dict[str, Any]]) -> Callable[[nn.Module], Any]:
        for t in types:
            HANDLERS[t] = fn
        return fn

    return register


@handler(nn.LSTM, nn.GRU, nn.RNN)
def _rnn(m: nn.Module) -> dict[str, Any]:
    values = {name: getattr(m, name) for name in (
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
        "bidirectional")}
    if isinstance(m, nn.LSTM):
        values["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        values["nonlinearity"] = m.nonlinearity
    return values


@handler(nn.MultiheadAttention)
def _mha(m: nn.Module) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
            "batch_first": m.batch_first}


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
    if not params and type(m) in HANDLERS:  # *args constructors (RNNs): use the base signature
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
        value = _sourced(value)
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


_INTERNAL = set(vars(nn.Module()))  # nn.Module's own bookkeeping (_parameters, training, hooks)


def _attributes(m: nn.Module) -> dict[str, Any]:
    """The instance's own recorded attributes, besides its tensors and children."""
    return {k: v for k, v in vars(m).items() if k not in _INTERNAL}


def _own_differences(a: nn.Module, b: nn.Module) -> int:
    """Public attributes only: libraries mark instances with private flags after building them
    (transformers' ``_is_hf_initialized``), which a rebuild need not reproduce."""
    count = 0
    other = vars(b)
    for key, value in _attributes(a).items():
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
    names and types, parameter and buffer names, shapes and dtypes, each module's plain
    attributes (so a norm layer rebuilt with another activation child is told apart)."""
    if type(a) is not type(b):
        return 1 << 20
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    count = len(mods_a.keys() ^ mods_b.keys())
    for name in mods_a.keys() & mods_b.keys():
        x, y = mods_a[name], mods_b[name]
        count += 1 if type(x) is not type(y) else _own_differences(x, y)
    shapes_a, shapes_b = _shapes(a), _shapes(b)
    count += len(shapes_a.keys() ^ shapes_b.keys())
    return count + sum(shapes_a[k] != shapes_b[k] for k in shapes_a.keys() & shapes_b.keys())


def _shapes(m: nn.Module) -> dict[str, tuple]:
    tensors = itertools.chain(m.named_parameters(remove_duplicate=False),
                              m.named_buffers(remove_duplicate=False))
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors}


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


def is_torch_nn(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn")


def class_source(cls: type) -> Source | None:
    """``nn.Conv2d`` for torch.nn's classes, else the name imported from its public module (the
    shortest parent package that exports the same object), or None when not importable."""
    if getattr(nn, cls.__name__, None) is cls and cls.__module__.startswith("torch.nn"):
        return Source(f"nn.{cls.__name__}")
    return _importable(cls)


def _importable(obj: Any) -> Source | None:
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


def _sourced(value: Any) -> Any:
    """``value``, or its :class:`Source` when it is a class, a function or a settings object
    (so it renders); raises TypeError when it has no source form."""
    if isinstance(value, PLAIN + (Source,)) and not isinstance(value, tuple):
        return value
    if isinstance(value, tuple | list):
        return type(value)(_sourced(v) for v in value)
    if isinstance(value, dict):
        return {k: _sourced(v) for k, v in value.items()}
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
        cls = _importable(type(value))
        return cls and Source(f"{cls.text}.{value.name}", cls.imports)
    if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(
            value, functools.partial | torch._ops.OpOverload):
        return None if isinstance(value, functools.partial) else _importable(value)
    return _settings_source(value)


def _settings_source(value: Any) -> Source | None:
    cls = _importable(type(value))
    if cls is None:
        return None
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    elif callable(getattr(value, "to_dict", None)):
        fields = value.to_dict()
    else:
        return None
    try:
        items = {k: _sourced(v) for k, v in fields.items()}
        args = [f"{k}={render_value(v)}" for k, v in items.items() if str(k).isidentifier()]
    except TypeError:
        return None
    if len(args) != len(items):
        return None
    text = f"{cls.text}({', '.join(args)})"
    imports = set(cls.imports) | {i for v in items.values() for i in _imports_of(v)}
    namespace = _namespace(imports)
    try:
        rebuilt = eval(text, namespace)  # noqa: S307 - text we generated
    except Exception:
        return None
    same = rebuilt.to_dict() == fields if hasattr(rebuilt, "to_dict") else rebuilt == value
    return Source(text, tuple(sorted(imports))) if same else None


def _imports_of(value: Any) -> set[str]:
    if isinstance(value, Source):
        return set(value.imports)
    if isinstance(value, tuple | list):
        return {i for v in value for i in _imports_of(v)}
    if isinstance(value, dict):
        return {i for v in value.values() for i in _imports_of(v)}
    return set()


def _namespace(imports: set[str] | tuple[str, ...]) -> dict[str, Any]:
    namespace: dict[str, Any] = {"torch": torch, "nn": nn}
    for line in imports:
        if line.startswith("from "):
            _from, module, _import, name = line.split()
            namespace[name] = getattr(importlib.import_module(module), name)
    return namespace


def constructor(m: nn.Module) -> Constructor | None:
    """A verified constructor call for ``m``, or None when no form rebuilds it exactly."""
    cls = type(m)
    head = class_source(cls)
    if head is None:
        return None
    values = HANDLERS[cls](m) if cls in HANDLERS else _generic(m)
    dtype = _dtype(m)
    if dtype is not None:
        values = {**values, "dtype": dtype}
    best: tuple[int, dict[str, Any]] | None = None
    for candidate in _filled(m, values):
        found = _verified(m, head, candidate)
        if found is not None:
            return found
        score = _score(m, head, candidate)
        if score is not None and (best is None or score < best[0]):
            best = (score, candidate)
    if best is None:
        return None
    return _verified(m, head, _searched(m, head, best[1], best[0]))


def _filled(m: nn.Module, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``values``, or with its missing required arguments taken from the instance's own values
    (each assignment in turn)."""
    missing = [k for k, v in values.items() if v is _MISSING]
    if not missing:
        yield values
        return
    pool = _own_values(m)[: _MAX_VALUES if len(missing) == 1 else _MAX_VALUES // 3]
    if len(missing) > _MAX_MISSING or not pool:
        return
    for chosen in itertools.product(pool, repeat=len(missing)):
        yield {**values, **dict(zip(missing, chosen, strict=True))}


def _own_values(m: nn.Module) -> list[Any]:
    """Candidate values for a required argument: the instance's plain attribute values and their
    items, and its own tensors' sizes."""
    found: list[Any] = []
    for value in _attributes(m).values():
        if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            found += [value, *value]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.append(value)
    for tensor in itertools.chain(m._parameters.values(), m._buffers.values()):
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
    types = list(dict.fromkeys(type(sub) for _n, sub in m.named_modules() if sub is not m))
    options = []
    for p in _signature(type(m)):
        if p.name in values:
            continue
        if isinstance(p.default, type) or p.default is None:
            options += [(p.name, t) for t in types]
        elif isinstance(p.default, bool):
            options.append((p.name, not p.default))
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
            found |= _imports_of(_sourced(value))
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
        built = _build(f"{head.text}({', '.join(args)})", imports)
        if built is not None and differences(m, built) == 0:
            return Constructor(head.text, tuple(args), imports)
    return None


_BUILT: dict[tuple[str, tuple[str, ...]], nn.Module | None] = {}


def _build(call: str, imports: tuple[str, ...]) -> nn.Module | None:
    """Evaluate a constructor call on the meta device (cached: models repeat their layers)."""
    key = (call, imports)
    if key not in _BUILT:
        try:
            with torch.device("meta"):
                _BUILT[key] = eval(call, _namespace(imports))  # noqa: S307 - text we generated
        except Exception:
            _BUILT[key] = None
    return _BUILT[key]


# -- restoring a module from its recorded state -------------------------------------------------

RESTORE_HELPER = '''\
def _restored(cls: type, attributes: dict[str, Any], **members: Any) -> nn.Module:
    """A ``cls`` set up from its recorded attributes, parameters, buffers and submodules, for a
    class whose constructor arguments cannot be read back from an instance (``__init__`` is not
    called). A buffer that is not saved with the weights is passed as ``("transient", value)``."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__dict__.update(attributes)
    for name, value in members.items():
        if isinstance(value, tuple):
            module.register_buffer(name, value[1], persistent=False)
        elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            module.register_buffer(name, value)
        else:
            setattr(module, name, value)
    return module
'''
RESTORE_IMPORTS = ("from typing import Any",)


def restored(m: nn.Module, member: Callable[[str, Any], Any]) -> Constructor | None:
    """The restoring helper's call for ``m``: its class, its recorded attributes, and each of
    its parameters, buffers and children as ``member(name, value)`` gives it (source text or a
    :class:`Constructor`; None: it has no form). None when the class is not importable or an
    attribute has no source form."""
    head = class_source(type(m))
    if head is None:
        return None
    try:
        attributes = {k: _sourced(v) for k, v in _attributes(m).items()}
    except TypeError:
        return None
    imports = set(head.imports) | _imports_of(list(attributes.values()))
    args: list[Any] = [head.text, render_arg(attributes)]
    persistent = set(m.state_dict(keep_vars=True))
    members = {**m._parameters, **m._buffers, **m._modules}
    unnamed = []  # members whose names are no keywords ("0" in a list-like module)
    for name, value in members.items():
        built = "None" if value is None else member(name, value)
        if built is None:
            return None
        if isinstance(built, Constructor):
            imports.update(built.imports)
        if name in m._buffers and name not in persistent:
            built = Bracket('("transient", ', (built,), ")")
        if name.isidentifier() and not keyword.iskeyword(name):
            args.append((f"{name}=", built))
        else:
            unnamed.append((f"{render_value(name)}: ", built))
    if unnamed:
        args.append(("**", Bracket("{", tuple(unnamed), "}")))
    return Constructor("_restored", tuple(args), tuple(sorted(imports)), how="restored")


def container(m: nn.Module, member: Callable[[str, Any], Any]) -> Constructor | None:
    """``nn.Sequential(a, b)``, ``nn.ModuleList([a, b])`` or ``nn.ModuleDict({...})`` from its
    children as ``member(name, child)`` gives them; None for anything else."""
    if type(m) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return None
    items = {name: member(name, child) for name, child in m._modules.items()}
    if None in items.values():
        return None
    imports = {i for v in items.values() if isinstance(v, Constructor) for i in v.imports}
    head, found = f"nn.{type(m).__name__}", tuple(sorted(imports))
    if isinstance(m, nn.Sequential):
        return Constructor(head, tuple(items.values()), found)
    if isinstance(m, nn.ModuleList):
        return Constructor(head, (Bracket("[", tuple(items.values()), "]"),), found)
    entries = tuple((f"{render_value(k)}: ", v) for k, v in items.items())
    return Constructor(head, (Bracket("{", entries, "}"),), found)


def tensor_source(t: torch.Tensor, recorded: bool = True) -> str | None:
    """A tensor's value as an expression the class computes (``torch.arange(512).view(1, 512)``,
    ``torch.zeros(4)``), a literal for a small one, or None; ``recorded=False`` asks only for
    storage of the right shape and dtype (the value comes from the weights file)."""
    shape = ", ".join(str(int(s)) for s in t.shape) if t.dim() else "()"
    size = f"({shape},)" if t.dim() == 1 else (f"({shape})" if t.dim() else "()")
    view = "" if t.dim() == 1 else f".view({shape})"
    if not recorded or t.is_meta:
        return f"torch.empty({shape}{_dtype_arg(t, torch.float32)})"
    flat = t.detach().reshape(-1).cpu()
    if not flat.numel():
        return f"torch.empty({shape}{_dtype_arg(t, torch.float32)})"
    if flat.is_complex():
        return None
    if bool((flat == flat[0]).all()):
        first = flat[0].item()
        if first in (0, 1):
            name = "zeros" if first == 0 else "ones"
            return f"torch.{name}({shape}{_dtype_arg(t, torch.float32)})"
        return f"torch.full({size}, {render_value(first)}{_dtype_arg(t, _inferred(first))})"
    if torch.equal(flat, torch.arange(flat.numel(), dtype=flat.dtype)):
        return f"torch.arange({flat.numel()}{_dtype_arg(t, torch.int64)}){view}"
    if flat.numel() <= 16:
        values = flat.tolist()
        literal = render_arg(values, width=LINE - 40)  # one value a line when long
        return f"torch.tensor({literal}{_dtype_arg(t, _inferred(values[0]))}){view}"
    return None


def _inferred(value: Any) -> torch.dtype:
    """The dtype torch gives a tensor made from this Python number."""
    return torch.tensor(value).dtype


def _dtype_arg(t: torch.Tensor, inferred: torch.dtype) -> str:
    return "" if t.dtype == inferred else f", dtype={t.dtype}"
