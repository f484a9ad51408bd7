"""`dira3d localise`, `dira3d export` and `dira3d experiment` refuse their common bad inputs before torch and MONAI
are imported, so the refusals are immediate.

`dira3d localise` imported torch with its module (10-14 s on a 2-core CPU before a missing --model was named),
`dira3d export` with `dira3d.deploy` (9-12 s), and `dira3d experiment` checked a label fraction, the baseline and the
pretraining's dataset_dir only after its bundle checks had loaded MONAI (docs/benchmarks.md). Each case runs the command
with a folder first on PYTHONPATH whose `torch` and `monai` raise ImportError (the fixture of
test_finetune_quick_refusals): the command must still refuse with its own one line, exit 2, and leave files as they were.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_finetune_quick_refusals as finetune_refusals

BLOCKED = finetune_refusals.BLOCKED
blocker = finetune_refusals.blocker  # the fixture: a folder whose torch.py and monai/__init__.py raise ImportError


def _refused(blocker: Path, repo_root: Path, cwd: Path, command: str, args: list[str], expected: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(repo_root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "dira3d", command, *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=120)
    assert BLOCKED not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and f"dira3d {command}" in lines[-1] and ": error: " in lines[-1], \
        result.stderr[-3000:]
    assert expected in lines[-1], lines[-1]
    assert not result.stdout, result.stdout


@pytest.mark.parametrize("case, expected", [
    ("model", "model {tmp}/typo.pt does not exist; fine-tune bundles/chestxray14_cls first (models/model.pt)"),
    ("datalist", "box datalist {tmp}/typo.json does not exist; `dira3d prepare chestxray14` writes bbox_datalist.json"),
    ("earlier", "{tmp}/out/localisation.json holds an earlier run's results, which this run would replace; choose "
                "another --output-dir, or pass --overwrite to replace them"),
    ("threshold", "--threshold 2 must be between 0 and 1 (the heatmap is scaled to [0, 1]), e.g. 0.5"),
])
def test_localise_refuses_before_torch(blocker, repo_root, tmp_path, case, expected):
    (tmp_path / "model.pt").write_bytes(b"weights")  # not read before these refusals
    (tmp_path / "bbox.json").write_text('{"test": []}')
    out = tmp_path / "out"
    if case == "earlier":
        out.mkdir()
        (out / "localisation.json").write_text("earlier")
    args = ["--bbox-datalist", str(tmp_path / ("typo.json" if case == "datalist" else "bbox.json")),
            "--model", str(tmp_path / ("typo.pt" if case == "model" else "model.pt")), "--output-dir", str(out)]
    _refused(blocker, repo_root, tmp_path, "localise", args + (["--threshold", "2"] if case == "threshold" else []),
             expected.format(tmp=tmp_path))
    assert (out / "localisation.json").read_text() == "earlier" if case == "earlier" else not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["onnx", "--bundle", "lidc_nodule_seg", "--out", "{tmp}/earlier.onnx"],
     "{tmp}/earlier.onnx already exists (an earlier export); choose another --out, or pass --overwrite"),
    (["torchscript", "--bundle", "lidc_nodulex", "--out", "{tmp}/m.ts"],
     "bundle 'lidc_nodulex' not found: the folder lidc_nodulex does not exist and it is not a bundle name"),
    (["torchscript", "--bundle", "lidc_nodule_seg", "--out", "{tmp}/m.ts", "--checkpoint", "{tmp}/typo.pt"],
     "fine-tuned weights {tmp}/typo.pt do not exist; pass the model to export with --checkpoint"),
    (["pretrained", "--checkpoint", "{tmp}/typo.pt", "--out", "{tmp}/weights"],
     "checkpoint {tmp}/typo.pt does not exist; check the path given by --checkpoint"),
    (["pretrained", "--checkpoint", "{tmp}/best.pt", "--out", "{tmp}/earlier"],
     "{tmp}/earlier already holds encoder.pt of an earlier export, which this one would replace; choose another "
     "folder, or pass --overwrite"),
])
def test_export_refuses_before_torch(blocker, repo_root, tmp_path, args, expected):
    (tmp_path / "earlier.onnx").write_bytes(b"earlier")
    (tmp_path / "best.pt").write_bytes(b"checkpoint")  # not read before these refusals
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "encoder.pt").write_bytes(b"earlier")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    _refused(blocker, repo_root, tmp_path, "export", [a.format(tmp=tmp_path) for a in args], expected.format(tmp=tmp_path))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert (tmp_path / "earlier.onnx").read_bytes() == b"earlier" and (tmp_path / "earlier" / "encoder.pt").read_bytes() == b"earlier"


TINY_2D = ["--override", "backbone=resnet10", "--override", "decoder_channels=[16,16,8,8,8]",
           "--override", "roi_size=[64,64]"]
GIVEN = "--input-shape (input_shape)"


@pytest.mark.parametrize("bundle, shape, expected", [
    ("montgomery_lung_seg", "1 1 64 64 32", "1 1 64 64 32 has 5 numbers; the bundle's network is 2D: give B C and 2 sizes, "
                                            "e.g. 1 1 64 64"),
    ("siim_pneumothorax_seg", "1 3 64 64", "1 3 64 64: 3 channels, but the bundle's network takes 1 (in_channels); "
                                           "give e.g. 1 1 64 64"),
    ("chestxray14_cls", "1 1 60 64", "1 1 60 64: size 60 is not a multiple of 32 (the network's downsampling); give "
                                     "e.g. 1 1 32 64 or 1 1 64 64 (the nearest sizes that fit)"),
    ("chexpert_cls", "0 1 64 64", "0 1 64 64: batch 0 is not a batch size >= 1; give e.g. 1 1 64 64"),
    ("montgomery_lung_seg", "1 1 -64 64", "1 1 -64 64: size -64 is not a size >= 1; give e.g. 1 1 64 64"),
    ("lits_liver_seg", "1 1 60 64 32", "1 1 60 64 32: size 60 is not a multiple of 8 (the network's downsampling); "
                                       "give e.g. 1 1 56 64 32 or 1 1 64 64 32 (the nearest sizes that fit)"),
])
@pytest.mark.parametrize("what", ["torchscript", "onnx"])
def test_export_refuses_an_input_shape_the_network_cannot_take_before_torch(blocker, repo_root, tmp_path, what,
                                                                             bundle, shape, expected):
    """Only the count of numbers was checked, after torch loaded: 3 channels failed in a convolution, a size that is
    not a multiple of 32 in the decoder ("Sizes of tensors must match"), batch 0 in the agreement check ("max(): Expected
    reduction dim"), a negative number in torch.rand (tests/test_export_input_shape.py: the check itself)."""
    (tmp_path / "model.pt").write_bytes(b"weights")  # not read before this refusal
    overrides = TINY_2D if bundle != "lits_liver_seg" else ["--override", "width=0.125"]
    args = [what, "--bundle", bundle, "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "m.out"),
            *overrides, "--input-shape", *shape.split()]
    _refused(blocker, repo_root, tmp_path, "export", args, f"{GIVEN} {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "model.pt"]


@pytest.mark.parametrize("setting, expected", [
    ({"label_fractions": [0.5, 1.5]}, "label fraction 1.5 in {config} must be in (0, 1]"),
    ({"baseline": "scratch"}, "baseline 'scratch' in {config} is not one of the methods ['random', 'mine']"),
    ({"pretrain": {"dataset_dir": "typo"}, "methods": {"random": None, "dira": {"pretrain": {}}}},
     "pretrain dataset_dir {tmp}/typo in {config} does not exist; point it to the output of `dira3d visual-words`"),
    ({"welsh": True}, "experiment config {config}: unknown setting 'welsh' (did you mean 'welch'?)"),
])
def test_experiment_refuses_a_bad_config_before_torch(blocker, repo_root, tmp_path, setting, expected):
    (tmp_path / "datalist.json").write_text('{"training": [], "test": []}')
    (tmp_path / "best.pt").write_bytes(b"checkpoint")  # not read before these refusals
    config = {"bundle": "lidc_nodule_seg", "datalist": "datalist.json", "metric": "dice", "output_dir": "out",
              "seeds": [0, 1], "label_fractions": [0.5, 1.0], "methods": {"random": None, "mine": "best.pt"}, **setting}
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(config))
    _refused(blocker, repo_root, tmp_path, "experiment", ["--config", str(path)], expected.format(tmp=tmp_path, config=path))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="the output_dir lock uses POSIX flock")
def test_experiment_refuses_a_busy_output_dir_before_torch(blocker, repo_root, tmp_path):
    """A second `dira3d experiment` on an output_dir another one runs in (its lock held) is refused by the same lock
    check, before the bundle checks load MONAI and torch (it waited ~10 s for them), and touches nothing there."""
    (tmp_path / "datalist.json").write_text('{"training": [], "test": []}')
    (tmp_path / "best.pt").write_bytes(b"checkpoint")  # not read before this refusal
    out = tmp_path / "out"
    out.mkdir()
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({"bundle": "lidc_nodule_seg", "datalist": "datalist.json", "metric": "dice",
                                "output_dir": "out", "seeds": [0], "label_fractions": [1.0],
                                "methods": {"random": None, "mine": "best.pt"}}))
    holder = subprocess.Popen([sys.executable, "-c", (  # another process holds the folder, as a running experiment does
        "import fcntl, sys\n"
        f"h = open({str(out / '.dira3d.lock')!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX); h.write('process 4242'); "
        "h.flush(); print('locked', flush=True); sys.stdin.readline()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _refused(blocker, repo_root, tmp_path, "experiment", ["--config", str(path)],
                 f"the experiment's output_dir {out} is in use by process 4242: a second `dira3d experiment` there "
                 "would run the same grid into one results.csv; wait for that run to end, or choose another output folder")
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == [".dira3d.lock"]  # nothing written there
    assert (out / ".dira3d.lock").read_text() == "process 4242"


# that these command modules import without torch, monai and scipy.stats: tests/test_pretrain_quick_refusals.py


def test_the_deploy_package_still_exports_every_name():
    import dira3d.deploy as deploy
    from dira3d.deploy.bundle_network import bundle_paths, missing_weights_error
    from dira3d.deploy.export import check_new_output, check_scan_exists

    for name in deploy.__all__:  # each re-exported name is its module's own object, and listed by dir()
        value = getattr(deploy, name)
        module = importlib.import_module(getattr(value, "__module__", None) or "dira3d.deploy")
        assert name in dir(deploy) and (not hasattr(module, name) or getattr(module, name) is value), name
    assert deploy.export.export_onnx is deploy.export_onnx  # submodules as attributes
    checks = importlib.import_module("dira3d.deploy.export_checks")
    assert (bundle_paths, missing_weights_error, check_new_output, check_scan_exists) == (
        checks.bundle_paths, checks.missing_weights_error, checks.check_new_output, checks.check_scan_exists)
