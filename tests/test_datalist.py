"""The one datalist reader (dira3d.data.datalist) and the three readers built on it."""

from __future__ import annotations

import json
import os

import pytest
from monai.data import load_decathlon_datalist

from dira3d.data.datalist import DatalistError, DatalistFilesMissingError, datalist_entries, read_datalist_json
from dira3d.data.errors import DataError
from dira3d.engines import load_datalist
from dira3d.evaluation import load_split
from dira3d.visual_words.loading import read_datalist


def write(path, content) -> object:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "images" / f"{name}.nii.gz").write_bytes(b"")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.nii.gz").write_bytes(b"")
    return tmp_path


def test_a_folder_given_as_datalist_names_the_datalists_in_it(tmp_path, capsys):
    """`--datalist prepared/luna16` (the --dst of `dira3d prepare`) used to be called a datalist that
    "does not exist"; the message now says it is a folder and names the datalists to pass."""
    from dira3d.engines.command import main as pretrain_main
    from dira3d.visual_words.command import main as visual_words_main

    dst = tmp_path / "prepared"
    dst.mkdir()
    with pytest.raises(FileNotFoundError, match=r"prepared is a folder, not a datalist file; pass the datalist JSON "
                                                 r"that `dira3d prepare` wrote"):
        read_datalist_json(dst)
    for name in ("pretrain_datalist.json", "ncc_datalist.json", "report.json"):
        write(dst / name, {"training": []})
    expected = f"{dst} is a folder, not a datalist file; pass the datalist in it: {dst / 'ncc_datalist.json'} or " \
               f"{dst / 'pretrain_datalist.json'}"
    with pytest.raises(FileNotFoundError) as err:
        read_datalist_json(dst)
    assert str(err.value) == f"datalist {expected}"
    assert visual_words_main(["--datalist", str(dst), "--out", str(tmp_path / "vw")]) == 1
    assert capsys.readouterr().err == f"dira3d visual-words: error: datalist {expected}\n"
    assert not (tmp_path / "vw").exists()
    with pytest.raises(SystemExit) as stop:
        pretrain_main(["--datalist", str(dst), "--output", str(tmp_path / "run")])
    assert stop.value.code == 2 and capsys.readouterr().err.endswith(f"error: datalist {expected}\n")


def test_file_json_and_key_checks_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"datalist .*absent\.json does not exist; make one with `dira3d prepare"):
        read_datalist_json(tmp_path / "absent.json")
    bad = write(tmp_path / "bad.json", '{"training": [\n  {"image": "a"}\n  {"image": "b"}\n]}')
    with pytest.raises(DatalistError, match=r"datalist .*bad\.json is not valid JSON \(Expecting ',' delimiter: line 3 column 3"):
        read_datalist_json(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"training": [{"image": "é"}]}'.encode("latin-1"))
    with pytest.raises(DatalistError, match="latin.json is not valid JSON"):
        read_datalist_json(latin)
    with pytest.raises(DatalistError, match=r"list\.json holds a JSON list, not an object"):
        read_datalist_json(write(tmp_path / "list.json", [{"image": "a"}]))
    path = write(tmp_path / "dl.json", {"validation": [], "meta": {}})
    with pytest.raises(DatalistError, match=r"dl\.json has no 'training' key \(keys: \['meta', 'validation'\]\)") as info:
        read_datalist_json(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError) and info.value.path == path
    assert read_datalist_json(path, required=()) == {"validation": [], "meta": {}}
    assert datalist_entries(path, "test", optional=True) == []
    with pytest.raises(DatalistError, match="has no 'test' key"):
        datalist_entries(path, "test")
    with pytest.raises(DatalistError, match=r"has no list 'meta' \(it holds a dict\)"):
        datalist_entries(path, "meta")


def test_entry_problems_are_all_listed(folder):
    entries = [{"image": "images/a.nii.gz", "case_id": "a"}, "images/b.nii.gz", {"case_id": "x"}, {"image": ""},
               {"image": "images/gone.nii.gz", "case_id": "g"}]
    path = write(folder / "dl.json", {"training": entries})
    with pytest.raises(DatalistError) as info:
        datalist_entries(path, check_files="file")
    message = str(info.value)
    assert not isinstance(info.value, FileNotFoundError)
    assert message.startswith(f"datalist {path} has 4 bad 'training' entries: entry 1 is a str, not an object; "
                              "entry 2 has no 'image'; entry 3 has no 'image'; entry 4 (case g): ")
    assert message.endswith("gone.nii.gz does not exist. Fix or remove them and rerun")
    path = write(folder / "gone.json", {"training": [entries[0], entries[4]]})
    with pytest.raises(DatalistFilesMissingError, match=r"1 bad 'training' entry: entry 1 \(case g\)") as info:
        datalist_entries(path, check_files="path")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    assert len(datalist_entries(path)) == 2  # files are not checked unless asked
    path = write(folder / "folder.json", {"training": [{"image": "images"}]})  # a folder (a DICOM series)
    assert datalist_entries(path, check_files="path")[0]["image"] == str(folder / "images")
    with pytest.raises(DatalistFilesMissingError, match="images does not exist"):
        datalist_entries(path, check_files="file")
    many = write(folder / "many.json", {"training": [{"case_id": str(i)} for i in range(12)]})
    with pytest.raises(DatalistError, match=r"entry 9 has no 'image'; \.\.\. 2 more\. Fix"):
        datalist_entries(many)
    with pytest.raises(ValueError, match="check_files='yes' is not supported"):
        datalist_entries(many, check_files="yes")


@pytest.mark.parametrize("segmentation", [True, False])
def test_paths_resolve_exactly_as_monai_does(folder, segmentation):
    entries = [
        {"image": "images/a.nii.gz", "label": "masks/a.nii.gz", "case_id": "images", "other": "masks/a.nii.gz",
         "absent": "masks/none.nii.gz", "fold": 1, "extra": ["images/a.nii.gz", "images/b.nii.gz"]},
        {"image": ["./images/b.nii.gz", "sub/../images/c.nii.gz"], "label": 1, "case_id": "b", "mixed": ["images", 2]},
        {"image": str(folder / "images" / "c.nii.gz"), "label": [0.0, 1.0], "case_id": "c"},
    ]
    path = write(folder / "dl.json", {"training": entries, "test": ["images/a.nii.gz", "images/b.nii.gz"]})
    path_keys = ("image", "label") if segmentation else ("image",)
    for key in ("training", "test"):
        expected = load_decathlon_datalist(str(path), is_segmentation=segmentation, data_list_key=key,
                                           base_dir=str(folder))
        assert datalist_entries(path, key, path_keys=path_keys) == expected
    other = folder / "elsewhere"
    (other / "images").mkdir(parents=True)
    assert datalist_entries(path, base_dir=other)[0]["image"] == os.path.join(other, "images", "a.nii.gz")
    # only the path keys: the other values stay as written
    plain = datalist_entries(path, path_keys=("image",), detect_paths=False)[0]
    assert plain["image"] == str(folder / "images" / "a.nii.gz")
    assert (plain["label"], plain["case_id"], plain["other"]) == ("masks/a.nii.gz", "images", "masks/a.nii.gz")


def test_the_three_readers_keep_their_own_rules(folder):
    entries = [{"image": "images/a.nii.gz", "case_id": "a", "label": 0, "fold": 0},
               {"image": "images/b.nii.gz", "case_id": "b", "label": 1, "fold": 1}]
    path = write(folder / "dl.json", {"training": entries, "validation": []})
    # pretraining: every image must exist, an empty split says how to make one, other keys untouched
    assert [e["image"] for e in load_datalist(path)] == [str(folder / "images" / n) for n in ("a.nii.gz", "b.nii.gz")]
    with pytest.raises(DataError, match=r"dl\.json has an empty 'validation' list; prepare a validation share"):
        load_datalist(path, "validation")
    # visual words: absent or empty splits other than training are empty; case ids from the file name
    assert read_datalist(path)["validation"] == []
    write(path, {"training": [{"image": "images/c.nii.gz"}]})
    assert read_datalist(path)["training"][0]["case_id"] == "c"
    write(path, {"training": [{"image": "images/gone.nii.gz"}]})
    with pytest.raises(FileNotFoundError, match="gone.nii.gz does not exist"):
        read_datalist(path)
    # fine-tuning: the files of the entries a run uses must exist (all missing ones named), entries need an image
    # (a test fold of one class is refused: its AUC is undefined; c makes fold 1 hold both)
    write(path, {"training": [*entries, {"image": "images/c.nii.gz", "case_id": "c", "label": 0, "fold": 1},
                              {"image": "images/gone.nii.gz", "case_id": "g", "label": 0, "fold": 0}]})
    with pytest.raises(FileNotFoundError, match=r"case g: .*gone\.nii\.gz does not exist"):
        load_split(path, "test", fold=0)
    assert len(load_split(path, "test", fold=1)) == 2  # another fold's missing file is not this run's
    write(path, {"training": [*entries, {"case_id": "g", "label": 0, "fold": 0}]})
    with pytest.raises(ValueError, match="entry 2 has no 'image'"):
        load_split(path, "test", fold=0)


@pytest.mark.parametrize("dataset, option", [("chestxray14", "`dira3d prepare chestxray14 ... --val-fraction`"),
                                             ("luna16", "`dira3d prepare luna16 ... --val-subsets`"),
                                             ("lits", "`dira3d prepare lits ... --val-range`")])
def test_an_empty_validation_list_names_its_datasets_own_prepare_option(folder, dataset, option):
    """The advice gave fixed examples (`dira3d prepare generic ... --val-fraction 0.1`; `dira3d prepare luna16 ...
    --val-subsets 8`) whatever the datalist's dataset: neither is an option of `dira3d prepare chestxray14` or lits."""
    path = write(folder / "dl.json", {"training": [{"image": "images/a.nii.gz"}], "validation": [],
                                      "meta": {"dataset": dataset}})
    with pytest.raises(DataError) as caught:
        load_datalist(path, "validation")
    assert f"has an empty 'validation' list; prepare a validation share ({option}) or add entries" in str(caught.value)
    assert "--val-fraction 0.1" not in str(caught.value) and "--val-subsets 8" not in str(caught.value)
