"""`dira3d finetune`'s common refusals come before torch and MONAI are imported, so they are immediate.

A rerun into a folder that holds a run, a run going on there, a typo'd --datalist / --pretrained / --dataset-dir, a
--set without '=' or an unknown --bundle were printed only after torch and MONAI had loaded (5.8 s on a 2-core CPU,
20.9 s on a GPU machine; docs/benchmarks.md). Each case runs `python -m dira3d finetune` with a folder first on
PYTHONPATH whose `torch` and `monai` raise ImportError: the command must still refuse with its own one line, exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_folder_lock import hold_in_another_process

BLOCKED = "must not be imported for this refusal"


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    folder = tmp_path / "blocker"
    (folder / "monai").mkdir(parents=True)
    (folder / "torch.py").write_text(f'raise ImportError("torch {BLOCKED}")\n')
    (folder / "monai" / "__init__.py").write_text(f'raise ImportError("monai {BLOCKED}")\n')
    return folder


def _finetune(blocker: Path, repo_root: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(repo_root), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dira3d", "finetune", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def _refused(result: subprocess.CompletedProcess, expected: str) -> None:
    assert BLOCKED not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("dira3d finetune: error: "), result.stderr[-3000:]
    assert expected in lines[-1], lines[-1]
    assert not result.stdout, result.stdout


def test_the_blocker_blocks(blocker, repo_root, tmp_path):
    # the refusals below are only proof if a run that needs torch fails here
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(repo_root)]))
    result = subprocess.run([sys.executable, "-c", "import dira3d.utils.checkpoint as c; c.load_checkpoint('x')"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and f"torch {BLOCKED}" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("earlier, expected", [
    (("models/model.pt", "metrics.json"), "already holds a fine-tuning run (models/model.pt, metrics.json), which this "
                                          "run would replace; choose another output folder (--output-dir), or pass "
                                          "--overwrite to replace it"),
    (("events.out.tfevents.1.host.1.0",), "holds an unfinished fine-tuning run (the TensorBoard files "
                                          "events.out.tfevents.1.host.1.0 but no metrics.json"),
])
def test_a_folder_holding_a_run_is_refused_before_torch(blocker, repo_root, tmp_path, earlier, expected):
    out = tmp_path / "out"
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"earlier")
    result = _finetune(blocker, repo_root, tmp_path, "--bundle", "lidc_nodule_seg", "--output-dir", str(out))
    _refused(result, f"{out} {expected}")
    assert all((out / name).read_bytes() == b"earlier" for name in earlier)


def test_a_folder_another_run_holds_is_refused_before_torch(blocker, repo_root, tmp_path):
    out = tmp_path / "out"
    holder = hold_in_another_process(out)
    try:
        result = _finetune(blocker, repo_root, tmp_path, "--bundle", "luna16_nodule_fpr", "--output-dir", str(out))
    finally:
        holder.kill()
        holder.wait()
    _refused(result, f"fine-tuning output folder (--output-dir) {out} is in use by process {holder.pid}")


@pytest.mark.parametrize("option, expected", [
    ("--datalist", "datalist {path} does not exist; make one with `dira3d prepare ...` (docs/data.md) or fix the path"),
    ("--pretrained", "pretrained checkpoint {path} does not exist; check the bundle's 'pretrained' setting "
                     "(`dira3d finetune --pretrained`)"),
    ("--dataset-dir", "dataset_dir {path} (the folder of the prepared datalist, --dataset-dir) does not exist"),
])
def test_a_missing_input_path_is_refused_before_torch(blocker, repo_root, tmp_path, option, expected):
    path = tmp_path / "typo" / ("dl.json" if option == "--datalist" else "best.pt" if option == "--pretrained" else "d")
    out = tmp_path / "out"
    result = _finetune(blocker, repo_root, tmp_path, "--bundle", "lits_liver_seg", option, str(path), "--output-dir", str(out))
    _refused(result, expected.format(path=path))
    assert not out.exists()  # a refused run leaves no folder


def test_a_folder_given_as_datalist_is_refused_before_torch(blocker, repo_root, tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "lits_datalist.json").write_text("{}")
    result = _finetune(blocker, repo_root, tmp_path, "--bundle", "lits_liver_seg", "--datalist", str(data))
    _refused(result, f"datalist {data} is a folder, not a datalist file; pass the datalist in it: {data / 'lits_datalist.json'}")


@pytest.mark.parametrize("args, expected", [
    (("--bundle", "lidc_nodule_seg", "--set", "max_epochs"), "--set 'max_epochs' must look like ID=VALUE"),
    (("--bundle", "lidc_nodulex"), "bundle 'lidc_nodulex' not found: the folder lidc_nodulex does not exist and it is "
                                   "not a bundle name; use one of luna16_nodule_fpr"),
])
def test_a_bad_option_is_refused_before_torch(blocker, repo_root, tmp_path, args, expected):
    _refused(_finetune(blocker, repo_root, tmp_path, *args), expected)
