"""Property-based fuzzing of the spec loader and the CLI: every input either loads or fails with
one ``reconfx`` error line naming the file (and the field, when a field is at fault); never a
traceback, never a hang.

Three sources of input: random YAML values, random text, and valid specs mutated at a random
place (a key deleted, a value replaced by a random one, an unknown key added, a list emptied).
``CASES`` counts what ran, and each source's test checks that all its cases did."""

from __future__ import annotations

import contextlib
import copy
import io
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconfx.cli import main
from reconfx.errors import SpecError
from reconfx.spec import load_spec_file

ROOT = Path(__file__).resolve().parents[1]
VALID = [yaml.safe_load((ROOT / "specs" / name).read_text())
         for name in ("multidigits.yaml", "multidigits-layers.yaml")]
VALID.append({  # a backbone with heads, integer inputs and the other select policies' fields
    "name": "bert-like", "backbone": {"factory": "tests.models:tiny_bert", "kwargs": {}},
    "inputs": [{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "low": 0,
                "high": 100, "dynamic": [0, 1]}],
    "tasks": [{"name": "a", "head": {"kind": "linear", "out": 3}, "loss": "cross_entropy"},
              {"name": "b", "head": {"kind": "mlp", "out": 2, "hidden": 8}, "loss": "mse",
               "metric": "mse"}],
    "select": {"param_budget": 10.0, "exclude": ["*.norm*"]},
    "train": {"sparse": {"fraction": 0.1}, "precision": "bf16"},
})
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES: Counter[str] = Counter()
HANG_SECONDS = 10

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", "-", "auto", "cuda", "top_k", "ew", "float32", "int64",
                              "reconfx.zoo:small_resnet", "a:b", "x" * 200, "left", "[0]"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10) | scalars.filter(
                          lambda v: isinstance(v, str | int | bool)), inner, max_size=4),
                      max_leaves=25)


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a nested dict/list a mutation can target."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths(value, (*prefix, index))
    return found


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    spec = copy.deepcopy(draw(st.sampled_from(VALID)))
    where = draw(st.sampled_from(paths(spec)))
    kind = draw(st.sampled_from(["delete", "replace", "unknown", "empty"]))
    if not where:
        return draw(values) if kind == "replace" else spec
    parent = spec
    for part in where[:-1]:
        parent = parent[part]
    last = where[-1]
    if kind == "delete":
        del parent[last]
    elif kind == "replace":
        parent[last] = draw(values)
    elif kind == "unknown" and isinstance(parent[last], dict):
        parent[last][draw(st.text(min_size=1, max_size=8))] = draw(values)
    else:
        parent[last] = [] if isinstance(parent[last], list) else {}
    return spec


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def fail(*_args: object) -> None:
        raise AssertionError(f"the spec loader took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_loader(path: Path) -> None:
    """Loads, or raises one SpecError line that names the file."""
    try:
        with no_hang():
            load_spec_file(path)
    except SpecError as exc:
        text = str(exc)
        assert "\n" not in text, text
        assert text.startswith(str(path)), text
        if exc.where and exc.where.count(": ") >= 1 and "unknown field" in text:
            assert exc.where.rsplit(": ", 1)[1], text  # the field is named


def check_cli(path: Path) -> None:
    """`reconfx validate` prints one line and exits 0 or 2: never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with no_hang(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    lines = err.getvalue().splitlines()
    if code == 0:
        assert lines == [] and out.getvalue().startswith(f"{path}: ok"), (out.getvalue(), lines)
    else:
        assert code == 2, (code, lines)
        assert len(lines) == 1 and lines[0].startswith(f"reconfx: error: {path}"), lines
        assert "internal error" not in lines[0] and "Traceback" not in lines[0], lines


def check_both(tmp_path: Path, text: str | bytes, kind: str) -> None:
    path = tmp_path / "fuzzed.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    check_loader(path)
    check_cli(path)
    CASES[kind] += 1


SOURCES = {
    "mutated": (mutated_specs(), lambda spec: yaml.safe_dump(spec, sort_keys=False)),
    "random values": (values, yaml.safe_dump),
    "random text": (st.text(max_size=200) | st.binary(max_size=100), lambda text: text),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_fuzzed_specs_load_or_fail_in_one_line(tmp_path_factory: pytest.TempPathFactory,
                                               kind: str) -> None:
    strategy, text_of = SOURCES[kind]

    @SETTINGS
    @given(value=strategy)
    def check(value: Any) -> None:
        check_both(tmp_path_factory.mktemp("fuzz"), text_of(value), kind)

    check()
    assert CASES[kind] == SETTINGS.max_examples  # each went through the loader and the CLI


HOSTILE = {
    # each alias doubles the expanded size: 2**40 values if expanded
    "alias bomb": "a: &a [x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20))
    + "name: *u\n",
    "deep nesting": "name: " + "[" * 5000 + "]" * 5000 + "\n",
    "python object tag": "name: !!python/object/apply:os.system ['echo pwned']\n",
    "duplicate keys": "name: a\nname: b\ninputs: []\n",
    "tabs": "name:\tx\n\tinputs: []\n",
    "huge int": "name: x\ninputs: [{name: a, shape: [" + "9" * 5000 + "]}]\n",
    "not utf-8": b"name: \xff\xfe\n",
    "empty file": "",
    "a list": "- name: x\n",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_yaml_fails_in_one_line(tmp_path: Path, case: str) -> None:
    check_both(tmp_path, HOSTILE[case], "hostile")
    with pytest.raises(SpecError) as caught:
        load_spec_file(tmp_path / "fuzzed.yaml")
    if case == "duplicate keys":
        assert str(caught.value).endswith("fuzzed.yaml:2: duplicate key 'name' (first on line 1) "
                                          "(fix: keep one of them)")
    assert not (Path.cwd() / "pwned").exists()
