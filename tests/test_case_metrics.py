"""Per-case test metrics of the segmentation bundles: ``test_cases.csv`` beside ``metrics.json``.

``metrics.json`` held the mean Dice / IoU of the test split only; the per-case values were in MONAI's
``<metric>_raw.csv`` under the image's absolute path, one file per metric, without saying which reference masks were
empty (an empty reference scores 1 or 0, and counts in the mean). ``test_cases.csv`` names each case as
``splits.json`` does, holds every metric and ``empty_reference``; its mean is ``metrics.json``'s figure, and under
DDP it holds every test case once."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import leaving_the_group, run_two_gloo_ranks
from dira3d.evaluation.case_metrics import CASES_FILE, CaseMetricsWriter, case_rows, write_case_rows

ROOT = Path(__file__).resolve().parents[1]
SEGMENTATION_BUNDLES = ("lidc_nodule_seg", "lits_liver_seg", "brats_tumor_seg", "siim_pneumothorax_seg",
                        "montgomery_lung_seg")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_rows_hold_each_metric_and_the_empty_flag_and_nan_is_an_empty_cell(tmp_path):
    details = {"dice": torch.tensor([[0.5], [1.0], [float("nan")]]), "iou": torch.tensor([[1 / 3], [1.0], [0.0]])}
    rows = case_rows(["a.nii.gz", "b.nii.gz", "c.nii.gz"], details, [False, True, False])
    assert rows[1] == {"case": "b.nii.gz", "dice": 1.0, "iou": 1.0, "empty_reference": 1}
    path = write_case_rows(tmp_path / CASES_FILE, rows)
    assert path.read_text().splitlines() == ["case,dice,iou,empty_reference", "a.nii.gz,0.5,0.3333333432674408,0",
                                             "b.nii.gz,1.0,1.0,1", "c.nii.gz,,0.0,0"]
    with pytest.raises(ValueError, match=r"metric 'iou' are 2 for 3 scored cases"):
        case_rows(["a", "b", "c"], {"iou": torch.tensor([[1.0], [0.0]])})
    with pytest.raises(ValueError, match="2 empty-reference flags for 3"):
        case_rows(["a", "b", "c"], {}, [True, False])


def test_every_segmentation_bundle_writes_the_per_case_rows_in_its_evaluation():
    from monai.bundle import ConfigParser

    for bundle in SEGMENTATION_BUNDLES:
        evaluate = json.loads((ROOT / "bundles" / bundle / "configs" / "evaluate.json").read_text(encoding="ascii"))
        targets = [h.get("_target_") for h in evaluate["validate#handlers"] if isinstance(h, dict)]
        # after MetricsSaver, as the metrics it reads are attached before any handler
        assert targets.index("dira3d.evaluation.CaseMetricsWriter") > targets.index("MetricsSaver"), bundle
        writer = next(h for h in evaluate["validate#handlers"] if h.get("_target_") == "dira3d.evaluation.CaseMetricsWriter")
        assert writer == {"_target_": "dira3d.evaluation.CaseMetricsWriter", "save_dir": "@output_dir",
                          "datalist": "@datalist", "entries": "@validate#datalist", "split": "@eval_split"}, bundle
    assert ConfigParser({"w": {"_target_": "dira3d.evaluation.CaseMetricsWriter", "save_dir": "x"}}).get_parsed_content("w")


def _empty_test_mask(datalist: Path) -> str:
    """Blank the first test case's mask; return its image as the datalist lists it."""
    entry = json.loads(datalist.read_text())["test"][0]
    label = datalist.parent / entry["label"]
    image = nib.load(str(label))
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(label))
    return entry["image"]


def test_finetune_writes_one_row_per_test_case_whose_mean_is_the_metrics_json_figure(tmp_path):
    from test_bundles_finetune import SEGMENTATION, make_segmentation

    from dira3d.evaluation.finetune import run_finetune

    name, shape, channels = SEGMENTATION["lidc_nodule_seg"]
    datalist, _ = make_segmentation(tmp_path / "data", name, shape, channels, n_train=4, n_test=3)
    blank = _empty_test_mask(datalist)
    out = tmp_path / "run"
    result = run_finetune("lidc_nodule_seg", {"datalist": str(datalist), "seed": 0}, output_dir=out, tiny=True)
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["test_cases"] == result["test_cases"] == CASES_FILE
    rows = _read(out / CASES_FILE)
    assert list(rows[0]) == ["case", "dice", "iou", "empty_reference"]
    # the ids of splits.json, every test case once
    assert sorted(r["case"] for r in rows) == json.loads((out / "splits.json").read_text())["test"]["cases"]
    assert {r["case"]: r["empty_reference"] for r in rows} == {f"vols/test{i}_img.nii.gz": "1" if i == 0 else "0"
                                                             for i in range(3)} and blank == "vols/test0_img.nii.gz"
    for metric in ("dice", "iou"):  # empty references count (1 or 0), as in metrics.json's mean
        values = [float(r[metric]) for r in rows if r[metric] != ""]
        assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)
        assert float(np.mean(values)) == pytest.approx(recorded["metrics"][metric], rel=1e-6, abs=1e-7), (metric, rows)
    assert recorded["splits"]["test"]["positive"] == sum(r["empty_reference"] == "0" for r in rows)


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from monai.data import DataLoader, Dataset, DistributedSampler, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine

    from dira3d.evaluation import ForegroundDice, ForegroundIoU

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        folder = Path(out).parent / "data"
        data = []
        for i in range(5):  # an odd count: rank 0 scores 3, rank 1 scores 2
            label = torch.zeros(1, 4, 4)
            label[0, : i, :2] = 1  # case 0 empty; case i has 2i foreground pixels
            image = MetaTensor(torch.ones(1, 4, 4) * (i >= 2), meta={"filename_or_obj": str(folder / f"c{i}.png")})
            data.append({"image": image, "label": label})
        entries = [{"image": str(folder / f"c{i}.png")} for i in range(5)]
        loader = DataLoader(Dataset(data), batch_size=2,
                            sampler=DistributedSampler(Dataset(data), even_divisible=False, shuffle=False))

        class Threshold(torch.nn.Module):  # predicts the image: cases 2-4 all foreground, 0-1 empty
            def forward(self, x):
                return x

        evaluator = SupervisedEvaluator(
            device=torch.device("cpu"), val_data_loader=loader, network=Threshold(),
            key_val_metric={"dice": ForegroundDice(output_transform=from_engine(["pred", "label"]))},
            additional_metrics={"iou": ForegroundIoU(output_transform=from_engine(["pred", "label"]))},
            val_handlers=[CaseMetricsWriter(save_dir=Path(out).parent, datalist=folder / "d.json", entries=entries)])
        evaluator.run()
        result = {"mean": float(evaluator.state.metrics["dice"]), "file": getattr(evaluator.state, "case_metrics_file", None)}
    torch.save(result, f"{out}.{rank}")


def test_under_ddp_rank_0_writes_every_test_case_once(tmp_path):
    main, other = run_two_gloo_ranks(_ddp_worker, tmp_path)
    assert main["file"] == str(tmp_path / CASES_FILE) and other["file"] is None  # rank 0 alone writes
    rows = _read(tmp_path / CASES_FILE)
    assert sorted(r["case"] for r in rows) == [f"c{i}.png" for i in range(5)]
    by_case = {r["case"]: r for r in rows}
    # prediction empty for c0 (empty reference: 1) and c1 (0); full for c2-c4: Dice 2|G| / (|G| + 16), G = 2i pixels
    expected = {0: 1.0, 1: 0.0, **{i: 4 * i / (2 * i + 16) for i in (2, 3, 4)}}
    for i, dice in expected.items():
        row = by_case[f"c{i}.png"]
        assert float(row["dice"]) == pytest.approx(dice, rel=1e-6), row
        assert float(row["iou"]) == pytest.approx(dice / (2 - dice), rel=1e-6), row
        assert row["empty_reference"] == ("1" if i == 0 else "0")
    assert main["mean"] == pytest.approx(float(np.mean(list(expected.values()))), rel=1e-6)
    assert not math.isnan(main["mean"])
