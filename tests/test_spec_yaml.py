"""YAML 1.1 reads unquoted off/on/yes/no as booleans: every spec field whose documented values
include one of those words accepts it written unquoted, as the docs show it."""

from __future__ import annotations

import typing

import pytest
import yaml
from pydantic import BaseModel

from reconfx import spec as spec_module
from reconfx.spec import Spec

WORDS = {"off", "on", "yes", "no"}


def word_fields() -> list[tuple[type[BaseModel], str, str]]:
    """(model, field, word) for each Literal field of the spec's models offering a YAML word."""
    found, seen, todo = [], set(), [Spec]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            for arg in _flat(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
            values = {v for t in _flat(field.annotation) if typing.get_origin(t) is typing.Literal
                      for v in typing.get_args(t)}
            found += [(model, name, word) for word in sorted(values & WORDS)]
    return found


def _flat(annotation: object) -> list[object]:
    out = [annotation]
    for arg in typing.get_args(annotation):
        out += _flat(arg)
    return out


FIELDS = word_fields()


def test_the_spec_has_fields_offering_yaml_words():
    assert (spec_module.BranchSpec, "stream_batching", "off") in FIELDS


@pytest.mark.parametrize(("model", "field", "word"), FIELDS,
                         ids=[f"{m.__name__}.{f}={w}" for m, f, w in FIELDS])
def test_an_unquoted_yaml_word_is_taken_as_written(model, field, word):
    parsed = yaml.safe_load(f"{field}: {word}")
    assert isinstance(parsed[field], bool)  # (YAML 1.1's reading)
    assert getattr(model(**parsed), field) == word
