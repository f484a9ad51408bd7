"""A rerun of ``dira3d prepare`` into the same --dst keeps the warnings of the cases it skips.

Found by a 2D walkthrough: a rerun (after fixing one bad file, say) skipped the cases written before and rewrote
report.json without their warnings, so a grey X-ray stored as RGB, or an EXIF-turned JPEG, was no longer named
anywhere. The earlier report's warnings are now carried over to the skipped cases.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dira3d.cli import main as cli_main
from dira3d.data.errors import DataError, DataWarning
from dira3d.data.runner import Case, run_cases


def _write(case: Case) -> dict:
    if case.case_id == "a":
        warnings.warn(f"{case.case_id}: stored as RGB", DataWarning)
    Path(case.outputs[0]).write_text("x")
    return {}


def _cases(dst: Path) -> list[Case]:
    return [Case(cid, [dst / f"{cid}.txt"], {}) for cid in ("a", "b")]


def _report(path: Path) -> dict:
    return {c["case_id"]: c for c in json.loads(path.read_text())["cases"]}


def test_a_skipped_case_keeps_the_warnings_of_the_earlier_report(tmp_path):
    dst = tmp_path / "out"
    first = run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False)
    assert first[0].warnings == ["a: stored as RGB"]
    again = run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert again[0].warnings == ["a: stored as RGB"] and again[1].warnings == []
    assert _report(dst / "report.json")["a"]["warnings"] == ["a: stored as RGB"]
    # and a third run still has them (carried from a report of skipped cases)
    run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False)
    assert _report(dst / "report.json")["a"]["warnings"] == ["a: stored as RGB"]


def test_the_notes_of_an_earlier_run_itself_and_of_another_dataset_are_not_carried(tmp_path):
    dst = tmp_path / "out"
    run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False)
    report = json.loads((dst / "report.json").read_text())
    report["cases"][0]["warnings"].insert(0, "redone: its output was empty")
    (dst / "report.json").write_text(json.dumps(report))
    assert run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False)[0].warnings == ["a: stored as RGB"]
    report["desc"] = "other"  # another dataset's report: refused (2026-11-28: it was replaced without a word) ...
    (dst / "report.json").write_text(json.dumps(report))
    record = json.loads((dst / "prepared.json").read_text())  # (and its record in --dst, which names the dataset)
    (dst / "prepared.json").write_text(json.dumps({**record, "desc": "other"}))
    with pytest.raises(DataError, match="holds the other dataset"):
        run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False)
    report["cases"][1]["warnings"] = ["b: a note of the other dataset"]  # ... and with --overwrite none of its notes
    (dst / "report.json").write_text(json.dumps(report))  # is carried (every case is redone: its own notes only)
    again = run_cases(_cases(dst), _write, out_dir=dst, desc="toy", progress=False, overwrite=True)
    assert [r.warnings for r in again] == [["a: stored as RGB"], []]


def test_a_radiographs_rerun_keeps_and_prints_the_warning_of_a_skipped_image(tmp_path, capsys):
    src, dst = tmp_path / "xrays", tmp_path / "out"
    src.mkdir()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).convert("RGB").save(src / "rgb.png")  # grey stored as RGB: a warning
    Image.fromarray(grey).save(src / "grey.png")
    command = ["prepare", "radiographs", "--src", str(src), "--dst", str(dst), "--size", "8", "--val-fraction", "0"]
    assert cli_main(command) == 0
    assert "WARNING rgb:" in capsys.readouterr().err
    assert cli_main(command) == 0
    out = capsys.readouterr()
    assert "2 skipped" in out.out and "WARNING rgb:" in out.err and "stored as RGB" in out.err
    case = _report(dst / "report.json")["rgb"]
    assert case["status"] == "skipped" and "stored as RGB with equal colour channels" in case["warnings"][0]
