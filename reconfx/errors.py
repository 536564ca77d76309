"""The reconfx error hierarchy: every failure a user can cause or see is one of these.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``: 2 for bad input
(spec, model, checkpoint), 1 for failures of a pass or a check.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = [
    "CheckError", "FolderRefused", "located", "ModelError", "OutputError", "ReconfxError",
    "SelectionError", "SpecError", "TraceError", "TrainingError", "unexpected"
]


class ReconfxError(Exception):
    """Base class. ``where`` names the file and field, ``fix`` says what to do."""

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(str(self))

    def at(self, where: str) -> ReconfxError:
        """The same error located at ``where`` (a former ``where`` joins the message)."""
        message = f"{self.where}: {self.message}" if self.where else self.message
        return type(self)(message, where=where, fix=self.fix)

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} (fix: {self.fix})" if self.fix else text


class SpecError(ReconfxError):
    """The spec file is malformed, has an unknown key, or a value of the wrong type."""

    exit_code = 2


class ModelError(ReconfxError):
    """The model factory, checkpoint or model outputs do not fit the spec."""

    exit_code = 2


class TraceError(ReconfxError):
    """Neither tracing tier can turn the model into a graph."""

    exit_code = 2


class SelectionError(ReconfxError):
    """The layers asked for cannot be selected (pattern matches nothing, layer not shared...)."""

    exit_code = 2


class CheckError(ReconfxError):
    """A compiled artifact failed an invariant check (I1-I4); nothing was written."""

    exit_code = 1


class OutputError(ReconfxError):
    """The output folder cannot be written (permissions, disk full)."""

    exit_code = 1


class FolderRefused(OutputError):
    """The output folder is not reconfx's to write (it holds the user's files, or it is the root,
    home or working directory), or another command is writing it; nothing was written."""

    exit_code = 2


class TrainingError(ReconfxError):
    """Profiling or training cannot go on: a non-finite loss or gradient, a model whose outputs
    do not fit its targets."""

    exit_code = 1


def unexpected(exc: BaseException) -> None:
    """A fallback met an exception it does not expect there (a bug in reconfx, not a candidate
    that fails as candidates may): raised again under ``RECONFX_STRICT=1``, as the test suite
    runs, so that it fails loudly; else the fallback goes on, and the user's command completes
    the longer way (model.py writing out ops it would have called whole)."""
    if os.environ.get("RECONFX_STRICT") == "1":
        raise exc


@contextlib.contextmanager
def located(path: str) -> Iterator[None]:
    """A spec or model error raised inside whose ``where`` names a spec field but not the
    spec's file (``tasks[0].loss``, from code that does not know the file) gets the file
    prepended (a TrainingError's ``where`` is a step of the run, and stays as it is)."""
    try:
        yield
    except (SpecError, ModelError) as exc:
        if exc.where and not exc.where.startswith(path):
            exc.where = f"{path}: {exc.where}"
            exc.args = (str(exc),)
        raise
