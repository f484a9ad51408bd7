"""``dira3d export`` killed (SIGKILL) while it wrote (found 2026-11-27, interruption walkthrough follow-up).

Each export file is written whole under a hidden temporary name beside ``--out`` and renamed into place
(:func:`dira3d.utils.atomic.atomic_path`). A process killed while it wrote left that temporary (``.model.ts.<8
characters>.ts``), and no rerun removed it: its name is new each time. ``dira3d prepare`` removed its own
(``stale_temporaries``, under its folder lock); an export writes into a folder of the user's (``--out ~/liver.ts``),
so it removes only the temporaries of its own targets, by their name, and never one a running export holds.
"""

from __future__ import annotations

import pytest

from dira3d.deploy import export_pretrained
from dira3d.deploy.command import main as export_main
from dira3d.utils.atomic import atomic_path, stale_temporaries_of
from test_deploy_export import _bundle_copy, _pretraining_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _killed_write(target, suffix: str):
    """The temporary a write of ``target`` killed mid-way leaves (atomic_path's name, no process holding it)."""
    with atomic_path(target, suffix=suffix) as partial:
        name = partial.name
    (target.parent / name).write_bytes(b"half a graph")
    target.unlink()
    return target.parent / name


def test_stale_temporaries_of_a_file_are_its_killed_writes_only(tmp_path):
    target = tmp_path / "liver.ts"
    left = _killed_write(target, ".ts")
    mine = [tmp_path / ".liver.ts.backup.ts", tmp_path / ".liver.ts.abcdefgh.tmp", tmp_path / ".other.ts.abcdefgh.ts",
            tmp_path / "liver.ts.abcdefgh.ts"]  # 6 characters; another suffix; another file; not hidden
    for path in mine:
        path.write_text("the user's")
    with atomic_path(target, suffix=".ts") as running:  # an export of the same file going on now (its flock)
        running.write_bytes(b"being written")
        assert stale_temporaries_of(target, ".ts") == [left]
    # with the suffix asked for (atomic_write's ".tmp"): that name is one of liver.ts's temporaries
    assert stale_temporaries_of(target, ".tmp") == [tmp_path / ".liver.ts.abcdefgh.tmp"]
    assert stale_temporaries_of(tmp_path / "nowhere" / "x.ts", ".ts") == []


def test_a_torchscript_export_removes_what_a_killed_one_left_beside_out(repo_root, tmp_path, capsys):
    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    out = tmp_path / "exports" / "liver.ts"
    out.parent.mkdir()
    left = _killed_write(out, ".ts")
    (out.parent / "notes.txt").write_text("the user's")
    code = export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), "--override", "width=0.125",
                        "--input-shape", "1", "1", "32", "32", "16"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["liver.ts", "notes.txt"]
    assert (f"removed 1 half-written temporary file(s) an interrupted export left beside {out} ({left.name})"
            in err), err


def test_a_pretrained_export_removes_what_a_killed_one_left(tmp_path, capsys):
    out = tmp_path / "weights"
    out.mkdir()
    left = [_killed_write(out / "encoder.pt", ".tmp"), _killed_write(out / "encoder.safetensors", ".safetensors")]
    export_pretrained(_pretraining_checkpoint(), out, parts=["encoder"])
    assert sorted(p.name for p in out.iterdir()) == ["encoder.pt", "encoder.safetensors", "key_map.json"]
    err = capsys.readouterr().err
    assert all(path.name in err for path in left), err
