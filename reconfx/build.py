"""Build what a spec names: the model (or backbone + heads), its example inputs, and the mapping
from the model's outputs to tasks."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconfx.artifacts import torch_load_safely
from reconfx.data.padding import padded_data
from reconfx.errors import ModelError, ReconfxError, SpecError
from reconfx.heads import attach_heads, encoder_only
from reconfx.spec import DTYPES, FactorySpec, InputSpec, Spec
from reconfx.tree import is_sequence_root, output_leaves

__all__ = [
    "build_model", "call_data_factory", "call_factory", "check_checkpoint_size", "example_inputs",
    "load_checkpoint", "locate_callable", "resolve_factory", "run_example", "second_size",
    "task_paths"
]


def resolve_factory(text: str, where: str) -> Any:
    """Import ``"package.module:callable"`` (the callable may be dotted: ``Class.method``)."""
    module_name, _, attr_path = text.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing user code
        raise SpecError(f"cannot import '{module_name}' ({type(exc).__name__}: {exc})",
                        where=where, fix="install the package or fix the module path") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"'{module_name}' has no attribute '{attr_path}'", where=where,
                            fix="check the name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"'{text}' is not callable", where=where)
    return obj


def locate_callable(text: str, where: str) -> None:
    """Check that ``"package.module:name"`` names something the module defines, without
    importing it (so without running any of its code): the module is found on ``sys.path``
    the way the import system would find it, and its source must bind ``name`` at the top
    level (``def``, ``class``, an assignment or an import). A module already imported is asked
    directly."""
    module_name, _, attr_path = text.partition(":")
    head = attr_path.split(".")[0]
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        if not hasattr(loaded, head):
            raise SpecError(f"'{module_name}' has no attribute '{attr_path}'", where=where,
                            fix="check the name after ':'")
        return
    source = _module_source(module_name, where)
    if source is not None and head not in _top_level_names(source, module_name, where):
        raise SpecError(f"'{module_name}' defines no '{head}'", where=where,
                        fix="check the name after ':'")


def _module_source(module_name: str, where: str) -> str | None:
    """The source of a module found on ``sys.path`` without importing it or its packages;
    None for a module without Python source (an extension)."""
    search: list[str] | None = None
    spec = None
    parts = module_name.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[:i + 1])
        found = sys.modules.get(name)
        spec = found.__spec__ if found is not None else \
            importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None:
            raise SpecError(f"cannot find the module '{module_name}' ('{name}' is not on the "
                            "Python path)", where=where,
                            fix="install the package or fix the module path")
        search = list(spec.submodule_search_locations or [])
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        return None
    try:
        return Path(origin).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read the module '{module_name}' ({exc})", where=where,
                        fix="fix the module path") from exc


def _top_level_names(source: str, module_name: str, where: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise SpecError(f"the module '{module_name}' does not parse (line {exc.lineno}: "
                        f"{exc.msg})", where=where, fix="fix its syntax") from exc
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.If | ast.Try):  # (conditional definitions: taken at face value)
            names |= {n.name for n in ast.walk(node) if isinstance(
                n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    return names


def call_factory(factory: FactorySpec, where: str) -> nn.Module:
    text, kwargs = factory.call
    field = f"{where}.{factory.source}"
    fn = resolve_factory(text, field)
    try:
        model = fn(**kwargs)
    except ModelError as exc:  # (hf / timm loading: the message says what is wrong)
        raise ModelError(exc.message, where=field, fix=exc.fix) from exc
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"factory '{text}' raised {type(exc).__name__}: {first}",
                         where=f"{where}.kwargs" if factory.factory else field,
                         fix="check the factory's arguments") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory '{text}' returned {type(model).__name__}, "
                         "not a torch.nn.Module", where=field)
    if factory.checkpoint is not None:
        load_checkpoint(model, factory.checkpoint, f"{where}.checkpoint")
    return model


def call_data_factory(data: Any, split: str, seed: int, where: str,
                      inputs: Sequence[InputSpec] = ()) -> Any:
    """``data.factory(split, seed, **kwargs)``: a Dataset of (inputs, targets) dicts, whose
    first item is checked against the spec's ``inputs`` (names, dtypes, fixed axes)."""
    fn = resolve_factory(data.factory, f"{where}.factory")
    try:
        dataset = fn(split=split, seed=seed, **data.kwargs)
    except ReconfxError:  # (it says where and what to do itself)
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"data factory '{data.factory}' raised {type(exc).__name__}: {first}",
                         where=f"{where}.kwargs", fix="check the factory's arguments") from exc
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ModelError(f"data factory '{data.factory}' returned {type(dataset).__name__}, "
                         "not a map-style Dataset (with len() and indexing)",
                         where=f"{where}.factory", fix="return a torch.utils.data.Dataset; "
                         "an IterableDataset can be wrapped in a list of its items")
    if len(dataset) == 0:
        raise ModelError(f"data factory '{data.factory}' returned an empty '{split}' split",
                         where=f"{where}.kwargs", fix="check the factory's size or split "
                         "arguments: every split reconfx reads needs items")
    try:
        item = dataset[0]
    except Exception:  # the loader reports a failing item, naming the batch it belongs to
        return padded_data(dataset, inputs, where.rsplit(": ", 1)[0])
    if not (isinstance(item, tuple | list) and len(item) == 2
            and all(isinstance(part, dict) for part in item)):
        raise ModelError(f"data factory '{data.factory}': items of the '{split}' split are "
                         f"{_describe(item)}, not (inputs, targets) pairs of dicts",
                         where=f"{where}.factory", fix="return ({input name: tensor}, "
                         "{task name: tensor}) from __getitem__")
    for spec in inputs:
        if spec.mask_of is not None and spec.name not in item[0]:
            continue  # (the loader builds it)
        problem = _input_problem(item[0].get(spec.name), spec)
        if problem:
            raise ModelError(f"data factory '{data.factory}': input '{spec.name}' of the "
                             f"'{split}' split {problem}", where=f"{where}.factory",
                             fix=f"make the factory return what inputs[] declares for "
                             f"'{spec.name}', or change its declaration")
    return padded_data(dataset, inputs, where.rsplit(": ", 1)[0])


def _input_problem(value: Any, spec: InputSpec) -> str | None:
    """What is wrong with one item's input against its declaration (None: nothing)."""
    if value is None:
        return "is missing from its items"
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        return f"is {dtype}, and the spec declares {spec.dtype}"
    if value.dim() != len(spec.shape) - 1:
        return (f"has shape {tuple(value.shape)} per item, and the spec's shape {spec.shape} "
                f"(batch first) means {len(spec.shape) - 1} axes per item")
    for axis, size in enumerate(spec.shape[1:], start=1):
        if axis not in spec.dynamic and value.shape[axis - 1] != size:
            return (f"has shape {tuple(value.shape)} per item, and the spec's shape "
                    f"{spec.shape} fixes axis {axis} at {size}")
    return None


def _describe(item: Any) -> str:
    if isinstance(item, tuple | list):
        return f"{type(item).__name__}s of {', '.join(type(x).__name__ for x in item[:3])}"
    return f"{type(item).__name__}s"


def load_checkpoint(model: nn.Module, path: Path, where: str) -> None:
    """Load a state dict safely: safetensors, or ``torch.load(weights_only=True)``."""
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' not found", where=where, fix="check the path")
    check_checkpoint_size(model, path, where)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch_load_safely(path)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint '{path}': "
                         f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}",
                         where=where,
                         fix="save it with torch.save(model.state_dict()) or safetensors") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict",
                         where=where)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise ModelError(f"checkpoint '{path.name}' does not fit the model: " + ", ".join(problems),
                         where=where, fix="use the checkpoint of this architecture and kwargs")
    model.load_state_dict(state, strict=True)


# A checkpoint may hold more than the model (optimiser state, an EMA copy): up to this many times
# the model's own tensors, plus a margin, before it is refused unread.
_CHECKPOINT_FACTOR, _CHECKPOINT_MARGIN = 4, 64 << 20


def check_checkpoint_size(model: nn.Module, path: Path, where: str) -> None:
    """Refuse, before anything is inflated, a checkpoint whose tensors would take far more than
    the model's: torch's zip format is measured by its entries' uncompressed sizes (a small
    zip bomb inflates to gigabytes), safetensors by its header. A file in another format is left
    to the loader, which reads it whole anyway."""
    import zipfile

    own = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    limit = _CHECKPOINT_FACTOR * own + _CHECKPOINT_MARGIN
    size = None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:  # (reads the header only)
                size = sum(_safetensors_bytes(handle, k) for k in handle.keys())
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                size = sum(info.file_size for info in archive.infolist())
    except Exception:
        return  # (not readable as such: the loader names what is wrong)
    if size is not None and size > limit:
        raise ModelError(f"checkpoint '{path.name}' would inflate to {size:,} bytes, more than "
                         f"{_CHECKPOINT_FACTOR}x the model's {own:,}: it is not this model's "
                         "checkpoint", where=where, fix="use the checkpoint of this architecture")


def _safetensors_bytes(handle: Any, key: str) -> int:
    view = handle.get_slice(key)
    digits = "".join(c for c in view.get_dtype() if c.isdigit())  # F16 -> 16, BOOL -> 8
    itemsize = max(int(digits[:2] or 8) // 8, 1)
    numel = 1
    for n in view.get_shape():
        numel *= n
    return numel * itemsize


def second_size(size: int, axis: int) -> int:
    """The other size the checks give a dynamic axis: the batch axis (0) one longer; any other
    axis longer by the largest power of two its size is a multiple of (16 -> 32, 12 -> 16,
    7 -> 8), so that a side a model needs in multiples (an image through strided stages, a
    sequence in patches) stays one."""
    return size + 1 if axis == 0 else size + (size & -size)


def example_inputs(inputs: list[InputSpec], seed: int = 0, batch: int | None = None,
                   grown: bool = False) -> dict[str, torch.Tensor]:
    """Deterministic example inputs. ``batch`` overrides axis 0; ``grown``: every dynamic axis
    at its :func:`second_size`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in inputs:
        shape = list(spec.shape)
        for axis in spec.dynamic if grown else ():
            shape[axis] = second_size(shape[axis], axis)
        if batch is not None:
            shape[0] = batch
        dtype = DTYPES[spec.dtype]
        if spec.mask_of is not None:  # a padding mask: the first row full, then shorter ones
            lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=gen)
            lengths[0] = shape[1]
            out[spec.name] = (torch.arange(shape[1]) < lengths[:, None]).to(dtype)
        elif dtype.is_floating_point:
            value = torch.rand(shape, generator=gen)
            if spec.low is not None or spec.high is not None:
                low = spec.low if spec.low is not None else 0.0
                high = spec.high if spec.high is not None else low + 1.0
                value = low + (high - low) * value
            else:
                value = torch.randn(shape, generator=gen)
            out[spec.name] = value.to(dtype)
        elif dtype == torch.bool:
            out[spec.name] = torch.rand(shape, generator=gen) > 0.5
        else:
            low = int(spec.low or 0)
            out[spec.name] = torch.randint(low, int(spec.high), shape, generator=gen, dtype=dtype)
    return out


def run_example(model: nn.Module, example: dict[str, torch.Tensor], spec: Spec,
                spec_path: str | Path, grown: bool = False) -> Any:
    """``model(**example)`` in eval mode under ``torch.no_grad``; an exception is the model's or
    the inputs' fault, reported as a ModelError naming the inputs."""
    try:
        with torch.no_grad():
            return model.eval()(**example)
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                           for k, v in example.items())
        dynamic = "; ".join(f"{i.name}: {list(i.dynamic)}" for i in spec.inputs if i.dynamic)
        if grown and dynamic:
            raise ModelError(
                f"the model runs on the example inputs but raises {type(exc).__name__} when "
                f"their dynamic axes ({dynamic}) take a second size ({shapes}): {first}",
                where=f"{spec_path}: inputs", fix="mark as dynamic only the axes whose size "
                "may change, or let the model accept other sizes") from exc
        raise ModelError(f"the model raises {type(exc).__name__} on the example inputs ({shapes}"
                         f"{', second draw' if grown else ''}):"
                         f" {first}", where=f"{spec_path}: inputs",
                         fix="check the inputs' names, shapes, dtypes and value ranges against "
                         "the model's forward, and the factory's arguments") from exc


def build_model(spec: Spec, spec_path: str | Path = "spec") -> nn.Module:
    """The multi-task model the spec describes, in eval mode, weights from its checkpoint."""
    where = f"{spec_path}: {'model' if spec.model is not None else 'backbone'}"
    model = call_factory(spec.factory, where)
    if spec.backbone is not None:
        example = example_inputs(spec.inputs, seed=spec.train.seed)
        given = [i.name for i in spec.inputs if i.to_backbone]
        model, feature = encoder_only(model, spec.backbone.feature, given)
        run_example(model, {k: example[k] for k in given}, spec, spec_path)
        heads = {t.name: t.head for t in spec.tasks}
        model = attach_heads(model, feature, heads=heads, example=example,
                             where=f"{where}.feature",
                             backbone_inputs=None if len(given) == len(spec.inputs) else given)
    return model.eval()


def task_paths(spec: Spec, output: Any, where: str = "spec") -> tuple[dict[str, str], list[str]]:
    """Map each task to the path of its output; also return the output paths no task uses."""
    leaves = output_leaves(output)
    if list(leaves) == [""]:
        raise ModelError(
            "the model returns a single tensor, but the spec has several tasks",
            where=f"{where}: tasks",
            fix="return a dict keyed by task name or a tuple in task order, or use 'backbone'")
    by_position = is_sequence_root(output)
    paths = {}
    for i, task in enumerate(spec.tasks):
        path = task.output or (str(i) if by_position else task.name)
        if path not in leaves:
            hint = f"tasks[{i}].output" if task.output else f"tasks[{i}].name"
            raise ModelError(
                f"task '{task.name}' is not among the model's outputs (looked for '{path}'; "
                f"outputs: {', '.join(leaves) or 'none'})", where=f"{where}: {hint}",
                fix="name the task after an output key, or set tasks[].output: 'key.path'")
        if not isinstance(leaves[path], torch.Tensor):
            raise ModelError(f"output '{path}' of task '{task.name}' is a "
                             f"{type(leaves[path]).__name__}, not a tensor",
                             where=f"{where}: tasks[{i}]")
        paths[task.name] = path
    ignored = [p for p in leaves if p not in paths.values()]
    return paths, ignored
