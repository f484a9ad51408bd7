"""Which cases a fine-tuning run's splits hold (``splits.json``) and their digests (``split_digests`` in metrics.json,
the ``*_digest`` columns of results.csv): the ids are stable where the data folder moves, and the digest is what the
docs say, so a user can recompute it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dira3d.evaluation.datalists import load_split
from dira3d.evaluation.split_ids import case_id, split_digest, split_ids, write_splits


def _datalist(folder: Path, patients: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    training = []
    for p in range(patients):
        for scan in range(2):
            name = f"images/p{p}_{scan}.nii.gz"
            (folder / name).write_bytes(b"x")
            training.append({"image": name, "label": (p + scan) % 2, "case_id": f"p{p}"})
    (folder / "test.nii.gz").write_bytes(b"x")
    path = folder / "dl.json"
    path.write_text(json.dumps({"training": training, "test": [{"image": "test.nii.gz", "label": 0, "case_id": "t"},
                                                               {"image": "test.nii.gz", "label": 1, "case_id": "t"}]}))
    return path


def test_case_ids_are_image_paths_relative_to_the_datalist_and_the_digest_is_the_documented_sha256(tmp_path):
    datalist = _datalist(tmp_path / "data")
    train = load_split(datalist, "train", label_fraction=1.0, seed=0)  # absolute paths, as the bundles get them
    assert all(Path(e["image"]).is_absolute() for e in train)
    ids = split_ids(train, datalist.parent)
    assert all(c.startswith("images/p") and c.endswith(".nii.gz") for c in ids["cases"]), ids["cases"]
    assert ids["cases"] == sorted(ids["cases"]) and len(ids["cases"]) == len(train)
    assert ids["patients"] == sorted({e["case_id"] for e in train})
    # the documented recipe (docs/finetuning.md; the module's docstring)
    assert ids["digest"] == hashlib.sha256("\n".join(ids["cases"]).encode()).hexdigest()[:16]
    assert ids["digest"] == split_digest(list(reversed(ids["cases"])))  # the order of the entries does not matter


def test_the_digest_tells_apart_splits_of_the_same_size(tmp_path):
    """The gap the sizes left: two training splits of one size but other cases (another subset rule) differ."""
    datalist = _datalist(tmp_path / "data", patients=10)
    one = load_split(datalist, "train", label_fraction=0.5, seed=0, holdout=0.0)  # no holdout: same counts per class
    other = load_split(datalist, "train", label_fraction=0.5, seed=1, holdout=0.0)
    assert len(one) == len(other)
    assert {e["image"] for e in one} != {e["image"] for e in other}
    assert split_ids(one, datalist.parent)["digest"] != split_ids(other, datalist.parent)["digest"]


def test_the_ids_do_not_change_when_the_data_folder_moves(tmp_path):
    """A results.csv is compared across machines and folders: the ids are relative to the datalist."""
    a = load_split(_datalist(tmp_path / "here"), "test")
    b = load_split(_datalist(tmp_path / "elsewhere" / "copy"), "test")
    assert split_ids(a, tmp_path / "here") == split_ids(b, tmp_path / "elsewhere" / "copy")
    assert split_ids(a, tmp_path / "here")["cases"] == ["test.nii.gz", "test.nii.gz"]  # an entry listed twice counts


def test_an_image_outside_the_datalists_folder_keeps_its_absolute_path_and_lists_are_joined(tmp_path):
    root = tmp_path / "data"
    assert case_id({"image": str(tmp_path / "other" / "a.nii.gz")}, root) == (tmp_path / "other" / "a.nii.gz").as_posix()
    assert case_id({"image": [str(root / "t1.nii.gz"), str(root / "t2.nii.gz")]}, root) == "t1.nii.gz+t2.nii.gz"
    assert case_id({"image": str(root / "a.nii.gz")}, None) == (root / "a.nii.gz").as_posix()
    assert case_id({"case_id": "c7"}, root) == "c7"


def test_write_splits_records_each_split_and_returns_their_digests(tmp_path):
    datalist = _datalist(tmp_path / "data")
    entries = {"train": load_split(datalist, "train"), "holdout": load_split(datalist, "holdout"),
               "test": load_split(datalist, "test"), "none": []}
    out = tmp_path / "run"
    out.mkdir()
    digests = write_splits(out, datalist, entries)
    record = json.loads((out / "splits.json").read_text())
    assert set(digests) == {"train", "holdout", "test"}  # an empty split is left out
    assert record["datalist"] == str(datalist.resolve())
    for name in digests:
        assert record[name]["digest"] == digests[name] == split_digest(record[name]["cases"])
    assert not set(record["train"]["patients"]) & set(record["holdout"]["patients"])  # held out by patient
