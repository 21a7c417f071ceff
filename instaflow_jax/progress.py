"""Progress bars fit for terminals and for log files.

On a terminal, :func:`progress_bar` is a plain tqdm bar. When its stream is not a terminal (a
log file, CI, ``nohup``), it writes whole lines instead of carriage-return redraws: one at the
start, one each time another ``fraction`` of the total is done or ``every_s`` seconds have
passed, whichever comes first, and one at the end.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class LineProgress(tqdm):
    """tqdm that prints a full line per report, at most every ``fraction`` of the total or ``every_s``."""

    monitor_interval = 0  # no monitor thread: reports happen on updates only

    def __init__(self, *args: Any, every_s: float = 30.0, fraction: float = 0.1, **kwargs: Any) -> None:
        self._every_s, self._fraction = every_s, fraction
        self._last_t, self._next_n, self._printed_n = -math.inf, 0.0, -1
        fmt = LINE_FORMAT if kwargs.get("total") is not None else LINE_FORMAT_NO_TOTAL
        kwargs.update(mininterval=0, miniters=1, leave=False, dynamic_ncols=False)
        kwargs.setdefault("bar_format", fmt)
        super().__init__(*args, **kwargs)

    def _emit(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._last_t, self._printed_n = time.monotonic(), self.n
        if self.total:
            step = max(self.total * self._fraction, 1)
            self._next_n = (math.floor(self.n / step) + 1) * step

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing or overwriting its line: nothing to take back in a file
            return False
        if self.n >= self._next_n or time.monotonic() - self._last_t >= self._every_s:
            self._emit()
        return True

    def close(self) -> None:
        if not self.disable and self._printed_n != self.n:
            self._emit()  # the final count, always
        super().close()


def progress_bar(
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    file: TextIO | None = None,
    every_s: float = 30.0,
    fraction: float = 0.1,
) -> tqdm:
    """A tqdm bar on a terminal, periodic single lines otherwise (see the module docstring).

    ``file`` defaults to stderr; the result has tqdm's ``update``, ``set_postfix`` and ``close``.
    """
    file = sys.stderr if file is None else file
    kwargs = dict(total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(**kwargs)
    return LineProgress(every_s=every_s, fraction=fraction, **kwargs)
