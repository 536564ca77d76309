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
    "load": ("reconfx.artifacts", "load"), "emit_onnx": ("reconfx.emit.onnx", "export_onnx"),
    "onnx_session": ("reconfx.emit.onnx", "onnx_session"),
    "emit_python": ("reconfx.emit.python", "emit_python"),
    "ReconfxError": ("reconfx.errors", "ReconfxError"),
    "inventory": ("reconfx.layers", "inventory"),
    "compile_spec": ("reconfx.pipeline", "compile_spec"),
    "prepare": ("reconfx.pipeline", "prepare"),
    "branch": ("reconfx.rewrite", "branch"), "select": ("reconfx.select", "select_layers"),
    "load_spec": ("reconfx.spec", "load_spec"), "trace": ("reconfx.trace", "trace"),
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'reconfx' has no attribute '{name}'")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


__all__ = [
    "ReconfxError", "branch", "compile_spec", "emit_onnx", "emit_python", "inventory", "load",
    "load_spec", "onnx_session", "prepare", "select", "trace",
]
