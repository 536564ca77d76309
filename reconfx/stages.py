"""Progress of a command's stages on the terminal: each stage's line as it starts and as it
finishes, with its time (``compiling ...`` is no longer followed by minutes of silence)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from reconfx.memory import release

__all__ = [
    "QUIET", "Stages"
]


class Stages:
    """``with stages("tracing", lambda: f"traced with {tier}"):`` prints ``  tracing ...`` and
    then ``  traced with fx (0.4 s)``; nothing when disabled (``--quiet``, other ranks)."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled and os.environ.get("RANK", "0") == "0"  # (one rank speaks)
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, doing: str, done: str | Callable[[], str] | None = None
                 ) -> Iterator[None]:
        if self.enabled:
            print(f"  {doing} ...", flush=True)
        start = time.perf_counter()
        yield
        release()  # (what the stage freed, before the next one's peak)
        seconds = time.perf_counter() - start
        self.times[doing] = seconds
        if self.enabled:
            text = done() if callable(done) else (done or f"{doing}: done")
            first, _, rest = text.partition("\n")  # (a table after the first line)
            print(f"  {first} ({seconds:.1f} s)" + (f"\n{rest}" if rest else ""), flush=True)


QUIET = Stages(False)
