"""Session-23c mutation audit of :mod:`dira3d.data.patients` (PA9 onward; PA1-PA8 are pinned in
tests/test_session23_reference_patients.py): behaviours a mutation changed without any test failing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dira3d.data.errors import DataError
from dira3d.data.patients import check_grouping, check_split_sizes, earlier_parts, patient_ids, patient_parts


def test_the_patient_comes_from_the_scan_path_not_its_mask(tmp_path):
    found = [("s7", tmp_path / "p1" / "scan7.nii.gz", tmp_path / "p1" / "scan7_label.nii.gz")]
    assert patient_ids(tmp_path, found, "regex", r"([^/]+)\.nii\.gz$") == {"s7": "scan7"}
    # a mask without its scan (the case fails elsewhere) still has a patient from its own path
    assert patient_ids(tmp_path, [("s8", None, tmp_path / "p2" / "s8_label.nii.gz")], "parent") == {"s8": "p2"}


_DROP = object()  # a meta key a datalist from before the grouping options lacks


def _datalist(path: Path, src: Path, **meta) -> Path:
    meta = {"source": str(src.resolve()), "val_fraction": 0.2, "test_fraction": 0.0, "seed": 0,
            "patient_from": "parent", "patient_regex": None, **meta}
    meta = {k: v for k, v in meta.items() if v is not _DROP}
    path.write_text(json.dumps({"meta": meta, "training": [{"case_id": "a", "patient_id": "p1"}],
                                "validation": [{"case_id": "b", "patient_id": "p2"}], "test": []}))
    return path


_RULE = {"val_fraction": 0.2, "test_fraction": 0.0, "seed": 0, "patient_from": "parent", "patient_regex": None}


def test_the_earlier_split_is_read_by_patient_for_the_same_rule_only(tmp_path):
    datalist = _datalist(tmp_path / "datalist.json", tmp_path)
    assert earlier_parts(datalist, tmp_path, _RULE) == {"training": ["p1"], "validation": ["p2"], "test": []}
    assert earlier_parts(datalist, tmp_path, {**_RULE, "seed": 1}) is None


def test_a_datalist_of_another_source_is_neither_kept_nor_judged(tmp_path):
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir(), other.mkdir()
    datalist = _datalist(tmp_path / "datalist.json", other)
    assert earlier_parts(datalist, src, _RULE) is None
    check_grouping(datalist, src, {"patient_from": "case", "patient_regex": None}, overwrite=False)  # run_cases refuses it


def test_a_datalist_from_before_the_grouping_options_was_split_by_case(tmp_path):
    datalist = _datalist(tmp_path / "datalist.json", tmp_path, patient_from=_DROP, patient_regex=_DROP)
    case_rule = {**_RULE, "patient_from": "case"}
    assert earlier_parts(datalist, tmp_path, case_rule) == {"training": ["p1"], "validation": ["p2"], "test": []}
    check_grouping(datalist, tmp_path, {"patient_from": "case", "patient_regex": None}, overwrite=False)
    with pytest.raises(DataError, match=r"was split by patient with --patient-from case \(now --patient-from parent\)"):
        check_grouping(datalist, tmp_path, {"patient_from": "parent", "patient_regex": None}, overwrite=False)


def test_regrouping_names_both_groupings_and_overwrite_lifts_it(tmp_path):
    datalist = _datalist(tmp_path / "datalist.json", tmp_path)
    regex = {"patient_from": "regex", "patient_regex": r"(p\d+)"}
    with pytest.raises(DataError, match=r"with --patient-from parent \(now --patient-regex '\(p\\\\d\+\)'\)"):
        check_grouping(datalist, tmp_path, regex, overwrite=False)
    check_grouping(datalist, tmp_path, regex, overwrite=True)
    check_grouping(datalist, tmp_path, {"patient_from": "parent", "patient_regex": None}, overwrite=False)


@pytest.mark.parametrize("seed", [0, 3])
def test_a_fresh_split_deals_the_seeded_permutation_in_order(seed):
    """The docstring's rule: the first n_val of the seeded permutation go to validation, the next n_test to test."""
    patients = [f"p{i}" for i in range(10)]
    part = patient_parts(patients, 0.2, 0.3, seed)
    order = np.random.default_rng(seed).permutation(10)
    assert {p for p in patients if part[p] == "validation"} == {patients[i] for i in order[:2]}
    assert {p for p in patients if part[p] == "test"} == {patients[i] for i in order[2:5]}


def test_an_earlier_split_is_kept_and_new_patients_fill_the_parts_to_their_sizes():
    patients = [f"p{i}" for i in range(10)]
    earlier = {"training": ["p0"], "validation": ["p1"], "test": ["p2"]}
    part = patient_parts(patients, 0.2, 0.2, 0, earlier=earlier)
    assert (part["p0"], part["p1"], part["p2"]) == ("training", "validation", "test")
    assert Counter(part.values()) == {"training": 6, "validation": 2, "test": 2}


def test_split_sizes_round_and_leave_training_at_least_one():
    assert check_split_sizes(10, 0.27, 0.0) == (3, 0)
    assert check_split_sizes(4, 0.25, 0.5) == (1, 2)
    with pytest.raises(ValueError, match=r"take 2 \+ 2 of the 4 case\(s\), leaving none to train on"):
        check_split_sizes(4, 0.5, 0.5)
