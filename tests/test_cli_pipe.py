"""``dira3d ... | head``: a reader that stops early ends the command quietly, not with a BrokenPipeError traceback.

The pipe's read end is closed before the command starts, so its first write (or the flush at its end) meets a
pipe without a reader, as after ``head -1`` has read its line and gone; reading a line first would be a race with
outputs that fit in the pipe's buffer (all of these: they are written before ``head`` closes its end).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dira3d.cli as cli

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["--version"], *([name, "--help"] for name in cli.COMMANDS)]


def _into_closed_pipe(argv: list[str], buffered: bool, module: str = "dira3d") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", module, *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=120)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_output_into_a_closed_pipe_ends_quietly(argv):
    """`dira3d --help | head` ended in a BrokenPipeError traceback (exit 1), a subcommand's help in "Exception
    ignored ... BrokenPipeError" at exit (120): now nothing on stderr and exit 141 (128 + SIGPIPE)."""
    done = _into_closed_pipe(argv, buffered=True)
    assert done.stderr == "", done.stderr
    assert done.returncode == cli.STDOUT_CLOSED == 141, (done.returncode, done.stderr)


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["prepare", "--help"]], ids=" ".join)
def test_unbuffered_output_into_a_closed_pipe_ends_quietly(argv):
    """With PYTHONUNBUFFERED a print fails at once, inside the command (a traceback and exit 1 before); argparse's
    help (the other commands') ignores that error itself and exits 0, as it did."""
    done = _into_closed_pipe(argv, buffered=False)
    assert done.stderr == "", done.stderr
    assert done.returncode == cli.STDOUT_CLOSED, (done.returncode, done.stderr)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("run", ["help", "first step"])
def test_demo_module_run_directly_into_a_closed_pipe_ends_quietly(tmp_path, run, buffered):
    """`make demo` runs `python -m dira3d.demo`, not the dira3d command: `python -m dira3d.demo | head -3` ended in a
    BrokenPipeError traceback (exit 1) at the step line the reader no longer took, its help in "Exception ignored ...
    BrokenPipeError" (120); now as `dira3d demo`: nothing on stderr and exit 141, before any phantom is written."""
    out = tmp_path / "demo"
    argv = ["--help"] if run == "help" else ["--out", str(out), "--count", "10", "--classes", "2", "--skip-finetune"]
    done = _into_closed_pipe(argv, buffered=buffered, module="dira3d.demo")
    assert done.stderr == "", done.stderr
    # argparse's help ignores the error of an unbuffered write itself and exits 0, as `dira3d demo --help` does
    expected = 0 if run == "help" and not buffered else cli.STDOUT_CLOSED
    assert done.returncode == expected, (done.returncode, done.stderr)
    assert not (out / "luna16_raw").exists()


def test_a_broken_pipe_that_is_not_stdout_stays_an_error(monkeypatch):
    """Only a closed standard output is quiet: a BrokenPipeError of another pipe (a data-loading worker's) goes on."""
    import dira3d.demo

    def broken(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(dira3d.demo, "main", broken)
    with pytest.raises(BrokenPipeError):
        cli.main(["demo"])
