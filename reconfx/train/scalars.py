"""Training scalars as tools read them: rows of CSV text and live TensorBoard event files.

``fit`` records one row per step (step, epoch, learning rate, each task's loss) and one per
epoch (learning rate, mean losses, validation metrics, conflict share). ``run`` writes them as
``steps.csv`` and ``metrics.csv``; with ``export.tensorboard`` the same scalars also go, while
training runs, to TensorBoard event files in ``<export.dir>/tensorboard``, all on one axis: the
global step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reconfx import outdir
from reconfx.errors import SpecError

__all__ = [
    "csv_text", "logged_to", "require_tensorboard", "TensorBoard"
]


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV: the columns in the order they first appear, integers as they are, other
    numbers with 6 significant digits, a missing or None value empty."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [",".join(columns)]
    lines += [",".join("" if row.get(c) is None else str(row[c]) if isinstance(row[c], int)
                       else f"{row[c]:.6g}" for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def require_tensorboard(where: str) -> None:
    """A :class:`SpecError` naming the field and the extra to install when TensorBoard's
    writer cannot be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise SpecError("export.tensorboard is true but the tensorboard package is not "
                        "installed", where=f"{where}: export.tensorboard",
                        fix="pip install 'reconfx[tensorboard]', or set export.tensorboard: "
                        "false (metrics.csv and steps.csv hold the same scalars)") from exc


class TensorBoard:
    """Scalars written live to TensorBoard event files in ``folder``. A fresh run (``start``
    0) empties the folder first; a resumed one continues it, dropping the events an
    interrupted run logged after the step it resumes from."""

    def __init__(self, folder: Path, start: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        if start == 0:
            outdir.clear_working(folder)  # (only the event files reconfx wrote there)
        self.folder = outdir.working_folder(folder.parent, folder.name)
        before = {e.name for e in os.scandir(self.folder)}
        # (the events logged after the resumed step are dropped: steps 1..start are kept)
        self.writer = SummaryWriter(str(folder), purge_step=start + 1 if start else None)
        self.files = sorted(e.name for e in os.scandir(self.folder) if e.name not in before)
        outdir.record(self.folder, *self.files, appended=True)

    def add(self, step: int, row: dict[str, Any], prefix: str = "") -> None:
        """Each numeric value of ``row`` except ``step`` and ``epoch``, at ``step``, tagged
        ``prefix`` + its column name."""
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, int | float):
                self.writer.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        self.writer.close()
        outdir.record(self.folder, *self.files)  # (their size and time as the run left them)


@contextlib.contextmanager
def logged_to(folder: Path | None, start: int) -> Iterator[TensorBoard | None]:
    """A :class:`TensorBoard` writer into ``folder`` for the block, closed after it however it
    ends; None without a folder."""
    if folder is None:
        yield None
        return
    board = TensorBoard(folder, start)
    try:
        yield board
    finally:
        board.close()
