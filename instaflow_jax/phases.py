"""Start-up feedback: one line per phase while models load and programs compile.

    with phase("compiling train step") as timer:
        compiled = step_fn.lower(...).compile()
    # stderr: "compiling train step… 41.2 s"; timer.seconds == 41.2

The label is written (and flushed) when the phase starts, so a slow phase shows what it is doing;
its duration ends the same line.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Phase:
    """A started phase: its label is printed (when ``enabled``) at once; ``done()`` ends the line."""

    def __init__(self, label: str, enabled: bool = True, file: TextIO | None = None):
        self.enabled, self.file = enabled, sys.stderr if file is None else file
        self.seconds = 0.0
        if enabled:
            self.file.write(f"{label}… ")
            self.file.flush()
        self._start = time.perf_counter()

    def done(self, failed: bool = False) -> float:
        """Print ``<seconds> s`` (or ``failed after <seconds> s``) and return the seconds."""
        self.seconds = time.perf_counter() - self._start
        if self.enabled:
            self.file.write(f"{'failed after ' if failed else ''}{self.seconds:.1f} s\n")
            self.file.flush()
        return self.seconds


@contextlib.contextmanager
def phase(label: str, enabled: bool = True, file: TextIO | None = None) -> Iterator[Phase]:
    """Time the block; when ``enabled``, print ``"<label>… <seconds> s"`` on one line of ``file``
    (stderr by default), or ``"<label>… failed after <seconds> s"`` if the block raises."""
    timer = Phase(label, enabled, file)
    try:
        yield timer
    except BaseException:
        timer.done(failed=True)
        raise
    timer.done()
