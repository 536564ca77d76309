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
    assert render_index((slice(None),), str) == ":,"
