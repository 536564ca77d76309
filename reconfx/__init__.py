"""reconfx: a declarative model-surgery compiler for multi-task learning, built on torch.fx.

>>> import reconfx                                                       # doctest: +SKIP
>>> compiled = reconfx.compile_spec("specs/multidigits.yaml")             # doctest: +SKIP
>>> model = reconfx.load(compiled.out_dir)                                # doctest: +SKIP
"""

__version__ = "0.1.0"

from reconfx.artifacts import load
from reconfx.emit.onnx import export_onnx as emit_onnx
from reconfx.emit.onnx import onnx_session
from reconfx.emit.python import emit_python
from reconfx.errors import ReconfxError
from reconfx.layers import inventory
from reconfx.pipeline import compile_spec, prepare
from reconfx.rewrite import branch
from reconfx.select import select_layers as select
from reconfx.spec import load_spec
from reconfx.trace import trace

__all__ = [
    "ReconfxError", "branch", "compile_spec", "emit_onnx", "emit_python", "inventory", "load",
    "load_spec", "onnx_session", "prepare", "select", "trace",
]
