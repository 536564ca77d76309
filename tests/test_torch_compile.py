"""torch.compile (default inductor backend, CPU) of a compiled model and of its emitted
model.py gives the eager outputs."""

import shutil

import pytest
import torch

import reconfx
from reconfx.build import example_inputs
from reconfx.commands import compile_spec
from tests.support import write_spec


def test_torch_compile_of_compiled_and_emitted_models(tmp_path):
    if not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        pytest.skip("inductor needs a C++ compiler on CPU, and this platform has none")
    spec = write_spec(tmp_path, "tc", model={"factory": "reconfx.zoo:small_resnet",
                                             "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["layer3.*", "layer4.*"]},
                      export={"dir": str(tmp_path / "out")})
    compiled = compile_spec(spec)
    example = example_inputs(compiled.prepared.loaded.spec.inputs, seed=5, batch=6)
    torch._dynamo.reset()
    for model in (compiled.branched.module.eval(), reconfx.load(tmp_path / "out")):
        fast = torch.compile(model)
        with torch.no_grad():
            want, got = model(**example), fast(**example)
        assert list(got) == ["left", "right"]
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=1e-4, atol=1e-5)
