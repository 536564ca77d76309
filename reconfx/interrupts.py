"""Ctrl-C and SIGTERM at any moment of a command, its first second of imports included: exit
130 or 143 with one line (the CLI prints it), never a traceback or a half-imported library.

A signal that arrives while Python imports a module (``torch`` and ``numpy`` take most of a
command's first seconds) is put off until the import is done: interrupting an extension module's
initialisation leaves it half set up, so that the clean-up code failed in odd ways (a
``RecursionError``, numpy without ``multiply``, a C++ ``terminate``). The handlers are
installed by the console entry point before anything heavy is imported (:func:`install`).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

__all__ = [
    "install", "Terminated"
]

_RETRY_S = 0.02  # how soon a signal put off during an import is delivered again


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):
        threading.Timer(_RETRY_S, os.kill, (os.getpid(), signum)).start()
        return
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def install() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM :class:`Terminated`, each put off while a
    module is being imported (main thread only: elsewhere handlers cannot be set)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
