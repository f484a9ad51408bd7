"""`dira3d pretrain`'s common refusals, and `dira3d visual-words`' of a missing --datalist, come before torch and MONAI
are imported, so they are immediate.

A missing --datalist, a --config naming no file, a malformed --override or a run folder another run holds were printed
only after `dira3d.engines` had imported torch and MONAI (8-10 s on a 2-core CPU, 25 s at a load of 6;
docs/benchmarks.md). Each case runs `python -m dira3d pretrain` with a folder first on PYTHONPATH whose `torch` and
`monai` raise ImportError: the command must still refuse with its own one line, exit 2 (`dira3d visual-words`: 1, as
for its other bad inputs). `dira3d.engines` and `dira3d.visual_words` re-export lazily, so the bundles'
`$dira3d.engines.X` and `$dira3d.visual_words.X` still name the same objects.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_finetune_quick_refusals as finetune_refusals
from test_folder_lock import hold_in_another_process

BLOCKED = finetune_refusals.BLOCKED
blocker = finetune_refusals.blocker  # the fixture: a folder whose torch.py and monai/__init__.py raise ImportError


def _pretrain(blocker: Path, repo_root: Path, cwd: Path, *args: str, command: str = "pretrain") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(repo_root), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dira3d", command, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def _refused(result: subprocess.CompletedProcess, expected: str, command: str = "pretrain", code: int = 2) -> None:
    assert BLOCKED not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and lines and lines[-1].startswith(f"dira3d {command}: error: "), result.stderr[-3000:]
    assert expected in lines[-1], lines[-1]
    assert not result.stdout, result.stdout


@pytest.fixture
def datalist(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "pretrain_datalist.json"  # not read before these refusals
    path.parent.mkdir()
    path.write_text('{"training": [], "validation": []}')
    return path


def test_a_missing_datalist_is_refused_before_torch(blocker, repo_root, tmp_path):
    path, out = tmp_path / "typo" / "dl.json", tmp_path / "out"
    result = _pretrain(blocker, repo_root, tmp_path, "--datalist", str(path), "--output", str(out))
    _refused(result, f"datalist {path} does not exist; make one with `dira3d prepare luna16 ...`")
    assert not out.exists()  # a refused run leaves no folder


def test_a_folder_given_as_datalist_is_refused_before_torch(blocker, repo_root, tmp_path, datalist):
    result = _pretrain(blocker, repo_root, tmp_path, "--datalist", str(datalist.parent))
    _refused(result, f"datalist {datalist.parent} is a folder, not a datalist file; pass the datalist in it: {datalist}")


@pytest.mark.parametrize("args, expected", [
    (("--config", "perfomance.json"), "--config perfomance.json: no such file; give a path or one of the bundle's "
                                      "configs: 2d.json"),
    (("--override", "max_epochs"), "--override 'max_epochs': write key=value, e.g. --override dis_mode=moco"),
    (("--override", "ckpt_dir=/elsewhere"), "--override ckpt_dir=...: dira3d pretrain sets ckpt_dir from --output"),
])
def test_a_bad_option_is_refused_before_torch(blocker, repo_root, tmp_path, datalist, args, expected):
    out = tmp_path / "out"
    _refused(_pretrain(blocker, repo_root, tmp_path, "--datalist", str(datalist), "--output", str(out), *args), expected)
    assert not out.exists()


def test_a_run_folder_another_run_holds_is_refused_before_torch(blocker, repo_root, tmp_path, datalist):
    out = tmp_path / "run"
    holder = hold_in_another_process(out / "models")
    try:
        result = _pretrain(blocker, repo_root, tmp_path, "--datalist", str(datalist), "--output", str(out), "--tiny")
    finally:
        holder.kill()
        holder.wait()
    # the message of the bundle's own check (check_checkpoint_folder_free in train.json's initialize)
    _refused(result, f"checkpoint folder {out / 'models'} is in use by process {holder.pid} on ")
    assert result.stderr.rstrip().endswith(": a second run writing there would replace its checkpoints in turn; wait "
                                           "for that run to end, or choose another output folder"), result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["models"]  # no eval/ made


@pytest.mark.parametrize("folder", [False, True])
def test_visual_words_refuses_a_missing_datalist_before_torch(blocker, repo_root, tmp_path, datalist, folder):
    path, out = (datalist.parent if folder else tmp_path / "typo" / "dl.json"), tmp_path / "vw"
    result = _pretrain(blocker, repo_root, tmp_path, "--datalist", str(path), "--out", str(out), command="visual-words")
    expected = (f"datalist {path} is a folder, not a datalist file; pass the datalist in it: {datalist}" if folder else
                f"datalist {path} does not exist; make one with `dira3d prepare ...` (docs/data.md) or fix the path")
    _refused(result, expected, command="visual-words", code=1)
    assert not out.exists()


def test_visual_words_refuses_an_out_folder_in_use_before_torch(blocker, repo_root, tmp_path, datalist):
    out = tmp_path / "vw"
    holder = hold_in_another_process(out)
    try:  # the run's own order: the lock comes before the datalist, which is missing here
        result = _pretrain(blocker, repo_root, tmp_path, "--datalist", str(tmp_path / "typo.json"), "--out", str(out),
                           command="visual-words")
    finally:
        holder.kill()
        holder.wait()
    _refused(result, f"--out folder {out} is in use by process {holder.pid} on ", command="visual-words", code=1)
    assert "a second run into it would re-create the shards it fills" in result.stderr, result.stderr


@pytest.mark.parametrize("modules, heavy", [
    ("dira3d.engines, dira3d.engines.command, dira3d.visual_words, dira3d.visual_words.command", "'torch', 'monai'"),
    ("dira3d.deploy, dira3d.deploy.command, dira3d.deploy.export_checks, dira3d.evaluation.localise, "
     "dira3d.evaluation.experiment", "'torch', 'monai', 'scipy.stats'"),  # the other commands' quick refusals
])
def test_the_command_packages_import_without_torch(repo_root, modules, heavy):
    code = f"import sys, {modules}; print(sorted({{{heavy}}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:] + result.stdout


def test_the_engines_package_still_exports_every_name():
    import dira3d.engines as engines
    from dira3d.engines.checkpoint import check_checkpoint_folder_free
    from dira3d.engines.trainer import DiRATrainer

    for name in engines.__all__:  # each re-exported name is its module's own object, and listed by dir()
        value = getattr(engines, name)
        module = importlib.import_module(getattr(value, "__module__", None) or "dira3d.engines")
        assert name in dir(engines) and (not hasattr(module, name) or getattr(module, name) is value), name
    assert engines.DiRATrainer is DiRATrainer and engines.check_checkpoint_folder_free is check_checkpoint_folder_free
    assert engines.distributed.is_main_process is engines.is_main_process  # submodules as attributes, as configs use them
    with pytest.raises(AttributeError, match="no_such_thing"):
        engines.no_such_thing  # noqa: B018


def test_the_visual_words_package_still_exports_every_name():
    import dira3d.visual_words as visual_words
    from dira3d.visual_words.dataset import VisualWordPairDataset

    for name in visual_words.__all__:
        value = getattr(visual_words, name)
        assert name in dir(visual_words) and getattr(importlib.import_module(value.__module__), name) is value, name
    assert visual_words.VisualWordPairDataset is VisualWordPairDataset  # as the pretraining configs name it
    assert visual_words.writer.read_manifest is visual_words.read_manifest
