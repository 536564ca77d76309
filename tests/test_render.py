"""Constants written as source text evaluate back to the same value."""

import pytest

from reconfx.emit.render import render_value


@pytest.mark.parametrize("value", ["plain", "it's", 'say "hi"', "both ' and \"", "tab\there",
                                   "back\\slash", 3, -2.5, float("inf"), None, True,
                                   (1,), [1, (2, 3)], {"k": slice(None, 2)}])
def test_rendered_constants_round_trip(value):
    text = render_value(value)
    assert eval(text) == value  # noqa: S307
    if isinstance(value, str) and '"' not in value:
        assert text.startswith('"')


def test_indices_use_slice_syntax():
    from reconfx.emit.render import render_index

    assert render_index((slice(None), 0), str) == ":, 0"
    assert render_index(slice(1, None, 2), str) == "1::2"
    assert render_index((slice(None),), str) == ":"  # x[:], not x[:,]
    assert render_index((0,), str) == "0,"  # (a 1-tuple key of a mapping stays one)


def test_long_names_keep_their_tail_and_stay_identifiers():
    from reconfx.emit.render import identifier

    path = "backbone.encoder.albert_layer_groups.0.albert_layers.0.attention.dense"
    assert identifier(path, limit=30) == "layers_0_attention_dense"
    assert identifier(path, limit=200) == path.replace(".", "_")
    assert identifier("layer.0.1.2.fc", limit=6) == "fc"  # never starts with a digit
    assert identifier("0.weight") == "v_0_weight"
    assert identifier("class") == "class_"
    assert identifier("x" * 60, limit=10) == "x" * 10


def test_long_arguments_and_targets_wrap_to_the_line_length():
    from reconfx.emit.render import LINE, assign, chain, render_arg, statement

    names = [f"stream_{i}_feature_with_a_long_name" for i in range(6)]
    value = [tuple(names[:3]), {"k": names[3:]}]
    arg = render_arg(value, width=60)
    assert eval(arg, {}, {n: n for n in names}) == value  # noqa: S307
    assert all(len(line) <= 60 for line in arg.splitlines())
    code = statement("        ", "out", "torch.cat(", [arg, "1"])
    assert all(len(line) <= LINE for line in code.splitlines())

    path = "self." + ".".join(f"block_{i}[0]" for i in range(12)) + ".weight"
    assert chain(path, 200) == path
    broken = chain(path, 40)
    assert broken.startswith("(\n") and broken.endswith("\n)")
    assert "".join(line.strip() for line in broken.splitlines())[1:-1] == path
    code = assign("        ", path, "nn.Parameter(torch.empty(2))")
    assert all(len(line) <= LINE for line in code.splitlines())
    assert compile(code.strip().replace("\n        ", "\n"), "<emitted>", "exec")
    assert statement("    ", "x" * 90, "f(", []).splitlines()[1].strip() == "f()"
    code = statement("        ", "x" * 50, "y" * 80 + ".contiguous(", [])  # no blank lines
    assert all(line.strip() and len(line) <= LINE for line in code.splitlines())
