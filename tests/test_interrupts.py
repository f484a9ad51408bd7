"""Ctrl-C during a MONAI/ignite run: no traceback on the console, other errors logged as before."""

from __future__ import annotations

import io
import itertools
import logging
import os

import pytest
from ignite.engine import Engine, Events
from monai.handlers import StatsHandler

from dira3d.utils.interrupts import WrittenFiles, quiet_interrupt_logs


def _run(error: BaseException, quiet: bool) -> str:
    """Log of an ignite run with MONAI's StatsHandler whose first step raises ``error``."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level, root.level = root.level, logging.INFO

    def step(engine, batch):
        raise error

    engine = Engine(step)
    StatsHandler(name=None, output_transform=lambda x: None).attach(engine)
    try:
        with pytest.raises(type(error)):
            if quiet:
                with quiet_interrupt_logs():
                    engine.run([0, 1], max_epochs=1)
            else:
                engine.run([0, 1], max_epochs=1)
    finally:
        root.removeHandler(handler)
        root.level = old_level
    return stream.getvalue()


def test_ctrl_c_logs_no_traceback_but_other_errors_do():
    loud = _run(KeyboardInterrupt(), quiet=False)
    assert "Traceback" in loud and "terminating due to exception" in loud  # what the user used to see
    assert "Traceback" not in _run(KeyboardInterrupt(), quiet=True)
    assert "terminating due to exception" not in _run(KeyboardInterrupt(), quiet=True)
    failure = _run(RuntimeError("disk full"), quiet=True)
    assert "Traceback" in failure and "disk full" in failure  # a real error keeps its traceback


def test_filters_are_removed_after_the_run():
    before = {id(h): list(h.filters) for h in logging.getLogger().handlers}
    with quiet_interrupt_logs():
        pass
    assert {id(h): list(h.filters) for h in logging.getLogger().handlers} == before


def test_engine_mixin_quiets_handlers_made_during_the_run():
    """MONAI's StatsHandler adds its own console handler when it is built (inside a bundle's run,
    after a command set up its filters); the dira3d engines filter at the interrupt itself."""
    from dira3d.utils.interrupts import QuietInterruptMixin

    class QuietEngine(QuietInterruptMixin, Engine):
        pass

    seen = []
    names = itertools.count()

    def build_and_run(cls, error):
        def step(engine, batch):
            raise error

        engine = cls(step)
        # a user's handler (before StatsHandler, which re-raises) still sees the interrupt
        engine.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, e: seen.append(type(e).__name__))
        name = f"dira3d.test.stats.{next(names)}"
        StatsHandler(output_transform=lambda x: None, name=name).attach(engine)
        # its logger's handler is made after any filter set up before the run; read it into a buffer
        # (the console streams of earlier tests may be closed, which logging reports as a traceback)
        stream, logger = io.StringIO(), logging.getLogger(name)
        logger.handlers, logger.propagate = [logging.StreamHandler(stream)], False
        with pytest.raises(type(error)):
            engine.run([0], max_epochs=1)
        return stream.getvalue()

    assert "Traceback" in build_and_run(Engine, KeyboardInterrupt())  # MONAI's default
    assert build_and_run(QuietEngine, KeyboardInterrupt()) == ""
    assert "Traceback" in build_and_run(QuietEngine, RuntimeError("disk full"))
    # (ignite hands an Exception, not a KeyboardInterrupt, to the handlers at two levels)
    assert seen[:2] == ["KeyboardInterrupt", "KeyboardInterrupt"] and set(seen[2:]) == {"RuntimeError"}


def test_dira_engines_take_the_mixin():
    from dira3d.engines import DiRAEvaluator, DiRATrainer
    from dira3d.utils.interrupts import QuietInterruptMixin

    assert issubclass(DiRATrainer, QuietInterruptMixin) and issubclass(DiRAEvaluator, QuietInterruptMixin)


def test_written_files_lists_new_and_changed_files_but_not_hidden_ones(tmp_path):
    """What a command's one line after Ctrl-C counts: a file it rewrote (--overwrite) is written too, and its own lock
    and the temporaries of atomic writes (hidden) are not files it wrote."""
    out = tmp_path / "out"
    (out / "subset0").mkdir(parents=True)
    for name in ("subset0/1.mhd", "subset0/2.mhd"):
        (out / name).write_text("before")
    single = tmp_path / "model.ts"  # a command whose output is one file, not there yet
    written = WrittenFiles(out, single)
    assert written.since() == []
    rewritten = out / "subset0" / "1.mhd"
    stat = rewritten.stat()
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, a second later
    (out / "subset1").mkdir()
    (out / "subset1" / "3.mhd").write_text("new")
    (out / ".dira3d.lock").write_text("")
    (out / "subset1" / ".4.mhd.abcd1234.tmp").write_text("half")
    single.write_bytes(b"x")
    assert written.since() == sorted([rewritten, out / "subset1" / "3.mhd", single])
