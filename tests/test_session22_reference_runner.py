"""Session-22 mutation audit of the `dira3d prepare` batch runner (dira3d.data.runner) and the checks it makes before
any case runs (dira3d.data.guards): each test pins a behaviour that a mutation of those modules changed without any
other test failing. References: the module docstrings' rules (go on with the good cases and report the bad ones,
never overwrite, redo damaged outputs), with statuses, reasons, report contents and relative paths worked out by hand
on tiny text-file "cases".
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pytest

from dira3d.data.end_messages import datalists_recorded
from dira3d.data.errors import DataError, DataWarning
from dira3d.data.guards import locks_held_until_done
from dira3d.data.runner import Case, read_case_outputs, run_cases, run_prepare, write_datalist


def _write(case: Case) -> dict:
    """Writes each output with the case id; ``params`` may ask for a failure, a warning or a pause."""
    time.sleep(case.params.get("sleep", 0))
    if case.params.get("oserror"):
        raise OSError(f"{case.params['oserror']}: cannot be read")
    for name, category in case.params.get("warn", []):
        warnings.warn(name, DataWarning if category == "data" else UserWarning, stacklevel=1)
    for path in case.outputs:
        if case.params.get("folder"):
            path.mkdir(parents=True, exist_ok=True)
        elif not case.params.get("skip_write"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(case.case_id)
    return {"outputs": len(case.outputs)}


def _fail_fast(case: Case) -> dict:
    if case.params.get("bad"):
        raise ValueError(f"{case.case_id}: broken")
    return _write(case)


def _cases(out: Path, n: int, **params) -> list[Case]:
    return [Case(f"c{i}", [out / f"c{i}.txt"], dict(params)) for i in range(n)]


# ---- write_datalist --------------------------------------------------------------------------------


def test_datalist_paths_of_images_and_labels_are_relative_whether_str_or_path(tmp_path, capsys):
    out = tmp_path / "out"
    entries = [{"image": out / "imgs" / "a.nii.gz", "label": str(out / "labels" / "a.nii.gz"), "case_id": "a"},
               {"image": str(out / "imgs" / "b.nii.gz"), "label": out / "labels" / "b.nii.gz", "case_id": "b"}]
    with datalists_recorded() as written:
        write_datalist(out / "dl.json", {"training": entries, "validation": [entries[0]]}, {"source": "x"})
    content = json.loads((out / "dl.json").read_text())
    assert content["training"] == [
        {"image": "imgs/a.nii.gz", "label": "labels/a.nii.gz", "case_id": "a"},
        {"image": "imgs/b.nii.gz", "label": "labels/b.nii.gz", "case_id": "b"},
    ]
    assert content["meta"] == {"source": "x"}
    assert written == [(out / "dl.json", True)]
    assert "WARNING" not in capsys.readouterr().err  # no split is empty, one with a single case included


def test_datalist_paths_stay_inside_the_folder_reached_through_a_symlink(tmp_path):
    """--dst given through a symbolic link: the entries are relative to the datalist's real folder ("imgs/a.nii.gz"),
    not a way back out through the link, so the folder can be moved or copied with its datalist."""
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    write_datalist(link / "dl.json", {"training": [{"image": link / "imgs" / "a.nii.gz"}]}, {})
    assert json.loads((tmp_path / "real" / "dl.json").read_text())["training"] == [{"image": "imgs/a.nii.gz"}]


def test_only_empty_splits_are_warned_about_and_an_unlabelled_datalist_is_recorded_so(tmp_path, capsys):
    with datalists_recorded() as written:
        write_datalist(tmp_path / "dl.json", {"training": [{"image": "a.nii.gz"}], "test": []}, {})
    assert written == [(tmp_path / "dl.json", False)]
    err = capsys.readouterr().err
    assert "'test' list is empty" in err and "'training'" not in err


# ---- run_cases -------------------------------------------------------------------------------------


def test_an_os_error_is_reported_as_its_message_and_other_warnings_are_shown(tmp_path):
    out = tmp_path / "out"
    cases = [Case("c0", [out / "c0.txt"], {"oserror": "in/c0.nii"}),
             Case("c1", [out / "c1.txt"], {"warn": [("note", "data"), ("shown", "user")]})]
    with pytest.warns(UserWarning, match="shown"):
        results = run_cases(cases, _write, out_dir=out, keep_going=True, progress=False)
    assert [r.status for r in results] == ["failed", "written"]
    assert results[0].reason == "in/c0.nii: cannot be read"
    assert results[1].warnings == ["note"] and results[1].info == {"outputs": 1}


def test_a_case_that_does_not_write_its_files_fails(tmp_path):
    out = tmp_path / "out"
    cases = [Case("c0", [out / "c0.txt"], {"skip_write": True}), Case("c1", [out / "c1.txt"], {"folder": True})]
    results = run_cases(cases, _write, out_dir=out, keep_going=True, progress=False)
    assert [r.status for r in results] == ["failed", "failed"]
    assert results[0].reason.startswith("finished without writing") and "c0.txt" in results[0].reason
    assert "c1.txt" in results[1].reason


def test_workers_below_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--workers must be at least 1, got 0"):
        run_cases(_cases(tmp_path, 1), _write, out_dir=tmp_path, workers=0, progress=False)


def test_a_case_without_outputs_is_never_skipped(tmp_path):
    out = tmp_path / "out"
    calls = []

    def count(case):
        calls.append(case.case_id)
        return {}

    for _ in range(2):
        assert [r.status for r in run_cases([Case("c0", [])], count, out_dir=out, progress=False)] == ["written"]
    assert calls == ["c0", "c0"]


def test_an_interrupted_case_with_some_outputs_is_redone(tmp_path):
    out = tmp_path / "out"
    case = Case("c0", [out / "a.txt", out / "b.txt"])
    out.mkdir()
    (out / "a.txt").write_text("half")
    assert run_cases([case], _write, out_dir=out, progress=False)[0].status == "written"
    assert (out / "a.txt").read_text() == "c0"


def test_half_written_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    left = out / "sub" / ".c0.txt.abcd1234.tmp"
    left.write_text("half")
    run_cases(_cases(out, 1), _write, out_dir=out, progress=False)
    assert not left.exists()
    assert "removed 1 half-written temporary file(s)" in capsys.readouterr().err


def test_a_dry_run_lists_three_outputs_and_how_many_more(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [Case("c0", [out / f"{i}.txt" for i in range(4)]), Case("c1", [out / f"{i}.txt" for i in range(3)])]
    run_cases(cases, _write, out_dir=out, dry_run=True, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("2.txt (+1 more)") and lines[1].endswith("2.txt") and "more" not in lines[1]


def test_the_first_failure_stops_a_pool_even_when_later_cases_succeed(tmp_path):
    """Two workers, at most four cases in flight: c0 fails at once while c1-c3 run; the rest are never started."""
    out = tmp_path / "out"
    cases = [Case("c0", [out / "c0.txt"], {"bad": True})]
    cases += [Case(f"c{i}", [out / f"c{i}.txt"], {"sleep": 1.0}) for i in range(1, 10)]
    results = run_cases(cases, _fail_fast, out_dir=out, workers=2, progress=False)
    statuses = [r.status for r in results]
    assert statuses[0] == "failed" and statuses[4:] == ["cancelled"] * 6, statuses


def test_the_redo_note_comes_first_and_a_cancelled_case_gets_none(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cases = [Case("c0", [out / "c0.txt"], {"warn": [("own note", "data")]}), Case("c1", [out / "c1.txt"], {"bad": True}),
             Case("c2", [out / "c2.txt"])]
    for case in cases:
        case.outputs[0].write_text("")  # empty: damaged, to be redone
    results = run_cases(cases, _fail_fast, out_dir=out, progress=False)
    assert [r.status for r in results] == ["written", "failed", "cancelled"]
    assert results[0].warnings == [f"redone: {out / 'c0.txt'} is empty", "own note"]
    assert results[2].warnings == []


def test_the_report_records_the_absolute_source_and_the_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    run_cases(_cases(tmp_path / "out", 1), _write, out_dir=tmp_path / "out", progress=False, source="src",
              settings={"spacing": (1, 1, 2.5)})
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["source"] == str((tmp_path / "src").resolve())
    assert report["settings"] == {"spacing": [1, 1, 2.5]}


def test_a_skipped_case_keeps_only_the_warnings_of_an_earlier_written_or_skipped_result(tmp_path):
    """The earlier report's warnings of a case it reported failed or cancelled are not carried to a skip."""
    out = tmp_path / "out"
    cases = _cases(out, 3)
    run_cases(cases, _write, out_dir=out, progress=False)
    report = json.loads((out / "report.json").read_text())
    for entry, status in zip(report["cases"], ["written", "failed", "cancelled"]):
        entry.update(status=status, warnings=[f"note of {entry['case_id']}"])
    (out / "report.json").write_text(json.dumps(report))
    again = run_cases(cases, _write, out_dir=out, progress=False)
    assert [r.status for r in again] == ["skipped"] * 3
    assert [r.warnings for r in again] == [["note of c0"], [], []]


# ---- after run_cases: read_case_outputs and the report -----------------------------------------------


def test_an_output_found_damaged_late_fails_its_case_and_the_report_says_so(tmp_path):
    out = tmp_path / "out"
    cases = [Case("c0", [out / "c0.txt"]), Case("c1", [out / "c1.txt"], {"bad": True}), Case("c2", [out / "c2.txt"])]
    results = run_cases(cases, _fail_fast, out_dir=out, keep_going=True, progress=False)

    def read(case, result):
        if case.case_id != "c0":
            raise ValueError(f"{case.case_id}.json: cut short")
        return [case.case_id]

    parts = read_case_outputs(cases, results, read, keep_going=True, out_dir=out)
    assert parts == [["c0"], None, None]
    assert [r.status for r in results] == ["written", "failed", "failed"]
    assert results[1].reason == "c1: broken; c1.json: cut short"  # both problems, "; "-joined
    assert results[2].reason == "c2.json: cut short" and results[2].outputs == []
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["written"] == 1 and report["summary"]["failed"] == 2
    assert report["cases"][2]["status"] == "failed"
    assert read_case_outputs(cases, results, read, keep_going=False, out_dir=out) is None


def test_a_prepare_error_before_any_case_is_exit_code_2(tmp_path, capsys):
    args = argparse.Namespace(src=tmp_path / "src", dst=tmp_path / "dst", workers=1, overwrite=False, dry_run=False,
                              keep_going=False, report=None)

    def prepare(src, dst, **options):
        raise ValueError(f"{src}: no scans found")

    assert run_prepare("dira3d prepare x", prepare, args) == 2
    assert f"dira3d prepare x: error: {tmp_path / 'src'}: no scans found" in capsys.readouterr().err


# ---- guards: what counts as done, what a rerun may not mix in ---------------------------------------


def test_outputs_a_check_refuses_with_an_os_error_are_redone(tmp_path):
    out = tmp_path / "out"
    run_cases(_cases(out, 1), _write, out_dir=out, progress=False)

    def check(case):
        raise OSError(f"{case.outputs[0]}: unreadable")

    result = run_cases(_cases(out, 1), _write, out_dir=out, progress=False, check_outputs=check)[0]
    assert result.status == "written" and result.warnings == [f"redone: {out / 'c0.txt'}: unreadable"]


def test_settings_recorded_as_json_lists_match_tuples_and_new_keys_are_not_compared(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "dl.json").write_text(json.dumps({"training": [], "meta": {"source": str((tmp_path / "src").resolve()),
                                                                       "spacing": [1, 1, 2.5]}}))
    results = run_cases(_cases(out, 1), _write, out_dir=out, progress=False, source=tmp_path / "src",
                        datalists=[out / "dl.json"], settings={"spacing": (1, 1, 2.5), "window": [-1000, 400]})
    assert [r.status for r in results] == ["written"]
    with pytest.raises(DataError, match=r"records volumes prepared with spacing \[1, 1, 2.5\] \(now \[1, 1, 3\]\)"):
        run_cases(_cases(out, 1), _write, out_dir=out, progress=False, source=tmp_path / "src",
                  datalists=[out / "dl.json"], settings={"spacing": (1, 1, 3)})


def test_a_report_folder_path_is_refused(tmp_path):
    (tmp_path / "r.json").mkdir()
    with pytest.raises(DataError, match="is a folder; --report must be a file path"):
        run_cases(_cases(tmp_path / "out", 1), _write, out_dir=tmp_path / "out", report_path=tmp_path / "r.json",
                  progress=False)


def test_without_a_source_the_datalists_are_not_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dl.json").write_text("not json")
    results = run_cases(_cases(out, 1), _write, out_dir=out, progress=False, datalists=[out / "dl.json"])
    assert [r.status for r in results] == ["written"]


def test_a_json_file_without_a_summary_is_not_a_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(DataError, match="is not a dira3d prepare report"):
        run_cases(_cases(out, 1), _write, out_dir=out, progress=False)


def _report(path: Path, desc: str, source: str | None, settings: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"desc": desc, "source": source, "summary": {}, "cases": []}
    if settings is not None:
        report["settings"] = settings
    path.write_text(json.dumps(report))


def test_which_earlier_reports_record_a_source_to_compare(tmp_path):
    """Compared: a report of this dataset in this --dst. Not compared: another dataset's report (its run is refused
    for being another dataset, not for its source; since 2026-11-28 it is no longer replaced), a report outside
    --dst, a report that records no source."""
    out, src = tmp_path / "out", tmp_path / "src"

    def run(report_path):
        return run_cases(_cases(out, 1), _write, out_dir=out, progress=False, source=src, desc="lidc",
                         report_path=report_path, overwrite=False)

    _report(out / "report.json", "luna16", "/elsewhere")
    with pytest.raises(DataError, match="holds the luna16 dataset") as refused:
        run(out / "report.json")
    assert "was prepared from --src" not in str(refused.value)
    (out / "report.json").unlink()
    _report(tmp_path / "reports" / "r.json", "lidc", "/elsewhere")
    run(tmp_path / "reports" / "r.json")
    _report(out / "report.json", "lidc", None)
    run(out / "report.json")
    _report(out / "report.json", "lidc", "/elsewhere")
    with pytest.raises(DataError, match="was prepared from --src /elsewhere"):
        run(out / "report.json")


def test_the_settings_of_an_earlier_report_are_compared(tmp_path):
    out, src = tmp_path / "out", tmp_path / "src"
    _report(out / "report.json", "lidc", str(src.resolve()), {"window": [-1000, 400]})
    with pytest.raises(DataError, match=r"window \[-1000, 400\] \(now \[-1000, 500\]\)"):
        run_cases(_cases(out, 1), _write, out_dir=out, progress=False, source=src, desc="lidc",
                  settings={"window": [-1000, 500]})


def _locked_by_someone(folder: Path) -> bool:
    """Whether a new open file description can take the folder's flock (as another process would try)."""
    import fcntl

    with open(folder / ".dira3d.lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def test_the_lock_is_kept_until_the_preparation_ends(tmp_path):
    pytest.importorskip("fcntl", reason="flock locks need fcntl (POSIX)")
    out = tmp_path / "out"
    with locks_held_until_done():
        run_cases(_cases(out, 1), _write, out_dir=out, progress=False)
        assert _locked_by_someone(out)
    assert not _locked_by_someone(out)
    run_cases(_cases(out, 1), _write, out_dir=out, progress=False)
    assert not _locked_by_someone(out)


def test_a_report_folder_that_cannot_be_made_is_refused_before_any_case(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="report folder"):
        run_cases(_cases(out, 1), _write, out_dir=out, report_path=tmp_path / "afile" / "report.json", progress=False)
    assert not (out / "c0.txt").exists()
