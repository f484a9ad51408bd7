"""Reference tests for session 20's fast split loading, written by a mutation audit: path resolution against MONAI's
own (``monai.data.load_decathlon_datalist``, the behaviour dira3d.data.datalist_entries reproduces with one lookup per
distinct value), and the draws' thresholds (dira3d.evaluation.split_draws) by hand: a multi-label value of 0.5 is
positive as the AUC binarises it (dira3d.evaluation.metrics), a LIDC ``voxels`` count of 0 is an empty mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from dira3d.data.datalist import datalist_entries
from dira3d.evaluation.split_draws import entry_classes, has_foreground, holdout_by_patient, select_fraction


def _datalist(tmp_path: Path) -> Path:
    for folder in ("cases", "masks", "Frontal_dir"):
        (tmp_path / folder).mkdir()
    (tmp_path / "cases" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    entries = [
        {"image": "cases/a.nii.gz", "label": ["masks/./a_1.nii.gz", "masks/a_2.nii.gz"], "mask_dir": "masks",
         "view": "Frontal", "fold": 1, "note": "notes.txt"},
        {"image": str(tmp_path / "cases" / "b.nii.gz"), "label": "masks/b.nii.gz", "mask_dir": "masks", "view": "Lateral",
         "fold": 0, "note": "cases/../notes.txt", "extra": ["cases", "gone"], "scores": [0.5, 1.0], "meta": {"k": "cases"}},
        {"image": "cases/../cases/c.nii.gz", "label": "masks", "mask_dir": "nowhere", "view": "Frontal_dir", "fold": 2,
         "note": None, "extra": ["masks", "cases"]},
    ]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


@pytest.mark.parametrize("base", ["datalist", "trailing", "root", "empty"])
def test_paths_resolve_as_monai_resolves_them(tmp_path, monkeypatch, base):
    path = _datalist(tmp_path)
    monkeypatch.chdir(tmp_path)  # "empty": relative to the working folder, as os.path.join("", p) leaves them
    base_dir = {"datalist": str(tmp_path), "trailing": str(tmp_path) + "/", "root": "/", "empty": ""}[base]
    ours = datalist_entries(path, "training", base_dir=base_dir, path_keys=("image", "label"), required=("image",))
    monai = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key="training", base_dir=base_dir)
    assert ours == monai


def test_a_multilabel_value_of_one_half_is_positive_as_the_auc_counts_it():
    assert entry_classes({"label": [0.5, 0.49, 1.0, 0.0]}) == {0, 2}
    assert entry_classes({"label": 1}) == {1}


def test_a_voxels_count_of_zero_is_an_empty_mask():
    assert has_foreground("voxels")({"voxels": 0}) == set()
    assert has_foreground("voxels")({"voxels": 0.0}) == set()
    assert has_foreground("voxels")({"voxels": 12}) == {True}
    # a holdout drawn with empty masks only takes a patient with foreground: here the only ones are p0 and p9
    entries = [{"case_id": f"p{i}", "label": f"m{i}.nii.gz", "voxels": 30 if i in (0, 9) else 0} for i in range(10)]
    train, held = holdout_by_patient(entries, 0.1, seed=0)
    assert sum(e["voxels"] > 0 for e in held) == 1 and sum(e["voxels"] > 0 for e in train) == 1


def test_the_labels_kept_do_not_depend_on_which_class_the_datalist_lists_first():
    """One seeded order per class, the classes taken in sorted order: listing a positive first (here: moving the
    positives, in their order, in front of the negatives) keeps the same cases."""
    entries = [{"case_id": f"p{i}", "image": f"i{i}.png", "label": int(i % 3 == 0)} for i in range(30)]
    negatives_first = sorted(entries, key=lambda e: e["label"])  # stable: each class keeps its order
    positives_first = sorted(entries, key=lambda e: -e["label"])
    for seed in range(3):
        kept = {e["case_id"] for e in select_fraction(negatives_first, 0.5, seed)}
        assert {e["case_id"] for e in select_fraction(positives_first, 0.5, seed)} == kept
        assert {e["case_id"] for e in select_fraction(entries, 0.5, seed)} == kept


def test_the_last_patient_of_the_draw_stays_in_training_whatever_the_holdout_share():
    """A patient of 9 entries and one of 1: at a holdout share of 0.5 drawing the small one first leaves the target
    unmet, but the last patient of the seeded order is never held out (training would be empty)."""
    entries = [{"case_id": "small", "label": 0}] + [{"case_id": "large", "label": 0} for _ in range(9)]
    orders = set()
    for seed in range(8):
        train, held = holdout_by_patient(entries, 0.5, seed)
        assert train and held and {e["case_id"] for e in train}.isdisjoint(e["case_id"] for e in held)
        orders.add(held[0]["case_id"])
    assert orders == {"small", "large"}  # both orders were drawn


def test_a_multilabel_holdout_gets_a_negative_of_a_class_its_draw_holds_only_positives_of():
    """One class, positive for 8 patients and negative for 2: whichever patient is drawn, the holdout ends with a
    positive and a negative (an AUC needs both), and training keeps both too."""
    entries = [{"case_id": f"p{i}", "image": f"i{i}.png", "label": [1.0 if i < 8 else 0.0]} for i in range(10)]
    for seed in range(10):
        train, held = holdout_by_patient(entries, 0.1, seed)
        assert {e["label"][0] for e in held} == {0.0, 1.0}, seed
        assert {e["label"][0] for e in train} == {0.0, 1.0}, seed
