"""Progress reports: a tqdm bar on a terminal, whole periodic lines in a log file."""

from __future__ import annotations

import io
import os
import re

from tqdm import tqdm

from instaflow_jax.progress import LineProgress, progress_bar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def counts(text: str) -> list[int]:
    """The done-count of each report line ``desc: 40% 4/10 […]``."""
    return [int(m) for m in re.findall(r"^\w+: +\d+% (\d+)/\d+ ", text, flags=re.M)]


def test_a_log_file_gets_one_line_per_tenth_never_a_redraw():
    log = io.StringIO()
    bar = progress_bar(total=100, desc="train", unit="step", file=log, every_s=3600)
    for step in range(100):
        bar.update(1)
        if step == 50:
            bar.set_postfix(loss="0.5")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert counts(text) == list(range(0, 101, 10)), text
    assert len(text.splitlines()) == 11 and "loss=0.5" in text.splitlines()[-1]


def test_lines_also_come_every_so_many_seconds_and_resume_from_initial():
    log = io.StringIO()
    bar = progress_bar(total=1000, desc="x", initial=400, file=log, every_s=0.0)  # always due
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert counts(log.getvalue()) == [400, 401, 402, 403]
    log = io.StringIO()
    bar = progress_bar(total=None, desc="x", file=log, every_s=0.0)
    bar.update(2)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("x: 2 ")


def test_a_terminal_gets_tqdms_bar_and_disable_prints_nothing():
    assert not isinstance(progress_bar(total=3, file=Terminal(), disable=True), LineProgress)
    assert isinstance(progress_bar(total=3, file=Terminal()), tqdm)
    log = io.StringIO()
    bar = progress_bar(total=3, file=log, disable=True)
    bar.update(3)
    bar.close()
    assert log.getvalue() == ""


def test_every_progress_bar_of_the_package_goes_through_the_helper():
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "instaflow_jax")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "progress.py":
                with open(path, encoding="utf-8") as f:
                    if re.search(r"\btqdm\(|from tqdm|import tqdm", f.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, f"use instaflow_jax.progress.progress_bar instead of tqdm in {offenders}"
