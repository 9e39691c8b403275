"""The ``ksm-analyze`` console script: signals first, then the (slow to import) command line.

Until ``cli.main`` installs its own handlers, importing numpy and typer (and pandas, for the
commands that need it) takes a noticeable part of a second; Ctrl-C or SIGTERM then must not
print a ``KeyboardInterrupt`` traceback. Nothing
has been read or written yet, so the early handler just says so and exits.
"""

from __future__ import annotations

import os
import signal
from types import FrameType


def _early(signum: int, frame: FrameType | None) -> None:
    os.write(2, f"Error: interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _early)
    from .cli import main as run

    run()
