"""inference.json never replaces a file it did not write (a manual label next to the scan is the common case).

A dira3d prediction carries a mark with a checksum of its content (NIfTI ``descrip``, PNG text chunk, JSON
``written_by`` / ``sha256``): a rerun replaces dira3d's own unchanged prediction; any other file at the
target path stops the run before anything is written, with an error naming the file, unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dira3d.evaluation import build_resnet_task_network, build_task_network, is_own_prediction
from dira3d.evaluation.finetune import bundle_path
from dira3d.utils import atomic_save

TINY_2D = {"backbone": "resnet10", "decoder_channels": (16, 16, 8, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _nifti(path: Path, array, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4)), str(path))
    return path


def _infer(bundle: str, image: Path, models: Path, configs=("inference.json",), **overrides) -> None:
    from monai.bundle import ConfigWorkflow

    folder = bundle_path(bundle) / "configs"
    flow = ConfigWorkflow(config_file=[str(folder / c) for c in configs], meta_file=str(folder / "metadata.json"),
                          logging_file=False, workflow_type=None, image=str(image), ckpt_dir=str(models), device="cpu",
                          **overrides)
    flow.initialize()
    try:
        flow.run()
    finally:
        flow.finalize()


def _refused(exc_type, run, *args, **kwargs):
    """The ``exc_type`` error a run raised (MONAI wraps an error of the evaluator in a RuntimeError)."""
    with pytest.raises(Exception) as raised:
        run(*args, **kwargs)
    error = raised.value
    while error is not None and not isinstance(error, exc_type):
        error = error.__cause__ or error.__context__
    assert error is not None, raised.value
    return error


@pytest.fixture
def seg3d(tmp_path):
    """A small CT-like scan, its folder, and a tiny lits_liver_seg model."""
    scan = _nifti(tmp_path / "case1.nii.gz", np.random.default_rng(0).random((32, 32, 16)) * 2000 - 1000)  # raw HU
    atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), tmp_path / "models" / "model.pt")
    return scan, tmp_path / "models"


SEG3D = {"width": 0.125, "roi_size": [32, 32, 16], "sw_batch_size": 1}


def test_a_manual_label_beside_the_scan_is_refused_and_left_as_it_was(seg3d):
    scan, models = seg3d
    label = _nifti(scan.parent / "case1_seg.nii.gz", np.zeros((32, 32, 16)), np.uint8)
    before, listing = label.read_bytes(), sorted(os.listdir(scan.parent))
    message = str(_refused(FileExistsError, _infer, "lits_liver_seg", scan, models, **SEG3D))
    assert str(label) in message and "not a prediction written by dira3d" in message
    assert "--output_dir" in message and "--output_postfix" in message and "--overwrite True" in message
    assert label.read_bytes() == before
    assert sorted(os.listdir(scan.parent)) == listing  # no prediction, no temporary file
    # the ways out the message names: another folder, or an explicit overwrite
    _infer("lits_liver_seg", scan, models, output_dir=str(scan.parent / "pred"), **SEG3D)
    assert is_own_prediction(scan.parent / "pred" / "case1_seg.nii.gz") and label.read_bytes() == before
    _infer("lits_liver_seg", scan, models, overwrite="true", **SEG3D)
    assert is_own_prediction(label)


def test_a_rerun_replaces_its_own_prediction_but_not_an_edited_one(seg3d):
    scan, models = seg3d
    written = scan.parent / "case1_seg.nii.gz"
    _infer("lits_liver_seg", scan, models, **SEG3D)
    first = nib.load(str(written))
    assert first.header["descrip"].item().startswith(b"dira3d prediction sha256:")
    assert first.shape == (32, 32, 16) and first.get_data_dtype() == np.uint8
    assert is_own_prediction(written)
    inode = written.stat().st_ino
    _infer("lits_liver_seg", scan, models, **SEG3D)  # the normal rerun
    assert written.stat().st_ino != inode and is_own_prediction(written)  # replaced (renamed over), marked again
    # corrected by hand and saved with the same header (mark kept, voxels changed): the user's now
    edited = np.asanyarray(nib.load(str(written)).dataobj).copy()
    edited[:4] = 1 - edited[:4]
    nib.save(nib.Nifti1Image(edited, first.affine, first.header), str(written))
    assert nib.load(str(written)).header["descrip"] == first.header["descrip"]
    assert not is_own_prediction(written)
    before = written.read_bytes()
    assert "case1_seg.nii.gz exists" in str(_refused(FileExistsError, _infer, "lits_liver_seg", scan, models, **SEG3D))
    assert written.read_bytes() == before


def test_a_failed_write_leaves_neither_a_prediction_nor_a_temporary_file(seg3d, monkeypatch):
    from dira3d.evaluation.outputs import PredictionNiftiWriter

    scan, models = seg3d

    def half_write(self, filename, verbose=False, **kwargs):
        Path(filename).write_bytes(b"\x1f\x8b half a file")  # what a killed nib.save would leave
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PredictionNiftiWriter, "write", half_write)
    with pytest.raises(RuntimeError) as raised:
        _infer("lits_liver_seg", scan, models, **SEG3D)
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert "No space left on device" in "\n".join(chain)  # MONAI's SaveImage quotes the writer's error
    assert sorted(os.listdir(scan.parent)) == ["case1.nii.gz", "models"]


def test_classification_probabilities_refuse_a_user_file_and_replace_their_own(tmp_path):
    cube = _nifti(tmp_path / "cand.nii.gz", np.random.default_rng(0).random((16, 16, 8)))
    models = tmp_path / "models"
    atomic_save(build_task_network("classification", 3, 1, 1, 0.125, "").state_dict(), models / "model.pt")
    settings = {"width": 0.125, "roi_size": [16, 16, 8]}
    target = tmp_path / "cand_prob.json"
    target.write_text('{"notes": "my own reading of this candidate"}\n')
    before = target.read_bytes()
    message = str(_refused(FileExistsError, _infer, "luna16_nodule_fpr", cube, models, **settings))
    assert str(target) in message and "--output_path" in message and "--overwrite True" in message
    assert target.read_bytes() == before
    target.unlink()
    _infer("luna16_nodule_fpr", cube, models, **settings)
    result = json.loads(target.read_text())
    assert result["written_by"].startswith("dira3d ") and len(result["predictions"]) == 1 and is_own_prediction(target)
    _infer("luna16_nodule_fpr", cube, models, **settings)  # rerun: its own file
    result["predictions"][0]["probabilities"] = [0.99]  # edited by hand
    target.write_text(json.dumps(result))
    assert "cand_prob.json" in str(_refused(FileExistsError, _infer, "luna16_nodule_fpr", cube, models, **settings))
    assert json.loads(target.read_text())["predictions"][0]["probabilities"] == [0.99]


def test_2d_mask_png_refuses_a_user_mask_and_replaces_its_own(tmp_path):
    image = tmp_path / "cxr.png"
    Image.fromarray((np.arange(40 * 48) % 251).astype(np.uint8).reshape(40, 48)).save(image)
    models = tmp_path / "models"
    atomic_save(build_resnet_task_network("segmentation", 1, 1, **TINY_2D).state_dict(), models / "model.pt")
    mask = tmp_path / "cxr_seg.png"
    Image.fromarray(np.ones((40, 48), np.uint8)).save(mask)
    before = mask.read_bytes()
    run = lambda **o: _infer("siim_pneumothorax_seg", image, models, configs=("inference.json", "tiny.json"), **o)  # noqa: E731
    assert "cxr_seg.png exists" in str(_refused(FileExistsError, run))
    assert mask.read_bytes() == before
    run(output_postfix="pred")
    assert is_own_prediction(tmp_path / "cxr_pred.png") and mask.read_bytes() == before
    assert np.asarray(Image.open(tmp_path / "cxr_pred.png")).shape == (40, 48)
    inode = (tmp_path / "cxr_pred.png").stat().st_ino
    run(output_postfix="pred")
    assert (tmp_path / "cxr_pred.png").stat().st_ino != inode and is_own_prediction(tmp_path / "cxr_pred.png")
    # a copy of the prediction edited in an image editor (the text chunk may survive): no longer ours
    edited = Image.open(tmp_path / "cxr_pred.png")
    pixels = np.asarray(edited).copy()
    pixels[0, 0] = 1 - pixels[0, 0]
    info = PngInfo()
    info.add_text("dira3d", edited.text["dira3d"])
    Image.fromarray(pixels).save(tmp_path / "cxr_pred.png", pnginfo=info)
    assert not is_own_prediction(tmp_path / "cxr_pred.png")


def test_the_target_checks():
    from monai.transforms import SaveImaged

    from dira3d.evaluation import SavePredictiond, check_prediction_targets, prediction_target

    # MONAI Label drops SaveImaged (and subclasses) from the served post-transforms
    assert issubclass(SavePredictiond, SaveImaged)
    assert prediction_target("/d/a.nii.gz", "/o", "seg", ".nii.gz") == "/o/a_seg.nii.gz"
    assert prediction_target("/d/a.png", "/o", "seg", "png") == "/o/a_seg.png"
    saver = SavePredictiond(keys="pred", output_dir="/o", output_postfix="seg", output_ext=".nii.gz", separate_folder=False)
    assert saver.targets(["/d/b.nii"]) == ["/o/b_seg.nii.gz"]
    with pytest.raises(ValueError, match="overwrite='maybe' is not a boolean"):
        check_prediction_targets([], overwrite="maybe")


def test_a_target_that_is_the_input_or_shared_by_two_inputs_is_refused_even_with_overwrite(tmp_path):
    from dira3d.evaluation import CheckPredictionFiles

    scan = _nifti(tmp_path / "a_seg.nii.gz", np.zeros((4, 4, 4)))
    # postfix "" writes <stem>.nii.gz: the scan itself
    same = CheckPredictionFiles([str(tmp_path / "a.nii.gz")], str(tmp_path), "", ".nii.gz", overwrite=True)
    _nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="is the input scan"):
        same()
    (tmp_path / "b").mkdir()
    twice = CheckPredictionFiles([str(tmp_path / "a.nii.gz"), str(tmp_path / "b" / "a.nii")], str(tmp_path / "out"), "seg",
                                 ".nii.gz", overwrite=True)
    with pytest.raises(ValueError, match="two inputs would write the same prediction file .*a_seg.nii.gz"):
        twice()
    assert scan.is_file()


def test_two_inputs_of_one_name_end_the_run_in_one_error_line(tmp_path):
    """A batch of scans named alike in their own folders (`sub-01/FLAIR.nii.gz`, `sub-02/FLAIR.nii.gz`: a walk of
    2026-11-28) was refused in a plain ValueError, which `python -m monai.bundle run` ended in three chained
    tracebacks; a DataError (a ValueError still) is its one `error:` line (dira3d.utils.bundle_errors)."""
    from dira3d.data.errors import DataError
    from dira3d.evaluation import CheckPredictionFiles
    from dira3d.utils.bundle_errors import user_error_in

    for folder in ("sub-01", "sub-02"):
        (tmp_path / folder).mkdir()
    scans = [str(tmp_path / folder / "FLAIR.nii.gz") for folder in ("sub-01", "sub-02")]
    with pytest.raises(DataError, match="two inputs would write the same prediction file .*FLAIR_seg.nii.gz") as raised:
        CheckPredictionFiles(scans, str(tmp_path / "out"), "seg", ".nii.gz")()
    assert user_error_in(raised.value) is raised.value
    _nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4)))
    with pytest.raises(DataError, match="is the input scan"):
        CheckPredictionFiles([str(tmp_path / "a.nii.gz")], str(tmp_path), "", ".nii.gz", overwrite=True)()


def test_monai_bundle_run_refuses_and_names_the_file(seg3d):
    """The documented command line: the run stops with the error, the label is untouched."""
    scan, models = seg3d
    label = _nifti(scan.parent / "case1_seg.nii.gz", np.zeros((32, 32, 16)), np.uint8)
    before = label.read_bytes()
    config = bundle_path("lits_liver_seg") / "configs" / "inference.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config), "--image", str(scan),
                             "--ckpt_dir", str(models), "--width", "0.125", "--roi_size", "[32, 32, 16]", "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    # one `error:` line naming the file (dira3d.utils.bundle_errors), not MONAI's traceback ending in FileExistsError
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(label) in errors[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert label.read_bytes() == before


def test_a_full_disk_is_reported_as_such_naming_the_prediction_and_what_to_do(seg3d, monkeypatch):
    """MONAI's SaveImage reported a writer's OSError (here ENOSPC) as "cannot find a suitable writer for
    <the temporary file>", with advice to install writer libraries."""
    import errno

    from dira3d.evaluation.outputs import PredictionNiftiWriter

    scan, models = seg3d

    def disk_full(self, filename, verbose=False, **kwargs):
        Path(filename).write_bytes(b"\x1f\x8b the start of a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(PredictionNiftiWriter, "write", disk_full)
    error = _refused(OSError, _infer, "lits_liver_seg", scan, models, **SEG3D)
    message = str(error)
    assert error.errno == errno.ENOSPC and "No space left on device" in message
    assert f"could not write the prediction {scan.parent / 'case1_seg.nii.gz'}:" in message
    assert "free space" in message and "--output_dir" in message
    assert "suitable writer" not in message and ".case1_seg" not in message  # not the temporary name
    assert sorted(os.listdir(scan.parent)) == ["case1.nii.gz", "models"]  # no temporary file left


def test_a_folder_that_cannot_be_written_is_named_with_the_prediction(tmp_path, monkeypatch):
    """An OSError of the file system around the writer (the temporary file cannot be created) names the
    prediction, not a temporary name."""
    import errno

    import torch
    from monai.data import MetaTensor

    from dira3d.evaluation.outputs import SavePredictiond
    from dira3d.utils import atomic

    real_open = os.open

    def no_temporary(name, *args, **kwargs):  # the temporary file cannot be created (atomic_path's os.open)
        if os.path.basename(str(name)).startswith(".case_seg.nii.gz."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", no_temporary)
    saver = SavePredictiond(keys="pred", output_dir=str(tmp_path), output_postfix="seg", output_ext=".nii.gz",
                            separate_folder=False, resample=False, print_log=False)
    image = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "/data/case.nii.gz"})
    with pytest.raises(PermissionError, match=rf"could not write the prediction {tmp_path / 'case_seg.nii.gz'}: "
                                              r"Permission denied; check that this folder can be written"):
        saver({"pred": image})


def test_predictions_from_before_the_marks_are_refused_all_named_with_why_and_the_way_out(tmp_path):
    """Masks that task bundles before 0.1.4 wrote (MONAI's SaveImage, no mark) were refused one at a time with "e.g.
    a manual label ... or a prediction edited since", which did not say that dira3d's own older predictions are refused
    too, nor why (nothing tells them from a label saved under the same name), nor which other files --overwrite True
    would replace."""
    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    from dira3d.evaluation import check_prediction_targets

    old = SaveImage(output_dir=str(tmp_path), output_postfix="seg", output_ext=".nii.gz", separate_folder=False,
                    output_dtype=np.uint8, print_log=False)  # as inference.json wrote masks before the marks
    targets = []
    for name in ("a", "b", "c", "d"):
        old(MetaTensor(np.zeros((1, 8, 8, 4), np.float32), meta={"filename_or_obj": str(tmp_path / f"{name}.nii.gz")}))
        targets.append(tmp_path / f"{name}_seg.nii.gz")
    before = {p: p.read_bytes() for p in targets}
    with pytest.raises(FileExistsError) as one:
        check_prediction_targets(targets[:1])
    assert str(one.value).startswith(f"{targets[0]} exists and is not a prediction written by dira3d, as far as it can "
                                     "tell: it has no dira3d mark (")
    assert "a prediction of a task bundle before 0.1.4, which did not mark its files" in str(one.value)
    assert "--overwrite True to replace it (check first" in str(one.value)
    with pytest.raises(FileExistsError) as every:
        check_prediction_targets(targets)
    message = str(every.value)
    assert message.startswith(f"{targets[0]} and 3 more of this run's targets ({targets[1]}, {targets[2]} and 1 more) "
                              "exist and are not predictions written by dira3d"), message
    assert "they have no dira3d mark" in message and "--overwrite True to replace them all" in message
    assert {p: p.read_bytes() for p in targets} == before
    # a marked prediction edited since is told apart; a file dira3d cannot mark says so
    edited = nib.load(str(targets[1]))
    edited.header["descrip"] = b"dira3d prediction sha256:" + b"0" * 32
    nib.save(edited, str(targets[1]))
    (tmp_path / "e_seg.nrrd").write_bytes(b"NRRD0004\n")
    with pytest.raises(FileExistsError) as mixed:
        check_prediction_targets([targets[1], tmp_path / "e_seg.nrrd"])
    assert "b_seg.nii.gz has dira3d's mark, but its content changed since dira3d wrote it" in str(mixed.value)
    assert "e_seg.nrrd has the suffix .nrrd, which dira3d cannot mark as its own" in str(mixed.value)
    # the report was always marked: its refusal names no older bundle
    (tmp_path / "inference_report.json").write_text("my notes\n")
    with pytest.raises(FileExistsError) as report:
        check_prediction_targets([tmp_path / "inference_report.json"], before_marks=False)
    assert "no dira3d mark (a file from elsewhere)" in str(report.value) and "0.1.4" not in str(report.value)
    assert check_prediction_targets(targets, overwrite=True) == targets


def test_a_dicom_folder_with_dots_in_its_name_keeps_its_whole_name(tmp_path):
    """LIDC-IDRI series folders are named by their UID (``1.3.6.1.4.1.14519...``) or ``3000566.000000-03192``: MONAI's
    naming took the text after the last dot for an extension, so ``--image .../1.2.826.0.1.9`` wrote
    ``1.2.826.0.1_seg.nii.gz``, and a folder given with a trailing ``/`` wrote ``_seg.nii.gz``; the docs promise
    ``<name>_seg.nii.gz`` next to the input."""
    import torch
    from monai.data import MetaTensor

    from dira3d.evaluation.outputs import SavePredictiond, prediction_target

    series = tmp_path / "1.2.826.0.1.9"
    tcia = tmp_path / "3000566.000000-03192"
    series.mkdir()
    tcia.mkdir()
    assert prediction_target(series, tmp_path, "seg", ".nii.gz") == str(tmp_path / "1.2.826.0.1.9_seg.nii.gz")
    assert prediction_target(f"{tcia}/", tmp_path, "seg", ".nii.gz") == str(tmp_path / "3000566.000000-03192_seg.nii.gz")
    assert prediction_target("/d/scan.v2.nii.gz", "/o", "seg", ".nii.gz") == "/o/scan.v2_seg.nii.gz"  # a file as before
    saver = SavePredictiond(keys="pred", output_dir=str(tmp_path), output_postfix="seg", output_ext=".nii.gz",
                            separate_folder=False, resample=False, print_log=False)
    saver({"pred": MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": f"{series}/"})})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.2.826.0.1.9", "1.2.826.0.1.9_seg.nii.gz", "3000566.000000-03192"]
