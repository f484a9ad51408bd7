"""Session 23b mutation audit of dira3d.data.sequences: the checks the earlier tests left unpinned."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data.nifti_header import PREDICTION_MARK_PREFIX
from dira3d.data.sequences import check_sequence_settings, find_sequence_cases, parse_sequences, stack_sequences


@pytest.mark.parametrize("spec", ["t1=", "t1=   ", ["t1=*T1w*", "flair= "]])
def test_a_sequence_with_an_empty_pattern_is_refused_naming_the_item(spec):
    """`t1=` matched no file of any case: every case failed on it, instead of the setting being named once."""
    with pytest.raises(ValueError, match=r"must be NAME=PATTERN"):
        parse_sequences(spec)


@pytest.mark.parametrize("spec", ["", ",", ["", " , "]])
def test_sequences_without_any_item_are_refused(spec):
    """an empty `--sequences` gave {}, which check_sequence_settings reads as 'no --sequences' (single scans)."""
    with pytest.raises(ValueError, match="at least one NAME=PATTERN"):
        parse_sequences(spec)


def _nifti(path, marked: bool = False) -> None:
    image = nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4))
    if marked:
        image.header["descrip"] = (PREDICTION_MARK_PREFIX + "0" * 8).encode("ascii")
    nib.save(image, str(path))


def test_a_marked_prediction_is_no_sequence_but_the_label_pattern_takes_it(tmp_path):
    """the docstring's '(the label pattern may still take it)': a bundle's prediction used as the mask is found as
    the mask, while the T1 pattern it matches too leaves it out."""
    case = tmp_path / "src" / "sub-01"
    case.mkdir(parents=True)
    _nifti(case / "sub-01_T1w.nii.gz")
    _nifti(case / "sub-01_T1w_seg.nii.gz", marked=True)
    problems: dict[str, str] = {}
    cases = find_sequence_cases(tmp_path / "src", {"t1": "*T1w*"}, label_pattern="*seg*", problems=problems)
    assert problems == {}
    assert [(cid, found["t1"].name, label.name) for cid, _folder, found, label in cases] == [
        ("sub-01", "sub-01_T1w.nii.gz", "sub-01_T1w_seg.nii.gz")]


def test_a_pattern_matching_two_files_gives_no_path_and_a_problem_naming_both(tmp_path):
    """with `problems` the case is still listed: a sequence matched twice is None (not the first file, which a caller
    would stack as if it were the one), and the problem names both files."""
    case = tmp_path / "src" / "sub-01"
    case.mkdir(parents=True)
    for name in ("a_T1w.nii.gz", "b_T1w.nii.gz", "a_FLAIR.nii.gz"):
        _nifti(case / name)
    problems: dict[str, str] = {}
    [(cid, _folder, found, label)] = find_sequence_cases(tmp_path / "src", {"t1": "*T1w*", "flair": "*FLAIR*"},
                                                         problems=problems)
    assert cid == "sub-01" and found["t1"] is None and found["flair"].name == "a_FLAIR.nii.gz" and label is None
    assert "2 files match the t1 pattern" in problems["sub-01"] and "a_T1w.nii.gz, b_T1w.nii.gz" in problems["sub-01"]


def test_hidden_files_are_no_candidates(tmp_path):
    """macOS copies leave `._<name>` files beside each scan: `._sub-01_T1w.nii.gz` matched `*T1w*` too, and the case
    failed with '2 files match'."""
    case = tmp_path / "src" / "sub-01"
    case.mkdir(parents=True)
    _nifti(case / "sub-01_T1w.nii.gz")
    (case / "._sub-01_T1w.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    problems: dict[str, str] = {}
    [(cid, _folder, found, _label)] = find_sequence_cases(tmp_path / "src", {"t1": "*T1w*"}, problems=problems)
    assert problems == {} and found["t1"].name == "sub-01_T1w.nii.gz"


def test_one_sequence_stacks_to_a_3d_volume_and_an_empty_sequence_is_kept(tmp_path):
    """one sequence is the 3D scan itself (a 4D volume of one channel is not what check_channels(.., 1) and the
    single-scan bundles read); a blank sequence (all zero) is a sequence, not an 'empty mask' to refuse."""
    _nifti(tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), str(tmp_path / "flair.nii.gz"))
    keep = lambda image, path: image  # noqa: E731
    volume, reference, path = stack_sequences({"t1": tmp_path / "t1.nii.gz"}, keep)
    assert volume.GetDimension() == 3 and volume.GetSize() == (4, 4, 3) and path == tmp_path / "t1.nii.gz"
    checked = []
    volume, _, _ = stack_sequences({"t1": tmp_path / "t1.nii.gz", "flair": tmp_path / "flair.nii.gz"}, keep,
                                   check=lambda image, path: checked.append(path.name))
    assert checked == ["t1.nii.gz", "flair.nii.gz"]  # every sequence is checked (e.g. that it is not a mask)
    assert volume.GetDimension() == 4 and volume.GetSize() == (4, 4, 3, 2)
    channels = sitk.GetArrayFromImage(volume)  # (channel, z, y, x): t1 first, in the order given
    assert channels[0].min() == 1 and channels[1].max() == 0


@pytest.mark.parametrize("label_pattern", ["", "  "])
def test_an_empty_label_pattern_is_refused_not_read_as_no_masks(label_pattern):
    """`--label-pattern ''` (an unset shell variable) prepared every case without its mask, without a word."""
    with pytest.raises(ValueError, match="--label-pattern is empty"):
        check_sequence_settings(["t1=*T1w*"], label_pattern, None, "", None)
    assert check_sequence_settings(["T1=*T1w*", "flair=*FLAIR*"], "*mask*", "mr", "", None) == {"t1": "*T1w*", "flair": "*FLAIR*"}
