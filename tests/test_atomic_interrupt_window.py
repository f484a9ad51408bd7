"""An interrupt right after ``atomic_path`` creates its temporary file leaves nothing behind (session 25).

``tests/test_prepare_interrupts.py`` failed once under load: SIGTERM, sent as soon as ``dira3d prepare`` had made its
first temporary file, left ``.<case>.nii.gz.xxxxxxxx.nii.gz`` in ``volumes/``. The handler's ``TerminatedBySignal``
was raised between ``tempfile.mkstemp`` and the ``try`` that removes the file (in the ``flock`` call there); the
rerun removed it, but the stop is meant to leave none. The name is now known before the file exists and every step
after it is inside that ``try``.
"""

from __future__ import annotations

import os

import pytest

from dira3d.utils import atomic
from dira3d.utils.atomic import atomic_path, atomic_write_text


def test_an_interrupt_while_the_temporary_file_is_locked_removes_it(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt  # as the SIGTERM handler raises TerminatedBySignal at the next bytecode

    monkeypatch.setattr(atomic, "_hold", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "case.nii.gz", suffix=".nii.gz"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_interrupt_right_after_the_file_is_created_removes_it(tmp_path, monkeypatch):
    real_open = os.open

    def created_then_interrupted(name, *args, **kwargs):
        fd = real_open(name, *args, **kwargs)
        if os.path.basename(str(name)).startswith(".case.nii.gz."):
            os.close(fd)
            raise KeyboardInterrupt  # the file exists, the name was never returned
        return fd

    monkeypatch.setattr(atomic.os, "open", created_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "case.nii.gz", suffix=".nii.gz"):
            pass
    monkeypatch.setattr(atomic.os, "open", real_open)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_name_taken_by_another_writer_is_skipped_and_never_removed(tmp_path, monkeypatch):
    other = tmp_path / ".case.txt.aaaaaaaa.tmp"
    other.write_text("another writer's")
    names = iter(["a"] * 8 + ["b"] * 8)
    monkeypatch.setattr(atomic.secrets, "choice", lambda characters: next(names))
    atomic_write_text(tmp_path / "case.txt", "mine")
    assert (tmp_path / "case.txt").read_text() == "mine" and other.read_text() == "another writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".case.txt.aaaaaaaa.tmp", "case.txt"]


def test_the_temporary_name_is_one_stale_temporaries_recognises(tmp_path):
    with atomic_path(tmp_path / "case.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.startswith(".case.nii.gz.") and oct(tmp.stat().st_mode & 0o777) == "0o600"
        assert atomic.stale_temporaries(tmp_path) == [tmp]
        tmp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"
