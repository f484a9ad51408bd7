"""Reference tests for session 20's per-case test files (dira3d.evaluation.case_metrics), written by a mutation audit:
each pins a behaviour that a mutation of the module changed without any other test failing. The expected values
are computed by hand or by an independent definition (scikit-learn's AUC over labels binarised at >= 0.5, as
dira3d.evaluation.metrics.per_class_auc binarises them)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import roc_auc_score

from dira3d.evaluation.metrics import per_class_auc
from dira3d.evaluation.case_metrics import (CASES_FILE, CaseMetricsWriter, CasePredictionsWriter, case_rows,
                                            prediction_columns, prediction_rows, write_case_rows)


def _read(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _names(batch: dict) -> list[dict]:
    return [{"filename_or_obj": name} for name in batch["names"]]


def _run(writer, batches: list[dict], epochs: int = 1, runs: int = 1, details=None) -> Engine:
    """An ignite engine whose output is its batch; ``details`` (a function of the engine) sets the per-case metric
    values at the end of each epoch, before the writer (attached after it), as MONAI's metric handlers do."""
    engine = Engine(lambda e, batch: batch)
    if details is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, details)
    writer.attach(engine)
    for _ in range(runs):
        engine.run(batches, max_epochs=epochs)
    return engine


def test_case_rows_pair_each_value_with_its_own_case_and_refuse_surplus_values():
    rows = case_rows(["a", "b", "c"], {"dice": torch.tensor([[0.1], [0.2], [0.3]])}, [True, False, False])
    assert [(r["case"], r["dice"], r["empty_reference"]) for r in rows] == [
        ("a", pytest.approx(0.1), 1), ("b", pytest.approx(0.2), 0), ("c", pytest.approx(0.3), 0)]
    with pytest.raises(ValueError, match=r"metric 'dice' are 3 for 2 scored cases"):
        case_rows(["a", "b"], {"dice": torch.tensor([[0.1], [0.2], [0.3]])})
    with pytest.raises(ValueError, match="3 empty-reference flags for 2"):
        case_rows(["a", "b"], {}, [True, False, True])


def test_no_scored_case_writes_the_header_alone(tmp_path):
    path = write_case_rows(tmp_path / CASES_FILE, [])
    assert path.read_text() == "case\n"


def test_case_ids_are_found_for_unnormalised_paths_and_entries_of_several_images(tmp_path):
    (tmp_path / "cases").mkdir()
    first, second = str(tmp_path / "cases" / "p1_t1.nii.gz"), str(tmp_path / "cases" / "p1_t2.nii.gz")
    entries = [{"image": [f"{tmp_path}/cases/./p1_t1.nii.gz", second], "case_id": "p1"}]  # as written, not normalised
    writer = CaseMetricsWriter(tmp_path, datalist=tmp_path / "d.json", entries=entries)
    # the id of the entry (both images), whichever spelling of its first image the loader reports
    assert writer.case_id(first) == "cases/p1_t1.nii.gz+cases/p1_t2.nii.gz"
    assert writer.case_id(str(tmp_path / "cases" / "x" / ".." / "p1_t1.nii.gz")) == writer.case_id(first)
    assert writer.case_id(second) == "cases/p1_t2.nii.gz"  # not the first image of an entry: itself


def test_a_second_evaluation_with_the_same_handler_writes_its_own_cases_once(tmp_path):
    batches = [{"names": [str(tmp_path / "a.png"), str(tmp_path / "b.png")]}, {"names": [str(tmp_path / "c.png")]}]

    def details(engine):
        engine.state.metric_details = {"dice": torch.tensor([[0.5], [1.0], [0.0]])}
        engine.state.foreground_flags = {"dice": [True, False, True]}

    writer = CaseMetricsWriter(tmp_path, datalist=tmp_path / "d.json", batch_transform=_names)
    engine = _run(writer, batches, runs=2, details=details)
    rows = _read(engine.state.case_metrics_file)
    assert [(r["case"], r["dice"], r["empty_reference"]) for r in rows] == [
        ("a.png", "0.5", "0"), ("b.png", "1.0", "1"), ("c.png", "0.0", "0")]


def _prediction_batches(tmp_path: Path) -> list[dict]:
    return [{"names": [str(tmp_path / "c0.png"), str(tmp_path / "c1.png")],
             "pred": torch.tensor([[0.9], [0.2]]), "label": torch.tensor([[1.0], [0.5]])},
            {"names": [str(tmp_path / "c2.png")], "pred": torch.tensor([[0.4]]), "label": torch.tensor([[0.0]])}]


def _predictions_writer(tmp_path: Path, **kwargs) -> CasePredictionsWriter:
    return CasePredictionsWriter(tmp_path, datalist=tmp_path / "d.json", batch_transform=_names,
                                 output_transform=lambda out: (out["pred"], out["label"]), **kwargs)


def test_a_second_evaluation_with_the_same_prediction_handler_writes_its_own_cases_once(tmp_path):
    engine = _run(_predictions_writer(tmp_path), _prediction_batches(tmp_path), runs=2)
    rows = _read(engine.state.case_metrics_file)
    assert [(r["case"], r["label"], r["probability"]) for r in rows] == [
        ("c0.png", "1", "0.8999999761581421"), ("c1.png", "1", "0.20000000298023224"),
        ("c2.png", "0", "0.4000000059604645")]


def test_a_soft_label_of_one_half_is_positive_as_the_auc_counts_it():
    labels = np.array([[0.5, 0.0], [0.0, 1.0], [1.0, 0.5], [0.0, 0.0]])
    scores = np.array([[0.7, 0.1], [0.2, 0.8], [0.6, 0.3], [0.4, 0.9]])
    rows = prediction_rows(["a", "b", "c", "d"], labels, scores, ["A", "B"])
    assert [r["label_A"] for r in rows] == [1, 0, 1, 0] and [r["label_B"] for r in rows] == [0, 1, 1, 0]
    for k, name in enumerate(["A", "B"]):  # the file's AUC is dira3d's AUC of the soft labels
        file_auc = roc_auc_score([r[f"label_{name}"] for r in rows], [r[f"probability_{name}"] for r in rows])
        assert file_auc == pytest.approx(per_class_auc(scores, labels)[k], abs=1e-12)


def test_prediction_columns_of_more_names_than_outputs_keep_the_first_and_warn():
    with pytest.warns(UserWarning, match="class_names names 3 classes for the 2 outputs"):
        assert prediction_columns(["A", "B", "C"], 2) == (["label_A", "label_B"], ["probability_A", "probability_B"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prediction_columns(["A", "B"], 2) == (["label_A", "label_B"], ["probability_A", "probability_B"])


def test_each_row_carries_its_own_candidate_and_a_candidate_count_is_checked():
    candidates = [{"seriesuid": "s1", "coordX": 1.0}, {"seriesuid": "s2", "coordX": 2.0}]
    rows = prediction_rows(["a", "b"], [[1.0], [0.0]], [[0.9], [0.1]], (), candidates)
    assert [(r["seriesuid"], r["coordX"]) for r in rows] == [("s1", 1.0), ("s2", 2.0)]
    with pytest.raises(ValueError, match="for 2 scored cases"):
        prediction_rows(["a", "b"], [[1.0], [0.0]], [[0.9], [0.1]], (), candidates[:1])


def test_a_case_of_other_label_and_probability_counts_is_refused(tmp_path):
    batches = [{"names": [str(tmp_path / "c0.png")], "pred": torch.tensor([[0.9]]), "label": torch.tensor([[1.0, 0.0]])}]
    with pytest.raises(ValueError, match="labels of 2 classes for probabilities of 1"):
        _run(_predictions_writer(tmp_path), batches)


def test_candidate_columns_name_the_scan_by_case_id_and_keep_entries_without_a_position(tmp_path):
    entries = [{"image": str(tmp_path / "c0.png"), "case_id": "scan0", "patient_id": "patient0", "world_mm": [1, 2, 3]},
               {"image": str(tmp_path / "c1.png"), "case_id": "scan1", "patient_id": "patient1"},
               {"image": str(tmp_path / "c2.png"), "case_id": "scan2", "world_mm": [4.5, 5, 6, 7]}]
    engine = _run(_predictions_writer(tmp_path, entries=entries, id_column="seriesuid"), _prediction_batches(tmp_path))
    rows = _read(engine.state.case_metrics_file)
    assert [[r[k] for k in ("case", "seriesuid", "coordX", "coordY", "coordZ")] for r in rows] == [
        ["c0.png", "scan0", "1.0", "2.0", "3.0"], ["c1.png", "scan1", "", "", ""], ["c2.png", "scan2", "", "", ""]]
    # no id_column: no candidate columns, even for entries with a position
    engine = _run(_predictions_writer(tmp_path, entries=entries), _prediction_batches(tmp_path))
    assert list(_read(engine.state.case_metrics_file)[0]) == ["case", "label", "probability"]
