"""Session-23 mutation audit of the prediction files' marks and checks (dira3d.evaluation.outputs): each test pins a
behaviour that a mutation of that module changed without any other test failing. References: the module docstring
(a mark with a checksum of the content; only dira3d's own, unchanged prediction is replaced; a folder, an input scan
or a shared target is refused) with digests compared against each other and messages worked out by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dira3d.evaluation.outputs import array_digest, check_prediction_targets, is_own_prediction, json_digest


def test_the_array_digest_is_of_shape_dtype_and_values_whatever_the_byte_order():
    values = np.arange(6, dtype=np.int16)
    digest = array_digest(values)
    assert len(digest) == 32 and int(digest, 16) >= 0
    # the same values stored big-endian (a NIfTI written on another machine) are the same content
    assert array_digest(values.astype(">i2")) == array_digest(values.astype("<i2")) == digest
    # the same bytes as another shape, or the same values as another type, are another content
    assert array_digest(values.reshape(2, 3)) != digest
    assert array_digest(values.view(np.uint16)) != digest  # same bytes, same itemsize, other kind
    assert array_digest(values.astype(np.int32)) != digest


def test_a_json_is_own_only_with_both_written_by_and_a_right_checksum(tmp_path):
    payload = {"a.nii.gz": [0.25, 0.75]}
    unmarked = dict(payload, sha256=json_digest(payload))  # the checksum alone is no mark
    (tmp_path / "unmarked_prob.json").write_text(json.dumps(unmarked))
    assert not is_own_prediction(tmp_path / "unmarked_prob.json")
    foreign = dict(unmarked, written_by="someone else")
    (tmp_path / "foreign_prob.json").write_text(json.dumps(foreign))
    assert not is_own_prediction(tmp_path / "foreign_prob.json")
    own = dict(unmarked, written_by="dira3d 0.1.0")
    (tmp_path / "own_prob.json").write_text(json.dumps(own))
    assert is_own_prediction(tmp_path / "own_prob.json")


def test_a_folder_at_a_target_is_refused_even_with_overwrite(tmp_path):
    """``--overwrite True`` replaces files; a folder under the target's name is refused as a folder (the rename
    onto it would fail after the whole inference ran)."""
    folder = tmp_path / "case_seg.nii.gz"
    folder.mkdir()
    with pytest.raises(FileExistsError, match=r"case_seg\.nii\.gz is an existing folder; choose another --output_dir"):
        check_prediction_targets([folder], overwrite=True)
    assert folder.is_dir()


def test_the_saver_itself_never_writes_over_its_input_scan_even_with_overwrite(tmp_path):
    """SavePredictiond checks its own target too (MONAI Label runs the post-transforms without the run's
    CheckPredictionFiles): with no postfix, the prediction of ``case.nii.gz`` in its own folder is the scan."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor

    from dira3d.evaluation import SavePredictiond

    scan = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), -1000.0, np.float32), np.eye(4)), str(scan))
    before = scan.read_bytes()
    saver = SavePredictiond(keys="pred", output_dir=str(tmp_path), output_postfix="", output_ext=".nii.gz",
                            separate_folder=False, resample=False, print_log=False, overwrite=True)
    image = MetaTensor(torch.ones(1, 4, 4, 4), meta={"filename_or_obj": str(scan)})
    with pytest.raises(ValueError, match=rf"the prediction file {scan} is the input scan {scan} itself; "
                                         "choose another --output_dir"):
        saver({"pred": image})
    assert scan.read_bytes() == before


def test_each_saved_prediction_is_logged_under_its_own_name(tmp_path, caplog):
    """``print_log`` (MONAI's default) logs every file written, by its final name: not only the first of a batch,
    and never the temporary name it is written under."""
    import logging

    import torch
    from monai.data import MetaTensor

    from dira3d.evaluation import SavePredictiond

    saver = SavePredictiond(keys="pred", output_dir=str(tmp_path), output_postfix="seg", output_ext=".nii.gz",
                            separate_folder=False, resample=False)
    with caplog.at_level(logging.INFO):
        for name in ("a", "b"):
            saver({"pred": MetaTensor(torch.ones(1, 4, 4, 4), meta={"filename_or_obj": f"/data/{name}.nii.gz"})})
    written = [r.getMessage() for r in caplog.records if r.getMessage().startswith("writing: ")]
    assert written == [f"writing: {tmp_path / 'a_seg.nii.gz'}", f"writing: {tmp_path / 'b_seg.nii.gz'}"]
    assert is_own_prediction(tmp_path / "a_seg.nii.gz") and is_own_prediction(tmp_path / "b_seg.nii.gz")


def test_an_entry_of_several_files_is_named_by_its_first(tmp_path):
    """A multi-channel entry lists one file per channel; LoadImaged records the first, which names the output."""
    from dira3d.evaluation import CheckPredictionFiles

    check = CheckPredictionFiles([[str(tmp_path / "t1.nii.gz"), str(tmp_path / "t2.nii.gz")], str(tmp_path / "c.nii.gz")],
                                 str(tmp_path / "out"), "seg", ".nii.gz")
    assert check.targets() == [str(tmp_path / "out" / "t1_seg.nii.gz"), str(tmp_path / "out" / "c_seg.nii.gz")]


def test_the_target_check_runs_when_the_evaluator_starts_before_any_input_is_read(tmp_path):
    """Every target is checked at ``STARTED``: a user's file at the last target stops the run before the first
    input is processed (checking at the end would have written the others first)."""
    from ignite.engine import Engine

    from dira3d.evaluation import CheckPredictionFiles

    (tmp_path / "c_seg.nii.gz").write_bytes(b"a user's label")
    seen = []
    engine = Engine(lambda engine, batch: seen.append(batch))
    CheckPredictionFiles([str(tmp_path / f"{n}.nii.gz") for n in "abc"], str(tmp_path), "seg").attach(engine)
    with pytest.raises(FileExistsError, match=r"c_seg\.nii\.gz exists and is not a prediction written by dira3d"):
        engine.run(["a", "b", "c"], max_epochs=1)
    assert seen == []
    assert (tmp_path / "c_seg.nii.gz").read_bytes() == b"a user's label"
