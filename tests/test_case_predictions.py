"""Per-case test predictions of the classification bundles: ``test_cases.csv`` beside ``metrics.json``.

The classification bundles wrote no per-case file: the AUC is not per case, but bootstrapping its confidence
interval, comparing two models case by case (DeLong) or running the LUNA16 challenge's FROC evaluation needs each
case's label and probability. ``test_cases.csv`` names each case as ``splits.json`` does and holds the label(s),
binarised as the AUC binarises them, and the probability(ies) as the AUC scores them: ``roc_auc_score`` over its
columns is ``metrics.json``'s AUC; LUNA16 / PE-CAD rows carry the candidate's scan and world position; under DDP
it holds every test case once."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import leaving_the_group, run_two_gloo_ranks
from dira3d.evaluation.case_metrics import CASES_FILE, CasePredictionsWriter, prediction_columns, prediction_rows

ROOT = Path(__file__).resolve().parents[1]
WRITERS = {"luna16_nodule_fpr": {"id_column": "seriesuid"}, "pecad_embolism_fpr": {"id_column": "patient_id"},
           "chestxray14_cls": {"class_names": "@class_names"}, "chexpert_cls": {"class_names": "@class_names"}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _mean_auc(rows: list[dict], classes: list[str]) -> float:
    """sklearn's AUC of each class of both values in the rows, averaged (one class: its AUC)."""
    columns = [("label", "probability")] if not classes else [(f"label_{c}", f"probability_{c}") for c in classes]
    aucs = []
    for label, probability in columns:
        y = [int(r[label]) for r in rows]
        if len(set(y)) == 2:
            aucs.append(roc_auc_score(y, [float(r[probability]) for r in rows]))
    return float(np.mean(aucs))


def test_rows_binarise_labels_as_the_auc_and_name_columns_after_the_classes(tmp_path):
    rows = prediction_rows(["a.png", "b.png"], [[0.7, 0.0], [0.3, 1.0]], [[0.25, 0.5], [0.75, 1.0]], ["Edema", "Mass"])
    assert rows == [{"case": "a.png", "label_Edema": 1, "label_Mass": 0, "probability_Edema": 0.25, "probability_Mass": 0.5},
                    {"case": "b.png", "label_Edema": 0, "label_Mass": 1, "probability_Edema": 0.75, "probability_Mass": 1.0}]
    one = prediction_rows(["c.nii.gz"], [[1.0]], [[0.125]], ["nodule"],
                          [{"seriesuid": "1.3.6", "coordX": -1.5, "coordY": 2.0, "coordZ": 3.25}])
    assert one == [{"case": "c.nii.gz", "seriesuid": "1.3.6", "coordX": -1.5, "coordY": 2.0, "coordZ": 3.25,
                    "label": 1, "probability": 0.125}]
    assert prediction_columns([], 1) == (["label"], ["probability"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prediction_columns([], 2) == (["label_class0", "label_class1"], ["probability_class0", "probability_class1"])
    with pytest.warns(UserWarning, match="class_names names 1 classes for the 2 outputs"):
        assert prediction_columns(["A"], 2)[1] == ["probability_A", "probability_class1"]
    with pytest.raises(ValueError, match="1 predictions and 1 labels for 2 scored cases"):
        prediction_rows(["a", "b"], [[1.0]], [[0.5]])
    with pytest.raises(ValueError, match="labels of 2 classes for probabilities of 1"):
        prediction_rows(["a"], [[1.0, 0.0]], [[0.5]])


def test_every_classification_bundle_writes_the_per_case_predictions_in_its_evaluation():
    from monai.bundle import ConfigParser

    for bundle, settings in WRITERS.items():
        configs = ROOT / "bundles" / bundle / "configs"
        evaluate = json.loads((configs / "evaluate.json").read_text(encoding="ascii"))
        targets = [h.get("_target_") for h in evaluate["validate#handlers"] if isinstance(h, dict)]
        assert targets.index("dira3d.evaluation.CasePredictionsWriter") > targets.index("MetricsSaver"), bundle
        writer = next(h for h in evaluate["validate#handlers"] if h.get("_target_") == "dira3d.evaluation.CasePredictionsWriter")
        assert writer == {"_target_": "dira3d.evaluation.CasePredictionsWriter", "save_dir": "@output_dir",
                          "datalist": "@datalist", "entries": "@validate#datalist", **settings, "split": "@eval_split"}, bundle
        parser = ConfigParser()
        parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
        if "class_names" in settings:  # one name per output
            assert len(parser.get_parsed_content("class_names")) == parser.get_parsed_content("out_channels"), bundle
        else:
            assert parser.get_parsed_content("out_channels") == 1, bundle


@pytest.mark.parametrize("bundle", ["luna16_nodule_fpr", "pecad_embolism_fpr"])
def test_candidate_finetune_writes_each_candidate_with_its_scan_and_position_and_the_auc_of_metrics_json(bundle, tmp_path):
    from test_bundles_finetune import CLASSIFICATION, make_classification

    from dira3d.evaluation.finetune import run_finetune

    name, shape = CLASSIFICATION[bundle]
    datalist = make_classification(tmp_path / "data", name, shape, folds=bundle.startswith("pecad"))
    content = json.loads(datalist.read_text())
    by_image = {}
    for i, entry in enumerate(e for split in ("training", "test") for e in content.get(split, [])):
        # as dira3d prepare luna16 / pecad write them: the scan (patient) and the world position in mm
        entry.update(case_id=f"1.3.6.1.{i // 2}", world_mm=[-100.5 + i, 20.25, -300.0 - i])
        by_image[entry["image"]] = entry
    datalist.write_text(json.dumps(content))
    out = tmp_path / "run"
    result = run_finetune(bundle, {"datalist": str(datalist), "seed": 0}, output_dir=out, tiny=True)
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["test_cases"] == result["test_cases"] == CASES_FILE
    rows = _read(out / CASES_FILE)
    scan = WRITERS[bundle]["id_column"]
    assert list(rows[0]) == ["case", scan, "coordX", "coordY", "coordZ", "label", "probability"]
    assert sorted(r["case"] for r in rows) == json.loads((out / "splits.json").read_text())["test"]["cases"]
    for row in rows:
        entry = by_image[row["case"]]
        assert row[scan] == entry["case_id"] and int(row["label"]) == entry["label"]
        assert [float(row[c]) for c in ("coordX", "coordY", "coordZ")] == entry["world_mm"]
        assert 0.0 <= float(row["probability"]) <= 1.0
    assert len({r[scan] for r in rows}) > 1 and len({r["label"] for r in rows}) == 2
    assert _mean_auc(rows, []) == pytest.approx(recorded["metrics"]["auc"], abs=1e-9)


def test_chexpert_finetune_writes_a_column_per_class_whose_mean_auc_is_metrics_json(tmp_path):
    from test_bundles_2d import TINY_NET, write_cxr

    from dira3d.evaluation.finetune import run_finetune

    datalist = write_cxr(tmp_path / "data", "chexpert.json", 5, soft=True, test=6)
    content = json.loads(datalist.read_text())
    content["test"][0]["label"] = [0.7, 0.6, 0.3, 0.0, 0.0]  # soft labels, binarised at 0.5 as the AUC does
    for entry in content["test"]:  # class 4 all negative: no AUC, left out of the mean
        entry["label"][4] = 0.0
    datalist.write_text(json.dumps(content))
    out = tmp_path / "run"
    overrides = {"datalist": str(datalist), "pretrained": "", "seed": 0, **TINY_NET}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the test split's class of one value
        result = run_finetune("chexpert_cls", overrides, output_dir=out, tiny=True)
    classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    rows = _read(out / CASES_FILE)
    assert list(rows[0]) == ["case", *[f"label_{c}" for c in classes], *[f"probability_{c}" for c in classes]]
    assert sorted(r["case"] for r in rows) == json.loads((out / "splits.json").read_text())["test"]["cases"]
    first = next(r for r in rows if r["case"] == content["test"][0]["image"])
    assert [first[f"label_{c}"] for c in classes] == ["1", "1", "0", "0", "0"]
    assert _mean_auc(rows, classes) == pytest.approx(result["metrics"]["auc"], abs=1e-9)
    assert result["test_cases"] == CASES_FILE


LOGITS = [[-2.0, 1.0], [0.5, -1.0], [1.5, 0.0], [-0.5, 2.0], [3.0, -3.0]]
LABELS = [[0, 1], [1, 0], [0, 0], [1, 1], [1, 0]]


def _evaluate(folder: Path, distributed: bool, **writer) -> Any:
    """Score 5 two-class cases whose logits are their images (rank 0 scores 3, rank 1 scores 2 under DDP)."""
    from monai.data import DataLoader, Dataset, DistributedSampler, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine
    from monai.transforms import Activationsd

    from dira3d.evaluation import MeanAUC

    data = [{"image": MetaTensor(torch.tensor(x), meta={"filename_or_obj": str(folder / f"c{i}.png")}),
             "label": torch.tensor(y, dtype=torch.float32)} for i, (x, y) in enumerate(zip(LOGITS, LABELS))]
    sampler = DistributedSampler(Dataset(data), even_divisible=False, shuffle=False) if distributed else None
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(data), batch_size=2, sampler=sampler),
        network=torch.nn.Identity(), postprocessing=Activationsd(keys="pred", sigmoid=True),
        key_val_metric={"auc": MeanAUC(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[CasePredictionsWriter(datalist=folder / "d.json", class_names=["A", "B"], **writer)])
    evaluator.run()
    return evaluator


def test_entries_without_positions_give_no_position_columns(tmp_path):
    entries = [{"image": str(tmp_path / f"c{i}.png"), "case_id": f"p{i}"} for i in range(5)]
    evaluator = _evaluate(tmp_path, False, save_dir=tmp_path, entries=entries, id_column="seriesuid")
    rows = _read(Path(evaluator.state.case_metrics_file))
    assert list(rows[0]) == ["case", "label_A", "label_B", "probability_A", "probability_B"]
    assert [r["case"] for r in rows] == [f"c{i}.png" for i in range(5)]


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        folder = Path(out).parent / "data"
        entries = [{"image": str(folder / f"c{i}.png")} for i in range(5)]
        evaluator = _evaluate(folder, True, save_dir=Path(out).parent, entries=entries)
        result = {"auc": float(evaluator.state.metrics["auc"]), "file": getattr(evaluator.state, "case_metrics_file", None)}
    torch.save(result, f"{out}.{rank}")


def test_under_ddp_rank_0_writes_every_test_case_once_with_its_own_prediction(tmp_path):
    main, other = run_two_gloo_ranks(_ddp_worker, tmp_path)
    assert main["file"] == str(tmp_path / CASES_FILE) and other["file"] is None  # rank 0 alone writes
    rows = _read(tmp_path / CASES_FILE)
    assert sorted(r["case"] for r in rows) == [f"c{i}.png" for i in range(5)]
    logits, labels = ({f"c{i}.png": v for i, v in enumerate(values)} for values in (LOGITS, LABELS))
    for row in rows:  # each case's own values, not another rank's
        assert [float(row["probability_A"]), float(row["probability_B"])] == pytest.approx(
            [1 / (1 + np.exp(-v)) for v in logits[row["case"]]], rel=1e-6)
        assert [int(row["label_A"]), int(row["label_B"])] == labels[row["case"]]
    assert _mean_auc(rows, ["A", "B"]) == pytest.approx(main["auc"], abs=1e-9) == pytest.approx(other["auc"], abs=1e-9)


def test_the_rows_of_the_ranks_merge_in_rank_order_and_a_rank_without_a_case_adds_none():
    from dira3d.evaluation.case_metrics import merge_rank_values

    rank0, rank1 = [[1.0, 0.0, 0.25, 0.75]], [[0.0, 1.0, 0.5, 0.125], [1.0, 1.0, 1.0, 0.0]]
    assert merge_rank_values([rank0, rank1, []]) == [*rank0, *rank1]
    assert merge_rank_values([[], rank1]) == rank1 and merge_rank_values([[], []]) == []
    with pytest.raises(ValueError, match="hold 2 or 4 values; every rank must score the same network"):
        merge_rank_values([rank0, [[1.0, 0.5]]])


def test_with_more_ranks_than_cases_rank_0_writes_every_case_once_with_a_column_per_output(tmp_path, thread_ranks):
    """3 ranks, 2 cases of a two-output network without class_names: rank 2 scores none. It cannot know the number of
    outputs and padded its empty rows to 2 values (label, probability) against the others' 4, which the gather of the
    rows refused; and the ids' gather (MONAI's string_list_all_gather) gave it one empty id."""
    from ignite.engine import Engine
    from types import SimpleNamespace

    ranks = thread_ranks(3)
    cases = {0: [("c0.png", [0.25, 0.75], [0.0, 1.0])], 1: [("c1.png", [0.5, 0.125], [1.0, 0.0])], 2: []}

    def rank(number: int) -> Any:
        writer = CasePredictionsWriter(save_dir=tmp_path, batch_transform=lambda batch: [{"filename_or_obj": n} for n in batch[0]],
                                       output_transform=lambda output: output)
        batches = [([name], ([torch.tensor(p)], [torch.tensor(y)])) for name, p, y in cases[number]]
        engine = Engine(lambda engine, batch: batch[1])
        if not batches:  # no case: only the gather at the end of the evaluation
            writer(SimpleNamespace(state=SimpleNamespace()))
            return None
        writer.attach(engine)
        engine.run(batches)
        return getattr(engine.state, "case_metrics_file", None)

    assert ranks.run(rank) == [str(tmp_path / CASES_FILE), None, None]  # rank 0 alone writes
    rows = _read(tmp_path / CASES_FILE)
    assert rows == [{"case": "c0.png", "label_class0": "0", "label_class1": "1", "probability_class0": "0.25",
                     "probability_class1": "0.75"},
                    {"case": "c1.png", "label_class0": "1", "label_class1": "0", "probability_class0": "0.5",
                     "probability_class1": "0.125"}]
