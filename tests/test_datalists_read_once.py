"""``load_split`` parses a datalist once per content: a fine-tune loads its splits one by one (train, holdout, test),
and each call parsed the whole file again (2.3 s for CheXpert's 223k entries).

Pinned: a second call does not parse the file again; a rewritten file (even of the same size, within the file
system's timestamp step) is read again; a caller changing the entries it got does not change the next call's; the
memo keeps a few files, not every one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dira3d.evaluation import load_split


def _entries(prefix: str, patients: int) -> list[dict]:
    return [{"image": f"{prefix}{i}.nii.gz", "case_id": f"{prefix}{i // 2}", "label": [float(i % 2), 1.0 - i % 2]}
            for i in range(2 * patients)]


def _write(folder: Path, name: str = "dl.json", patients: int = 10) -> Path:
    content = {"training": _entries("tr", patients), "test": _entries("te", 3)}
    for entry in content["training"] + content["test"]:
        (folder / entry["image"]).write_bytes(b"")
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def test_the_splits_of_one_datalist_parse_it_once(tmp_path, datalist_parses):
    path = _write(tmp_path)
    train = load_split(path, "train", seed=1)
    held = load_split(path, "holdout", seed=1)
    test = load_split(path, "test", seed=1)
    assert datalist_parses == [str(path.resolve())]
    assert len(train) + len(held) == 20 and len(test) == 6
    assert load_split(path, "train", seed=1) == train and len(datalist_parses) == 1  # the same entries from the memo


def test_a_rewritten_datalist_is_read_again(tmp_path, datalist_parses):
    path = _write(tmp_path)
    first = load_split(path, "test")
    content = json.loads(path.read_text())
    content["test"][0]["label"] = [1.0, 0.0] if content["test"][0]["label"] == [0.0, 1.0] else [0.0, 1.0]
    before = path.stat()
    path.write_text(json.dumps(content))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # rewritten within one step of the file times
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = load_split(path, "test")
    assert len(datalist_parses) == 2
    assert second[0]["label"] == content["test"][0]["label"] != first[0]["label"]


def test_changing_the_returned_entries_does_not_change_the_next_call(tmp_path, datalist_parses):
    path = _write(tmp_path)
    test = load_split(path, "test")
    expected = [dict(e, label=list(e["label"])) for e in test]
    for entry in test:
        entry["label"].append(9.0)  # a caller's own change of a label vector
        entry["image"] = "changed"
    assert load_split(path, "test") == expected and len(datalist_parses) == 1


def test_a_few_datalists_are_kept_not_every_one(tmp_path, datalist_parses):
    paths = []
    for i in range(6):
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        paths.append(_write(folder))
        load_split(paths[-1], "test")
    load_split(paths[-1], "test")  # the latest: kept
    assert len(datalist_parses) == 6
    load_split(paths[0], "test")  # the first: parsed again
    assert len(datalist_parses) == 7


def test_a_missing_or_broken_datalist_is_still_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(tmp_path / "none.json", "train")
    path = _write(tmp_path)
    load_split(path, "test")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_split(path, "test")
