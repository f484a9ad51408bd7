"""Mutation audit of :mod:`dira3d.data.modality` (session 23c): what the mask check, the air checks and the
modality probe of ``dira3d prepare generic`` promise, pinned where no test held them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data.io import DataError, xyz_to_image
from dira3d.data.modality import check_hu, check_not_a_mask, modality_from_scans, recorded_modality
from dira3d.data.runner import Case

SHAPE = (8, 8, 4)


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(xyz_to_image(array), str(path))
    return path


def _mr(path: Path) -> Path:
    array = np.zeros(SHAPE, np.float32)
    array[2:6, 2:6, 1:3] = np.linspace(100, 2900, 32, dtype=np.float32).reshape(4, 4, 2)
    return _write(path, array)


def _ct(path: Path) -> Path:
    array = np.full(SHAPE, -1000, np.int16)
    array[2:6, 2:6, 1:3] = np.arange(-100, 220, 10, dtype=np.int16).reshape(4, 4, 2)
    return _write(path, array)


def _constant(path: Path) -> Path:
    return _write(path, np.zeros(SHAPE, np.float32))


def _cases(paths: list[Path], errors: dict[int, str] | None = None) -> list[Case]:
    errors = errors or {}
    return [Case(f"c{i}", [], {"image": str(p)}, errors.get(i, "")) for i, p in enumerate(paths)]


def test_an_integer_label_map_is_refused_as_a_mask():
    labels = np.zeros(SHAPE, np.int16)
    labels[2:5, 2:5, 1:3] = 1
    labels[5:7, 5:7, 2:4] = 2
    with pytest.raises(DataError, match=r"has only 3 distinct values \(0, 1, 2\): it looks like a mask"):
        check_not_a_mask(xyz_to_image(labels), "labels.nii.gz")


@pytest.mark.parametrize("count, shown", [(8, "0, 1, 2, 3, 4, 5, 6, 7)"), (10, "0, 1, 2, 3, 4, 5, 6, 7, ...)")])
def test_the_mask_message_shows_eight_values_and_says_when_there_are_more(count, shown):
    labels = (np.arange(np.prod(SHAPE)) % count).astype(np.int16).reshape(SHAPE)
    with pytest.raises(DataError) as caught:
        check_not_a_mask(xyz_to_image(labels), "labels.nii.gz")
    assert f"has only {count} distinct values ({shown}" in str(caught.value), caught.value


def test_a_constant_image_is_not_judged_by_the_air_check():
    """A constant image is no scan: another check names it; check_hu neither refuses nor warns about it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_hu(xyz_to_image(np.zeros(SHAPE, np.float32)), "flat.nii.gz", chosen_by="taken from the scans")


def test_the_probe_reads_past_the_spread_while_no_scan_decides(tmp_path):
    """7 cases: the 5 spread over them (0, 2, 3, 4, 6) are constant and decide nothing, so cases 1 and 5 are read;
    they are MRIs, so the run stops instead of windowing them as CT."""
    paths = [(_mr if i in (1, 5) else _constant)(tmp_path / f"s{i}.nii.gz") for i in range(7)]
    with pytest.raises(DataError, match="has no voxel below -500 HU"):
        modality_from_scans(_cases(paths), tmp_path)


def test_constant_images_decide_nothing(tmp_path):
    paths = [_constant(tmp_path / f"s{i}.nii.gz") for i in range(3)]
    assert modality_from_scans(_cases(paths), tmp_path) == ("ct", "no scan read could tell, so the former default")


def test_the_probe_reads_at_most_twenty_scans(tmp_path):
    """25 cases: the probe reads the 5 spread (0, 6, 12, 18, 24), then in order, 20 in all (up to case 17); the
    MRIs at 19 .. 23 are never read, and each case is judged on its own later."""
    paths = [(_mr if 19 <= i <= 23 else _constant)(tmp_path / f"s{i:02d}.nii.gz") for i in range(25)]
    assert modality_from_scans(_cases(paths), tmp_path) == ("ct", "no scan read could tell, so the former default")


def test_a_case_that_already_failed_is_not_probed(tmp_path):
    """The MRI of a case that failed while listing is not read, so the CTs are not called a mixed folder."""
    paths = [_ct(tmp_path / "a.nii.gz"), _mr(tmp_path / "b.nii.gz"), _ct(tmp_path / "c.nii.gz")]
    modality, why = modality_from_scans(_cases(paths, {1: "no mask for this scan"}), tmp_path)
    assert modality == "ct" and "air below -500 HU in the 2 read, e.g. a.nii.gz" in why, why


def test_a_label_map_among_the_scans_decides_nothing(tmp_path):
    """A mask left among CT scans is no MRI: the probe skips it (its case reports it) and the folder is CT."""
    labels = np.zeros(SHAPE, np.int16)
    labels[2:5, 2:5, 1:3] = 1
    paths = [_ct(tmp_path / "a.nii.gz"), _write(tmp_path / "b.nii.gz", labels), _ct(tmp_path / "c.nii.gz")]
    modality, why = modality_from_scans(_cases(paths), tmp_path)
    assert modality == "ct" and "in the 2 read" in why, why


def test_the_no_air_error_counts_the_other_scans_read(tmp_path):
    paths = [_mr(tmp_path / "a.nii.gz"), _mr(tmp_path / "b.nii.gz")]
    with pytest.raises(DataError, match=r"nor have the 1 other scan\(s\) read"):
        modality_from_scans(_cases(paths), tmp_path)


def _report(path: Path, src: Path, modality: str, desc: str = "generic") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"desc": desc, "source": str(src.resolve()), "settings": {"modality": modality}}))
    return path


def test_the_report_of_another_dataset_in_dst_records_no_modality(tmp_path):
    src, dst = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    _report(dst / "report.json", src, "mr", desc="brats")
    assert recorded_modality(dst, src, None) is None
    _report(dst / "report.json", src, "mr")
    assert recorded_modality(dst, src, None) == ("mr", dst / "report.json")


def test_a_datalist_of_another_source_records_no_modality(tmp_path):
    src, other, dst = tmp_path / "scans", tmp_path / "other", tmp_path / "out"
    src.mkdir(), other.mkdir(), dst.mkdir()
    datalist = dst / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"meta": {"source": str(other.resolve()), "modality": "mr"}, "training": []}))
    assert recorded_modality(dst, src, None) is None
    datalist.write_text(json.dumps({"meta": {"source": str(src.resolve()), "modality": "mr"}, "training": []}))
    assert recorded_modality(dst, src, None) == ("mr", datalist)


def test_the_report_given_as_report_path_is_the_one_read(tmp_path):
    src, dst = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    given = _report(dst / "run1.json", src, "mr")
    assert recorded_modality(dst, src, given) == ("mr", given)
    assert recorded_modality(dst, src, None) is None  # no report.json there
