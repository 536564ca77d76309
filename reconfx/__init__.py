"""reconfx: a declarative model-surgery compiler for multi-task learning, built on torch.fx.

>>> import reconfx                                                       # doctest: +SKIP
>>> compiled = reconfx.compile_spec("specs/multidigits.yaml")             # doctest: +SKIP
>>> model = reconfx.load(compiled.out_dir)                                # doctest: +SKIP
"""

__version__ = "0.1.0"

import importlib
from typing import Any

# Public names, imported when first used: `import reconfx` and `reconfx --help` stay light (no
# torch import), so the command line answers at once and handles Ctrl-C from its first line.
_PUBLIC = {
    "load_spec": ("reconfx.spec", "load_spec"), "prepare": ("reconfx.pipeline", "prepare"),
    "trace": ("reconfx.tracing", "trace"), "inventory": ("reconfx.layers", "inventory"),
    "profile": ("reconfx.pipeline", "profile_prepared"),
    "select": ("reconfx.selection", "select_layers"), "branch": ("reconfx.rewrite", "branch"),
    "emit_python": ("reconfx.emit.python", "emit_python"),
    "export_onnx": ("reconfx.emit.onnx", "export_onnx"),
    "onnx_session": ("reconfx.emit.onnx", "onnx_session"),
    "compile_spec": ("reconfx.commands", "compile_spec"), "run": ("reconfx.commands", "run_spec"),
    "load": ("reconfx.artifacts", "load"), "ReconfxError": ("reconfx.errors", "ReconfxError"),
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'reconfx' has no attribute '{name}'")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


__all__ = [
    "ReconfxError", "branch", "compile_spec", "emit_python", "export_onnx", "inventory", "load",
    "load_spec", "onnx_session", "prepare", "profile", "run", "select", "trace",
]
