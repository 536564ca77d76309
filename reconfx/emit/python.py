"""The Python emitter: a graph module as one standalone, readable ``model.py``.

``__init__`` builds each submodule explicitly from its constructor arguments (one line per leaf,
at its original path, so the weights load by name and a branch changes only its own lines);
``forward`` names values after module paths (``layer1_0_conv1``) with a ``_<task>`` suffix on
task streams and a comment at each branch point. The output is deterministic: the same graph
gives byte-identical text.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import importlib
import importlib.util
import inspect
import keyword
import operator
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from reconfx.aten import Spelling, packet, spelling
from reconfx.calls import MARK, TaskStream
from reconfx.emit.constructors import Bracket, Constructor, constructor, own_attributes
from reconfx.emit.merge import Alternatives, merge_modes
from reconfx.emit.render import (
    LINE,
    LOCAL,
    assign,
    bracketed,
    chain,
    comment,
    infix,
    local_name,
    render_arg,
    render_index,
    render_value,
    statement,
    unique_name,
)
from reconfx.emit.restore import (
    RESTORE_HELPER,
    RESTORE_IMPORTS,
    container,
    restored,
    tensor_source,
)
from reconfx.emit.sources import SETTINGS, sourced
from reconfx.errors import CheckError
from reconfx.facts import facts
from reconfx.graph import DualGraphModule, output_node, region_call, resolve, same_graph
from reconfx.rows import PerTask, shares_parameters, unswapped
from reconfx.streams import StreamRegion, fits
from reconfx.tracing import leaf_tracer

__all__ = [
    "buildable", "emit_python", "EmittedSource", "PythonEmitter"
]

_INFIX = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
    operator.and_: "&", operator.or_: "|", operator.xor: "^", operator.lshift: "<<",
    operator.rshift: ">>", operator.eq: "==", operator.ne: "!=", operator.lt: "<",
    operator.le: "<=", operator.gt: ">", operator.ge: ">=",
}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~", operator.not_: "not "}
_HOIST = 60  # a settings object's source longer than this is written once, as a constant
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
_RESERVED = set(dir(builtins)) | {"self", "torch", "nn", "F", "operator", "math"}


@dataclass
class EmittedSource:
    source: str
    # module path -> how __init__ builds it: "constructor" (its class's), "restored" (from its
    # recorded state, see reconfx.emit.restore), "generated" (a class for a submodule run per
    # task stream) or "traced" (a class holding its traced code: nothing rebuilds it)
    built: dict[str, str] = field(default_factory=dict)


@dataclass
class _Tree:
    """The submodule tree the emitted __init__ builds, in order of first use."""

    children: dict[str, _Tree] = field(default_factory=dict)
    obj: Any = None  # a leaf module, a Parameter or a buffer tensor

    def child(self, name: str) -> _Tree:
        return self.children.setdefault(name, _Tree())


def _container_kind(node: _Tree) -> str:
    keys = list(node.children)
    if keys and all(k.isdigit() for k in keys) and sorted(map(int, keys)) == list(range(len(keys))):
        return "list"
    if all(k.isidentifier() and not keyword.iskeyword(k) for k in keys):
        return "module"
    return "dict"


def _whole(text: str) -> re.Pattern:
    """``text`` where no name character comes right before it."""
    return re.compile(r"(?<![\w.])" + re.escape(text))


def _index_order(node: _Tree) -> None:
    """Put the items of every list under ``node`` in index order: they are collected in order
    of first use, and a branched item may first be used after the items that follow it."""
    if _container_kind(node) == "list":
        node.children = dict(sorted(node.children.items(), key=lambda item: int(item[0])))
    for child in node.children.values():
        _index_order(child)


def _access(root: _Tree, path: str) -> str:
    """``self.layer1[0].conv1`` for the path ``layer1.0.conv1``. Below a module that is built
    whole (a leaf's constructor call), each step follows that module's own containers."""
    text, node, built = "self", root, None
    for part in path.split("."):
        if part == MARK:  # the calling task's copy, in a generated class
            text += "[task]"
            node = next(iter(node.children.values()), _Tree())
            continue
        if built is not None or part not in node.children:  # inside a leaf
            text += _member(built, part)
            built = getattr(built, "_modules", {}).get(part)
            node = node.children.get(part, _Tree())
            continue
        kind = _container_kind(node)
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


@dataclass
class _Scope:
    """The names of one method body being written: each value's local name, the names taken,
    and the task suffix of values whose nodes carry no task (a region's ops written for one
    stream)."""

    tree: _Tree
    chains: dict[fx.Node, list[fx.Node]]
    room: int  # see _suffix_room
    suffix: str = ""
    names: dict[fx.Node, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    commented: set[str] = field(default_factory=set)  # branch points already commented
    unpacked: set[fx.Node] = field(default_factory=set)  # items named where they are made
    unused: set[fx.Node] = field(default_factory=set)  # values computed but read by nobody
    loop_items: set[str] = field(default_factory=set)  # names only loops bind (``layer``)

    def name_of(self, node: fx.Node) -> str:
        if node.op == "get_attr":
            return chain(_access(self.tree, str(node.target)))
        return self.names[node]

    def fresh(self, node: fx.Node) -> str:
        stem, suffix = _base_name(node)
        return _fresh((stem, suffix or self.suffix), self.taken, self.room)

    def inner(self, suffix: str, chains: dict[fx.Node, list[fx.Node]],
              taken: set[str] | None = None) -> _Scope:
        """A scope for a region body's ops (``chains``: the body's loops)."""
        return _Scope(self.tree, chains, self.room, suffix, taken=self.taken if taken is None
                      else taken, commented=self.commented, loop_items=self.loop_items)


class PythonEmitter:
    def __init__(self, module: DualGraphModule, class_name: str, *, doc: str,
                 task_containers: set[str], branch_notes: dict[str, str] | None = None,
                 settings: Sequence[Any] = ()):
        self.module = module
        self.class_name = class_name
        self.doc = doc
        self.task_containers = task_containers
        self.branch_notes = branch_notes or {}
        self.settings = settings
        self.constants: dict[str, str] = {}  # settings source text -> its constant's name
        self.classes: dict[str, list[str]] = {}  # generated class -> its lines after the header
        self.base = ""  # the path of the module this class stands for, with a dot
        self.spelled: dict[str, set[str]] = {}  # see _mode_arguments
        result = output_node(module.train_graph).args[0]
        self.tasks = tuple(result) if isinstance(result, dict) else ()  # the model's tasks
        self.imports: set[str] = {"import torch", "from torch import nn"}
        self.tree = _Tree()
        self.built: dict[str, str] = {}
        self._copies: dict[str, dict[str, str]] = {}  # see _copy_exprs
        self.nesting = 0  # extra indentation levels (a forward body rendered inside an if)
        self._tie_cache: list[tuple[str, str]] | None = None
        self.rows: set[str] = set()  # paths of per-task layers on task rows (reconfx.rows)
        self._swaps: list[tuple[str, PerTask]] = []  # swapped in after a list's line
        self.regions = sorted({id(r): r for r in self.module.modules()
                               if isinstance(r, StreamRegion)}.values(), key=lambda r: r.method)

    # -- __init__ ------------------------------------------------------------------------------
    def _graphs(self) -> list[fx.Graph]:
        """Every graph the source renders: forward's (one per mode) and each region's body."""
        graphs = [graph for _mode, graph in self.module.graphs()]
        return graphs + [region.body for region in self.regions]

    def _collect(self) -> None:
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
        _index_order(self.tree)

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
            return f"{self._generated(path, obj)}()"
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
                return f"{self._generated(path, stream, traced=True)}()"
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
        sub = PythonEmitter(stream, "", doc=doc, task_containers=inner, settings=self.settings)
        sub.base, sub.constants, sub.tasks = f"{self.base}{path}.", self.constants, self.tasks
        sub._collect()
        body = sub.class_lines()
        self.imports |= sub.imports
        self.built.update({f"{path}.{k}": how for k, how in sub.built.items()})
        self.built[path] = "traced" if traced else "generated"
        for name, lines in self.classes.items():
            if lines == body:
                return name
        base, n = f"{'Branched' if stream.per_task else 'Traced'}{stream.kind}", 1
        while (base if n == 1 else f"{base}{n}") in self.classes:
            n += 1
        name = base if n == 1 else f"{base}{n}"
        self.classes[name] = body
        return name

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
        self.imports.update(built.imports)
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
            if text not in self.constants:
                name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", SETTINGS[text]).upper()
                taken = set(self.constants.values())
                n = 1
                while (name if n == 1 else f"{name}_{n}") in taken:
                    n += 1
                self.constants[text] = name if n == 1 else f"{name}_{n}"
            value = _whole(text).sub(lambda _m, t=text: self.constants[t], value)
        return value

    def _leaf_lines(self, access: str, path: str, obj: Any) -> list[str]:
        if isinstance(obj, torch.Tensor):
            return [assign(self._indent(2), access, self._leaf_expr(path, obj))]
        if isinstance(obj, TaskStream):
            return [assign(self._indent(2), access, f"{self._generated(path, obj)}()")]
        with unswapped(obj) as swaps:  # (built as before the surgery, its per-task layers after)
            built = self._built(path, obj)
            if built is None:
                lines = [assign(self._indent(2), access, self._unbuildable(path, obj))]
            else:
                lines = [statement(self._indent(2), access, f"{built.head}(", built.arguments())]
        for name, per_task in swaps:
            lines += self._swap_lines(f"{path}.{name}", per_task)
        return lines

    def _swap_lines(self, path: str, per_task: PerTask) -> list[str]:
        """``self.layer1[0].conv1 = PerTask({...})`` for a per-task layer inside a module built
        whole; ``per_task_statistics(...)`` of the module's own layer where every task's copy
        holds the same parameters."""
        access = _access(self.tree, path)
        if shares_parameters(per_task) and tuple(per_task) == self.tasks:
            self.constants.setdefault(render_value(self.tasks), "TASKS")
            return [assign(self._indent(2), access, f"per_task_statistics({access})")]
        node = _Tree()
        for task, module in per_task.items():
            node.child(task).obj = module
        self.rows.add(path)
        return self._task_container(access, path, node)

    def _init_lines(self) -> list[str]:
        lines: list[str] = []
        self._emit_children(self.tree, "", lines)
        lines += self._tie_lines()
        if self.regions:
            rows = [f'"{r.method}": {render_value(r.max_rows)}' for r in self.regions]
            lines += [comment(self._indent(2), "Stream batching (eval mode): each shared region "
                              "runs the task streams joined along the batch axis while they "
                              "hold at most this many rows together (None: always; 0: never)."),
                      statement(self._indent(2), "self.stream_rows", "{", rows, "}")]
        return lines

    def _emit_children(self, node: _Tree, prefix: str, lines: list[str]) -> None:
        kind = _container_kind(node)
        if kind == "list" and self._inline_list(node, prefix):
            return  # (the list's own line builds its items)
        for name, child in node.children.items():
            path = f"{prefix}.{name}" if prefix else name
            access = _access(self.tree, path)
            if path in self.task_containers or path in self.rows:
                lines += self._task_container(access, path, child)
            elif isinstance(child.obj, torch.Tensor) and not isinstance(child.obj, nn.Parameter):
                owner = access[: -len(name) - 1]
                lines.append(statement(self._indent(2), "", f"{owner}.register_buffer(",
                                       [f'"{name}"', self._leaf_expr(path, child.obj)]))
            elif child.obj is not None:
                lines += self._leaf_lines(access, path, child.obj)
            else:
                if kind != "list" or _container_kind(child) != "module":
                    lines.append(self._container_line(access, path, child))
                    swaps, self._swaps = self._swaps, []
                    for inner, per_task in swaps:
                        lines += self._swap_lines(inner, per_task)
                self._emit_children(child, path, lines)

    def _container_line(self, access: str, path: str, node: _Tree) -> str:
        kind = _container_kind(node)
        if kind == "list" and self._inline_list(node, path):
            items = [self._item_expr(f"{path}.{k}", c) for k, c in node.children.items()]
            return statement(self._indent(2), access, "nn.ModuleList([", items, "])")
        if kind == "list":
            count = len(node.children)
            items = "[nn.Module()]" if count == 1 else f"[nn.Module() for _ in range({count})]"
            return assign(self._indent(2), access, f"nn.ModuleList({items})")
        empty = "nn.ModuleDict()" if kind == "dict" else "nn.Module()"
        return assign(self._indent(2), access, empty)

    def _task_container(self, access: str, path: str, node: _Tree) -> list[str]:
        # Each copy is built like the original layer at ``path`` (its weights come from the file).
        stats = self._statistics_copies(path, node)
        if stats is not None:  # ``per_task_statistics(nn.BatchNorm2d(64))``
            return [assign(self._indent(2), access, f"per_task_statistics({stats})")]
        same = self._same_copies(path, node)
        if same is not None:
            # the same copy for each task: ``nn.ModuleDict({task: nn.Linear(8, 8) for ...})``
            head, text, names = same
            ind = self._indent(2)
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
        return [comment(self._indent(2), f"{path}: {note}"),
                statement(self._indent(2), access, self._dict_head(node, path), items, "})"), *ties]

    def _copy_exprs(self, path: str, node: _Tree) -> dict[str, str]:
        """Each task's copy at ``path`` as source, written once per path (a constructor is
        searched for and verified)."""
        if path not in self._copies:
            self._copies[path] = {task: self._leaf_expr(path, child.obj)
                                  for task, child in node.children.items()}
        return self._copies[path]

    def _statistics_copies(self, path: str, node: _Tree) -> str | None:
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
        found = {(a, b) for a, b in self._ties() if _under(a, path) and _under(b, path)}
        if not own or found != wanted:
            return None
        self.constants.setdefault(render_value(tasks), "TASKS")
        return built[tasks[0]]

    def _same_copies(self, path: str, node: _Tree) -> tuple[str, str, str] | None:
        """(``nn.ModuleDict({``, the copy's constructor, ``TASKS``) where every task's copy is
        built the same way and none shares a tensor with another; else None."""
        built = self._copy_exprs(path, node)
        if len(set(built.values())) != 1 or len(built) < 2 or self._tie_lines(scope=path):
            return None
        tasks = tuple(built)
        if tasks == self.tasks:
            self.constants.setdefault(render_value(tasks), "TASKS")
        names = "TASKS" if tasks == self.tasks else render_value(tasks)
        return self._dict_head(node, path), built[tasks[0]], names

    def _dict_head(self, node: _Tree, path: str) -> str:
        if path in self.rows:
            return "PerTask({"
        params = all(isinstance(c.obj, nn.Parameter) for c in node.children.values())
        return "nn.ParameterDict({" if params else "nn.ModuleDict({"

    def _inline_list(self, node: _Tree, path: str) -> bool:
        """A ModuleList whose items are all plain leaves, or copies per task each built the same
        way, is written as one ``nn.ModuleList([...])``."""
        def inline(key: str, child: _Tree) -> bool:
            if f"{path}.{key}" not in self.task_containers:
                return child.obj is not None
            return (child.obj is None and all(c.obj is not None for c in child.children.values())
                    and self._same_copies(f"{path}.{key}", child) is not None)

        return all(inline(k, c) for k, c in node.children.items())

    def _item_expr(self, path: str, node: _Tree) -> str:
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
            inside = scope is not None and _under(name, scope) and _under(canon, scope)
            if inside or (scope is None and not self._scoped(canon, name)):
                lines.append(assign(self._indent(2), _access(self.tree, name),
                                    _access(self.tree, canon)))
        return lines

    def _ties(self) -> list[tuple[str, str]]:
        """(name, first name) for each parameter name that repeats an earlier Parameter object
        built by a different leaf."""
        if self._tie_cache is None:
            leaves = set(_leaf_paths(self.tree))
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
        return any(_under(a, s) and _under(b, s) for s in self.task_containers)

    # -- forward -------------------------------------------------------------------------------
    def _forward(self, graph: fx.Graph, method: str) -> list[str]:
        """``method``'s source: forward (or a train/eval variant) returning the task dict."""
        scope = _Scope(self.tree, _chains(graph, self.tree), _suffix_room(graph))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for n in placeholders:
            scope.names[n] = str(n.target)
            scope.taken.add(str(n.target))
        params = ["self"] + [f"{scope.names[n]}: "
                             f"{facts(n).type or 'torch.Tensor'}"
                             for n in placeholders]
        result = output_node(graph).args[0]
        returns = ("dict[str, torch.Tensor]" if isinstance(result, dict) else "torch.Tensor"
                   if isinstance(result, fx.Node) else "tuple[torch.Tensor, ...]")
        lines = [statement(self._indent(1), "", f"def {method}(", params, f") -> {returns}:")]
        for node in graph.nodes:
            if node.op in ("placeholder", "get_attr") or _region_item(node):
                continue
            if node.op == "output":
                if isinstance(result, dict):
                    outs = [f'"{t}": {render_value(n, scope.name_of)}' for t, n in result.items()]
                    lines.append(statement(self._indent(2), "", "return {", outs, "}"))
                else:
                    lines.append(f"{self._indent(2)}return {render_value(result, scope.name_of)}")
            elif region_call(node):
                lines.append(self._region(node, scope))
            else:
                lines += self._statement(node, scope)
        return lines

    def _statement(self, node: fx.Node, scope: _Scope) -> list[str]:
        """The statement(s) computing ``node``, its value named in ``scope`` (none where the
        value keeps another's name or is written with the call it comes from)."""
        same = _identity_input(node)
        if same is not None:  # x + 0 and the like: the value keeps its name
            scope.names[node] = scope.name_of(same)
            return []
        if node in scope.chains:  # ``for layer in self.encoder.layer[:5]: h = layer(h)``
            scope.unpacked.update(scope.chains[node])
            return [self._loop_lines(scope.chains[node], scope)]
        if _folded(node) or node in scope.unpacked:  # written with the call (``f(x)[0]``)
            return []
        note = self._comment(node, scope.commented)
        lines = [note] if note else []
        items = _unpacked(node, self.module)
        if items:  # ``a, b = self.block(x, "left")``
            scope.unpacked.update(items)
            lhs = [scope.fresh(item) for item in items]
            scope.names.update(zip(items, lhs, strict=True))
            return [*lines, self._node_line(node, ", ".join(lhs), scope.name_of)]
        if facts(node).streams:  # ``x_streams = torch.cat([x, x])``
            first = node.args[0]
            joined = first[0] if isinstance(first, list | tuple) else first
            stem = f"{scope.name_of(joined).rstrip('_')}_streams"
            scope.names[node] = _fresh((stem, ""), scope.taken, scope.room)
        else:
            scope.names[node] = scope.fresh(node)
        # kept for its effect (an in-place op, set_grad_enabled) when unused: no name bound
        used = node.users and node not in scope.unused
        return [*lines, self._node_line(node, scope.names[node] if used else "", scope.name_of)]

    def _loop_lines(self, chain: list[fx.Node], scope: _Scope) -> str:
        """A chain of calls of a ``ModuleList``'s consecutive items as one loop (one statement
        of the method, so both modes' renderings compare it whole)."""
        calls = [n for n in chain if n.op == "call_module"]
        container, _, first = str(calls[0].target).rpartition(".")
        last = int(first) + len(calls)
        size = len(_node_at(self.tree, container).children)
        items = _access(self.tree, container)
        if (int(first), last) != (0, size):
            items += f"[{first if first != '0' else ''}:{last if last != size else ''}]"
        ind, carried = self._indent(2), chain[-1]
        suffix = _base_name(carried)[1] or scope.suffix  # (a task stream's loop: its task's)
        var = _fresh((local_name(container.replace(".", "_"), LOCAL), suffix), scope.taken,
                     scope.room)
        if "layer" not in scope.taken:  # (every loop rebinds it: one name serves them all)
            scope.loop_items.add("layer")
        item = "layer" if "layer" in scope.loop_items else _fresh(("layer", ""), scope.taken)
        scope.taken.add(item)
        scope.names[carried] = var
        args = [var, *_call_arguments(calls[0], scope.name_of)[1:]]
        tail = (f")[{render_index(carried.args[1], scope.name_of)}]"
                if carried.op == "call_function" else ")")
        return "\n".join([assign(ind, var, scope.name_of(calls[0].args[0])),
                          f"{ind}for {item} in {items}:",
                          statement(ind + "    ", var, f"{item}(", args, tail)])

    def _region(self, node: fx.Node, scope: _Scope) -> Alternatives:
        """A stream-batched region's call as ``if not fits(rows, cap): <each task stream's
        ops> else: <the streams joined: torch.cat, the ops once, a split>``, its outputs named
        as the region's results are."""
        region: StreamRegion = resolve(self.module, str(node.target))
        body, tasks, (n_in, n_rep, _n_shared) = region.body, region.tasks, region.counts
        inputs = [n for n in body.nodes if n.op == "placeholder"]
        outputs = output_node(body).args[0]
        ops = [n for n in body.nodes if n.op not in ("placeholder", "output", "get_attr")]
        args = [render_value(a, scope.name_of) for a in node.args]
        rest = args[len(tasks) * n_in:]
        results = {u.args[1]: u for u in node.users}
        ind = self._indent(2)
        chains = _chains(body, self.tree)

        def one_by_one(scope: _Scope) -> list[str]:
            """Each stream's ops, one stream after another (as the train graph has them), the
            region's results named in ``scope``."""
            lines = []
            scopes = [scope.inner(f"_{task}", chains=chains) for task in tasks]
            for t, inner in enumerate(scopes):
                inner.names.update(zip(inputs, args[t * n_in:(t + 1) * n_in] + rest,
                                       strict=True))
                inner.unused.update(o for k, o in enumerate(outputs)
                                    if k * len(tasks) + t not in results and len(o.users) == 1)
            for inner in scopes:
                for op in ops:
                    lines += self._statement(op, inner)
            for k, out in enumerate(outputs):
                for t, inner in enumerate(scopes):
                    if k * len(tasks) + t in results:
                        scope.names[results[k * len(tasks) + t]] = inner.name_of(out)
            return lines

        self.nesting += 2  # (also one level deeper, for merge_modes: the same names)
        try:
            deeper = one_by_one(dataclasses.replace(scope, names=dict(scope.names),
                                                    taken=set(scope.taken),
                                                    commented=set(scope.commented)))
        finally:
            self.nesting -= 2
        self.nesting += 1
        try:
            streams = one_by_one(scope)
            joined = [comment(self._indent(2), f"{_span(region.modules_called)}: shared; the "
                              f"task streams {', '.join(tasks)} run joined along the batch "
                              "axis (stream batching)")]
            # (its names are visible only in this branch: later names need not avoid them)
            together = scope.inner("", taken=set(scope.taken), chains=chains)
            joined += self._joined_inputs(together, inputs, args=args, streams=len(tasks),
                                          n_in=n_in, n_rep=n_rep)
            for op in ops:
                joined += self._statement(op, together)
            for k, out in enumerate(outputs):
                names = [scope.names[results[k * len(tasks) + t]]
                         if k * len(tasks) + t in results else "_" for t in range(len(tasks))]
                # (not .chunk: exporters would fix the batch size its chunks depend on)
                split = f"{together.name_of(out)}.unflatten(0, ({len(tasks)}, -1)).unbind()"
                line = f"{self._indent(2)}{', '.join(names)} = {split}"
                joined.append(line if len(line) <= LINE else statement(
                    self._indent(2), "", "(", names, f") = {split}"))
        finally:
            self.nesting -= 1
        rows = f"{len(tasks)} * {args[0]}.shape[0]"
        return Alternatives(ind, "not fits(", [rows, f'self.stream_rows["{region.method}"]'],
                            [streams, deeper], joined)

    def _joined_inputs(self, scope: _Scope, inputs: list[fx.Node], *, args: list[str],
                       streams: int, n_in: int, n_rep: int) -> list[str]:
        """The region's inputs for all streams joined: each stream input concatenated, each
        shared input with a batch axis repeated per stream (a size multiplied), the rest as
        they are."""
        lines = []
        rest = args[streams * n_in:]
        for i, param in enumerate(inputs):
            if i >= n_in + n_rep:
                scope.names[param] = rest[i - n_in]
                continue
            ind = self._indent(2)
            if i < n_in:
                name = scope.fresh(param)
                parts = [args[t * n_in + i] for t in range(streams)]
            else:  # named after the value it repeats (``mask_joined``)
                value = rest[i - n_in]
                stem = value if value.isidentifier() else _base_name(param)[0]
                name = _fresh((local_name(f"{stem}_joined", LOCAL), ""), scope.taken)
                parts = [value] * streams
            scope.names[param] = name
            if i >= n_in and facts(param).type not in (None, "torch.Tensor"):  # (``batch * 4``)
                lines.append(infix(ind, name, parts[0], "*", str(streams)))
                continue
            width = LINE - len(ind) - 16
            lines.append(statement(ind, name, "torch.cat(", [bracketed("[", parts, "]", width)]))
        return lines

    def _comment(self, node: fx.Node, commented: set[str]) -> str | None:
        """One comment per branch point, before the first task's first use of the layer."""
        layer = facts(node).branch_point
        if layer is None or layer in commented:
            return None
        commented.add(layer)
        note = self.branch_notes.get(layer, "")
        if self.rows:
            return comment(self._indent(2), f"branch point: {layer}{note}; from here the task "
                           "streams run as one tensor, the tasks' batches one after another")
        return comment(self._indent(2), f"branch point: {layer}{note}; one copy per task from "
                       "here")

    def _node_line(self, node: fx.Node, lhs: str, name_of: Any) -> str:
        ind = self._indent(2)
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(source, fx.Node) and _folded(source):
            return statement(ind, lhs, f"{_access(self.tree, str(source.target))}(",
                             _call_arguments(source, name_of),
                             f")[{render_index(node.args[1], name_of)}]")
        args = _call_arguments(node, name_of, self._spelled(node))
        if node.op == "call_module":
            return statement(ind, lhs, f"{_access(self.tree, str(node.target))}(", args)
        if node.op == "call_method":
            return statement(ind, lhs, f"{args[0]}.{node.target}(", args[1:])
        target = node.target
        if packet(target) == "slice" and not node.kwargs and isinstance(node.args[0], fx.Node):
            return assign(ind, lhs, f"{_operand(node.args[0], name_of)}"
                                    f"[{render_index(_slice_index(node.args[1:]), name_of)}]")
        plain = spelling(node)
        if plain is not None:
            return self._plain_line(plain, node, lhs, name_of)
        if target in _INFIX and len(node.args) == 2 and not node.kwargs:
            return infix(ind, lhs, _operand(node.args[0], name_of), _INFIX[target],
                         _operand(node.args[1], name_of))
        if target in _UNARY and len(node.args) == 1:
            return assign(ind, lhs, f"{_UNARY[target]}{_operand(node.args[0], name_of)}")
        if target is getattr and len(node.args) == 2 and str(node.args[1]).isidentifier():
            return assign(ind, lhs, f"{_operand(node.args[0], name_of)}.{node.args[1]}")
        if target is operator.getitem and not node.kwargs:
            return assign(ind, lhs, f"{_operand(node.args[0], name_of)}"
                                    f"[{render_index(node.args[1], name_of)}]")
        return statement(ind, lhs, f"{self._function(target)}(", args)

    def _plain_line(self, plain: Spelling, node: fx.Node, lhs: str, name_of: Any) -> str:
        ind = self._indent(2)
        if plain.kind == "infix":
            return infix(ind, lhs, _operand(node.args[0], name_of), plain.name,
                         _operand(node.args[1], name_of))
        if plain.kind == "unary":
            return assign(ind, lhs, f"{plain.name}{_operand(node.args[0], name_of)}")
        args = _call_arguments(node, name_of, self._spelled(node))
        if plain.kind == "method":
            return statement(ind, lhs, f"{args[0]}.{plain.name}(", args[1:])
        return statement(ind, lhs, f"{plain.name}(", args)

    def _function(self, target: Any) -> str:
        if isinstance(target, torch._ops.OpOverload):
            return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
        qualified = fx.node._get_qualified_name(target)
        if qualified.startswith("builtins."):
            return qualified.removeprefix("builtins.")
        module = qualified.rpartition(".")[0]
        if module and not module.startswith("torch"):
            self.imports.add(f"import {module}")
        return qualified

    def _indent(self, level: int) -> str:
        return "    " * (level + self.nesting)

    # -- whole file ----------------------------------------------------------------------------
    def class_lines(self) -> list[str]:
        """The class's docstring, ``__init__`` and methods (the lines after its header)."""
        init = self._init_lines()
        if self.module.dual:
            fwd = self._one_forward()
        else:
            fwd = self._forward(self.module.train_graph, "forward")
        doc = [*_docstring(self.doc, "    "), ""] if self.doc and not self.class_name else []
        return [*doc, "    def __init__(self) -> None:", "        super().__init__()", *init,
                "", *fwd]

    def emit(self) -> EmittedSource:
        self._collect()
        lines = self.class_lines()
        for name, alias in self._aliased().items():  # an imported class named like ours
            call = re.compile(rf"(?<![\w.]){re.escape(name)}(?=\()")
            lines = [call.sub(alias, line) for line in lines]
            self.classes = {k: [call.sub(alias, line) for line in body]
                            for k, body in self.classes.items()}
            self.constants = {call.sub(alias, text): n for text, n in self.constants.items()}
        generated = [line for name, body in self.classes.items()
                     for line in ["", "", f"class {name}(nn.Module):", *body]]
        helper: list[str] = []
        if self.rows:
            self.imports.add("from typing import Any")
            helper += ["", *inspect.getsource(PerTask).rstrip("\n").splitlines(), ""]
        if any("per_task_statistics(" in line for line in [*lines, *generated]):
            self.imports.add("import copy")
            text = STATISTICS_HELPER
            if self.rows:  # (on task rows: each copy runs on its task's rows)
                text = text.replace("nn.ModuleDict", "PerTask").replace(
                    "on each task's stream", "on the task streams")
            helper += ["", *text.rstrip("\n").splitlines(), ""]
        if any("_restored(" in line for line in [*lines, *generated]):  # (also nested)
            self.imports.update(RESTORE_IMPORTS)
            helper += ["", *RESTORE_HELPER.rstrip("\n").splitlines(), ""]
        if self.regions:
            helper += ["", *inspect.getsource(fits).rstrip("\n").splitlines(), ""]
        for line in sorted(i for i in self.imports if i.startswith(f"from {_OWN_CLASSES} ")):
            # (reconfx's own heads are written into the file: model.py needs no reconfx)
            self.imports.discard(line)
            cls = getattr(importlib.import_module(_OWN_CLASSES), line.rpartition(" ")[2])
            helper += ["", *inspect.getsource(cls).rstrip("\n").splitlines(), ""]
        constants = [statement("", name, text[:text.index("(") + 1],
                               _split_arguments(text[text.index("(") + 1:-1]), ")")
                     for text, name in sorted(self.constants.items(), key=lambda c: c[1])]
        if constants:  # (one blank line after the imports, two before a definition)
            helper = [*constants, "", *helper] if helper else [*constants, ""]
        out = [f'"""{self.doc}"""', "", *_sorted_imports(self.imports), "", *helper]
        if generated:
            out += generated[1:] + [""]
        out += ["", f"class {self.class_name}(nn.Module):", *lines, ""]
        return EmittedSource("\n".join(out), dict(self.built))

    def _aliased(self) -> dict[str, str]:
        """Imported names that the classes this file defines would shadow -> the alias they are
        imported as instead (``from reconfx.zoo import Bottleneck as Bottleneck_``)."""
        ours = {self.class_name, *self.classes}
        aliases = {}
        for line in sorted(self.imports):
            module, _, name = line.removeprefix("from ").partition(" import ")
            if line.startswith("from ") and name in ours:
                alias = f"{name}_"
                while alias in ours:
                    alias += "_"
                self.imports.discard(line)
                self.imports.add(f"from {module} import {name} as {alias}")
                aliases[name] = alias
        return aliases

    def _spelled(self, node: fx.Node) -> set[str]:
        return self.spelled.get(facts(node).name or node.name, set())

    def _one_forward(self) -> list[str]:
        """``forward`` for a model whose train and eval graphs differ, each difference written
        once where it is, on ``self.training`` (see :mod:`reconfx.emit.merge`)."""
        self.spelled = _mode_arguments([self.module.train_graph],
                                       [self.module.eval_graph, *(r.body for r in self.regions)])
        renderings: dict[fx.Graph, list[list[str]]] = {}
        try:
            # (at each depth an if block may need: train's third for a region's first branch)
            train_depth = 3 if self.regions else 2
            for graph, depth in ((self.module.train_graph, train_depth),
                                 (self.module.eval_graph, 2)):
                for self.nesting in range(depth):
                    renderings.setdefault(graph, []).append(self._forward(graph, "forward"))
        finally:
            self.nesting = 0
        train, eval_ = renderings[self.module.train_graph], renderings[self.module.eval_graph]
        body = merge_modes([lines[1:] for lines in train], [lines[1:] for lines in eval_],
                           self._indent(2))
        return [train[0][0], *body]


def _has_source(value: Any) -> bool:
    try:
        sourced(value)
    except TypeError:
        return False
    return True


def _unpacked(node: fx.Node, module: Any) -> list[fx.Node]:
    """The items of a module call's tuple result (a generated class's, or one whose length the
    call's annotation recorded) or of the task rows' ``unbind``, in order, when each is taken
    once (its result is then unpacked where it is made); else empty."""
    if node.op == "call_method" and node.target == "unbind":
        items = facts(node).items  # (the task rows, reconfx.rows)
    elif node.op != "call_module" or region_call(node):
        return []
    else:
        try:
            stream = resolve(module, str(node.target))
        except AttributeError:
            return []
        if isinstance(stream, TaskStream):
            result = output_node(stream.train_graph).args[0]
            items = len(result) if isinstance(result, tuple) else None
        else:
            items = facts(node).items
    users = list(node.users)
    if items is None or any(
            u.target is not operator.getitem or type(u.args[1]) is not int for u in users):
        return []
    users.sort(key=lambda u: u.args[1])
    return users if [u.args[1] for u in users] == list(range(items)) else []


def _node_at(tree: _Tree, path: str) -> _Tree:
    for part in path.split("."):
        tree = tree.children[part]
    return tree


def _chains(graph: fx.Graph, tree: _Tree) -> dict[fx.Node, list[fx.Node]]:
    """First call -> the nodes of a chain of at least three calls of consecutive items of one
    ``ModuleList``, next to each other in the graph, each taking the previous one's result (or
    the same item of it) first and the same other arguments."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr")]
    chains: dict[fx.Node, list[fx.Node]] = {}
    i = 0
    while i < len(nodes):
        chain, j = [nodes[i]], i
        while True:
            step = _chain_step(nodes, j, tree)
            if step is None:
                break
            chain += nodes[j + 1:step + 1]
            j = step
        if _folded(nodes[j]):
            chain.append(nodes[j + 1])  # (the item the last call's result is used for)
        calls = [n for n in chain if n.op == "call_module"]
        if len(calls) >= 3:
            chains[chain[0]] = chain
            i = j + 1
        else:
            i += 1
    return chains


def _chain_step(nodes: list[fx.Node], j: int, tree: _Tree) -> int | None:
    """The position of the next call of a chain whose last call is at ``j``, None where the
    chain ends."""
    node = nodes[j]
    if node.op != "call_module" or region_call(node):
        return None
    container, _, index = str(node.target).rpartition(".")
    if not index.isdigit() or not container:
        return None
    try:
        if _container_kind(_node_at(tree, container)) != "list":
            return None
    except KeyError:
        return None
    carried, k = node, j + 1
    if _folded(node):
        carried, k = nodes[j + 1], j + 2
    if k >= len(nodes) or len(carried.users) != 1:
        return None
    nxt = nodes[k]
    meta, nxt_meta = facts(node), facts(nxt)
    if (nxt.op != "call_module" or str(nxt.target) != f"{container}.{int(index) + 1}"
            or not nxt.args or nxt.args[0] is not carried or nxt.args[1:] != node.args[1:]
            or nxt.kwargs != node.kwargs or _folded(nxt) != _folded(node)
            or meta.task != nxt_meta.task or nxt_meta.branch_point is not None):
        return None
    if _folded(nxt) and next(iter(nxt.users)).args[1] != carried.args[1]:
        return None  # (another item of the next result)
    return k


def _folded(node: fx.Node) -> bool:
    """A module call whose result is only used by taking one item of it (``layer(x)[0]``)."""
    users = list(node.users)
    return (node.op == "call_module" and not region_call(node) and len(users) == 1
            and users[0].op == "call_function" and users[0].target is operator.getitem
            and users[0].args[0] is node and not isinstance(users[0].args[1], fx.Node))


def _region_item(node: fx.Node) -> bool:
    """A ``getitem`` of a region's results (written as part of the region's call)."""
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and region_call(node.args[0]))


def _span(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else f"{modules[0]} ... {modules[-1]}"


def _docstring(text: str, indent: str) -> list[str]:
    """``text`` as a docstring's lines at ``indent``, wrapped to the line width."""
    lines = textwrap.wrap(text, width=LINE - len(indent) - 6)
    if len(lines) == 1:
        return [f'{indent}"""{lines[0]}"""']
    return [f'{indent}"""{lines[0]}', *(f"{indent}{line}" for line in lines[1:]), f'{indent}"""']


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _owning_leaf(name: str, leaves: set[str]) -> str:
    """The longest leaf path that ``name`` lies under (itself when none)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in leaves:
            return prefix
    return name


def _leaf_paths(tree: _Tree, prefix: str = "") -> list[str]:
    out = []
    for name, child in tree.children.items():
        path = f"{prefix}.{name}" if prefix else name
        out += [path] if child.obj is not None else _leaf_paths(child, path)
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


def _base_name(node: fx.Node) -> tuple[str, str]:
    """The name a node's value gets (from its module path) and its task suffix (``_left``)."""
    meta = facts(node)
    base, task = meta.name or node.name, meta.task
    if not task:
        return base, ""
    return base.removesuffix(f"_{task}"), f"_{task}"


def _fresh(base: tuple[str, str], taken: set[str], room: int = 0) -> str:
    """A new local name: the base shortened to leave ``room`` for the longest task suffix (so
    every task's name is shortened alike and parallel lines align), a counter before the
    suffix where the name is taken."""
    stem, suffix = base
    name = local_name(stem, LOCAL - room if suffix else LOCAL)
    if name in _RESERVED:
        name = f"{name}_"
    return unique_name(name, taken, suffix)


def _suffix_room(graph: fx.Graph) -> int:
    tasks = {facts(n).task for n in graph.nodes}
    return max((len(t) + 1 for t in tasks if t), default=0)


def _call_arguments(node: fx.Node, name_of: Any, spelled: set[str] = frozenset()) -> list[str]:
    """A call node's arguments as source, long lists and tuples one item per line; an aten
    op's keyword arguments equal to its schema's defaults (``pin_memory=False``) left out, except
    those in ``spelled``, which are written by keyword from that one on (``dropout_p=0.0``)."""
    defaults: dict[str, Any] = {}
    args, kwargs = list(node.args), dict(node.kwargs)
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema.arguments
        defaults = {a.name: a.default_value for a in schema if a.has_default_value()}
        names = [a.name for a in schema]
        first = min((names.index(n) for n in spelled if n in names), default=len(args))
        if first < len(args) or spelled:
            kwargs = {**dict(zip(names[first:len(args)], args[first:], strict=False)), **kwargs}
            args = args[:first]
            kwargs = {n: kwargs.get(n, defaults.get(n)) for n in names[first:]
                      if n in kwargs or n in spelled}
            while args and _default(args[-1], defaults.get(names[len(args) - 1], _END)):
                args.pop()  # (a trailing ``None`` another mode leaves out)
    kwargs = {k: v for k, v in kwargs.items() if k in spelled
              or not (k in defaults and _default(v, defaults[k]))
              and not (k == "pin_memory" and v is False)}  # (False and None mean the same)
    return [render_arg(a, name_of) for a in args] + [
        f"{k}={render_arg(v, name_of)}" for k, v in kwargs.items()]


def _default(value: Any, default: Any) -> bool:
    """``value`` is a schema default's value (of its type: ``0`` is not ``False``)."""
    return not _reads_nodes(value) and type(value) is type(default) and value == default


def _reads_nodes(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _mode_arguments(train: Sequence[fx.Graph], eval_: Sequence[fx.Graph]
                    ) -> dict[str, set[str]]:
    """For aten calls of the same name in the train and the eval graphs (a forward's, and
    the region bodies written inside it): the schema arguments that are constants differing
    between the two (one passing ``dropout_p=0.1``, the other leaving it at its default), so
    both spell them and the difference is one token."""
    found: list[dict[str, tuple[Any, dict[str, Any]]]] = []
    for graphs in (train, eval_):
        calls = {}
        for node in (n for graph in graphs for n in graph.nodes):
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                schema = node.target._schema.arguments
                values = {a.name: a.default_value for a in schema if a.has_default_value()}
                values.update(zip((a.name for a in schema), node.args, strict=False))
                values.update(node.kwargs)
                calls[facts(node).name or node.name] = (node.target, values)
        found.append(calls)
    spelled: dict[str, set[str]] = {}
    for name, (target, train) in found[0].items():
        other = found[1].get(name)
        if other is None or other[0] is not target:
            continue
        differing = {k for k in train.keys() | other[1].keys()
                     if not _reads_nodes(train.get(k)) and not _reads_nodes(other[1].get(k))
                     and train.get(k) != other[1].get(k)}
        if differing:
            spelled[name] = differing
    return spelled


_END = 2**63 - 1  # the "to the end" of an aten slice


def _slice_index(args: tuple[Any, ...]) -> tuple[slice, ...]:
    """``aten.slice(x, dim, start, end, step)``'s arguments as the index ``x[:, start:end]``
    (which dispatches to the same op)."""
    dim, start, end, step = (list(args) + [0, None, None, 1][len(args):])[:4]
    start = None if start == 0 else start
    end = None if end is None or (isinstance(end, int) and end >= _END) else end
    return (*[slice(None)] * dim, slice(start, end, None if step == 1 else step))


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input of an aten op that returns its input's value unchanged (``x + 0``, ``x * 1``,
    ``x[:]``) in the same dtype and shape, when nothing modifies the result in place (then it could
    share the input's name); else None."""
    name = packet(node.target) if node.op == "call_function" else None
    neutral = {"add": 0, "sub": 0, "mul": 1, "div": 1}
    if name == "slice" and node.args and isinstance(node.args[0], fx.Node) and not node.kwargs:
        # x[:] along one axis: start 0, end past the axis, step 1
        _dim, start, end, step = (*node.args[1:], None, None, None, None)[:4]
        if start not in (None, 0) or step not in (None, 1) or (
                end is not None and not (isinstance(end, int) and end >= 2**62)):
            return None
        source = node.args[0]
    elif name not in neutral or len(node.args) != 2 or node.kwargs:
        return None
    else:
        source, other = node.args
        if not isinstance(source, fx.Node) or isinstance(other, bool) or other != neutral[name]:
            return None
    mine, theirs = node.meta.get("val"), source.meta.get("val")
    if not isinstance(mine, torch.Tensor) or not isinstance(theirs, torch.Tensor) or (
            mine.dtype != theirs.dtype or mine.shape != theirs.shape):
        return None
    if any(_may_mutate(u) for u in [*node.users, *source.users]):
        return None
    return source


def _may_mutate(node: fx.Node) -> bool:
    """Whether a call may change a tensor argument in place (an in-place op, any module)."""
    if node.op == "call_module":
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", str(node.target))
    return name.endswith("_") and not name.endswith("__")


def _operand(value: Any, name_of: Any) -> str:
    text = render_value(value, name_of)
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        return f"({text})"
    return text


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
