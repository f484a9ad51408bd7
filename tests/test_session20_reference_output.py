"""Reference tests for session 20's console output, written by a mutation audit: the one-line format of dira3d's
warnings (dira3d.utils.warning_format; other warnings as Python formats them, written out by hand) and the progress
lines of a job without a terminal (dira3d.utils.progress.ProgressLines, on a clock the test sets: at most one line a
minute, the time to go from the rate so far)."""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path


import dira3d
import dira3d.utils.progress as progress_module
from dira3d.utils.progress import ProgressLines, show_progress
from dira3d.utils.warning_format import install_warning_format, is_dira3d_warning

PACKAGE = Path(dira3d.__file__).resolve().parent


def test_a_second_install_keeps_the_one_wrapper():
    before = warnings.formatwarning  # installed by import dira3d
    install_warning_format()
    assert warnings.formatwarning is before
    assert before("left out", UserWarning, str(PACKAGE / "data" / "io.py"), 3) == "WARNING: left out\n"


def test_other_warnings_keep_python_s_format_with_the_line_given():
    text = warnings.formatwarning("going away", DeprecationWarning, "/elsewhere/lib.py", 7, "    old_call(x)")
    assert text == "/elsewhere/lib.py:7: DeprecationWarning: going away\n  old_call(x)\n"


def test_the_package_is_found_through_a_link_and_a_name_it_cannot_read_is_not_dira3d_s(tmp_path, monkeypatch):
    (tmp_path / "linked").symlink_to(PACKAGE, target_is_directory=True)
    assert is_dira3d_warning(UserWarning, str(tmp_path / "linked" / "data" / "io.py"))
    assert not is_dira3d_warning(UserWarning, "/elsewhere/a\x00b.py")  # resolve() refuses it: not dira3d's
    monkeypatch.chdir(PACKAGE / "utils")  # no file name: not dira3d's, whatever the working folder
    assert not is_dira3d_warning(UserWarning, "")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def _lines(monkeypatch, total: int, start: float = 1000.0, **kwargs) -> tuple[Clock, ProgressLines, io.StringIO]:
    clock = Clock(start)
    monkeypatch.setattr(progress_module, "time", clock)
    stream = io.StringIO()
    return clock, ProgressLines("toy", total, stream=stream, **kwargs), stream


def test_a_line_at_most_once_a_minute_with_the_time_to_go_from_the_rate_so_far(monkeypatch):
    clock, lines, stream = _lines(monkeypatch, 10)
    for at in (30, 60, 100, 120, 150):  # seconds after the start, one case each
        clock.now = 1000.0 + at
        lines.update()
    # 60 s: 2 done, 30 s a case, 8 to go; 100 s: 40 s after the last line, none; 120 s: 4 done, 6 x 30 s to go
    assert stream.getvalue().splitlines() == ["toy: 2/10 cases (60 s; about 4 min to go)",
                                              "toy: 4/10 cases (2 min; about 3 min to go)"]


def test_no_line_for_the_last_case_nor_when_disabled(monkeypatch):
    clock, lines, stream = _lines(monkeypatch, 2)
    clock.now += 90
    lines.update(2)  # done: the job's own summary follows
    assert stream.getvalue() == ""
    clock, lines, stream = _lines(monkeypatch, 5, enabled=False)
    clock.now += 90
    lines.update()
    assert stream.getvalue() == ""


def test_update_counts_its_n_and_durations_switch_units_at_2_min_and_2_h(monkeypatch):
    clock, lines, stream = _lines(monkeypatch, 100, unit="volumes")
    clock.now += 3600.0
    lines.update(40)  # 90 s a volume, 60 to go: 90 min
    clock.now += 3600.0
    lines.update(40)  # 2 h for 80: 20 to go, 30 min
    clock.now += 59.0
    lines.update(1)  # 59 s after the last line: none
    assert stream.getvalue().splitlines() == ["toy: 40/100 volumes (60 min; about 90 min to go)",
                                              "toy: 80/100 volumes (2.0 h; about 30 min to go)"]
    clock, lines, stream = _lines(monkeypatch, 1000)
    clock.now += 120.0
    lines.update(999)  # 120 s: 2 min; 1 to go: 0 s
    assert stream.getvalue() == "toy: 999/1000 cases (2 min; about 0 s to go)\n"


def test_lines_go_to_stderr_or_to_emit(monkeypatch):
    clock = Clock(0.0)
    monkeypatch.setattr(progress_module, "time", clock)
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    lines = ProgressLines("toy", 3)
    clock.now = 60.0
    lines.update()
    assert err.getvalue() == "toy: 1/3 cases (60 s; about 2 min to go)\n" and out.getvalue() == ""
    emitted: list[str] = []
    lines = ProgressLines("toy", 3, emit=emitted.append)
    clock.now = 120.0
    lines.update()
    assert emitted == ["toy: 1/3 cases (60 s; about 2 min to go)"] and err.getvalue().count("\n") == 1


def test_another_node_s_local_rank_0_draws_no_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of the second node shares no terminal with rank 0
    assert show_progress(Terminal()) is False
