"""Side files a command reads besides the scans and the main datalists (settings records, manifests,
box lists, bundle configs, dataset CSVs): each is fed empty, cut short, of the wrong JSON type,
with wrong value types and with bytes that are not UTF-8. The user must get a ``ValueError`` whose
message names the file and says what to do, never a bare ``JSONDecodeError``, ``UnicodeDecodeError``,
``KeyError``, ``TypeError`` or ``AttributeError``, and the file itself must be left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dira3d.utils.files import FileContentError, read_json, read_text, read_yaml

# the same four breakages for every JSON side file; per-site value errors are added below
BROKEN_JSON = {
    "empty": (b"", "is empty"),
    "cut short": (b'{"training": [{"image": "a.npy", "lab', "cut short"),
    "array": (b"[1, 2]", "holds a JSON array, not an object"),
    "number": (b"3", "holds a JSON number, not an object"),
    "latin-1": ('{"name": "Müller"}'.encode("latin-1"), "is not UTF-8 text"),
}


def _call(func, path: Path, *texts: str) -> str:
    """``func()`` must raise a ValueError (not one of the bare parser errors) naming ``path`` and ``texts``;
    ``path`` is left as it was."""
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ValueError) as info:
        func()
    assert not isinstance(info.value, (json.JSONDecodeError, UnicodeDecodeError)), repr(info.value)
    message = str(info.value)
    assert str(path) in message, message
    for text in texts:
        assert text in message, f"{text!r} not in {message!r}"
    if before is not None:
        assert path.read_bytes() == before
    return message


# ---- the shared reader ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", BROKEN_JSON)
def test_read_json_names_the_file_the_problem_and_the_fix(tmp_path, variant):
    data, problem = BROKEN_JSON[variant]
    path = tmp_path / "x.json"
    path.write_bytes(data)
    message = _call(lambda: read_json(path, "test record", "do this"), path, problem, "test record", "; do this")
    assert isinstance(pytest.raises(FileContentError, read_json, path, "r", "f").value.path, Path)
    if variant == "cut short":
        assert "line 1 column" in message
    if variant == "latin-1":
        assert "byte 0xfc at line 1" in message


def test_read_json_line_and_column_of_an_edit_and_type_checks(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n  "b": 2,\n}\n')
    message = _call(lambda: read_json(path, "r", "f"), path, "line 4 column 1")
    assert "cut short" not in message  # a stray comma is an edit, not a truncation
    path.write_text("[1]")
    assert read_json(path, "r", "f", expect=list) == [1] and read_json(path, "r", "f", expect=None) == [1]
    _call(lambda: read_json(path, "r", "f", expect=(dict, str)), path, "not an object or a string")


@pytest.mark.parametrize("data, problem", [(b"", "is empty"), (b"a: [1\nb: 2\n", "is not valid YAML"),
                                           (b"- 1\n- 2\n", "holds a YAML list, not a mapping"),
                                           (b"\xff\xfea: 1\n", "is not UTF-8 text")])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_read_yaml(tmp_path, data, problem, suffix):
    """A .json file (experiment configs may be JSON) is named as JSON, not YAML, in the refusal."""
    path = tmp_path / f"x{suffix}"
    if suffix == ".json":
        problem = problem.replace("YAML", "JSON")
    path.write_bytes(data)
    _call(lambda: read_yaml(path, "config", "fix it"), path, problem)


@pytest.mark.parametrize("text, key, lines", [
    ("seeds: [0, 1, 2]\nbundle: b\nseeds: [0]\n", "seeds", (1, 3)),  # two seeds: lines ran one seed, silently
    ("methods:\n  random: null\n  dira: {}\n  random: {pretrain: x}\n", "random", (2, 4)),
    ("runs:\n- a: 1\n  b: 2\n- a: 1\n  a: 2\n", "a", (4, 5)),  # inside a list, and not across its items
    ("x: {1: a, 1.0: b}\n", "1.0", (1, 1)),  # the same dict key written two ways
    ("base: &b {a: 1}\nx:\n  <<: *b\n  a: 2\n  a: 3\n", "a", (4, 5)),
])
def test_read_yaml_refuses_a_key_written_twice_naming_it_and_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    assert isinstance(yaml.safe_load(text), dict)  # PyYAML alone keeps the last value without a word
    _call(lambda: read_yaml(path, "config", "fix it"), path,
          f"config {path} has the key {key!r} twice, at lines {lines[0]} and {lines[1]} (YAML keeps only the last value): "
          "remove one of them; fix it")
    assert read_yaml(path, "config", "fix it", unique_keys=False) == yaml.safe_load(text)


def test_read_yaml_loads_valid_yaml_as_safe_load_does(tmp_path):
    # merge keys: a merged-in key written again is an override, also when the merged mapping is spliced into
    # another one before it is built itself (a check in construct_mapping alone calls that a duplicate)
    text = """base: &b {a: 1, c: 3}
defs:
  inner: &m
    <<: *b
    a: 2
x:
  <<: [*m, {d: 4}]
  c: 9
= : eq
s: !!set {p, q}
when: 2001-01-01
2001-01-01: day
bytes: !!binary aGVsbG8=
list: [{a: 1}, {a: 2}, [1, 1]]
"""
    path = tmp_path / "x.yaml"
    path.write_text(text)
    assert read_yaml(path, "config", "fix it") == yaml.safe_load(text)
    assert read_yaml(path, "config", "fix it")["x"] == {"a": 2, "c": 9, "d": 4}


def test_read_json_refuses_a_key_twice_unless_told(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"test": [{"image": "a.png", "box": [1, 2, 3, 4], "label_index": 0, "label_index": 5}]}')
    _call(lambda: read_json(path, "box datalist", "fix it"), path,
          f"box datalist {path} has an object with the key 'label_index' twice (keys ['image', 'box', 'label_index', "
          "'label_index']; JSON keeps only the last value): remove one of them; fix it")
    assert read_json(path, "r", "f", unique_keys=False)["test"][0]["label_index"] == 5
    path.write_text('[{"a": 1}, {"a": 2}]')  # the same key in two objects is no duplicate
    assert read_json(path, "r", "f", expect=list) == [{"a": 1}, {"a": 2}]


def test_bundle_configs_keep_the_last_of_a_repeated_id_as_monai_does(tmp_path):
    """MONAI reads the bundle configs itself (and warns about a repeated id); the syntax check before it adds no
    rule of its own."""
    from dira3d.utils.overrides import check_overrides

    config = tmp_path / "train.json"
    config.write_text('{"max_epochs": 1, "max_epochs": 2}')
    yaml_config = tmp_path / "extra.yaml"
    yaml_config.write_text("lr: 1\nlr: 2\n")
    with pytest.warns(UserWarning, match="Duplicate key"):
        check_overrides([config, yaml_config], {"max_epochs": 3, "lr": 3})


def test_read_text_points_at_the_line_of_the_bad_byte(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"a,b\n1,2\n3,\xe94\n")
    _call(lambda: read_text(path, "CSV", "fix"), path, "byte 0xe9 at line 3, byte offset 10")
    path.write_bytes("\ufeffa,b\n".encode("utf-8"))
    assert read_text(path, "CSV", "fix", encoding="utf-8-sig") == "a,b\n"


# ---- dira3d experiment ---------------------------------------------------------------------------

def _experiment_dir(tmp_path: Path) -> tuple[Path, dict]:
    (tmp_path / "dl.json").write_text('{"training": [], "test": []}')
    config = {"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
              "seeds": [0], "label_fractions": [1.0], "methods": {"random": None}}
    return tmp_path / "experiment.yaml", config


@pytest.mark.parametrize("variant", BROKEN_JSON)
def test_experiment_config_file(tmp_path, variant):
    from dira3d.evaluation.experiment import load_config

    path, _ = _experiment_dir(tmp_path)
    data, problem = BROKEN_JSON[variant]
    path.write_bytes(data)
    problem = problem.replace("JSON array, not an object", "YAML list, not a mapping").replace(
        "JSON number, not an object", "YAML number, not a mapping").replace("cut short", "not valid YAML")
    _call(lambda: load_config(path), path, problem, "experiment --help")


def test_experiment_config_with_a_setting_twice(tmp_path, capsys):
    """Two `seeds:` lines kept the last one without a word (a 3-seed experiment ran one seed)."""
    from dira3d.evaluation.experiment import load_config, main

    path, _ = _experiment_dir(tmp_path)
    path.write_text("bundle: luna16_nodule_fpr\ndatalist: dl.json\nmetric: auc\noutput_dir: out\nseeds: [0, 1, 2]\n"
                    "label_fractions: [1.0]\nmethods:\n  random: null\nseeds: [0]\n")
    first, second = 5, 9
    assert yaml.safe_load(path.read_text())["seeds"] == [0]
    _call(lambda: load_config(path), path, f"has the key 'seeds' twice, at lines {first} and {second}", "experiment --help")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(path)])
    assert info.value.code == 2 and f"has the key 'seeds' twice, at lines {first} and {second}" in capsys.readouterr().err


@pytest.mark.parametrize("setting, value, text", [
    ("datalist", 5, "datalist in"), ("output_dir", None, "output_dir in"), ("bundle", ["a"], "bundle in"),
    ("baseline", [1], "baseline in"), ("overrides", [1], "overrides in"), ("methods", {"random": 5}, "method 'random'"),
    ("welch", "yes", "welch in"), ("pretrain", "visual_words", "pretrain in"),
    ("methods", {"random": None, "d": {"pretrain": 3}}, "pretrain of method 'd'"),
])
def test_experiment_config_values_of_the_wrong_kind_name_the_setting(tmp_path, setting, value, text):
    from dira3d.evaluation.experiment import load_config

    path, config = _experiment_dir(tmp_path)
    config[setting] = value
    path.write_text(yaml.safe_dump(config))
    _call(lambda: load_config(path), path, text)


def _ran_once(tmp_path: Path) -> dict:
    from dira3d.evaluation.experiment import load_config, run_experiment

    path, config = _experiment_dir(tmp_path)
    path.write_text(yaml.safe_dump(config))
    config = load_config(path)
    run_experiment(config, runner=lambda bundle, overrides: {"auc": 0.5}, log=lambda _: None)
    return config


@pytest.mark.parametrize("variant", [*BROKEN_JSON, "overrides text"])
def test_experiment_settings_record(tmp_path, variant):
    from dira3d.evaluation.experiment import run_experiment

    config = _ran_once(tmp_path)
    path = tmp_path / "out" / "experiment.json"
    data, problem = BROKEN_JSON.get(variant, (b'{"bundle": "b", "overrides": "x"}', "overrides 'x', not a mapping"))
    path.write_bytes(data)
    _call(lambda: run_experiment(config, runner=lambda b, o: {"auc": 0.5}, log=lambda _: None), path, problem,
          "delete it")


@pytest.mark.parametrize("variant", BROKEN_JSON)
def test_experiment_checkpoints_record(tmp_path, variant):
    from dira3d.evaluation.experiment import load_config, run_experiment

    path, config = _experiment_dir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"weights")
    config["methods"]["mine"] = "ckpt.pt"
    path.write_text(yaml.safe_dump(config))
    config = load_config(path)
    run_experiment(config, runner=lambda bundle, overrides: {"auc": 0.5}, log=lambda _: None)
    record = tmp_path / "out" / "checkpoints.json"
    assert json.loads(record.read_text())["mine"]["path"] == str(tmp_path / "ckpt.pt")
    data, problem = BROKEN_JSON[variant]
    record.write_bytes(data)
    _call(lambda: run_experiment(config, runner=lambda b, o: {"auc": 0.5}, log=lambda _: None), record, problem,
          "delete it")


@pytest.mark.parametrize("data, problem", [(b"method,label_fraction,seed,metric,value\nrandom,1.0,0,auc,0.5\n",
                                            "has no checkpoint column"),
                                           (b"\xff\xfemethod,checkpoint\n", "is not UTF-8 text")])
def test_experiment_results_csv(tmp_path, data, problem):
    from dira3d.evaluation.experiment import run_experiment

    config = _ran_once(tmp_path)
    path = tmp_path / "out" / "results.csv"
    path.write_bytes(data)
    _call(lambda: run_experiment(config, runner=lambda b, o: {"auc": 0.5}, log=lambda _: None), path, problem)


@pytest.mark.parametrize("name", ["settings.json", "done.json"])
@pytest.mark.parametrize("variant", [*BROKEN_JSON, "overrides number"])
def test_experiment_pretraining_records(tmp_path, name, variant):
    from dira3d.evaluation.experiment_pretrain import check_pretrain_settings

    out = tmp_path / "pretrain" / "dira"
    (out / "models").mkdir(parents=True)
    (out / "models" / "best.pt").write_bytes(b"")
    (out / "done.json").write_text('{"method": "dira", "overrides": {}}')
    data, problem = BROKEN_JSON.get(variant, (b'{"configs": [], "dataset_dir": "d", "overrides": 3}',
                                              "overrides 3, not a mapping"))
    (out / name).write_bytes(data)
    settings = {"configs": ["train.json"], "dataset_dir": "d", "overrides": {}}
    _call(lambda: check_pretrain_settings("dira", out, settings), out / name, problem,
          f"delete the folder {out}")


def test_experiment_command_prints_one_error_line(tmp_path, capsys):
    from dira3d.evaluation.experiment import main

    _ran_once(tmp_path)
    record = tmp_path / "out" / "experiment.json"
    record.write_text('{"bundle": "luna16_nodule_fpr", "datal')
    assert main(["--config", str(tmp_path / "experiment.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dira3d experiment: error: experiment settings") and str(record) in err[0]
    (tmp_path / "experiment.yaml").write_bytes(b"seeds: [0\nbundle: x\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", str(tmp_path / "experiment.yaml")])
    assert info.value.code == 2
    assert "experiment.yaml is not valid YAML" in capsys.readouterr().err


# ---- dira3d localise: the box datalist ------------------------------------------------------------

@pytest.mark.parametrize("variant", [*BROKEN_JSON, "entry text", "box null", "box text", "image number"])
def test_box_datalist(tmp_path, variant):
    from dira3d.evaluation.localise import load_box_entries

    (tmp_path / "a.png").write_bytes(b"png")
    entry = {"image": "a.png", "label_index": 0, "box": [1, 2, 3, 4]}
    values = {"entry text": ["a.png"], "box null": [{**entry, "box": None}], "box text": [{**entry, "box": "abcd"}],
              "image number": [{**entry, "image": 5}]}
    path = tmp_path / "bbox_datalist.json"
    if variant in BROKEN_JSON:
        data, problem = BROKEN_JSON[variant]
    else:
        data, problem = json.dumps({"test": values[variant]}).encode(), "entry 0 of split 'test'"
    path.write_bytes(data)
    _call(lambda: load_box_entries(path, "test"), path, problem, "dira3d prepare chestxray14")
    path.write_text(json.dumps({"test": [entry]}))
    assert load_box_entries(path, "test")[0]["box"] == [1, 2, 3, 4]


# ---- visual words: datalist, manifest, shards -----------------------------------------------------

def _manifest(**change) -> dict:
    from dira3d.visual_words.writer import new_manifest

    manifest = new_manifest(0, {}, "d.json", {}, {})
    manifest.update(status="complete", classes=[{"index": 0, "status": "done", "shards": {"training": "a.npy"}}])
    return {**manifest, **change}


@pytest.mark.parametrize("variant", [*BROKEN_JSON, "entry text", "label null", "training object"])
def test_visual_word_datalist(tmp_path, variant):
    from dira3d.visual_words import load_visual_word_classes

    np.save(tmp_path / "a.npy", np.zeros((2, 1, 4, 4, 4), np.float16))
    values = {"entry text": ["a.npy"], "label null": [{"image": "a.npy", "label": None}], "training object": {"a": 1}}
    path = tmp_path / "visual_words.json"
    data, problem = BROKEN_JSON.get(variant, (json.dumps({"training": values.get(variant)}).encode(), "'training'"))
    path.write_bytes(data)
    _call(lambda: load_visual_word_classes(path), path, problem, "rerun the same `dira3d visual-words`")
    path.write_text(json.dumps({"training": [{"image": "a.npy", "label": 0}]}))
    assert load_visual_word_classes(tmp_path) == [(tmp_path / "a.npy", 0)]


@pytest.mark.parametrize("variant", [*BROKEN_JSON, "classes number", "class text", "params null"])
def test_visual_word_manifest(tmp_path, variant):
    from dira3d.visual_words import load_visual_word_classes, read_manifest

    np.save(tmp_path / "a.npy", np.zeros((2, 1, 4, 4, 4), np.float16))
    values = {"classes number": {"classes": 3}, "class text": {"classes": ["a.npy"]}, "params null": {"params": None}}
    path = tmp_path / "manifest.json"
    data, problem = BROKEN_JSON.get(variant, (json.dumps(_manifest(**values.get(variant, {}))).encode(), "malformed"))
    path.write_bytes(data)
    for read in (lambda: read_manifest(tmp_path), lambda: load_visual_word_classes(path)):
        _call(read, path, problem, "move it away")
    path.write_text(json.dumps(_manifest()))
    assert load_visual_word_classes(path) == [(tmp_path / "a.npy", 0)]


@pytest.mark.parametrize("damage", ["cut short", "empty", "not npy"])
def test_visual_word_shard(tmp_path, damage):
    from dira3d.visual_words import VisualWordPairDataset

    shard = tmp_path / "a.npy"
    np.save(shard, np.zeros((4, 1, 4, 4, 4), np.float16))
    shard.write_bytes({"cut short": shard.read_bytes()[:200], "empty": b"", "not npy": b"garbage!" * 20}[damage])
    (tmp_path / "visual_words.json").write_text(json.dumps({"training": [{"image": "a.npy", "label": 0}]}))
    _call(lambda: VisualWordPairDataset(tmp_path), shard, "visual-word shard", "--overwrite")


def test_interrupted_message_survives_a_garbled_manifest(tmp_path):
    from dira3d.visual_words.command import interrupted_message

    (tmp_path / "manifest.json").write_text('{"format": "dira3d-visual-words", "version": 1, "classes": 7}')
    assert "interrupted" in interrupted_message(tmp_path)


# ---- data preparation: split.json, dataset CSVs, case manifests -----------------------------------

@pytest.mark.parametrize("data", [b"", b'{"rule": {"a"', b"[1]", b"\xff\xfe{}", b'{"rule": {"a": 1}, "training": [[1], "p1"]}'])
def test_a_broken_split_record_is_split_afresh(tmp_path, data):
    from dira3d.data.splits import earlier_split

    path = tmp_path / "split.json"
    path.write_bytes(data)
    result = earlier_split(path, {"a": 1})
    assert result in (None, {"training": ["p1"]})  # a kept id is a usable id: no list of a list


@pytest.mark.parametrize("reader, name, header", [
    ("cxr", "Data_Entry_2017.csv", b"Image Index,Finding Labels\n"),
    ("chestxray14_list", "test_list.txt", b""),
    ("luna16", "candidates.csv", b"seriesuid,coordX,coordY,coordZ,class\n"),
    ("pecad", "candidates.csv", b"patient_id,x,y,z,coords,label\n"),
])
def test_dataset_csv_not_utf8(tmp_path, reader, name, header):
    from dira3d.data import chestxray14, cxr, luna16, pecad

    read = {"cxr": lambda p: cxr.read_csv_rows(p, ["Image Index", "Finding Labels"]),
            "chestxray14_list": chestxray14.read_image_list,
            "luna16": lambda p: luna16.read_candidates(p, problems={}), "pecad": pecad.read_candidates}[reader]
    path = tmp_path / name
    path.write_bytes(header + "Müller.png,1,2,3,0\n".encode("cp1252"))
    message = _call(lambda: read(path), path, "is not UTF-8 text", "line 2" if header else "line 1")
    assert "0xfc" in message


def test_dataset_csv_row_cut_short_is_refused_not_read_as_blank_cells(tmp_path):
    from dira3d.data import chestxray14, cxr

    path = tmp_path / "BBox_List_2017.csv"
    # the real file's header ends in three empty columns its rows do not have; those are fine
    path.write_bytes(b"Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,1,2,3,4\nb.png,Mass,1,2")
    _call(lambda: chestxray14.read_boxes(path), path, "line 3 has 4 of the 9 columns, so no 'w'", "re-download it")
    path.write_bytes(b"\xef\xbb\xbfImage Index,Finding Labels\na.png,No Finding\n")  # a byte-order mark is no problem
    assert cxr.read_csv_rows(path, ["Image Index", "Finding Labels"]) == [{"Image Index": "a.png", "Finding Labels": "No Finding"}]


def test_a_garbled_case_manifest_is_named_and_its_case_redone(tmp_path):
    # it used to stop the rerun at the datalist (tests/test_prepare_rerun_damaged.py has the variants)
    from test_data_pecad import write_volume

    from dira3d.data import pecad

    src, dst = tmp_path / "PE-CAD", tmp_path / "out"
    write_volume(src / "volumes" / "PE01.nii.gz", (10, 12, 7), (0.8, 0.6, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\nPE01,10,12,7,voxel,1\n")
    assert [r.status for r in pecad.prepare(src, dst, cube_size=(8, 8, 8), progress=False)] == ["written"]
    manifests = [p for p in dst.rglob("*.json") if p.name not in ("pecad_datalist.json", "report.json", "split.json", "prepared.json")]
    assert len(manifests) == 1
    manifests[0].write_text('{"candidates": [{"image": "x"')
    [result] = pecad.prepare(src, dst, cube_size=(8, 8, 8), progress=False)
    assert result.status == "written"
    assert f"case manifest {manifests[0]} is not valid JSON" in result.warnings[0] and "cut short" in result.warnings[0]


# ---- bundle configs and the MONAI Label app ---------------------------------------------------------

@pytest.mark.parametrize("variant", BROKEN_JSON)
def test_bundle_config_given_with_config(tmp_path, variant, capsys):
    from dira3d.engines.command import main

    data, problem = BROKEN_JSON[variant]
    (tmp_path / "dl.json").write_text('{"training": []}')
    path = tmp_path / "mine.json"
    path.write_bytes(data)
    with pytest.raises(SystemExit) as info:
        main(["--datalist", str(tmp_path / "dl.json"), "--output", str(tmp_path / "run"), "--config", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"bundle config {path} " in err and problem in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bundle_config_in_yaml(tmp_path):
    from dira3d.utils.overrides import check_overrides

    path = tmp_path / "mine.yaml"
    path.write_text("max_epochs: [1\n")
    _call(lambda: check_overrides([path], {}), path, "is not valid YAML", "line 2")


@pytest.mark.parametrize("variant", [*BROKEN_JSON, "outputs text", "format number", "output list"])
def test_monailabel_bundle_metadata(tmp_path, variant):
    from dira3d.deploy.monailabel import bundle_kind

    values = {"outputs text": {"network_data_format": {"outputs": "pred"}}, "format number": {"network_data_format": 3},
              "output list": {"network_data_format": {"outputs": {"pred": ["image"]}}}}
    path = tmp_path / "configs" / "metadata.json"
    path.parent.mkdir()
    data, problem = BROKEN_JSON.get(variant, (json.dumps(values.get(variant)).encode(), "network_data_format.outputs"))
    path.write_bytes(data)
    _call(lambda: bundle_kind(tmp_path), path, problem)
    path.write_text(json.dumps({"network_data_format": {"outputs": {"pred": {"type": "image"}}}}))
    assert bundle_kind(tmp_path) == "segmentation"
