"""The ``reconfx`` command's entry point: installs the signal handlers before anything else is
imported (see :mod:`reconfx.interrupts`), then runs :func:`reconfx.cli.main`."""

from reconfx import interrupts

__all__ = [
    "main"
]

interrupts.install()


def main() -> int:
    from reconfx.cli import main as run

    return run()
