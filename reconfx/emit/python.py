"""The Python emitter: a graph module as one standalone, readable ``model.py``.

Three parts write it: :mod:`reconfx.emit.tree` the module tree and ``__init__`` (each submodule
built explicitly from its constructor arguments, one line per leaf at its original path, so the
weights load by name and a branch changes only its own lines), :mod:`reconfx.emit.forward` the
``forward`` statements (values named after module paths, ``layer1_0_conv1``, with a ``_<task>``
suffix on task streams and a comment at each branch point), and this module the classes and the
file around them: imports, constants, helpers, generated classes. The output is deterministic:
the same graph gives byte-identical text.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reconfx.calls import TaskStream
from reconfx.emit.forward import ForwardWriter
from reconfx.emit.render import LINE, statement
from reconfx.emit.restore import RESTORE_HELPER, RESTORE_IMPORTS
from reconfx.emit.sources import defining
from reconfx.emit.tree import FileParts, InitWriter
from reconfx.graph import DualGraphModule, output_node
from reconfx.rows import PerTask
from reconfx.streams import StreamRegion, fits

__all__ = ["emit_python", "EmittedSource", "PythonEmitter"]

STATISTICS_HELPER = '''\
def per_task_statistics(norm: nn.Module) -> nn.ModuleDict:
    """One copy of ``norm`` per task, each keeping its own running statistics, all holding
    ``norm``'s parameters: a shared norm layer that runs on each task's stream."""
    copies = nn.ModuleDict({task: copy.deepcopy(norm) for task in TASKS})
    for module in copies.values():
        for name, param in norm.named_parameters(recurse=False):
            setattr(module, name, param)
    return copies
'''


@dataclass
class EmittedSource:
    source: str
    # module path -> how __init__ builds it: "constructor" (its class's), "restored" (from its
    # recorded state, see reconfx.emit.restore), "generated" (a class for a submodule run per
    # task stream) or "traced" (a class holding its traced code: nothing rebuilds it)
    built: dict[str, str] = field(default_factory=dict)


class PythonEmitter:
    """One class of ``model.py`` (the model's, or one generated for a submodule run per task
    stream, sharing the file's ``parts``), and the file around the model's class."""

    def __init__(self, module: DualGraphModule, class_name: str, *, doc: str,
                 task_containers: set[str], branch_notes: dict[str, str] | None = None,
                 settings: Sequence[Any] = (), parts: FileParts | None = None, base: str = "",
                 tasks: tuple[str, ...] | None = None):
        self.module = module
        self.class_name = class_name
        self.doc = doc
        self.task_containers = task_containers
        self.branch_notes = branch_notes or {}
        self.settings = settings
        self.parts = parts or FileParts()
        if tasks is None:
            result = output_node(module.train_graph).args[0]
            tasks = tuple(result) if isinstance(result, dict) else ()
        self.regions = sorted({id(r): r for r in self.module.modules()
                               if isinstance(r, StreamRegion)}.values(), key=lambda r: r.method)
        self.init = InitWriter(module, self.parts, task_containers=task_containers,
                               settings=settings, tasks=tasks, regions=self.regions,
                               generate=self._generated, base=base)

    def class_lines(self) -> list[str]:
        """The class's docstring, ``__init__`` and methods (the lines after its header)."""
        self.init.collect()
        init = self.init.lines()
        forward = ForwardWriter(self.module, self.parts, self.init.tree, regions=self.regions,
                                branch_notes=self.branch_notes, rows=bool(self.init.rows))
        doc = [*_docstring(self.doc, "    "), ""] if self.doc and not self.class_name else []
        return [*doc, "    def __init__(self) -> None:", "        super().__init__()", *init,
                "", *forward.lines()]

    def _generated(self, path: str, stream: TaskStream, traced: bool = False) -> str:
        """The name of the class generated for a submodule holding branched layers, or written
        as its ``traced`` code (one class for all such submodules whose source is the same)."""
        inner = {c[len(path) + 1:] for c in self.task_containers if c.startswith(path + ".")}
        doc = (f"{stream.kind} with branched layers, for one task stream: each branched layer "
               "holds one copy per task (an nn.ModuleDict by task name) and `task` picks the "
               "copy." if stream.per_task else f"{stream.kind}'s forward as traced: the module "
               "holds a value with no source form, so no call of its class rebuilds it."
               if traced else f"{stream.kind} as traced, written out to compare with the "
               "class model.py generates for it.")
        sub = PythonEmitter(stream, "", doc=doc, task_containers=inner, settings=self.settings,
                            parts=self.parts, base=f"{self.init.base}{path}.",
                            tasks=self.init.tasks)
        body = sub.class_lines()
        built = self.init.built
        built.update({f"{path}.{k}": how for k, how in sub.init.built.items()})
        built[path] = "traced" if traced else "generated"
        for name, lines in self.parts.classes.items():
            if lines == body:
                return name
        name = self.parts.class_name(f"{'Branched' if stream.per_task else 'Traced'}{stream.kind}")
        self.parts.classes[name] = body
        return name

    def emit(self) -> EmittedSource:
        self.parts.defined.add(self.class_name)
        with defining(self.parts.defined):  # (a class imported under one of them: an alias)
            lines = self.class_lines()
        generated = [line for name, body in self.parts.classes.items()
                     for line in ["", "", f"class {name}(nn.Module):", *body]]
        helper: list[str] = []
        if self.init.rows:
            self.parts.imports.add("from typing import Any")
            helper += ["", *inspect.getsource(PerTask).rstrip("\n").splitlines(), ""]
        if any("per_task_statistics(" in line for line in [*lines, *generated]):
            self.parts.imports.add("import copy")
            text = STATISTICS_HELPER
            if self.init.rows:  # (on task rows: each copy runs on its task's rows)
                text = text.replace("nn.ModuleDict", "PerTask").replace(
                    "on each task's stream", "on the task streams")
            helper += ["", *text.rstrip("\n").splitlines(), ""]
        if any("_restored(" in line for line in [*lines, *generated]):  # (also nested)
            self.parts.imports.update(RESTORE_IMPORTS)
            helper += ["", *RESTORE_HELPER.rstrip("\n").splitlines(), ""]
        if self.regions:
            helper += ["", *inspect.getsource(fits).rstrip("\n").splitlines(), ""]
        for line in sorted(i for i in self.parts.imports if i.startswith(f"from {_OWN_CLASSES} ")):
            # (reconfx's own heads are written into the file: model.py needs no reconfx)
            self.parts.imports.discard(line)
            name, _, alias = line.partition(" import ")[2].partition(" as ")
            source = inspect.getsource(getattr(importlib.import_module(_OWN_CLASSES), name))
            if alias:  # (named like a class of the file: written under its alias)
                source = source.replace(f"class {name}(", f"class {alias}(", 1)
            helper += ["", *source.rstrip("\n").splitlines(), ""]
        constants = [statement("", name, text[:text.index("(") + 1],
                               _split_arguments(text[text.index("(") + 1:-1]), ")")
                     for text, name in sorted(self.parts.constants.items(), key=lambda c: c[1])]
        if constants:  # (one blank line after the imports, two before a definition)
            helper = [*constants, "", *helper] if helper else [*constants, ""]
        out = [f'"""{self.doc}"""', "", *_sorted_imports(self.parts.imports), "", *helper]
        if generated:
            out += generated[1:] + [""]
        out += ["", f"class {self.class_name}(nn.Module):", *lines, ""]
        return EmittedSource("\n".join(out), dict(self.init.built))


def _docstring(text: str, indent: str) -> list[str]:
    """``text`` as a docstring's lines at ``indent``, wrapped to the line width."""
    lines = textwrap.wrap(text, width=LINE - len(indent) - 6)
    if len(lines) == 1:
        return [f'{indent}"""{lines[0]}"""']
    return [f'{indent}"""{lines[0]}', *(f"{indent}{line}" for line in lines[1:]), f'{indent}"""']


def _sorted_imports(imports: set[str]) -> list[str]:
    """isort's layout: standard library, installed packages, then the rest (the user's own
    modules), each section with plain imports before from-imports, sections blank-separated;
    the names one module gives joined into one from-import."""
    sections: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for line in _joined(imports):
        sections[_section(line.split()[1].split(".")[0])].append(line)
    out: list[str] = []
    for lines in sections.values():
        if lines:
            plain = sorted(i for i in lines if i.startswith("import "))
            froms = sorted(i for i in lines if i.startswith("from "))
            out += ([""] if out else []) + plain + froms
    return out


def _joined(imports: set[str]) -> list[str]:
    names: dict[str, set[str]] = {}
    lines = [i for i in imports if not i.startswith("from ")]
    for line in imports:
        if line.startswith("from "):
            module, _, imported = line.removeprefix("from ").partition(" import ")
            names.setdefault(module, set()).update(n.strip() for n in imported.split(","))
    for module, found in names.items():
        ordered = sorted(found, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))
        text = f"from {module} import {', '.join(ordered)}"
        if len(text) > LINE:
            text = f"from {module} import (\n" + "".join(f"    {n},\n" for n in ordered) + ")"
        lines.append(text)
    return lines


def _section(top: str) -> int:
    if top in sys.stdlib_module_names:
        return 0
    found = importlib.util.find_spec(top)
    origin = getattr(found, "origin", None) or ""
    return 1 if "site-packages" in origin or "dist-packages" in origin else 2


def _split_arguments(text: str) -> list[str]:
    """The top-level comma-separated items of an argument list's source text."""
    items, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return items + ([tail] if tail else [])


# The module whose classes model.py holds a copy of instead of importing them (the heads and
# pooling reconfx adds to a backbone: plain torch code).
_OWN_CLASSES = "reconfx.heads"


def emit_python(module: DualGraphModule, class_name: str, *, doc: str,
                task_containers: set[str] | None = None,
                branch_notes: dict[str, str] | None = None, settings: Sequence[Any] = ()
                ) -> EmittedSource:
    """Source text of a standalone ``nn.Module`` class reproducing ``module``.

    >>> emitted = emit_python(branched.module, "MyModel", "My model.")   # doctest: +SKIP
    >>> print(emitted.source)                                             # doctest: +SKIP
    """
    return PythonEmitter(module, class_name, doc=doc, task_containers=task_containers or set(),
                         branch_notes=branch_notes, settings=settings).emit()
