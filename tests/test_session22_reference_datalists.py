"""Reference checks of load_split's parse memo (dira3d.evaluation.datalists, session 22 mutation audit): entries with
nested values are the caller's own, the validation split's too; a file rewritten while it was parsed is not kept
under the content it had before; the last datalist parsed is the one kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import dira3d.evaluation.datalists as datalists
from dira3d.evaluation import load_split


def _entry(prefix: str, i: int) -> dict:
    return {"image": f"{prefix}{i}.nii.gz", "case_id": f"{prefix}{i}", "label": [float(i % 2), 1.0 - i % 2],
            "meta": {"site": "a", "ids": [i, i + 1]}, "boxes": [[1.0, 2.0], [3.0]]}


def _write(folder: Path, name: str = "dl.json", tag: str = "") -> Path:
    content = {"training": [_entry("tr", i) for i in range(8)], "test": [_entry("te", i) for i in range(4)],
               "validation": [_entry("va", i) for i in range(4)], "tag": tag}
    for key in ("training", "test", "validation"):
        for entry in content[key]:
            (folder / entry["image"]).write_bytes(b"")
    path = folder / name
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("split", ["test", "validation"])
def test_nested_values_of_the_returned_entries_are_the_callers_own(tmp_path, datalist_parses, split):
    path = _write(tmp_path)
    first = load_split(path, split)
    expected = copy.deepcopy(first)
    assert first[0]["meta"] == {"site": "a", "ids": [0, 1]} and first[0]["boxes"] == [[1.0, 2.0], [3.0]]
    for entry in first:  # a caller's own changes, at every depth
        entry["label"].append(9.0)
        entry["meta"]["site"] = "changed"
        entry["meta"]["ids"].append(99)
        entry["boxes"][0].append(9.0)
    assert load_split(path, split) == expected
    assert len(datalist_parses) == 1  # from the memo, unchanged


def test_a_datalist_rewritten_while_it_is_parsed_is_not_kept_under_its_earlier_content(tmp_path, monkeypatch):
    path = _write(tmp_path)
    earlier = path.read_bytes()
    original = datalists.read_datalist_json
    content = json.loads(earlier)
    content["test"][0]["label"] = [5.0, 5.0]
    later = json.dumps(content).encode()
    rewrites = []

    def rewritten_during_the_parse(where, *args, **kwargs):
        if not rewrites:  # the first parse reads the rewritten file (its bytes were hashed before)
            rewrites.append(1)
            path.write_bytes(later)
        return original(where, *args, **kwargs)

    monkeypatch.setattr(datalists, "read_datalist_json", rewritten_during_the_parse)
    assert load_split(path, "test")[0]["label"] == [5.0, 5.0]  # what was parsed
    path.write_bytes(earlier)  # the earlier content again: parsed as it is, not the rewrite's entries
    assert load_split(path, "test")[0]["label"] == [0.0, 1.0]


def test_the_last_datalist_parsed_is_the_one_kept(tmp_path, datalist_parses):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _write(tmp_path / "a", tag="a"), _write(tmp_path / "b", tag="b")
    load_split(first, "test")
    load_split(second, "test")
    load_split(first, "test")  # parsed again: only the last one parsed (second) was kept
    load_split(first, "test")  # kept now
    assert datalist_parses == [str(first.resolve()), str(second.resolve()), str(first.resolve())]
