"""A rerun of ``dira3d prepare`` into a --dst whose earlier outputs were damaged (a case manifest cut short,
edited or emptied, a crop it lists deleted, a zero-byte volume or PNG) redoes the damaged case instead of
trusting it: a LIDC-IDRI / PE-CAD rerun used to skip the case ("outputs exist") and then stop the whole
batch at the datalist with the manifest's error, even with --keep-going; other datasets listed the empty
file in their datalist (docs/data.md, "Resumable")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dira3d.data import generic, lidc, montgomery, pecad
from dira3d.data.errors import DataError
from dira3d.data.runner import Case, read_case_outputs, run_cases

sys.path.insert(0, str(Path(__file__).parent))
from test_data_cxr_seg import _montgomery_layout  # noqa: E402
from test_data_lidc import make_patient as make_lidc_patient  # noqa: E402
from test_data_pecad import write_volume  # noqa: E402


def _lidc(tmp_path: Path) -> tuple[Path, Path, dict]:
    src, dst = tmp_path / "LIDC-IDRI", tmp_path / "out"
    make_lidc_patient(src, 1)
    make_lidc_patient(src, 2)
    options = {"crop": (16, 16, 8), "split": (1, 0, 1), "progress": False}
    assert [r.status for r in lidc.prepare(src, dst, **options)] == ["written", "written"]
    return src, dst, options


def _pecad(tmp_path: Path, rows: str = "PE01,10,12,7,voxel,1\nPE02,10,12,7,voxel,0\n",
           first: tuple[str, ...] = ("written", "written")) -> tuple[Path, Path, dict]:
    src, dst = tmp_path / "PE-CAD", tmp_path / "out"
    for name in ("PE01", "PE02"):
        write_volume(src / "volumes" / f"{name}.nii.gz", (10, 12, 7), (0.8, 0.6, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\n" + rows)
    options = {"cube_size": (8, 8, 8), "progress": False}
    assert tuple(r.status for r in pecad.prepare(src, dst, keep_going=True, **options)) == first
    return src, dst, options


def _entries(datalist: Path) -> list[dict]:
    data = json.loads(datalist.read_text())
    return [e for name, part in data.items() if name != "meta" for e in part]


def _edit(path: Path, change) -> None:
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# what was done to the manifest of the first case (key: the manifest's list of entries)
DAMAGE = {
    "cut short": lambda path, key: path.write_text(path.read_text()[:60]),
    "emptied": lambda path, key: path.write_bytes(b""),
    "not JSON": lambda path, key: path.write_text("nodules: none\n"),
    "a JSON list": lambda path, key: path.write_text("[]"),
    "list removed": lambda path, key: _edit(path, lambda m: m.pop(key)),
    "entry without image": lambda path, key: _edit(path, lambda m: m[key][0].pop("image")),
    "entry of another case": lambda path, key: _edit(path, lambda m: m[key][0].update(case_id="someone else")),
    "image outside --dst": lambda path, key: _edit(path, lambda m: m[key][0].update(image="../../etc/passwd")),
    "image deleted": lambda path, key: (path.parents[1] / json.loads(path.read_text())[key][0]["image"]).unlink(),
    "image emptied": lambda path, key: (path.parents[1] / json.loads(path.read_text())[key][0]["image"]).write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_lidc_rerun_redoes_a_series_whose_manifest_is_damaged(tmp_path, damage):
    src, dst, options = _lidc(tmp_path)
    before = _entries(dst / "lidc_datalist.json")
    manifest = dst / "manifests" / "LIDC-IDRI-0001.json"
    DAMAGE[damage](manifest, "nodules")
    results = lidc.prepare(src, dst, keep_going=True, **options)
    assert [r.status for r in results] == ["written", "skipped"]
    assert results[0].warnings[0].startswith("redone: ") and str(manifest) in results[0].warnings[0]
    report = json.loads((dst / "report.json").read_text())
    assert report["cases"][0]["warnings"] == results[0].warnings
    after = _entries(dst / "lidc_datalist.json")
    assert sorted(map(json.dumps, after)) == sorted(map(json.dumps, before))  # the same nodules, every file there
    assert all((dst / e[k]).stat().st_size > 0 for e in after for k in ("image", "label"))
    assert [r.status for r in lidc.prepare(src, dst, **options)] == ["skipped", "skipped"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_pecad_rerun_redoes_a_patient_whose_manifest_is_damaged(tmp_path, damage):
    src, dst, options = _pecad(tmp_path)
    manifest = dst / "manifests" / "PE01.json"
    DAMAGE[damage](manifest, "candidates")
    results = pecad.prepare(src, dst, keep_going=True, **options)
    assert [r.status for r in results] == ["written", "skipped"]
    assert results[0].warnings[0].startswith("redone: ") and str(manifest) in results[0].warnings[0]
    entries = _entries(dst / "pecad_datalist.json")
    assert [(e["case_id"], e["label"]) for e in entries] == [("PE01", 1), ("PE02", 0)]
    assert all((dst / e["image"]).stat().st_size > 0 for e in entries)


def test_dry_run_says_which_damaged_case_it_would_redo(tmp_path, capsys):
    src, dst, options = _pecad(tmp_path)
    (dst / "manifests" / "PE01.json").write_text("{")
    capsys.readouterr()
    results = pecad.prepare(src, dst, dry_run=True, **options)
    assert [r.status for r in results] == ["dry-run", "skipped"] and "not valid JSON" in results[0].reason
    assert "would redo PE01" in capsys.readouterr().out
    assert (dst / "manifests" / "PE01.json").read_text() == "{"  # a dry run writes nothing


def test_pecad_rerun_after_the_csv_changed_redoes_that_patient(tmp_path):
    """A label corrected in the CSV used to keep the old label in the datalist (the patient was skipped and its
    manifest's labels listed); a row added for a patient was never prepared."""
    src, dst, options = _pecad(tmp_path)
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\nPE01,10,12,7,voxel,0\nPE02,10,12,7,voxel,0\n"
                                        "PE02,11,12,7,voxel,1\n")
    results = pecad.prepare(src, dst, **options)
    assert [r.status for r in results] == ["written", "written"]
    assert all("candidates.csv" in r.warnings[0] and "changed" in r.warnings[0] for r in results)
    entries = _entries(dst / "pecad_datalist.json")
    assert [(e["case_id"], e["candidate"], e["label"]) for e in entries] == [("PE01", 0, 0), ("PE02", 1, 0), ("PE02", 2, 1)]
    assert [r.status for r in pecad.prepare(src, dst, **options)] == ["skipped", "skipped"]


def test_pecad_manifest_of_an_older_version_is_compared_by_row_and_label(tmp_path):
    """Manifests written before they recorded their CSV rows are still trusted while the rows agree: an
    upgrade does not redo every patient."""
    src, dst, options = _pecad(tmp_path)
    for name in ("PE01", "PE02"):
        _edit(dst / "manifests" / f"{name}.json", lambda m: m.pop("rows"))
    assert [r.status for r in pecad.prepare(src, dst, **options)] == ["skipped", "skipped"]
    (src / "candidates.csv").write_text("patient_id,x,y,z,coords,label\nPE01,10,12,7,voxel,1\nPE02,10,12,7,voxel,1\n")
    assert [r.status for r in pecad.prepare(src, dst, **options)] == ["skipped", "written"]
    assert [e["label"] for e in _entries(dst / "pecad_datalist.json")] == [1, 1]


def test_pecad_patient_whose_redo_fails_fails_alone(tmp_path, capsys):
    """A damaged manifest of a patient that now fails (its volume gone) stopped the whole batch at the datalist;
    with --keep-going the other patient is listed, without it no datalist is written (exit code 1)."""
    src, dst, options = _pecad(tmp_path)
    (dst / "manifests" / "PE01.json").write_text('{"candidates": [')
    (src / "volumes" / "PE01.nii.gz").unlink()
    (dst / "pecad_datalist.json").unlink()
    argv = ["--src", str(src), "--dst", str(dst), "--cube-size", "8", "8", "8"]
    assert pecad.main(argv) == 1
    assert not (dst / "pecad_datalist.json").exists()
    assert pecad.main(argv + ["--keep-going"]) == 0
    report = {c["case_id"]: c for c in json.loads((dst / "report.json").read_text())["cases"]}
    assert report["PE01"]["status"] == "failed" and "no volume" in report["PE01"]["reason"]
    assert [e["case_id"] for e in _entries(dst / "pecad_datalist.json")] == ["PE02"]
    assert "Traceback" not in capsys.readouterr().err


def test_a_pecad_partial_manifest_of_an_earlier_run_is_not_listed(tmp_path):
    """The good cubes of a patient with bad rows are listed from the partial manifest of this run only: one left
    by an earlier run (the patient's volume since gone) listed cubes of a case that failed for another reason."""
    src, dst, options = _pecad(tmp_path, rows="PE01,10,12,7,voxel,1\nPE01,1,2,3,voxel,7\nPE02,10,12,7,voxel,0\n",
                               first=("failed", "written"))
    assert (dst / "manifests" / "PE01.partial.json").is_file()
    assert [e["case_id"] for e in _entries(dst / "pecad_datalist.json")] == ["PE01", "PE02"]
    (src / "volumes" / "PE01.nii.gz").unlink()
    results = pecad.prepare(src, dst, keep_going=True, **options)
    assert [r.status for r in results] == ["failed", "skipped"] and "no volume" in results[0].reason
    assert [e["case_id"] for e in _entries(dst / "pecad_datalist.json")] == ["PE02"]


def test_lidc_manifest_unreadable_at_the_datalist_fails_that_series_only(tmp_path, monkeypatch, capsys):
    """The datalist step reads every manifest again: one that cannot be read there (here: damaged while the
    check before skipping is switched off, as in a run of an older version) fails its series alone with
    --keep-going, in the results and the report, and stops the datalist without it."""
    src, dst, options = _lidc(tmp_path)
    manifest = dst / "manifests" / "LIDC-IDRI-0002.json"
    manifest.write_text('{"nodules": 3}')
    monkeypatch.setattr(lidc, "_check_manifest", lambda case: None)
    (dst / "lidc_datalist.json").unlink()
    results = lidc.prepare(src, dst, **options)
    assert [r.status for r in results] == ["skipped", "failed"] and str(manifest) in results[1].reason
    assert not (dst / "lidc_datalist.json").exists()
    assert json.loads((dst / "report.json").read_text())["summary"]["failed"] == 1
    results = lidc.prepare(src, dst, keep_going=True, **options)
    assert [r.status for r in results] == ["skipped", "failed"] and "no list of nodules" in results[1].reason
    report = json.loads((dst / "report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["skipped", "failed"] and report["summary"]["failed"] == 1
    assert {e["case_id"] for e in _entries(dst / "lidc_datalist.json")} == {"LIDC-IDRI-0001"}


def test_read_case_outputs_fails_the_case_in_results_and_report(tmp_path):
    cases = [Case(f"c{i}", [tmp_path / f"c{i}.txt"]) for i in range(3)]

    def process(case):
        case.outputs[0].write_text(case.case_id)

    def read(case, result):
        if case.case_id == "c1":
            raise DataError(case.outputs[0], "is damaged")
        return [case.case_id]

    results = run_cases(cases, process, out_dir=tmp_path, progress=False)
    assert read_case_outputs(cases, results, read, keep_going=True, out_dir=tmp_path) == [["c0"], None, ["c2"]]
    assert [r.status for r in results] == ["written", "failed", "written"] and results[1].outputs == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["failed"] == 1 and report["cases"][1]["reason"].endswith("c1.txt: is damaged")
    results = run_cases(cases, process, out_dir=tmp_path, progress=False)
    assert read_case_outputs(cases, results, read, keep_going=False, out_dir=tmp_path) is None


def test_check_outputs_decides_whether_a_case_is_redone(tmp_path):
    cases = [Case(f"c{i}", [tmp_path / f"c{i}.txt"]) for i in range(3)]
    written = []

    def process(case):
        written.append(case.case_id)
        case.outputs[0].write_text("good")

    def check(case):
        if case.outputs[0].read_text() != "good":
            raise DataError(case.outputs[0], "was edited")

    run_cases(cases, process, out_dir=tmp_path, progress=False, check_outputs=check)
    (tmp_path / "c1.txt").write_text("edited")
    (tmp_path / "c2.txt").write_bytes(b"")
    written.clear()
    results = run_cases(cases, process, out_dir=tmp_path, progress=False, check_outputs=check)
    assert written == ["c1", "c2"] and [r.status for r in results] == ["skipped", "written", "written"]
    assert results[1].warnings == [f"redone: {tmp_path / 'c1.txt'}: was edited"]
    assert results[2].warnings == [f"redone: {tmp_path / 'c2.txt'} is empty"]
    assert [r.status for r in run_cases(cases, process, out_dir=tmp_path, progress=False, check_outputs=check)] == \
        ["skipped"] * 3


def test_generic_rerun_redoes_an_emptied_volume(tmp_path):
    src, dst = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    for name in ("a", "b"):
        image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 500, (6, 8, 8)).astype(np.float32))
        sitk.WriteImage(image, str(src / f"{name}.nii.gz"))
    assert [r.status for r in generic.prepare(src, dst, modality="mr", progress=False)] == ["written", "written"]
    (dst / "volumes" / "a.nii.gz").write_bytes(b"")
    results = generic.prepare(src, dst, modality="mr", progress=False)
    assert [r.status for r in results] == ["written", "skipped"] and "a.nii.gz is empty" in results[0].warnings[0]
    assert (dst / "volumes" / "a.nii.gz").stat().st_size > 0


def test_montgomery_rerun_redoes_an_emptied_mask(tmp_path):
    src, _ = _montgomery_layout(tmp_path / "data")
    dst = tmp_path / "out"
    assert {r.status for r in montgomery.prepare(src, dst, size=16, progress=False)} == {"written"}
    mask = dst / "masks" / "MCUCXR_0002_1.png"
    mask.write_bytes(b"")
    results = {r.case_id: r for r in montgomery.prepare(src, dst, size=16, progress=False)}
    assert [r.status for r in results.values()].count("skipped") == 2
    redone = next(r for r in results.values() if r.status == "written")
    assert "MCUCXR_0002_1.png is empty" in redone.warnings[0] and mask.stat().st_size > 0


@pytest.mark.parametrize("data", [b"", b'{"rule": {"seed"', b"[]"])
def test_a_damaged_split_record_is_warned_about(tmp_path, capsys, data):
    """It was split afresh without a word: with patients added since, that moves earlier patients between
    training and test."""
    src, dst, options = _lidc(tmp_path)
    (dst / "split.json").write_bytes(data)
    capsys.readouterr()
    assert [r.status for r in lidc.prepare(src, dst, **options)] == ["skipped", "skipped"]
    err = capsys.readouterr().err
    assert f"WARNING {dst / 'split.json'}: cannot be read" in err and "split afresh" in err
    assert json.loads((dst / "split.json").read_text())["rule"]["dataset"] == "lidc"
    lidc.prepare(src, dst, **options)
    assert "split.json" not in capsys.readouterr().err  # replaced by a good record
