"""A ``dira3d prepare`` into a ``--dst`` that another dataset was prepared into is refused before anything is written.

Until 2026-11-28 a prepare of dataset B into the folder of dataset A went ahead: B's run replaced A's ``report.json``
(and, of the same name, its ``split.json`` and datalists) without a word, against the rule that nothing the user had
is overwritten. The check (:func:`dira3d.data.guards.check_other_dataset`) reads the dataset from the ``desc`` of
``--dst``'s ``prepared.json`` (every run writes it; in a folder prepared before it, ``report.json``) and of a
``--report`` path; ``--overwrite`` replaces them and deletes nothing. Until 2026-11-28 a ``--dst`` prepared with
``--report`` elsewhere held nothing naming its dataset, so another dataset's run into it went ahead.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from dira3d.cli import main as cli_main
from dira3d.data.errors import DataError
from dira3d.data.runner import Case, run_cases


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock file, which any run takes) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".dira3d.lock"}


def test_a_prepare_into_the_dst_of_another_dataset_is_refused_and_changes_nothing(tmp_path, capsys):
    xrays, scans, dst = tmp_path / "xrays", tmp_path / "scans", tmp_path / "prepared"
    xrays.mkdir()
    scans.mkdir()
    for i in range(3):
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4 + i).save(xrays / f"p{i}.png")
        volume = np.random.default_rng(i).normal(size=(12, 12, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), scans / f"s{i}.nii.gz")
    assert cli_main(["prepare", "radiographs", "--src", str(xrays), "--dst", str(dst), "--size", "8",
                     "--val-fraction", "0"]) == 0
    before = _files(dst)
    assert {"report.json", "split.json", "radiographs_datalist.json"} <= set(before)
    capsys.readouterr()
    generic = ["prepare", "generic", "--src", str(scans), "--dst", str(dst), "--modality", "mr", "--val-fraction", "0"]
    for extra in ([], ["--dry-run"]):
        assert cli_main(generic + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"dira3d prepare generic: error: {dst}: holds the radiographs dataset")
        assert "another --dst" in err and "--overwrite" in err
        assert _files(dst) == before  # report.json, split.json, the datalist and the PNGs as they were
    # --overwrite replaces the report (the datalists have other names) and deletes none of the PNGs
    assert cli_main(generic + ["--overwrite"]) == 0
    after = _files(dst)
    assert json.loads(after["report.json"])["desc"] == "generic"
    assert json.loads(after["prepared.json"])["desc"] == "generic"
    assert {k: v for k, v in before.items() if k not in ("report.json", "prepared.json")}.items() <= after.items()
    assert {"volumes/s0.nii.gz", "pretrain_datalist.json"} <= set(after)


def _write(case: Case) -> dict:
    Path(case.outputs[0]).write_text(case.case_id)
    return {}


def _report(path: Path, desc: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text := json.dumps({"desc": desc, "source": None, "summary": {}, "cases": []}))
    return text


def test_another_datasets_report_at_dst_or_at_the_report_path_is_not_replaced(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "reports" / "r.json"

    def run(**kwargs):
        return run_cases([Case("c0", [out / "c0.txt"], {})], _write, out_dir=out, progress=False, desc="lidc", **kwargs)

    kept = _report(out / "report.json", "luna16")
    with pytest.raises(DataError, match=r"out: holds the luna16 dataset .*Choose another --dst, or pass --overwrite"):
        run(report_path=elsewhere)  # the report would go elsewhere, but luna16's datalists of the same name not
    assert (out / "report.json").read_text() == kept and not elsewhere.exists() and not (out / "c0.txt").exists()
    (out / "report.json").unlink()
    kept = _report(elsewhere, "luna16")
    with pytest.raises(DataError, match=r"r\.json: is the report of a luna16 preparation; .*another --report path"):
        run(report_path=elsewhere)
    assert elsewhere.read_text() == kept and not (out / "c0.txt").exists()
    _report(elsewhere, "lidc")  # this dataset's own report: a rerun
    assert [r.status for r in run(report_path=elsewhere)] == ["written"]
    _report(out / "report.json", "")  # a report that names no dataset (run_cases without desc) is no other dataset
    assert [r.status for r in run()] == ["skipped"]
    _report(out / "report.json", "luna16")
    assert [r.status for r in run(overwrite=True)] == ["written"]
    assert json.loads((out / "report.json").read_text())["desc"] == "lidc"


def test_a_dst_prepared_with_the_report_elsewhere_names_its_dataset_and_refuses_another(tmp_path, capsys):
    xrays, scans, dst, report = tmp_path / "xrays", tmp_path / "scans", tmp_path / "prepared", tmp_path / "r" / "x.json"
    xrays.mkdir()
    scans.mkdir()
    for i in range(3):
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4 + i).save(xrays / f"p{i}.png")
        nib.save(nib.Nifti1Image(np.random.default_rng(i).normal(size=(12, 12, 6)).astype(np.float32), np.eye(4)),
                 scans / f"s{i}.nii.gz")
    assert cli_main(["prepare", "radiographs", "--src", str(xrays), "--dst", str(dst), "--size", "8",
                     "--val-fraction", "0", "--report", str(report)]) == 0
    before = _files(dst)
    assert "report.json" not in before and json.loads(report.read_text())["desc"] == "radiographs"  # --report as documented
    record = json.loads(before["prepared.json"])
    assert (record["desc"], record["source"], record["report"]) == ("radiographs", str(xrays.resolve()),
                                                                    str(report.resolve()))
    assert record["settings"]["size"] == 8
    capsys.readouterr()
    generic = ["prepare", "generic", "--src", str(scans), "--dst", str(dst), "--modality", "mr", "--val-fraction", "0"]
    for extra in ([], ["--report", str(tmp_path / "r" / "g.json")]):
        assert cli_main(generic + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"dira3d prepare generic: error: {dst}: holds the radiographs dataset (its prepared.json "
                              "says desc 'radiographs')"), err
        assert _files(dst) == before and not (tmp_path / "r" / "g.json").exists()
    # a rerun of the same dataset and source is incremental, and rewrites nothing in --dst
    assert cli_main(["prepare", "radiographs", "--src", str(xrays), "--dst", str(dst), "--size", "8",
                     "--val-fraction", "0", "--report", str(report)]) == 0
    assert _files(dst) == before


def test_the_record_in_dst_keeps_the_source_and_settings_of_a_run_whose_report_is_elsewhere(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "reports" / "r.json"
    elsewhere.parent.mkdir()

    def run(source, **kwargs):
        return run_cases([Case("c0", [out / "c0.txt"], {})], _write, out_dir=out, progress=False, desc="lidc",
                         report_path=elsewhere, source=tmp_path / source, **kwargs)

    assert [r.status for r in run("a", settings={"spacing": 1})] == ["written"]
    with pytest.raises(DataError, match=r"prepared\.json: was prepared from --src .*a, not .*b; choose another --dst"):
        run("b", settings={"spacing": 1})
    with pytest.raises(DataError, match=r"prepared\.json: records volumes prepared with spacing 1 \(now 2\)"):
        run("a", settings={"spacing": 2})
    assert [r.status for r in run("a", settings={"spacing": 1})] == ["skipped"]


def test_the_record_names_a_relative_src_by_its_full_path(tmp_path, monkeypatch):
    # a --src given relative to the working folder is recorded resolved: a rerun of the same command from another
    # folder is the same source, and ``dira3d demo`` compares it with its phantoms' folder
    from dira3d.data.guards import record_dataset

    (tmp_path / "raw").mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    record_dataset(Path("out"), "lidc", "raw", {"spacing": 1}, Path("report.json"))
    record = json.loads((tmp_path / "out" / "prepared.json").read_text(encoding="utf-8"))
    assert (record["source"], record["report"]) == (str((tmp_path / "raw").resolve()),
                                                    str((tmp_path / "report.json").resolve()))


def test_a_folder_holding_an_earlier_runs_record_is_its_output_even_before_its_datalist_and_report(tmp_path):
    # a run stopped (or its --report elsewhere) before it wrote its datalist left only prepared.json naming its
    # dataset: a preparation that searches --src for images must leave that folder (its resized copies) out
    from dira3d.data.guards import is_earlier_output, record_dataset

    folder = tmp_path / "src" / "prepared"
    folder.mkdir(parents=True)
    record_dataset(folder, "radiographs", tmp_path / "src", {"size": 8}, tmp_path / "elsewhere.json")
    assert not (folder / "report.json").exists()
    assert is_earlier_output(folder, "radiographs", "radiographs_datalist.json")
    assert not is_earlier_output(folder, "chestxray14", "chestxray14_datalist.json")  # another dataset's run


def test_a_prepared_json_that_is_not_the_record_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "prepared.json").write_text(mine := '{"my": "notes"}')
    with pytest.raises(DataError, match=r"prepared\.json: exists and is not the record dira3d prepare keeps in --dst; "
                                        r"move it away, choose another --dst, or pass --overwrite"):
        run_cases([Case("c0", [out / "c0.txt"], {})], _write, out_dir=out, progress=False, desc="lidc")
    assert (out / "prepared.json").read_text() == mine and not (out / "c0.txt").exists()
