"""The per-case results file of an evaluation: its name follows the split scored, and it keeps the candidates'
world positions that the datalist has.

1. ``evaluate.json`` scores ``eval_split`` (``test`` by default, ``holdout`` on request), but its writer always wrote
   ``test_cases.csv``: an evaluation of the holdout left a file whose name said it held the test cases. The file is
   now ``<split>_cases.csv`` (``test_cases.csv`` for the test split), and metrics.json, ``--overwrite`` and
   ``dira3d experiment``'s closing lines name that file.
2. ``load_split`` keeps only the keys every entry has (a batch cannot collate a key some samples lack), so one
   LUNA16 / PE-CAD candidate without ``world_mm`` took the world position from every candidate of the split, and the
   per-case file lost its ``seriesuid``, ``coordX``, ``coordY``, ``coordZ`` columns without a word. ``world_mm`` is
   now kept, with a placeholder that collates (three NaN) where an entry lacks it, written as empty cells.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from dira3d.evaluation.case_metrics import CASES_FILE, CaseMetricsWriter, CasePredictionsWriter, cases_file

ROOT = Path(__file__).resolve().parents[1]
TASK_BUNDLES = ("brats_tumor_seg", "chestxray14_cls", "chexpert_cls", "lidc_nodule_seg", "lits_liver_seg",
                "luna16_nodule_fpr", "montgomery_lung_seg", "pecad_embolism_fpr", "siim_pneumothorax_seg")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ---- 1. the file is named after the split scored ----

def test_the_file_is_named_after_the_split_and_the_test_split_keeps_its_name(tmp_path):
    assert cases_file() == cases_file("test") == CASES_FILE == "test_cases.csv"
    assert cases_file("holdout") == "holdout_cases.csv"
    assert CaseMetricsWriter(tmp_path).path == tmp_path / "test_cases.csv"
    assert CaseMetricsWriter(tmp_path, split="holdout").path == tmp_path / "holdout_cases.csv"
    assert CasePredictionsWriter(tmp_path, split="holdout").path == tmp_path / "holdout_cases.csv"
    assert CaseMetricsWriter(tmp_path, filename="mine.csv", split="holdout").path == tmp_path / "mine.csv"
    with pytest.raises(ValueError, match=r"eval_split='\.\./x' cannot name the per-case results file"):
        cases_file("../x")


@pytest.mark.parametrize("bundle", TASK_BUNDLES)
def test_every_task_bundle_names_the_file_after_its_eval_split(bundle):
    from monai.bundle import ConfigParser

    configs = ROOT / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    handlers = parser["validate#handlers"]
    index = next(i for i, h in enumerate(handlers) if str(h.get("_target_", "")).endswith(("CaseMetricsWriter",
                                                                                           "CasePredictionsWriter")))
    parser["validate#datalist"] = []  # the writer, without a datalist to read
    parser["output_dir"] = "/out"
    assert parser.get_parsed_content(f"validate#handlers#{index}").path == Path("/out/test_cases.csv")
    parser["eval_split"] = "holdout"
    assert parser.get_parsed_content(f"validate#handlers#{index}", lazy=False).path == Path("/out/holdout_cases.csv")


def test_experiment_names_the_per_case_file_of_the_split_its_runs_score(tmp_path):
    from dira3d.evaluation.experiment import written_message

    config = {"output_dir": str(tmp_path), "metric": "auc"}
    assert "test_cases.csv: each case's metrics (segmentation) or label(s)" in written_message(config)
    message = written_message({**config, "overrides": {"eval_split": "holdout"}})
    assert "holdout_cases.csv: each case's" in message and "test_cases.csv" not in message


# ---- 2. the candidates' world positions that exist are kept ----

def _candidates(tmp_path: Path) -> Path:
    """A LUNA16-like datalist: 6 test candidates of which 2 lack world_mm, one positive with diameter_mm."""
    images = tmp_path / "cubes"
    images.mkdir()
    test = []
    for i in range(6):
        (images / f"c{i}.npy").touch()
        entry = {"image": f"cubes/c{i}.npy", "label": i % 2, "case_id": f"1.3.6.{i // 2}"}
        if i not in (0, 3):  # the first one too: the key of the batch's first sample decides what it collates
            entry["world_mm"] = [-100.5 + i, 20.25, -300.0 - i]
        if i == 1:
            entry["diameter_mm"] = 6.5
        test.append(entry)
    path = tmp_path / "ncc_datalist.json"
    training = [{**e, "case_id": f"2.{e['case_id']}"} for e in test]  # other scans: no patient in both lists
    path.write_text(json.dumps({"training": training, "test": test}), encoding="utf-8")
    return path


def test_load_split_keeps_the_world_positions_some_candidates_lack(tmp_path):
    from monai.data import list_data_collate

    from dira3d.evaluation import load_split

    entries = load_split(_candidates(tmp_path), "test")
    assert [e["world_mm"][0] for e in entries if not math.isnan(e["world_mm"][0])] == [-99.5, -98.5, -96.5, -95.5]
    assert all(all(math.isnan(v) for v in entries[i]["world_mm"]) for i in (0, 3))
    assert not any("diameter_mm" in e for e in entries)  # a key the collation has no placeholder for: dropped
    batch = list_data_collate(entries[:3])  # as the DataLoader batches them: the first one has the placeholder
    assert torch.isnan(batch["world_mm"][0][0]) and batch["world_mm"][0][1:].tolist() == [-99.5, -98.5]


def _evaluate(out: Path, datalist: Path, entries: list[dict], logits: list[float]) -> list[dict]:
    """Score ``entries`` (logit per entry) as evaluate.json does, batches of 3; the rows of the per-case file."""
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine
    from monai.transforms import Activationsd

    from dira3d.evaluation import MeanAUC

    data = [{**e, "image": MetaTensor(torch.tensor([x]), meta={"filename_or_obj": e["image"]}),
             "label": torch.tensor([float(e["label"])])} for e, x in zip(entries, logits)]
    writer = CasePredictionsWriter(out, datalist=datalist, entries=entries, id_column="seriesuid")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(data), batch_size=3),
        network=torch.nn.Identity(), postprocessing=Activationsd(keys="pred", sigmoid=True),
        key_val_metric={"auc": MeanAUC(output_transform=from_engine(["pred", "label"]))}, val_handlers=[writer])
    evaluator.run()
    return _read(out / CASES_FILE)


def test_the_per_case_file_holds_the_positions_that_exist_and_empty_cells_for_the_others(tmp_path):
    from dira3d.evaluation import load_split

    datalist = _candidates(tmp_path)
    entries = load_split(datalist, "test")
    logits = [-1.0, 2.0, -0.5, 1.0, 0.25, 3.0]
    rows = _evaluate(tmp_path / "out", datalist, entries, logits)
    assert list(rows[0]) == ["case", "seriesuid", "coordX", "coordY", "coordZ", "label", "probability"]
    assert [r["case"] for r in rows] == [f"cubes/c{i}.npy" for i in range(6)]
    assert [r["seriesuid"] for r in rows] == [f"1.3.6.{i // 2}" for i in range(6)]
    for i, row in enumerate(rows):
        where = [row[c] for c in ("coordX", "coordY", "coordZ")]
        assert where == (["", "", ""] if i in (0, 3) else [str(-100.5 + i), "20.25", str(-300.0 - i)]), (i, row)
        assert float(row["probability"]) == pytest.approx(1 / (1 + math.exp(-logits[i])), abs=1e-6)
    # entries that hold the placeholder alone (none of the scored ones has a position): no position columns
    blank = [{**e, "world_mm": [math.nan] * 3} for e in entries]
    rows = _evaluate(tmp_path / "blank", datalist, blank, logits)
    assert list(rows[0]) == ["case", "label", "probability"]
