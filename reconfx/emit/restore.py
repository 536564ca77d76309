"""Building a module no constructor call rebuilds, and tensors' values as source.

``model.py`` gets a ``_restored`` helper that creates the module without calling ``__init__``
and sets its recorded attributes, parameters, buffers and children (each built the same way),
so ``model.py`` never needs the code that built the original. Buffers get values the class
computes (``torch.arange(512).view(1, 512)``, ``torch.zeros(4)``) or a small literal.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from reconfx.emit.constructors import Bracket, Constructor
from reconfx.emit.render import LINE, render_arg, render_value
from reconfx.emit.sources import class_source, imports_of, sourced
from reconfx.kinds import own_attributes

__all__ = [
    "container", "RESTORE_HELPER", "RESTORE_IMPORTS", "restored", "tensor_source"
]

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
        attributes = {k: sourced(v) for k, v in own_attributes(m).items()}
    except TypeError:
        return None
    imports = set(head.imports) | imports_of(list(attributes.values()))
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
    if not isinstance(m, nn.ModuleDict) and list(m._modules) != [str(i) for i in range(len(m))]:
        return None  # a Sequential with named children (restored instead, names kept)
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
