"""Session-23 mutation audit of the patient grouping of ``dira3d prepare generic`` (dira3d.data.patients): each test
pins a behaviour that a mutation of that module changed without any other test failing. Reference: the docstring of
check_patient_setting (an unknown ``patient_from`` is a ValueError naming the choices).
"""

from __future__ import annotations

import pytest

from dira3d.data.patients import check_patient_setting, patient_ids


def test_an_unknown_grouping_is_refused_naming_the_choices(tmp_path):
    """The command line's choices stop it there; a Python caller gets the same refusal, not an AttributeError."""
    with pytest.raises(ValueError, match=r"--patient-from must be one of \('case', 'parent', 'regex'\), got 'folder'"):
        check_patient_setting("folder", None)
    with pytest.raises(ValueError, match="got 'folder'"):
        patient_ids(tmp_path, [("a", tmp_path / "a.nii.gz", None)], patient_from="folder")


def test_a_regex_of_two_groups_is_refused_and_one_of_a_group_and_a_non_capturing_one_is_taken():
    with pytest.raises(ValueError, match=r"--patient-regex '\^\(p\\\\d\+\)/\(\\\\w\+\)' has 2 groups; it needs exactly one"):
        check_patient_setting("regex", r"^(p\d+)/(\w+)")
    assert check_patient_setting("regex", r"^(p\d+)/(?:\w+)").groups == 1


def test_the_regex_is_searched_in_the_relative_path_and_must_capture_something(tmp_path):
    from dira3d.data.errors import DataError

    found = [("ct1", tmp_path / "site_b" / "patient007" / "ct_2019.nii.gz", None)]
    # searched (re.search), not matched at the start: the id may lie deeper than the first folder
    assert patient_ids(tmp_path, found, "regex", r"(patient\d+)") == {"ct1": "patient007"}
    with pytest.raises(DataError, match=r"matches but its group captures nothing in its path 'site_b/patient007/ct_2019"):
        patient_ids(tmp_path, found, "regex", r"^(\d*)")


def test_a_case_that_already_failed_is_left_out_and_its_problem_kept(tmp_path):
    problems = {"a": "mask without its image"}
    found = [("a", None, tmp_path / "a_label.nii.gz"), ("b", tmp_path / "p1" / "b.nii.gz", None)]
    assert patient_ids(tmp_path, found, "parent", problems=problems) == {"b": "p1"}
    assert problems == {"a": "mask without its image"}
