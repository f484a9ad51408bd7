"""Ctrl-C without a screen of tracebacks.

ignite catches every exception of a run, ``KeyboardInterrupt`` included, logs "Engine run is
terminating due to exception:" and fires ``EXCEPTION_RAISED``, where MONAI's ``StatsHandler`` logs
the whole traceback before the exception goes on. The command-line tools catch the interrupt and
print one line on how to go on; :func:`quiet_interrupt_logs` keeps those error records (logged
while a ``KeyboardInterrupt`` is being handled) off the console. Every other error is logged as
before.

Handlers that MONAI creates while a run starts (``StatsHandler`` adds its own to its logger when a
bundle instantiates it) are not there yet when a command enters :func:`quiet_interrupt_logs`:
dira3d's engines take :class:`QuietInterruptMixin`, which filters at the moment of the interrupt,
and ``dira3d finetune`` instantiates MONAI's engines before it enters the context.

Pretraining stops more gently: :mod:`dira3d.engines.stopping` turns SIGTERM and a first Ctrl-C into a
stop after the step, with ``last.pt`` written, ending in :class:`StoppedBySignal`.

A Ctrl-C that a command caught still ended the process by SIGINT under ``python -m`` (after the command's
one line: "killed by signal", ``returncode`` -2 in ``subprocess``, not the command's 130): CPython marks a
``KeyboardInterrupt`` that leaves code run by ``exec`` / ``eval`` of a string as unhandled even when a caller
catches it (MONAI runs every ``$`` expression of a bundle config that way, ``$@trainer.run()`` included),
and ``python -m`` ends the process with SIGINT when the mark is set, whatever ``sys.exit`` said; a script
(the installed ``dira3d`` command) exits through ``sys.exit`` first and was not affected.
:func:`install_interrupt_exit_hook` (registered when ``dira3d`` is imported) clears the mark at exit
unless the interrupt really went uncaught.
"""

from __future__ import annotations

import atexit
import logging
import signal
import sys
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["InterruptLogFilter", "QuietInterruptMixin", "StoppedBySignal", "TerminatedBySignal", "WrittenFiles",
           "forget_caught_interrupt", "install_interrupt_exit_hook", "interrupt_exit_code", "interrupted_word",
           "loading_stopped", "quiet_engine_errors", "quiet_error_logs", "quiet_interrupt_logs", "sigterm_as_interrupt",
           "sigterm_ignored"]


class StoppedBySignal(SystemExit):
    """A run stopped by SIGTERM / SIGINT after saving ``last.pt``: ``SystemExit`` with code 128 + the signal
    number (``python -m monai.bundle run`` exits with it and no traceback; ``dira3d pretrain`` prints one
    line). Raised by :func:`dira3d.engines.exit_if_stopped`; defined here, without torch, for the commands.

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        iteration: the last iteration trained (that of ``last.pt``).
    """

    def __init__(self, signal_name: str, iteration: int) -> None:
        super().__init__(128 + int(getattr(signal, signal_name)))
        self.signal_name, self.iteration = signal_name, int(iteration)

    def __str__(self) -> str:
        return f"stopped by {self.signal_name} at iteration {self.iteration}"


class TerminatedBySignal(KeyboardInterrupt):
    """SIGTERM (SLURM preemption, ``scancel``, ``kill``) taken as a Ctrl-C by :func:`sigterm_as_interrupt`: the
    command's Ctrl-C path runs (its one line), and it exits with :attr:`code` (143) instead of 130."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def code(self) -> int:
        return 128 + self.signum


def interrupt_exit_code(err: BaseException) -> int:
    """The exit status after a caught interrupt: 128 + the signal (143 for SIGTERM), 130 for a Ctrl-C."""
    return int(getattr(err, "code", None) or 130)


def interrupted_word(err: BaseException | None) -> str:
    """How a command's one line after a caught interrupt starts: "interrupted" (Ctrl-C) or "stopped by SIGTERM"."""
    return "interrupted" if err is None or interrupt_exit_code(err) == 130 else "stopped by SIGTERM"


def loading_stopped(command: str, err: BaseException | None) -> str:
    """The one line of ``dira3d <command>`` stopped by Ctrl-C or SIGTERM while torch / MONAI load, before it wrote
    anything: when :mod:`dira3d.cli` imports the command's module, or later in a command that loads them only after
    its quick refusals (``dira3d pretrain``, ``dira3d visual-words``)."""
    return f"dira3d {command}: {interrupted_word(err)} while loading, before the command started; nothing was written"


class WrittenFiles:
    """The files a command wrote under its outputs, for its one line after Ctrl-C: made before the work starts, it
    records the files under ``paths`` (a file, or every file of a folder) and their modification times; :meth:`since`
    lists the ones new or changed since. Hidden files (locks, the temporaries of atomic writes) are left out."""

    def __init__(self, *paths: str | os.PathLike) -> None:
        self.paths = [Path(p) for p in paths]
        self.before = self._scan()

    def _scan(self) -> dict[Path, int]:
        found: dict[Path, int] = {}
        for path in self.paths:
            try:
                files = [path] if path.is_file() else (path.rglob("*") if path.is_dir() else ())
                for file in files:
                    if file.is_file() and not file.name.startswith("."):
                        found[file] = file.stat().st_mtime_ns
            except OSError:  # a folder removed or unreadable meanwhile: what can be read is listed
                continue
        return found

    def since(self) -> list[Path]:
        """The files new or changed since this object was made, sorted."""
        return sorted(p for p, mtime in self._scan().items() if self.before.get(p) != mtime)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the body runs, SIGTERM raises :class:`TerminatedBySignal` (a ``KeyboardInterrupt``) where Python code
    is running, as Ctrl-C does, instead of ending the process at once without a word. For commands that cannot
    resume (``dira3d finetune``, ``dira3d experiment``): they print their one Ctrl-C line and exit 143. A
    pretraining inside puts its own gentler handler (:mod:`dira3d.engines.stopping`) in place while it runs.

    Installed in the main thread only; a SIGTERM set to be ignored (``SIG_IGN``) stays ignored; the previous
    handler is put back after."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise TerminatedBySignal(signum)

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_ignored() -> Iterator[None]:
    """While the body runs, SIGTERM is ignored (main thread only; the previous handler is put back after, and a
    SIGTERM that came meanwhile is dropped, not delivered then). For writing the record of a run that a first SIGTERM
    already stopped: SLURM signals every process of a job step and ``torchrun`` forwards the signal it got too, so a
    rank may get a second SIGTERM right after the first, which SIGTERM's default action would end before its record
    is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class _QuietErrorFilter(logging.Filter):
    """Drop records of level ERROR and above logged about an error for which ``quiet`` is true."""

    def __init__(self, quiet: Callable[[BaseException], bool]) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        error = (record.exc_info or sys.exc_info())[1]  # the filter runs inside the logging call
        return not (record.levelno >= logging.ERROR and error is not None and self.quiet(error))


class InterruptLogFilter(_QuietErrorFilter):
    """Drop records of level ERROR and above that are logged about a ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        super().__init__(lambda error: isinstance(error, KeyboardInterrupt))


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    found = {id(h): h for logger in loggers for h in logger.handlers}
    if logging.lastResort is not None:
        found[id(logging.lastResort)] = logging.lastResort
    return list(found.values())


@contextmanager
def quiet_interrupt_logs() -> Iterator[None]:
    """While the body runs, the handlers configured now leave out the error records of a Ctrl-C.

    Enter it after the logging set-up (a bundle's ``logging.conf`` replaces the handlers).
    The interrupt itself still propagates: the caller says what to do next.
    """
    with quiet_error_logs(lambda error: isinstance(error, KeyboardInterrupt)):
        yield


@contextmanager
def quiet_error_logs(quiet: Callable[[BaseException], bool]) -> Iterator[None]:
    """While the body runs, the handlers configured now leave out the error records logged about an error for which
    ``quiet`` is true (ignite's and ``StatsHandler``'s traceback of an error the caller reports in its own line).
    Enter it after the logging set-up; the error itself still propagates."""
    quiet_filter = _QuietErrorFilter(quiet)
    handlers = _all_handlers()
    for handler in handlers:
        handler.addFilter(quiet_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet_filter)


_ENGINE_ERRORS_QUIET = False  # set by quiet_engine_errors()


def quiet_engine_errors() -> None:
    """From now on, :class:`QuietInterruptMixin` engines leave out the error logs of every error, not only of a Ctrl-C
    (for a rank that reports its error in one line: ``dira3d.engines.distributed.brief_errors_on_other_ranks``)."""
    global _ENGINE_ERRORS_QUIET
    _ENGINE_ERRORS_QUIET = True


class QuietInterruptMixin:
    """For ignite engines: the ``EXCEPTION_RAISED`` handlers of a Ctrl-C run as before (a checkpoint
    handler still sees it), but their error logs, e.g. ``StatsHandler``'s traceback, are left out."""

    def _handle_exception(self, e: BaseException) -> None:
        if _ENGINE_ERRORS_QUIET:  # a torchrun rank other than 0 that reports its error in one line
            with quiet_error_logs(lambda error: True):
                return super()._handle_exception(e)  # type: ignore[misc]
        if not isinstance(e, KeyboardInterrupt):
            return super()._handle_exception(e)  # type: ignore[misc]
        with quiet_interrupt_logs():
            return super()._handle_exception(e)  # type: ignore[misc]


def forget_caught_interrupt() -> None:
    """Clear CPython's mark of an unhandled ``KeyboardInterrupt`` (set when one left an ``exec`` / ``eval`` of a
    string, even though it was caught later): every such evaluation starts by clearing it, and this one raises
    nothing."""
    exec("pass", {})  # noqa: S102 - a constant: the evaluation itself is what clears the mark


def _exit_with_own_status() -> None:
    """``atexit``: unless a ``KeyboardInterrupt`` went uncaught (its traceback was printed: ``sys.last_value``),
    the process exits with the status the program gave, not by SIGINT."""
    if not isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        forget_caught_interrupt()


def install_interrupt_exit_hook() -> None:
    """Register the ``atexit`` hook that keeps a caught Ctrl-C from ending ``python -m ...`` by SIGINT (once)."""
    atexit.unregister(_exit_with_own_status)
    atexit.register(_exit_with_own_status)
