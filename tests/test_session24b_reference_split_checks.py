"""Session 24b mutation audit of dira3d.evaluation.split_checks: the datalist label check (``check_labels``), the
refusals of the 'validation' list as the holdout, the AUC check's edge cases and the test split warnings, pinned on
the public functions without a datalist on disk or a training run."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from dira3d.evaluation.split_checks import (check_auc_defined, check_labels, check_validation_holdout, split_kind,
                                            warn_test_patients_in_training, warning_for_test_split)

PATH = Path("/data/my_datalist.json")


def _labelled(label, n: int = 1, prefix: str = "a") -> list[dict]:
    return [{"image": f"{prefix}{i}.nii.gz", "label": label, "case_id": f"{prefix}{i}"} for i in range(n)]


def _refusal(entries: list[dict], kind: str | None = None, split: str = "train") -> str:
    with pytest.raises(ValueError) as caught:
        check_labels(PATH, split, entries, kind)
    return str(caught.value)


def test_check_labels_names_the_first_bad_entry_and_counts_the_others():
    entries = _labelled(1, 1, "g") + [{"image": "x.nii.gz"}] + _labelled(0, 1, "h")
    one = _refusal(entries)
    assert one.startswith(f"datalist {PATH}: entry 1 of split 'train' (image x.nii.gz) has no 'label'"), one
    assert "other entr" not in one
    two = _refusal(entries + [{"image": "y.nii.gz"}])
    assert two.startswith(f"datalist {PATH}: entry 1 of split 'train' (1 other entry of it too) (image x.nii.gz)"), two
    three = _refusal(entries + [{"image": "y.nii.gz"}, {"image": "z.nii.gz"}])
    assert "entry 1 of split 'train' (2 other entries of it too) (image x.nii.gz)" in three, three


def test_check_labels_takes_each_bundle_kind_its_own_labels_only():
    check_labels(PATH, "train", _labelled(1, 2), "classification")
    check_labels(PATH, "train", _labelled([1.0, 0.0], 2), "classification")  # a multi-label classifier (CheXpert)
    check_labels(PATH, "train", _labelled("m.nii.gz", 2), "segmentation")
    check_labels(PATH, "train", _labelled(["m1.nii.gz", "m2.nii.gz"], 2), "segmentation")  # a mask of several files
    check_labels(PATH, "train", _labelled("m.nii.gz", 2))  # no kind: only a missing label is refused
    assert "a mask file (a segmentation datalist?)" in _refusal(_labelled("m.nii.gz"), "classification")
    for label in (1, [1.0, 0.0], [], ["m.nii.gz", 3]):  # a class, a class vector, nothing, a list not of files
        assert "a class (a classification datalist?)" in _refusal(_labelled(label), "segmentation"), label


def test_the_validation_list_as_the_holdout_is_refused_with_any_fold_and_named_when_empty_or_missing():
    training, held, test = _labelled(0, 3, "t"), _labelled(1, 2, "v"), _labelled(0, 1, "s")
    content = {"training": training, "validation": held, "test": test}
    check_validation_holdout(PATH, content, held, training, test, fold=None)
    check_validation_holdout(PATH, content, held, training, test, fold=-1)  # no cross-validation fold
    with pytest.raises(ValueError, match=re.escape("holdout='validation' cannot be used with fold=0")):
        check_validation_holdout(PATH, content, held, training, test, fold=0)
    with pytest.raises(ValueError, match=re.escape("but its 'validation' list is empty;")):
        check_validation_holdout(PATH, dict(content, validation=[]), [], training, test)
    with pytest.raises(ValueError, match=re.escape("but it has no 'validation' list (it has ['test', 'training']);")):
        check_validation_holdout(PATH, {"training": training, "test": test, "meta": {}}, [], training, test)


def test_the_validation_list_sharing_a_patient_with_the_test_list_is_refused_naming_at_most_five():
    training, test = _labelled(0, 3, "t"), _labelled(0, 6, "v")
    for shared, listed in ((1, "(v0)"), (5, "(v0, v1, v2, v3, v4)"), (6, "(v0, v1, v2, v3, v4, ...)")):
        held = _labelled(1, shared, "v")
        with pytest.raises(ValueError) as caught:
            check_validation_holdout(PATH, {}, held, training, test)
        message = str(caught.value)
        assert f"{shared} patient(s) of the 'validation' list of datalist {PATH} are also in its 'test' list {listed}, " \
               "so early stopping would select the model on patients it is tested on" in message, message


def test_a_holdout_of_one_class_says_in_how_many_patients_training_keeps_the_other():
    chosen = _labelled(0, 4, "n") + _labelled(1, 1, "p")  # the label fraction keeps one positive patient
    with pytest.raises(ValueError, match=re.escape("the 5 training candidates this label fraction keeps have class "
                                                   "1 (positive) in 1 patient(s) only, which training needs")):
        check_auc_defined(PATH, "holdout", _labelled(0, 2, "n"), chosen=chosen, settings="label_fraction=0.1")
    with pytest.raises(ValueError, match="the training candidates this label fraction keeps are of class 0 only"):
        check_auc_defined(PATH, "holdout", _labelled(0, 2, "n"), chosen=_labelled(0, 4, "n"))


def test_the_auc_check_leaves_a_multilabel_split_with_a_label_not_of_numbers_to_the_label_check():
    check_auc_defined(PATH, "test", _labelled([1.0, 0.0], 2) + _labelled([1.0, "x"], 1, "b"))  # no AUC error


def test_split_kind_names_each_kind():
    assert split_kind(_labelled(1, 2)) == "classification"
    assert split_kind(_labelled([1.0, 0.0], 2)) == "multilabel"
    assert split_kind(_labelled("m.nii.gz", 2)) == "segmentation"


def test_no_warning_for_a_test_split_of_no_cases():
    assert warning_for_test_split(PATH, "segmentation", {"cases": 0, "positive": 0}) is None


def test_test_patients_in_training_are_warned_about_once_and_none_shared_not_at_all():
    training, test = _labelled(0, 2, "p"), _labelled(0, 1, "p") + _labelled(0, 1, "q")
    other = Path("/data/session24b_unique_datalist.json")  # a path of its own: the warnings are once per process
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_test_patients_in_training(other, training, _labelled(0, 2, "q"))
    with pytest.warns(UserWarning, match=re.escape(f"{other}: 1 patient(s) of its 'test' list are also in its "
                                                   "'training' list (p0)")):
        warn_test_patients_in_training(other, training, test)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_test_patients_in_training(other, training, test)  # the same datalist tested again: not again


@pytest.mark.parametrize("dataset, advice", [
    ("chestxray14", "add one (`dira3d prepare chestxray14 ... --val-fraction` writes one)"),
    ("luna16", "add one (`dira3d prepare luna16 ... --val-subsets` writes one)"),
    ("pecad", "`dira3d prepare pecad` writes no 'validation' list: its patients are all in 'training'"),
    (None, "add one (`dira3d prepare generic ... --val-fraction` writes one)"),
])
def test_a_missing_validation_holdout_names_its_datasets_own_prepare_option(tmp_path, dataset, advice):
    """It said "`dira3d prepare` writes one: the official validation subsets, or --val-fraction of the patients" for
    every dataset: options of no one command, and none of PE-CAD's (it writes no 'validation' list)."""
    import json

    training, test = _labelled(0, 3, "t"), _labelled(0, 1, "s")
    content = {"training": training, "test": test, "meta": {"dataset": dataset} if dataset else {}}
    path = tmp_path / "dl.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as caught:
        check_validation_holdout(path, content, [], training, test)
    assert f"but it has no 'validation' list (it has ['test', 'training']); {advice}" in str(caught.value), caught.value
    assert "the official validation subsets, or" not in str(caught.value)
