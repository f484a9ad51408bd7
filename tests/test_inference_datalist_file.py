"""``--datalist path/to/file.json`` at inference (found 2026-11-27, interruption walkthrough follow-up).

Users write ``python -m monai.bundle run --config_file .../inference.json --datalist my_scans.json``; the docs used
``--datalist "$(cat my_scans.json)"``. A path failed with MONAI's traceback ``dictionary update sequence element #0
has length 1; 2 is required``: ``InferenceBatch`` took the string as the list of entries (its characters). A path now
names a JSON file holding a list of inputs, or a decathlon-style datalist whose ``"test"`` list holds them
(``dira3d.evaluation.batch.batch_entries``); anything else is refused in one line naming the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dira3d.data.datalist import DatalistError
from dira3d.evaluation.batch import batch_entries
from dira3d.evaluation.finetune import bundle_path
from test_inference_batch import _report, _run, _scans

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py


def test_a_list_is_taken_as_it_is(tmp_path):
    entries = [{"image": "a.nii.gz"}, {"image": ["t1.nii.gz", "t2.nii.gz"]}]
    assert batch_entries(entries) == entries  # relative paths as given (the current folder), as before


@pytest.mark.parametrize("content", [
    [{"image": "scans/a.nii.gz"}, {"image": "/abs/b.nii.gz"}],
    ["scans/a.nii.gz", "/abs/b.nii.gz"],
    {"training": [{"image": "x.nii.gz", "label": "y.nii.gz"}], "test": [{"image": "scans/a.nii.gz"},
                                                                          {"image": "/abs/b.nii.gz"}]}])
def test_a_file_gives_its_entries_with_paths_resolved_against_its_folder(tmp_path, content):
    path = tmp_path / "lists" / "my_scans.json"
    path.parent.mkdir()
    path.write_text(json.dumps(content))
    expected = [os.path.normpath(tmp_path / "lists" / "scans" / "a.nii.gz"), "/abs/b.nii.gz"]
    assert [entry["image"] for entry in batch_entries(str(path))] == expected
    assert [entry["image"] for entry in batch_entries(path)] == expected


@pytest.mark.parametrize(("content", "held"), [
    ({"training": [{"image": "a.nii.gz"}]}, "an object with keys ['training']"),
    (7, "a JSON int")])
def test_a_file_of_another_form_is_refused_naming_it_and_the_forms_taken(tmp_path, content, held):
    path = tmp_path / "my_scans.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DatalistError) as info:
        batch_entries(str(path))
    message = str(info.value)
    assert message.startswith(f"datalist {path} holds {held}; ")
    assert '[{"image": path}, ...]' in message and '"test" key' in message


def test_a_file_without_images_or_not_json_is_refused_naming_it(tmp_path):
    path = tmp_path / "my_scans.json"
    path.write_text(json.dumps([{"label": "a.nii.gz"}]))
    with pytest.raises(DatalistError, match=rf"^datalist {path} is a list of 1 entry, a bad one: entry 0 has no 'image'"):
        batch_entries(str(path))
    path.write_text(json.dumps({"test": [{"label": "a.nii.gz"}]}))  # a datalist: its "test" key named
    with pytest.raises(DatalistError, match=rf"^datalist {path} has 1 bad 'test' entry: entry 0 has no 'image'"):
        batch_entries(str(path))
    path.write_text("[{'image': 'a.nii.gz'}]")  # Python, not JSON
    with pytest.raises(DatalistError, match=rf"^datalist {path} is not valid JSON"):
        batch_entries(str(path))


def test_a_file_of_bare_paths_with_an_object_or_a_number_among_them_is_refused_naming_each(tmp_path):
    """The first entry decided the form: after a bare path, ``{"img": ...}`` and ``5`` were taken as images ("5: cannot be
    loaded (TypeError ...)", "{'img': 'b.nii.gz'}: img: does not exist")."""
    path = tmp_path / "my_scans.json"
    path.write_text(json.dumps(["a.nii.gz", 5, {"img": "b.nii.gz"}, {"image": "c.nii.gz"}, ["t1.nii.gz", "t2.nii.gz"]]))
    with pytest.raises(DatalistError) as raised:
        batch_entries(path)
    message = str(raised.value)
    # the file is a list, not a datalist with a "test" key: said in those words (it was "has 2 bad 'test' entries")
    assert message.startswith(f"datalist {path} is a list of 5 entries, 2 of them bad: "), message
    assert "'test'" not in message, message
    assert "entry 1 is an int, not an object" in message and "entry 2 has no 'image'" in message, message
    assert "entry 0" not in message and "entry 3" not in message and "entry 4" not in message, message


def test_a_listed_entry_without_an_image_or_not_an_object_is_refused_naming_it():
    """As a file's entries are: a list given on the command line with an entry without ``image`` (a typo, a
    decathlon entry's ``label``) stopped the batch with MONAI's tracebacks of a ``KeyError`` and no report."""
    from dira3d.data.errors import DataError

    with pytest.raises(DataError, match=r"^--datalist: entry 1 \(\{'label': 'a.nii.gz'\}\) has no 'image'; entry 2 "
                                        r"\('b.nii.gz'\) is not an object; --datalist takes a list of inputs"):
        batch_entries([{"image": "a.nii.gz"}, {"label": "a.nii.gz"}, "b.nii.gz"])
    with pytest.raises(DataError, match=r"entry 2 \(\{'image': None\}\) has no 'image' and 2 more; --datalist takes"):
        batch_entries([{"image": None}, {"img": "a"}, {"image": None}, {}, {}, {"image": "c.nii.gz"}])


@pytest.mark.parametrize("given", ["missing.json", ""])
def test_a_path_that_is_not_a_file_is_refused_naming_it(tmp_path, given):
    with pytest.raises(FileNotFoundError, match=rf"^datalist '{given}' is not a file; --datalist takes a list"):
        batch_entries(given)


def test_a_segmentation_batch_runs_from_a_datalist_file(tmp_path):
    """In-process, as the bundle's JSON wires it: the screened inputs and ``CheckPredictionFiles`` (which read
    ``@datalist`` before) both take the file's entries."""
    scans = _scans(tmp_path, ["a", "b"])
    listed = tmp_path / "my_scans.json"
    listed.write_text(json.dumps({"test": [{"image": p.name} for p in scans]}))  # relative to the file's folder
    out = tmp_path / "out"
    assert _run("lits_liver_seg", tmp_path, str(listed), out) == [0]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz", "inference_report.json"]
    report = _report(out)
    assert [row["image"] for row in report["inputs"]] == [str(p) for p in scans]
    assert [row["status"] for row in report["inputs"]] == ["written", "written"]


def test_a_bad_datalist_file_ends_the_bundle_command_in_one_line(tmp_path, repo_root):
    """``python -m monai.bundle run``: one ``error:`` line, exit 1, no traceback (it was MONAI's
    ``dictionary update sequence element #0`` traceback for any path)."""
    listed = tmp_path / "my_scans.json"
    listed.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    folder = bundle_path("lits_liver_seg")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / "configs" / "inference.json"),
           "--meta_file", str(folder / "configs" / "metadata.json"), "--bundle_root", str(folder),
           "--device", "$torch.device('cpu')", "--output_dir", str(tmp_path / "out"), "--datalist", str(listed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: datalist {listed} holds an object with keys ['training']; --datalist takes a list of inputs "
        '[{"image": path}, ...] (on the command line or in a JSON file) or a datalist JSON file whose "test" key '
        "lists them")


def test_a_listed_entry_without_an_image_ends_the_bundle_command_in_one_line(tmp_path, repo_root):
    """It ended ``python -m monai.bundle run`` with about 80 lines of tracebacks (``KeyError: 'Key `image` of
    transform `LoadVolumed` was missing'``, ``Failed to evaluate ConfigExpression``)."""
    folder = bundle_path("lits_liver_seg")
    given = json.dumps([{"image": "a.nii.gz"}, {"label": "a.nii.gz"}])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(folder / "configs" / "inference.json"),
           "--meta_file", str(folder / "configs" / "metadata.json"), "--bundle_root", str(folder),
           "--device", "$torch.device('cpu')", "--output_dir", str(tmp_path / "out"), "--datalist", given]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: --datalist: entry 1 ({'label': 'a.nii.gz'}) has no 'image'; --datalist takes a list of inputs"), \
        proc.stderr[-3000:]
    assert not any((tmp_path / "out").rglob("*"))  # refused before any input was read: no report, no prediction
