"""A rerun of `dira3d prepare` after scans were added or removed keeps every patient in its part.

Cutting a fresh seeded permutation of the new patient set moved earlier patients between training,
validation and test, without a word: a model fine-tuned on the earlier datalist was then tested on
some of its own training patients. The recorded split (split.json, or the generic datalist) is kept
when its rule is unchanged; only new patients are dealt out.
"""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from dira3d.data import generic
from dira3d.data.cxr_splits import earlier_patient_split, patient_split, write_patient_split
from dira3d.data.io import xyz_to_image
from dira3d.data.patients import patient_parts
from dira3d.data.splits import earlier_split, extend_split, split_patients, write_split_file

PARTS = {"training": 60, "validation": 20, "test": 20}


def _part_of(split: dict) -> dict[str, str]:
    return {p: name for name, ids in split.items() for p in ids}


def test_split_patients_keeps_an_earlier_split_and_deals_out_only_new_patients():
    ids = [f"p{i:02d}" for i in range(20)]
    first = split_patients(ids, PARTS, seed=3)
    assert split_patients(ids, PARTS, seed=3, earlier=first) == first  # nothing changed: the same split
    grown = ids[1:] + [f"q{i}" for i in range(5)]  # one patient gone, five new
    fresh = split_patients(grown, PARTS, seed=3)
    assert any(_part_of(fresh)[p] != _part_of(first)[p] for p in ids[1:])  # what a fresh cut did: patients moved
    kept = split_patients(grown, PARTS, seed=3, earlier=first)
    assert all(_part_of(kept)[p] == _part_of(first)[p] for p in ids[1:])
    assert sorted(p for ids_ in kept.values() for p in ids_) == sorted(grown)
    assert [len(kept[name]) for name in PARTS] == [14, 5, 5]  # the new ones filled the parts towards 60/20/20 of 24


def test_extend_split_fills_the_parts_furthest_below_their_sizes():
    earlier = {"training": ["a", "b", "c"], "validation": [], "test": ["d"]}
    kept = extend_split(["a", "b", "c", "d", "e", "f"], {"training": 4, "validation": 1, "test": 1}, 0, earlier)
    assert kept["training"][:3] == ["a", "b", "c"] and kept["test"] == ["d"]
    assert len(kept["training"]) == 4 and len(kept["validation"]) == 1
    assert extend_split(["x", "y"], {"training": 1, "validation": 1}, 0, earlier) is None  # no patient in common
    assert extend_split(["a"], {"training": 1}, 0, None) is None


def test_earlier_split_only_for_the_same_rule(tmp_path):
    rule = {"method": "m", "seed": 1, "reference_sizes": PARTS}
    write_split_file(tmp_path / "split.json", {"training": ["a"], "validation": ["b"], "test": []}, rule)
    assert earlier_split(tmp_path / "split.json", rule) == {"training": ["a"], "validation": ["b"], "test": []}
    assert earlier_split(tmp_path / "split.json", {**rule, "seed": 2}) is None
    assert earlier_split(tmp_path / "nothing.json", rule) is None
    (tmp_path / "bad.json").write_text("{")
    assert earlier_split(tmp_path / "bad.json", rule) is None


def test_chest_xray_patient_split_keeps_the_recorded_parts(tmp_path):
    patients = [f"{i:05d}" for i in range(30)]
    first = patient_split(patients, 0.2, 0.2, seed=0)
    write_patient_split(tmp_path, first, 0, val_fraction=0.2, test_fraction=0.2)
    earlier = earlier_patient_split(tmp_path, 0, val_fraction=0.2, test_fraction=0.2)
    assert earlier == first
    assert earlier_patient_split(tmp_path, 0, val_fraction=0.1, test_fraction=0.2) is None  # another rule: a fresh split
    more = patient_split(patients + ["99999", "99998"], 0.2, 0.2, seed=0, earlier=earlier)
    assert all(_part_of(more)[p] == _part_of(first)[p] for p in patients)


def test_a_split_json_written_before_the_split_moved_to_cxr_splits_is_still_kept(tmp_path):
    """The split helpers moved from dira3d.data.cxr to dira3d.data.cxr_splits; split.json records the method by
    its first name, so a dataset prepared before the move keeps its patients' parts when it is prepared again."""
    first = patient_split([f"{i:05d}" for i in range(30)], 0.2, 0.2, seed=0)
    rule = {"method": "dira3d.data.cxr.patient_split", "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}
    write_split_file(tmp_path / "split.json", first, rule)  # as the preparations wrote it before the move
    assert earlier_patient_split(tmp_path, 0, val_fraction=0.2, test_fraction=0.2) == first
    write_patient_split(tmp_path, first, 0, val_fraction=0.2, test_fraction=0.2)
    assert json.loads((tmp_path / "split.json").read_text())["rule"] == rule


def _scan(path, seed):
    array = np.random.default_rng(seed).uniform(100, 900, size=(16, 16, 8)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(xyz_to_image(array), str(path))


def test_generic_rerun_with_added_and_removed_scans_moves_no_patient(tmp_path):
    src, dst = tmp_path / "scans", tmp_path / "out"
    for i in range(12):
        _scan(src / f"case{i:02d}.nii.gz", i)
    options = dict(modality="mr", val_fraction=0.25, test_fraction=0.25, seed=0, progress=False)
    generic.prepare(src, dst, **options)
    datalist = dst / "pretrain_datalist.json"

    def parts():
        data = json.loads(datalist.read_text())
        return {e["patient_id"]: name for name in ("training", "validation", "test") for e in data.get(name, [])}

    before = parts()
    (src / "case03.nii.gz").unlink()
    for i in range(12, 16):
        _scan(src / f"case{i:02d}.nii.gz", i)
    results = generic.prepare(src, dst, **options)
    assert sorted(r.status for r in results).count("written") == 4  # only the new scans are converted
    after = parts()
    assert {p: after[p] for p in before if p != "case03"} == {p: before[p] for p in before if p != "case03"}
    assert "case03" not in after and all(f"case{i}" in after for i in range(12, 16))
    fresh = patient_parts(sorted(after), 0.25, 0.25, 0)  # a fresh cut of the new set moves some
    assert any(fresh[p] != before[p] for p in before if p != "case03")
    assert sorted(after.values()).count("test") == 4 and sorted(after.values()).count("validation") == 4  # 15 patients

    generic.prepare(src, dst, **{**options, "seed": 5})  # another seed is another rule: a fresh cut
    assert parts() == patient_parts(sorted(after), 0.25, 0.25, 5) != after
