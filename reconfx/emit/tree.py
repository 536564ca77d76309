"""The module tree ``model.py``'s ``__init__`` builds, and the lines that build it.

The tree holds the submodules, parameters and buffers the graphs use, at their original paths
and in order of first use; :class:`InitWriter` writes one line per leaf (its constructor call,
verified, or its restoring), a per-task container per branched layer, the ties between leaves that
share a parameter, and, on task rows, the per-task layers swapped into a module built whole.
"""

from __future__ import annotations

import copy
import dataclasses
import keyword
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from reconfx.calls import MARK, TaskStream, under
from reconfx.emit.constructors import Bracket, Constructor, constructor
from reconfx.emit.render import LINE, assign, comment, render_value, statement
from reconfx.emit.restore import container, restored, tensor_source
from reconfx.emit.sources import SETTINGS, sourced
from reconfx.errors import CheckError
from reconfx.graph import DualGraphModule, region_call, resolve, same_graph
from reconfx.kinds import own_attributes
from reconfx.rows import PerTask, shares_parameters, unswapped
from reconfx.streams import StreamRegion
from reconfx.tracing import leaf_tracer

__all__ = [
    "accessor", "buildable", "container_kind", "FileParts", "InitWriter", "node_at", "Tree"
]

_IND = " " * 8  # a statement of __init__
_HOIST = 60  # a settings object's source longer than this is written once, as a constant


@dataclass
class FileParts:
    """What the classes of one ``model.py`` share: the imports they need, the module-level
    constants (a settings object's source text -> the constant's name), the classes generated
    for submodules (name -> the lines after its header), and the names the file defines itself
    (a class imported under one of them is imported under an alias, see
    :func:`reconfx.emit.sources.defining`)."""

    imports: set[str] = field(default_factory=lambda: {"import torch", "from torch import nn"})
    constants: dict[str, str] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    defined: set[str] = field(default_factory=set)

    def class_name(self, base: str) -> str:
        """A name for a new class of the file: ``base``, else ``base2``, ``base3``..., none
        taken by the file's classes or by a name its imports bind."""
        taken = self.defined | bound_names(self.imports)
        n = 1
        while (base if n == 1 else f"{base}{n}") in taken:
            n += 1
        name = base if n == 1 else f"{base}{n}"
        self.defined.add(name)
        return name


def bound_names(imports: set[str]) -> set[str]:
    """The names import lines bind (``torch``, ``nn``, ``Bottleneck_`` for ``from reconfx.zoo
    import Bottleneck as Bottleneck_``)."""
    names = set()
    for line in imports:
        if line.startswith("from "):
            items = line.partition(" import ")[2].strip("()").split(",")
        else:
            items = line.removeprefix("import ").split(",")
        for item in items:
            words = item.split()
            if words:
                names.add(words[-1].split(".")[0] if len(words) == 1 else words[-1])
    return names


@dataclass
class Tree:
    """The submodule tree the emitted __init__ builds, in order of first use."""

    children: dict[str, Tree] = field(default_factory=dict)
    obj: Any = None  # a leaf module, a Parameter or a buffer tensor

    def child(self, name: str) -> Tree:
        return self.children.setdefault(name, Tree())


def container_kind(node: Tree) -> str:
    keys = list(node.children)
    if keys and all(k.isdigit() for k in keys) and sorted(map(int, keys)) == list(range(len(keys))):
        return "list"
    if all(k.isidentifier() and not keyword.iskeyword(k) for k in keys):
        return "module"
    return "dict"


def _whole(text: str) -> re.Pattern:
    """``text`` where no name character comes right before it."""
    return re.compile(r"(?<![\w.])" + re.escape(text))


def index_order(node: Tree) -> None:
    """Put the items of every list under ``node`` in index order: they are collected in order
    of first use, and a branched item may first be used after the items that follow it."""
    if container_kind(node) == "list":
        node.children = dict(sorted(node.children.items(), key=lambda item: int(item[0])))
    for child in node.children.values():
        index_order(child)


def accessor(root: Tree, path: str) -> str:
    """``self.layer1[0].conv1`` for the path ``layer1.0.conv1``. Below a module that is built
    whole (a leaf's constructor call), each step follows that module's own containers."""
    text, node, built = "self", root, None
    for part in path.split("."):
        if part == MARK:  # the calling task's copy, in a generated class
            text += "[task]"
            node = next(iter(node.children.values()), Tree())
            continue
        if built is not None or part not in node.children:  # inside a leaf
            text += _member(built, part)
            built = getattr(built, "_modules", {}).get(part)
            node = node.children.get(part, Tree())
            continue
        kind = container_kind(node)
        text += f"[{part}]" if kind == "list" else (f'["{part}"]' if kind == "dict" else f".{part}")
        node = node.children[part]
        built = node.obj if isinstance(node.obj, nn.Module) else None
    return text


def _member(owner: nn.Module | None, part: str) -> str:
    """``[2]``, ``["2"]`` or ``.weight``: ``part`` of a module built whole, by its own type."""
    if isinstance(owner, nn.ModuleDict):
        return f'["{part}"]'
    if isinstance(owner, nn.Sequential | nn.ModuleList) and part.isdigit():
        return f"[{part}]"
    return f".{part}" if part.isidentifier() else f"[{part}]"

class InitWriter:
    """``__init__``'s lines for the module tree of ``module``'s graphs: ``generate`` names the
    class written for a submodule run per task stream (or as its traced code); ``base`` is the
    path of the module the class stands for (a generated class's), with a dot."""

    def __init__(self, module: DualGraphModule, parts: FileParts, *, task_containers: set[str],
                 settings: Sequence[Any], tasks: tuple[str, ...], regions: list[StreamRegion],
                 generate: Callable[..., str], base: str = ""):
        self.module = module
        self.parts = parts
        self.task_containers = task_containers
        self.settings = settings
        self.tasks = tasks  # the model's tasks
        self.regions = regions
        self.generate = generate
        self.base = base
        self.tree = Tree()
        # module path -> how __init__ builds it (see reconfx.emit.python.EmittedSource)
        self.built: dict[str, str] = {}
        self.rows: set[str] = set()  # paths of per-task layers on task rows (reconfx.rows)
        self._copies: dict[str, dict[str, str]] = {}  # see _copy_exprs
        self._tie_cache: list[tuple[str, str]] | None = None
        self._swaps: list[tuple[str, PerTask]] = []  # swapped in after a list's line

    def _graphs(self) -> list[fx.Graph]:
        """Every graph the source renders: forward's (one per mode) and each region's body."""
        graphs = [graph for _mode, graph in self.module.graphs()]
        return graphs + [region.body for region in self.regions]

    def collect(self) -> None:
        for graph in self._graphs():
            for node in graph.nodes:
                if node.op in ("call_module", "get_attr") and not region_call(node):
                    for target in self._targets(str(node.target)):
                        node_tree = self.tree
                        for part in target.split("."):
                            node_tree = node_tree.child(part)
                        node_tree.obj = resolve(self.module, target)
                        if isinstance(node_tree.obj, PerTask):  # (its copies are its children)
                            for task, copy_ in node_tree.obj.items():
                                node_tree.child(task).obj = copy_
                            node_tree.obj = None
                            self.rows.add(target)
        index_order(self.tree)

    def _targets(self, target: str) -> list[str]:
        """``target``, or in a generated class's body every task's copy it stands for."""
        if MARK not in target:
            return [target]
        container, _, rest = target.partition(f".{MARK}")
        owner = resolve(self.module, container)
        tasks = [*owner._modules, *owner._parameters]
        return [f"{container}.{task}{rest}" for task in tasks]

    def _leaf_expr(self, path: str, obj: Any) -> str:
        if isinstance(obj, TaskStream):
            return f"{self.generate(path, obj)}()"
        if isinstance(obj, nn.Parameter):
            grad = "" if obj.requires_grad else ", requires_grad=False"
            return f"nn.Parameter({tensor_source(obj, recorded=False)}{grad})"
        if isinstance(obj, torch.Tensor):
            return _buffer(obj)
        built = self._built(path, obj)
        return built.call if built is not None else self._unbuildable(path, obj)

    def _unbuildable(self, path: str, obj: nn.Module) -> str:
        """A module no constructor call or restoring rebuilds (an attribute has no source form):
        a class generated from its own traced code; a compile error where fx cannot trace it
        either (``model.py`` never calls back into the code or the folder that built it)."""
        bodies = _traced(obj)
        failed: Exception | None = None
        if bodies is not None:
            stream = TaskStream(obj, bodies, type(obj).__name__, per_task=False)
            try:
                return f"{self.generate(path, stream, traced=True)}()"
            except (TypeError, ValueError, CheckError) as exc:  # (what it reads has no form)
                failed = exc
        unformed = [k for k, v in own_attributes(obj).items() if not _has_source(v)]
        raise CheckError(
            f"model.py cannot build '{self.base}{path}' ({type(obj).__name__}): no constructor "
            "call rebuilds it, " + (f"its attribute(s) {', '.join(unformed[:4])} have no source "
            "form" if unformed else "its class cannot be imported by name") + ", and "
            + (f"its traced code cannot be written ({failed})" if failed is not None
               else "fx cannot trace its forward"),
            fix=f"register its constructor's arguments before compiling: reconfx.kinds.register("
                f"{type(obj).__name__}, constructor=lambda module: {{...}}), a function giving "
                "the keyword arguments that rebuild it from an instance")

    def _built(self, path: str, obj: nn.Module) -> Constructor | None:
        """The module's constructor call, else the restoring helper's (its imports noted)."""
        built = self._member(path, obj)
        if isinstance(built, Constructor):
            self.built[path] = built.how
            return built
        return None

    def _member(self, name: str, value: Any) -> Constructor | str | None:
        """A module, or a restored module's parameter, buffer or child (None: it has no source
        form); a long settings object in it written as its module-level constant."""
        if isinstance(value, nn.Parameter):
            return self._leaf_expr(name, value)
        if isinstance(value, torch.Tensor):
            return tensor_source(value)
        built = (container(value, self._member) or constructor(value, self.settings)
                 or restored(value, self._member))
        if built is None:
            return None
        self.parts.imports.update(built.imports)
        return self._hoisted(built)

    def _hoisted(self, value: Any) -> Any:
        """``value`` (a constructor, its arguments) with each long settings object's source text
        replaced by the name of a module-level constant holding it (``BERT_CONFIG``)."""
        if isinstance(value, Constructor):
            return dataclasses.replace(value, args=tuple(self._hoisted(a) for a in value.args))
        if isinstance(value, Bracket):
            return dataclasses.replace(value, items=tuple(self._hoisted(a) for a in value.items))
        if isinstance(value, tuple):
            return tuple(self._hoisted(a) for a in value)
        if not isinstance(value, str):
            return value
        # Whole settings texts only (``RobertaConfig(...)`` is not the tail of
        # ``XLMRobertaConfig(...)``), shortest first (a nested one before the one holding it),
        # so the constants depend on this value alone, not on what was emitted before.
        found = {text: _whole(text).search(value) for text in SETTINGS if len(text) > _HOIST}
        present = [text for text, match in found.items() if match]
        for text in sorted(present, key=lambda t: (len(t), found[t].start())):
            if text not in self.parts.constants:
                name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", SETTINGS[text]).upper()
                taken = set(self.parts.constants.values())
                n = 1
                while (name if n == 1 else f"{name}_{n}") in taken:
                    n += 1
                self.parts.constants[text] = name if n == 1 else f"{name}_{n}"
            value = _whole(text).sub(lambda _m, t=text: self.parts.constants[t], value)
        return value

    def _leaf_lines(self, access: str, path: str, obj: Any) -> list[str]:
        if isinstance(obj, torch.Tensor):
            return [assign(_IND, access, self._leaf_expr(path, obj))]
        if isinstance(obj, TaskStream):
            return [assign(_IND, access, f"{self.generate(path, obj)}()")]
        with unswapped(obj) as swaps:  # (built as before the surgery, its per-task layers after)
            built = self._built(path, obj)
            if built is None:
                lines = [assign(_IND, access, self._unbuildable(path, obj))]
            else:
                lines = [statement(_IND, access, f"{built.head}(", built.arguments())]
        for name, per_task in swaps:
            lines += self._swap_lines(f"{path}.{name}", per_task)
        return lines

    def _swap_lines(self, path: str, per_task: PerTask) -> list[str]:
        """``self.layer1[0].conv1 = PerTask({...})`` for a per-task layer inside a module built
        whole; ``per_task_statistics(...)`` of the module's own layer where every task's copy
        holds the same parameters."""
        access = accessor(self.tree, path)
        if shares_parameters(per_task) and tuple(per_task) == self.tasks:
            self.parts.constants.setdefault(render_value(self.tasks), "TASKS")
            return [assign(_IND, access, f"per_task_statistics({access})")]
        node = Tree()
        for task, module in per_task.items():
            node.child(task).obj = module
        self.rows.add(path)
        return self._task_container(access, path, node)

    def lines(self) -> list[str]:
        lines: list[str] = []
        self._emit_children(self.tree, "", lines)
        lines += self._tie_lines()
        if self.regions:
            rows = [f'"{r.method}": {render_value(r.max_rows)}' for r in self.regions]
            lines += [comment(_IND, "Stream batching (eval mode): each shared region "
                              "runs the task streams joined along the batch axis while they "
                              "hold at most this many rows together (None: always; 0: never)."),
                      statement(_IND, "self.stream_rows", "{", rows, "}")]
        return lines

    def _emit_children(self, node: Tree, prefix: str, lines: list[str]) -> None:
        kind = container_kind(node)
        if kind == "list" and self._inline_list(node, prefix):
            return  # (the list's own line builds its items)
        for name, child in node.children.items():
            path = f"{prefix}.{name}" if prefix else name
            access = accessor(self.tree, path)
            if path in self.task_containers or path in self.rows:
                lines += self._task_container(access, path, child)
            elif isinstance(child.obj, torch.Tensor) and not isinstance(child.obj, nn.Parameter):
                owner = access[: -len(name) - 1]
                lines.append(statement(_IND, "", f"{owner}.register_buffer(",
                                       [f'"{name}"', self._leaf_expr(path, child.obj)]))
            elif child.obj is not None:
                lines += self._leaf_lines(access, path, child.obj)
            else:
                if kind != "list" or container_kind(child) != "module":
                    lines.append(self._container_line(access, path, child))
                    swaps, self._swaps = self._swaps, []
                    for inner, per_task in swaps:
                        lines += self._swap_lines(inner, per_task)
                self._emit_children(child, path, lines)

    def _container_line(self, access: str, path: str, node: Tree) -> str:
        kind = container_kind(node)
        if kind == "list" and self._inline_list(node, path):
            items = [self._item_expr(f"{path}.{k}", c) for k, c in node.children.items()]
            return statement(_IND, access, "nn.ModuleList([", items, "])")
        if kind == "list":
            count = len(node.children)
            items = "[nn.Module()]" if count == 1 else f"[nn.Module() for _ in range({count})]"
            return assign(_IND, access, f"nn.ModuleList({items})")
        empty = "nn.ModuleDict()" if kind == "dict" else "nn.Module()"
        return assign(_IND, access, empty)

    def _task_container(self, access: str, path: str, node: Tree) -> list[str]:
        # Each copy is built like the original layer at ``path`` (its weights come from the file).
        stats = self._statistics_copies(path, node)
        if stats is not None:  # ``per_task_statistics(nn.BatchNorm2d(64))``
            return [assign(_IND, access, f"per_task_statistics({stats})")]
        same = self._same_copies(path, node)
        if same is not None:
            # the same copy for each task: ``nn.ModuleDict({task: nn.Linear(8, 8) for ...})``
            head, text, names = same
            ind = _IND
            line = f"{ind}{access} = {head}task: {text} for task in {names}}})"
            if len(line) <= LINE and "\n" not in line:
                return [line]
            if len(f"{ind}{access} = {head}") > LINE:  # (a long path: the value in parentheses)
                return [assign(ind, access, f"{head}task: {text} for task in {names}}})")]
            inner = ind + "    "
            text = text.replace("\n", "\n" + inner)
            return [f"{ind}{access} = {head}", f"{inner}task: {text}",
                    f"{inner}for task in {names}", f"{ind}}})"]
        built = self._copy_exprs(path, node)
        items = [f'"{task}": {text}' for task, text in built.items()]
        ties = self._tie_lines(scope=path)
        note = ("per-task running statistics; affine parameters shared" if ties
                else "branched: one copy per task")
        return [comment(_IND, f"{path}: {note}"),
                statement(_IND, access, self._dict_head(node, path), items, "})"), *ties]

    def _copy_exprs(self, path: str, node: Tree) -> dict[str, str]:
        """Each task's copy at ``path`` as source, written once per path (a constructor is
        searched for and verified)."""
        if path not in self._copies:
            self._copies[path] = {task: self._leaf_expr(path, child.obj)
                                  for task, child in node.children.items()}
        return self._copies[path]

    def _statistics_copies(self, path: str, node: Tree) -> str | None:
        """The layer's constructor where its per-task copies are built alike and share every
        parameter with the first one (a shared norm after a branch point with per-task running
        statistics); else None."""
        built = self._copy_exprs(path, node)
        tasks = tuple(built)
        if len(set(built.values())) != 1 or len(tasks) < 2 or tasks != self.tasks:
            return None
        first = node.children[tasks[0]].obj
        own = [n for n, _p in first.named_parameters()] if isinstance(first, nn.Module) else []
        wanted = {(f"{path}.{t}.{n}", f"{path}.{tasks[0]}.{n}") for t in tasks[1:] for n in own}
        found = {(a, b) for a, b in self._ties() if under(a, path) and under(b, path)}
        if not own or found != wanted:
            return None
        self.parts.constants.setdefault(render_value(tasks), "TASKS")
        return built[tasks[0]]

    def _same_copies(self, path: str, node: Tree) -> tuple[str, str, str] | None:
        """(``nn.ModuleDict({``, the copy's constructor, ``TASKS``) where every task's copy is
        built the same way and none shares a tensor with another; else None."""
        built = self._copy_exprs(path, node)
        if len(set(built.values())) != 1 or len(built) < 2 or self._tie_lines(scope=path):
            return None
        tasks = tuple(built)
        if tasks == self.tasks:
            self.parts.constants.setdefault(render_value(tasks), "TASKS")
        names = "TASKS" if tasks == self.tasks else render_value(tasks)
        return self._dict_head(node, path), built[tasks[0]], names

    def _dict_head(self, node: Tree, path: str) -> str:
        if path in self.rows:
            return "PerTask({"
        params = all(isinstance(c.obj, nn.Parameter) for c in node.children.values())
        return "nn.ParameterDict({" if params else "nn.ModuleDict({"

    def _inline_list(self, node: Tree, path: str) -> bool:
        """A ModuleList whose items are all plain leaves, or copies per task each built the same
        way, is written as one ``nn.ModuleList([...])``."""
        def inline(key: str, child: Tree) -> bool:
            if f"{path}.{key}" not in self.task_containers:
                return child.obj is not None
            return (child.obj is None and all(c.obj is not None for c in child.children.values())
                    and self._same_copies(f"{path}.{key}", child) is not None)

        return all(inline(k, c) for k, c in node.children.items())

    def _item_expr(self, path: str, node: Tree) -> str:
        """A ModuleList item written inline: a leaf's constructor (its per-task layers swapped
        in after the list's line), or one copy per task."""
        if node.obj is not None:
            with unswapped(node.obj) as swaps:
                expr = self._leaf_expr(path, node.obj)
            self._swaps += [(f"{path}.{name}", per_task) for name, per_task in swaps]
            return expr
        head, text, names = self._same_copies(path, node)
        return f"{head}task: {text} for task in {names}}})"

    def _tie_lines(self, scope: str | None = None) -> list[str]:
        """``self.b.weight = self.a.weight`` where separately built leaves share a Parameter;
        with ``scope``, only ties among the parameters under that path."""
        lines = []
        for name, canon in self._ties():
            inside = scope is not None and under(name, scope) and under(canon, scope)
            if inside or (scope is None and not self._scoped(canon, name)):
                lines.append(assign(_IND, accessor(self.tree, name),
                                    accessor(self.tree, canon)))
        return lines

    def _ties(self) -> list[tuple[str, str]]:
        """(name, first name) for each parameter name that repeats an earlier Parameter object
        built by a different leaf."""
        if self._tie_cache is None:
            leaves = set(leaf_paths(self.tree))
            first: dict[int, tuple[str, str]] = {}
            self._tie_cache = []
            for name, param in self.module.named_parameters(remove_duplicate=False):
                leaf = _owning_leaf(name, leaves)
                if id(param) not in first:
                    first[id(param)] = (name, leaf)
                elif first[id(param)][1] != leaf:
                    self._tie_cache.append((name, first[id(param)][0]))
        return self._tie_cache

    def _scoped(self, a: str, b: str) -> bool:
        return any(under(a, s) and under(b, s) for s in self.task_containers)

def _has_source(value: Any) -> bool:
    try:
        sourced(value)
    except TypeError:
        return False
    return True


def node_at(tree: Tree, path: str) -> Tree:
    for part in path.split("."):
        tree = tree.children[part]
    return tree


def _owning_leaf(name: str, leaves: set[str]) -> str:
    """The longest leaf path that ``name`` lies under (itself when none)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in leaves:
            return prefix
    return name


def leaf_paths(tree: Tree, prefix: str = "") -> list[str]:
    out = []
    for name, child in tree.children.items():
        path = f"{prefix}.{name}" if prefix else name
        out += [path] if child.obj is not None else leaf_paths(child, path)
    return out


def _traced(module: nn.Module) -> dict[str, fx.Graph] | None:
    """``module``'s forward traced by fx in each mode (one graph when they are the same), its
    submodules kept as calls by reconfx's leaf rule; None when fx cannot trace it."""
    was = module.training
    bodies = {}
    try:
        for mode in ("train", "eval"):
            module.train(mode == "train")
            bodies[mode] = leaf_tracer().trace(copy.copy(module))
    except Exception:
        return None
    finally:
        module.train(was)
    if same_graph(bodies["train"], bodies["eval"]):
        del bodies["eval"]
    return bodies


def _buffer(t: torch.Tensor) -> str:
    """A buffer's value as the class computes it, so the model runs before its weights load
    (the weights file holds the value; zeros where no expression is found)."""
    return tensor_source(t) or tensor_source(torch.zeros_like(t, device="cpu"))



def buildable(module: nn.Module, settings: Sequence[Any] = ()) -> bool:
    """Whether ``model.py`` can build ``module`` without the spec's factory: by a constructor,
    as a container, or restored, down to every member."""
    def member(_name: str, value: Any) -> Any:  # (as PythonEmitter._member decides)
        if isinstance(value, nn.Parameter):
            return "parameter"
        if isinstance(value, torch.Tensor):
            return tensor_source(value)
        return (container(value, member) or constructor(value, settings)
                or restored(value, member))

    with unswapped(module) as swaps:  # (its per-task layers are written after it is built)
        built = member("", module) is not None
    if not built or not swaps:
        return built
    uses: dict[int, int] = {}  # how often ``module`` holds each parameter
    for _name, param in module.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    return all(_apart(per_task, uses) and all(member("", m) is not None for m in per_task.values())
               for _name, per_task in swaps)


def _apart(per_task: PerTask, uses: dict[int, int]) -> bool:
    """Whether the line that swaps ``per_task`` in builds its tensors as they are: each task's
    copy holds tensors of its own, or all copies hold the same parameters (per-task running
    statistics); no tensor of it is tied to one elsewhere (``uses``: how often the module
    holding it holds each parameter)."""
    if shares_parameters(per_task):
        return all(uses[id(p)] == len(per_task) for p in next(iter(per_task.values())).parameters())
    return all(uses[id(p)] == 1 for m in per_task.values() for p in m.parameters())


