"""Read-only inputs and output folders that cannot be written (docs/reliability.md, "Read-only data and folders").

An output folder below a regular file cannot be created by anyone, root included, so most tests use that
(``blocker/sub``): the checks run before any work and the commands print one ``error:`` line. The tests that
need a real permission denial run a subprocess without the right to write others' files: as is when not root;
as root through ``setpriv`` as ``nobody``, keeping only the right to read (the interpreter may live under
``/root``), or they are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from dira3d.cli import main as cli_main
from dira3d.engines.inputs import setting_error_in
from dira3d.utils import atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def _one_error_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert lines and all(n in lines[-1] for n in needles), err


# --- commands: an output folder that cannot be written is one error line, before any work ---------------

def test_finetune_output_dir_not_writable_is_one_error_line(blocker, tmp_path, capsys):
    code = cli_main(["finetune", "--bundle", "luna16_nodule_fpr", "--datalist", str(tmp_path / "dl.json"),
                     "--output-dir", str(blocker / "ft"), "--tiny"])
    assert code == 2  # was a PermissionError traceback, exit 1
    _one_error_line(capsys.readouterr().err, "dira3d finetune: error:", str(blocker / "ft"), "--output-dir", "not writable")


def test_experiment_output_dir_not_writable_is_one_error_line(blocker, tmp_path, capsys):
    (tmp_path / "dl.json").write_text("{}")
    config = {"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": str(blocker / "grid"),
              "seeds": [0], "label_fractions": [1.0], "methods": {"random": None}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["experiment", "--config", str(tmp_path / "experiment.yaml")]) == 2  # was a traceback
    _one_error_line(capsys.readouterr().err, "dira3d experiment: error:", str(blocker / "grid"), "output_dir")


def test_exports_into_a_folder_that_cannot_be_written_fail_first_with_one_line(blocker, tmp_path, capsys):
    # the TorchScript default (<bundle>/models/model.ts) lies inside the bundle, read-only when an admin installed it
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO_ROOT / "bundles" / "luna16_nodule_fpr" / "configs", bundle / "configs")
    (bundle / "models").write_text("blocks the default --out folder")
    missing = str(tmp_path / "missing.pt")  # checked after the output: the output's error comes first
    assert cli_main(["export", "torchscript", "--bundle", str(bundle), "--checkpoint", missing]) == 2
    _one_error_line(capsys.readouterr().err, str(bundle / "models"), "not writable", "--out")
    assert cli_main(["export", "onnx", "--bundle", "luna16_nodule_fpr", "--checkpoint", missing,
                     "--out", str(blocker / "m.onnx")]) == 2
    _one_error_line(capsys.readouterr().err, str(blocker), "not writable", "--out")
    from dira3d.networks import UNet
    from dira3d.utils.checkpoint import atomic_save

    unet = UNet(3, 1, 1, width=0.125)
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                 "meta": {"spatial_dims": 3, "in_channels": 1, "width": 0.125}}, tmp_path / "pretrain.pt")
    assert cli_main(["export", "pretrained", "--checkpoint", str(tmp_path / "pretrain.pt"), "--out", str(blocker / "w")]) == 2
    _one_error_line(capsys.readouterr().err, str(blocker / "w"), "not writable")  # was a NotADirectoryError traceback
    assert cli_main(["export", "monailabel-app", "--out", str(blocker / "app")]) == 2
    _one_error_line(capsys.readouterr().err, str(blocker / "app"), "not writable")
    assert blocker.read_text() == "not a folder"


def test_localise_output_dir_not_writable_is_named_before_the_model_is_built(blocker, tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"not read before the output folder is checked")
    (tmp_path / "boxes.json").write_text("{}")  # present: a missing box datalist is refused first (fast refusals)
    with pytest.raises(SystemExit) as stop:
        cli_main(["localise", "--bbox-datalist", str(tmp_path / "boxes.json"), "--model", str(tmp_path / "model.pt"),
                  "--output-dir", str(blocker / "loc")])
    assert stop.value.code == 2
    _one_error_line(capsys.readouterr().err, str(blocker / "loc"), "--output-dir", "not writable")


def test_pretrain_refuses_overrides_of_the_folders_it_sets(tmp_path, capsys):
    (tmp_path / "dl.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:  # was a TypeError traceback (the bundle run got ckpt_dir twice)
        cli_main(["pretrain", "--datalist", str(tmp_path / "dl.json"), "--output", str(tmp_path / "run"),
                  "--override", f"ckpt_dir={tmp_path / 'elsewhere'}"])
    assert stop.value.code == 2
    _one_error_line(capsys.readouterr().err, "--override ckpt_dir", "--output")
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()


# --- bundles run with python -m monai.bundle: the output folders are checked in "initialize" ------------

BUNDLES = sorted(p.name for p in (REPO_ROOT / "bundles").iterdir() if (p / "configs" / "train.json").is_file())


def _initialize(configs: list[Path], **overrides):
    from monai.bundle import ConfigWorkflow

    flow = ConfigWorkflow(config_file=[str(c) for c in configs], logging_file=False, workflow_type=None,
                          meta_file=str(configs[0].parent / "metadata.json"), **overrides)
    flow.initialize()
    return flow


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_outputs_that_cannot_be_written_stop_before_any_data_is_loaded(bundle, blocker):
    """The writers used to create ckpt_dir / output_dir when the run reached them, after the datasets were cached
    (minutes to hours on real data), with a traceback naming the folder alone: a read-only bundle folder as
    --bundle_root, or the current folder (the default bundle_root) read-only."""
    configs = REPO_ROOT / "bundles" / bundle / "configs"
    datalist = str(blocker.parent / "never_read.json")
    for files, name in (([configs / "train.json"], "ckpt_dir"), ([configs / "train.json", configs / "multi_gpu_train.json"], "ckpt_dir"),
                        ([configs / "train.json", configs / "evaluate.json"], "output_dir")):
        if not files[-1].is_file():
            continue
        overrides = {"bundle_root": str(blocker / "run"), "datalist": datalist, "dataset_dir": str(blocker.parent)}
        if name == "output_dir":  # evaluate.json reads the model from ckpt_dir and writes its CSVs to output_dir
            overrides["ckpt_dir"] = str(blocker.parent)
        with pytest.raises(Exception) as err:
            _initialize(files, **overrides)
        cause = setting_error_in(err.value)
        assert isinstance(cause, atomic.FolderNotWritableError), err.value
        assert name in str(cause) and str(blocker / "run") in str(cause) and f"--{name}" in str(cause)


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b != "dira_pretrain"])
def test_inference_next_to_a_read_only_input_is_refused_before_the_model_runs(bundle, blocker, tmp_path):
    configs = REPO_ROOT / "bundles" / bundle / "configs"
    with pytest.raises(Exception) as err:  # the output goes next to the input by default: here a file's "folder"
        _initialize([configs / "inference.json"], image=str(blocker / "scan.nii.gz"), bundle_root=str(tmp_path))
    cause = setting_error_in(err.value)
    assert isinstance(cause, atomic.FolderNotWritableError) and str(blocker) in str(cause) and "--output_" in str(cause)
    _initialize([configs / "inference.json"], bundle_root=str(tmp_path))  # no image (MONAI Label): nothing checked


@pytest.mark.parametrize("bundle", [b for b in BUNDLES if b != "dira_pretrain"])
def test_inference_over_a_datalist_into_a_folder_that_cannot_be_written_is_refused_before_any_input(bundle, blocker,
                                                                                                   tmp_path, monkeypatch):
    """Only a single --image was checked: a --datalist run found out at its first prediction (or, for the
    classification bundles, after running every input, when the one probabilities file was written)."""
    configs = REPO_ROOT / "bundles" / bundle / "configs"
    datalist = [{"image": str(tmp_path / "never_read.nii.gz")}]
    name = "output_path" if bundle.endswith(("_cls", "_fpr")) else "output_dir"
    target = str(blocker / "out" / "prob.json") if name == "output_path" else str(blocker / "out")
    with pytest.raises(Exception) as err:  # the setting given
        _initialize([configs / "inference.json"], datalist=datalist, bundle_root=str(tmp_path), **{name: target})
    cause = setting_error_in(err.value)
    assert isinstance(cause, atomic.FolderNotWritableError), err.value
    assert str(blocker / "out") in str(cause) and f"--{name}" in str(cause)
    monkeypatch.setattr(Path, "cwd", classmethod(lambda cls: blocker))  # the default: the current folder
    with pytest.raises(Exception) as err:
        _initialize([configs / "inference.json"], datalist=datalist, bundle_root=str(tmp_path))
    cause = setting_error_in(err.value)
    assert isinstance(cause, atomic.FolderNotWritableError), err.value
    assert str(blocker) in str(cause) and f"--{name}" in str(cause) and "by default the current folder" in str(cause)


# --- real permission denials: a subprocess that cannot write others' files ------------------------------

def _unprivileged(tmp_path: Path) -> list[str]:
    """The command prefix that runs a process without the right to write files it does not own (see the module's
    docstring); skips when that is not possible here."""
    if os.name != "posix":
        pytest.skip("POSIX permissions only")
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing: cannot drop the right to write anywhere")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=+dac_read_search",
              "--ambient-caps=+dac_read_search"]
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(prefix + [sys.executable, "-c", f"import dira3d; open({str(probe / 'x')!r}, 'w')"],
                            capture_output=True, text=True, env=_env(tmp_path))
    if "PermissionError" not in result.stderr:
        pytest.skip(f"running as root, and setpriv cannot drop the right to write here: {result.stderr.strip()[-300:]}")
    return prefix


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home_not_writable"  # nothing may need a writable HOME (~/.cache, ~/.config)
    home.mkdir(exist_ok=True)
    home.chmod(0o555)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}


def _tree(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*"))}


def _chmod_tree(root: Path, mode: int) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(mode)


def test_prepare_from_a_read_only_source_writes_nothing_there(tmp_path):
    prefix = _unprivileged(tmp_path)
    src, dst = tmp_path / "scans", tmp_path / "out"
    (src / "site_b").mkdir(parents=True)
    array = np.zeros((16, 14, 8), np.float32)
    array[3:12, 3:10, 2:6] = np.random.default_rng(0).uniform(100, 900, (9, 7, 4))
    for name in ("a.nii.gz", "site_b/b.nrrd", "c.mhd"):
        sitk.WriteImage(sitk.GetImageFromArray(array.T), str(src / name))
    before = _tree(src)
    dst.mkdir()
    dst.chmod(0o777)  # the one folder the process may write into
    _chmod_tree(src, 0o555)
    try:
        result = subprocess.run(prefix + [sys.executable, "-m", "dira3d.cli", "prepare", "generic", "--src", str(src),
                                          "--dst", str(dst), "--modality", "mr", "--workers", "2"],
                                capture_output=True, text=True, env=_env(tmp_path), cwd=dst)
    finally:
        _chmod_tree(src, 0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _tree(src) == before  # no lock file, cache or temporary file in the source
    entries = json.loads((dst / "pretrain_datalist.json").read_text())["training"]
    assert sorted(e["case_id"] for e in entries) == ["a", "c", "site_b_b"]


def test_a_lock_file_another_user_left_does_not_stop_the_next_run(tmp_path):
    """A shared (group-writable) output folder: the lock file of the colleague's earlier run is theirs, mode 0644;
    opening it to write used to stop every later run of anyone else with a bare "Permission denied"."""
    prefix = _unprivileged(tmp_path)
    folder = tmp_path / "shared_run"
    folder.mkdir()
    folder.chmod(0o777)
    lock = folder / ".dira3d.lock"
    lock.write_text("process 1 on another host\n")
    lock.chmod(0o444)  # not writable by the process below (root's file as nobody; its own 0444 file otherwise)
    code = ("from dira3d.utils.folder_lock import FolderLock\n"
            f"lock = FolderLock({str(folder)!r}).acquire()\n"
            "assert lock.held\n"
            "print('locked')")
    try:
        result = subprocess.run(prefix + [sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path))
    finally:
        lock.chmod(0o644)
    assert result.returncode == 0 and "locked" in result.stdout, result.stderr[-2000:]


def test_a_holder_that_cannot_write_the_lock_file_is_the_one_a_refused_run_names(tmp_path):
    """The lock file of an earlier run (another user's, read-only here) kept that run's "process N on host": a
    second run was told the folder was in use by the earlier, finished process, not by the one holding it."""
    from dira3d.utils.folder_lock import FolderInUseError, FolderLock

    prefix = _unprivileged(tmp_path)
    folder = tmp_path / "shared_run"
    folder.mkdir()
    folder.chmod(0o777)
    FolderLock(folder).acquire().release()  # the earlier run: this process, which has released it
    lock = folder / ".dira3d.lock"
    assert lock.read_text().startswith(f"process {os.getpid()} on ")
    lock.chmod(0o444)  # not writable by the holder below
    code = ("import sys\nfrom dira3d.utils.folder_lock import FolderLock\n"
            f"lock = FolderLock({str(folder)!r}).acquire()\n"
            "print('locked', flush=True)\nsys.stdin.readline()\nlock.release()\n")
    holder = subprocess.Popen(prefix + [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()[-2000:]
        with pytest.raises(FolderInUseError, match=rf"{folder} is in use by process {holder.pid} on ") as refused:
            FolderLock(folder).acquire()
        assert f"process {os.getpid()} " not in str(refused.value)
    finally:
        holder.communicate("\n", timeout=60)
        lock.chmod(0o644)
    assert holder.returncode == 0, holder.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == [".dira3d.lock"]  # the holder's own record went with it


def test_inference_over_a_datalist_from_a_read_only_current_folder_stops_before_any_input(tmp_path):
    """A real permission denial: the outputs of a --datalist run go to the current folder by default."""
    prefix = _unprivileged(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o555)
    code = ("import sys; from monai.bundle import ConfigWorkflow; from dira3d.engines.inputs import setting_error_in\n"
            f"c = {str(REPO_ROOT / 'bundles' / 'lits_liver_seg' / 'configs')!r}\n"
            "flow = ConfigWorkflow(config_file=c + '/inference.json', meta_file=c + '/metadata.json', logging_file=False,"
            f" workflow_type=None, bundle_root={str(tmp_path)!r}, datalist=[{{'image': 'never_read.nii.gz'}}])\n"
            "try:\n    flow.initialize()\nexcept Exception as err:\n    sys.exit(str(setting_error_in(err)))\n")
    try:
        result = subprocess.run(prefix + [sys.executable, "-c", code], capture_output=True, text=True,
                                env=_env(tmp_path), cwd=work)
    finally:
        work.chmod(0o755)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"output_dir {work} is not writable (Permission denied)"), result.stderr[-2000:]
    assert "--output_dir" in last and "by default the current folder" in last
    assert os.listdir(work) == []
