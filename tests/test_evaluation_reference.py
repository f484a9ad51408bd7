"""Reference checks of the evaluation code that produces the published numbers (a mutation audit of
dira3d.evaluation): each test compares with an independent reference (scikit-learn, scipy, hand-computed Dice,
IoU and box overlaps on tiny arrays, the protocol of METHOD.md), so that a flipped comparison, a wrong summary
or a swapped argument fails here rather than changing a table silently."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from ignite.engine import Engine
from scipy import stats
from sklearn.metrics import roc_auc_score

from dira3d.evaluation import BestModelSaver, ForegroundDice, ForegroundIoU, finetune
from dira3d.evaluation.datalists import holdout_by_patient, load_split, select_fraction
from dira3d.evaluation.experiment import ExperimentRunsFailed, load_config, run_experiment
from dira3d.evaluation.gradcam import boxes_from_heatmap, gradcam_maps, localisation_accuracy
from dira3d.evaluation.metrics import foreground_dice, foreground_iou, mean_auc, per_class_auc
from dira3d.evaluation.results import FIELDS, SPLIT_FIELDS, read_rows, seed_values
from dira3d.evaluation.stats import aggregate, compare_to_baseline
from dira3d.evaluation.transforms import NormalizeScand


# ---------------------------------------------------------------- metrics.py: AUC, Dice, IoU by independent references


def test_foreground_dice_and_iou_are_the_mean_over_cases_not_another_summary():
    """Three cases of Dice 1 (both empty), 2/3 and 0 (IoU 1, 1/2, 0): the Dice is their mean 5/9, not their
    median 2/3 (the IoU's mean and median are both 1/2)."""
    pred = np.zeros((3, 1, 4, 4), np.float32)
    label = np.zeros((3, 1, 4, 4), np.float32)
    pred[1, 0, 0, :2] = 1  # 2 voxels
    label[1, 0, 0, :] = 1  # 4 voxels, 2 shared: Dice 2*2/6, IoU 2/4
    pred[2, 0, 3, 3] = 1  # a prediction where the truth is empty: 0
    dice = [1.0, 2 * 2 / (2 + 4), 0.0]
    iou = [1.0, 2 / 4, 0.0]
    assert foreground_dice(pred, label) == pytest.approx(sum(dice) / 3)
    assert foreground_iou(pred, label) == pytest.approx(sum(iou) / 3)


def test_foreground_dice_binarises_probabilities_at_one_half():
    """A probability map is scored as the bundles' AsDiscreted(threshold=0.5) binarises it: 0.45 is background."""
    label = np.zeros((6, 6), np.float32)
    label[:3, :] = 1  # 18 voxels
    pred = np.zeros((6, 6), np.float32)
    pred[:2, :] = 0.9  # 12 voxels inside the label
    pred[2:4, :] = 0.45  # below 0.5: not predicted (else 6 more true and 6 false positives)
    expected_dice = 2 * 12 / (12 + 18)
    assert foreground_dice(pred, label) == pytest.approx(expected_dice)
    assert foreground_iou(pred, label) == pytest.approx(12 / 18)


def test_foreground_dice_counts_a_probability_of_exactly_one_half_as_foreground_as_asdiscrete_does():
    """MONAI's AsDiscrete(threshold=0.5), which the bundles' postprocessing applies, keeps p >= 0.5; foreground_dice /
    foreground_iou used p > 0.5, so a voxel of exactly 0.5 was foreground in the bundles' masks and background here."""
    from monai.transforms import AsDiscrete

    label = np.zeros((6, 6), np.float32)
    label[:3, :] = 1  # 18 voxels
    pred = np.zeros((6, 6), np.float32)
    pred[:2, :] = 0.9
    pred[2, :] = 0.5  # 6 more voxels inside the label
    pred[3, :] = 0.5  # 6 false positives
    as_bundle = AsDiscrete(threshold=0.5)(torch.as_tensor(pred)[None]).numpy()[0]
    assert as_bundle.sum() == 24  # MONAI's convention, which the bundles follow
    assert foreground_dice(pred, label) == pytest.approx(foreground_dice(as_bundle, label)) == pytest.approx(2 * 18 / 42)
    assert foreground_iou(pred, label) == pytest.approx(18 / 24)
    # the ground truth too: a soft label of 0.5 is foreground
    assert foreground_dice(np.full((4, 4), 1.0, np.float32), np.full((4, 4), 0.5, np.float32)) == 1.0


def test_per_class_auc_binarises_soft_labels_at_one_half_as_sklearn_on_the_rounded_labels():
    """CheXpert's soft labels: 0.45 is negative, 0.5 and above positive (independent reference: scikit-learn on the
    labels binarised at 0.5)."""
    scores = np.array([[0.9, 0.1], [0.6, 0.7], [0.4, 0.3], [0.2, 0.8], [0.7, 0.6]])
    soft = np.array([[1.0, 0.0], [0.45, 1.0], [0.0, 0.45], [0.5, 1.0], [0.0, 0.0]])
    hard = (soft >= 0.5).astype(int)
    expected = [roc_auc_score(hard[:, k], scores[:, k]) for k in range(2)]
    assert per_class_auc(scores, soft) == pytest.approx(expected)
    assert mean_auc(scores, soft) == pytest.approx(np.mean(expected))


def test_foreground_iou_handler_scores_an_empty_prediction_of_an_empty_mask_as_one():
    """ForegroundIoU (the bundles' test `iou`), as foreground_iou: cases of IoU 1 (both empty) and 1/4 (a quarter of
    the mask predicted), mean 5/8; a mean over the non-empty masks only (MONAI's ignore_empty) would give 1/4."""
    empty, full, quarter = torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.zeros(1, 4, 4)
    quarter[0, :1] = 1  # 4 of the 16 voxels
    engine = Engine(lambda engine, batch: batch)
    ForegroundIoU(save_details=False).attach(engine, "iou")
    ForegroundDice(save_details=False).attach(engine, "dice")
    engine.run([[[empty, quarter], [empty, full]]])
    assert engine.state.metrics["iou"] == pytest.approx((1 + 4 / 16) / 2)
    assert engine.state.metrics["dice"] == pytest.approx((1 + 2 * 4 / (4 + 16)) / 2)


# ---------------------------------------------------------------- stats.py: mean ± std and the t-tests, against scipy


def _rows(values: dict[str, list[float]], fraction: float = 0.5, metric: str = "auc") -> list[dict]:
    return [{"method": method, "label_fraction": fraction, "seed": seed, metric: value}
            for method, column in values.items() for seed, value in enumerate(column)]


def test_paired_test_is_undefined_where_every_pair_differs_by_the_same_decimal_amount():
    """0.5757 - 0.5574, 0.6619 - 0.6436 and 0.5095 - 0.4912 are all 0.0183 but differ in the last bits of their
    floats: scipy's ttest_rel gives t ~ 4e14, p ~ 7e-30, for what is no spread at all (p n/a)."""
    a, b = [0.5757, 0.6619, 0.5095], [0.5574, 0.6436, 0.4912]
    assert stats.ttest_rel(a, b).pvalue < 1e-20  # what the test would report without the tolerance
    cells = compare_to_baseline(aggregate(_rows({"dira": a, "random": b}), "auc"), "random", paired=True)
    assert [(c.method, c.p_value, c.pairs) for c in cells] == [("dira", None, 3), ("random", None, None)]


# ---------------------------------------------------------------- results.py: one value per seed, rows read back


def test_a_seeds_value_is_the_mean_over_the_listed_folds_only():
    """With folds [0, 1], a row of fold 2 (a results.csv of an earlier folds list, its experiment.json deleted) is not
    averaged in: the seed's value is (0.6 + 0.8) / 2, not the mean over three folds."""
    config = {"metric": "auc", "methods": {"random": None}, "label_fractions": [1.0], "seeds": [0], "folds": [0, 1]}
    rows = [{"method": "random", "label_fraction": "1.0", "seed": "0", "fold": str(k), "value": str(v)}
            for k, v in ((0, 0.6), (1, 0.8), (2, 0.1))]
    values, incomplete = seed_values(config, rows)
    assert values == [{"method": "random", "label_fraction": 1.0, "seed": 0, "auc": pytest.approx(0.7)}]
    assert incomplete == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_results_row_of_a_value_that_is_not_a_finite_number_is_refused_naming_its_line(tmp_path, value):
    """A NaN in results.csv (an edited file, or a run recorded before undefined metrics were refused) would make
    the mean ± std and the t-test of its cell NaN; it is refused with its line, as a garbled row."""
    csv_path = tmp_path / "results.csv"
    header = ",".join(FIELDS)
    row = f"random,,1.0,0,auc,0.7,1.0,{tmp_path / 'a'}" + "," * len(SPLIT_FIELDS)  # the split columns empty
    csv_path.write_text(f"{header}\n{row}\n{row.replace(',0.7,', f',{value},').replace(',0,auc', ',1,auc')}\n")
    with pytest.raises(ValueError, match=r"results\.csv line 3 is incomplete or garbled"):
        read_rows(csv_path)
    csv_path.write_text(f"{header}\n{row}\n")
    assert [r["value"] for r in read_rows(csv_path)] == ["0.7"]


# ---------------------------------------------------------------- the experiment grid: what each run is given and what is kept


def _experiment(tmp_path, **extra):
    (tmp_path / "dl.json").write_text("{}")
    cfg = {"bundle": "lidc_nodule_seg", "datalist": "dl.json", "metric": "iou", "output_dir": "out", "seeds": [0, 1],
           "label_fractions": [1.0], "methods": {"random": None}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path)


def test_results_csv_records_the_configs_metric_among_those_a_run_returns(tmp_path):
    """A segmentation run returns dice and iou; an experiment on iou records iou (0.5x), never the larger dice."""
    config = _experiment(tmp_path)
    rows = run_experiment(config, runner=lambda bundle, o: {"dice": 0.9, "iou": 0.5 + 0.01 * o["seed"]}, log=lambda _: None)
    assert [(r["metric"], float(r["value"])) for r in rows] == [("iou", 0.5), ("iou", 0.51)]


def test_a_nan_test_metric_is_a_failed_run_and_not_a_row(tmp_path):
    """A runner's NaN (not only run_finetune's None) is an undefined metric: no NaN row, which would make its
    cell's mean, std and t-test NaN."""
    config = _experiment(tmp_path)
    runner = lambda bundle, o: {"dice": 0.9, "iou": float("nan") if o["seed"] == 1 else 0.5}  # noqa: E731
    with pytest.raises(ExperimentRunsFailed, match=r"1 of 2 runs failed.*'iou' is undefined \(NaN\)"):
        run_experiment(config, runner=runner, log=lambda _: None)
    assert [r["seed"] for r in read_rows(tmp_path / "out" / "results.csv")] == ["0"]


def test_the_default_runner_replaces_a_failed_attempt_and_passes_tiny_as_the_tiny_configs(monkeypatch):
    """A cell without a row is run again into its folder, which holds only an interrupted or failed attempt: it
    must be replaced (overwrite), or every retry of a failed run failed on the folder it left."""
    from dira3d.evaluation import experiment_grid

    seen = {}

    def fake_run_finetune(bundle, overrides, **kwargs):
        seen.update(bundle=bundle, overrides=overrides, **kwargs)
        return {"metrics": {"auc": 0.7}}

    monkeypatch.setattr(finetune, "run_finetune", fake_run_finetune)
    assert experiment_grid._default_runner("luna16_nodule_fpr", {"tiny": True, "seed": 3}) == {"auc": 0.7}
    assert seen == {"bundle": "luna16_nodule_fpr", "overrides": {"seed": 3}, "tiny": True, "overwrite": True}


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1])
def test_a_label_fraction_of_zero_is_refused_before_any_run(tmp_path, fraction):
    with pytest.raises(ValueError, match=rf"label fraction {fraction} in .* must be in \(0, 1\]"):
        _experiment(tmp_path, label_fractions=[fraction])


def test_an_interrupted_pretraining_is_resumed_not_fine_tuned_from(tmp_path, monkeypatch):
    """A method's pretraining stopped mid-way has a best.pt of its early epochs but no done.json: the grid resumes
    it (the bundle's own resume from last.pt) instead of fine-tuning every run from the unfinished checkpoint; a
    finished one (done.json) is reused without running again."""
    from dira3d.evaluation.experiment_pretrain import SETTINGS_NAME, pretrain_method, pretrain_settings

    config = {"output_dir": str(tmp_path / "out"), "pretrain": {"dataset_dir": str(tmp_path / "vw"), "overrides": {}}}
    folder, settings = pretrain_settings("dira", {"pretrain": {"max_epochs": 4}}, config)
    (folder / "models").mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        (folder / "models" / name).write_bytes(b"epoch 1 of 4")
    (folder / SETTINGS_NAME).write_text(json.dumps(settings))
    runs = []
    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", lambda configs, **kwargs: runs.append(kwargs))
    best = pretrain_method("dira", {"pretrain": {"max_epochs": 4}}, config, log=lambda _: None)
    assert best == str(folder / "models" / "best.pt") and len(runs) == 1 and runs[0]["bundle_root"] == str(folder)
    assert (folder / "done.json").is_file()
    pretrain_method("dira", {"pretrain": {"max_epochs": 4}}, config, log=lambda _: None)
    assert len(runs) == 1


# ---------------------------------------------------------------- label fractions and the early-stopping holdout


def test_label_fraction_keeps_the_nearest_whole_number_of_each_class_and_of_patients():
    """0.3 of a class of 9 is 2.7: 3 are kept (rounded, not cut to 2); 0.3 of 9 patients is 3 patients."""
    entries = [{"image": f"{i}", "label": int(i < 9), "case_id": f"p{i}"} for i in range(29)]  # 9 positives, 20 negatives
    kept = select_fraction(entries, 0.3, seed=0)
    assert sum(e["label"] for e in kept) == 3 and len(kept) == 3 + 6
    scans = [{"image": f"{p}_{k}", "label": f"{p}_{k}_seg", "case_id": f"p{p}"} for p in range(9) for k in range(2)]
    assert len({e["case_id"] for e in select_fraction(scans, 0.3, seed=0)}) == 3


@pytest.mark.parametrize("fraction, patients, kept", [(0.25, 10, 3), (0.05, 10, 1), (0.15, 10, 2), (0.35, 10, 4),
                                                      (0.45, 10, 5), (0.5, 5, 3), (0.1, 25, 3), (0.35, 90, 32),
                                                      (0.24, 10, 2), (0.26, 10, 3), (0.01, 10, 1)])
def test_a_label_fraction_rounds_a_half_up(fraction, patients, kept):
    """The count is fraction x patients rounded to the nearest, a half up, at least one: 25 % of 10 patients keeps 3
    (Python's round, half to even, kept 2; 45 % kept 4), 35 % of 90 is 31.4999... in floats and keeps 32. The same
    rule for each class of a classification list."""
    scans = [{"image": f"{p}_{k}", "label": f"{p}_{k}_seg", "case_id": f"p{p}"} for p in range(patients) for k in range(2)]
    assert len({e["case_id"] for e in select_fraction(scans, fraction, seed=3)}) == kept
    labelled = [{"image": f"{i}", "label": int(i < patients), "case_id": f"c{i}"} for i in range(2 * patients)]
    chosen = select_fraction(labelled, fraction, seed=3)
    assert sum(e["label"] for e in chosen) == kept and len(chosen) == 2 * kept


@pytest.mark.parametrize("count, held", [(25, 3), (14, 2), (10, 1)])
def test_the_holdout_holds_at_least_its_share_of_the_entries(count, held):
    """10 % of 25 one-scan patients is 2.5: the holdout takes 3 (at least 10 %, as METHOD.md's protocol says), not 2."""
    entries = [{"image": f"{p}.nii.gz", "label": f"{p}_seg.nii.gz", "case_id": f"p{p}"} for p in range(count)]
    train, holdout = holdout_by_patient(entries, 0.1, seed=0)
    assert len(holdout) == held and len(train) == count - held


def _segmentation_datalist(folder, patients: int = 12):
    entries = [{"image": f"{p}.nii.gz", "label": f"{p}_seg.nii.gz", "case_id": f"p{p}"} for p in range(patients)]
    test = [{"image": "t.nii.gz", "label": "t_seg.nii.gz", "case_id": "t"}]
    for entry in entries + test:
        for key in ("image", "label"):
            (folder / entry[key]).write_bytes(b"")
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries, "test": test}))
    return path, entries


def test_load_split_draws_the_label_subset_and_the_holdout_with_the_runs_seed(tmp_path):
    """Each seed of a grid is its own draw of the label subset (METHOD.md: runs repeated over seeds); the train and
    holdout of one seed are that seed's subset, split by patient."""
    path, entries = _segmentation_datalist(tmp_path)
    subsets = []
    for seed in range(4):
        train = load_split(path, "train", label_fraction=0.5, seed=seed)
        holdout = load_split(path, "holdout", label_fraction=0.5, seed=seed)
        chosen = {e["case_id"] for e in select_fraction(entries, 0.5, seed)}
        assert {e["case_id"] for e in train} | {e["case_id"] for e in holdout} == chosen
        assert not {e["case_id"] for e in train} & {e["case_id"] for e in holdout}
        subsets.append(frozenset(chosen))
    assert len(set(subsets)) > 1


def test_a_soft_label_of_one_half_is_a_positive_in_the_split_counts_as_in_the_auc():
    """The split counts (metrics.json `splits`, results.csv test_positive) and the holdout completion count a class
    as positive at >= 0.5, as per_class_auc scores it: 0.5 is positive, 0.45 is not."""
    from dira3d.evaluation.split_checks import describe_split

    labels = [[0.5, 0.0], [0.0, 1.0], [0.45, 0.5]]
    entries = [{"image": f"{i}.png", "case_id": f"p{i}", "label": label} for i, label in enumerate(labels)]
    assert describe_split(entries)["positive"] == (np.asarray(labels) >= 0.5).sum(0).tolist() == [1, 2]


# ---------------------------------------------------------------- BestModelSaver: the model that is tested is the best epoch's


def _saved_epoch(path) -> int:
    return int(torch.load(path, weights_only=True)["weight"].item())


def test_best_model_saver_keeps_the_first_epoch_of_the_highest_holdout_value(tmp_path):
    """Holdout values NaN, 0.5, 0.7, 0.7, 0.6 (the network's weight is the epoch number): the first validation is
    saved whatever its value, a NaN best is replaced by the first real value, the metric is maximised, and a tie
    does not replace the earlier model (a tie is no improvement, as for the early stopping): epoch 2 is kept."""
    network = torch.nn.Linear(1, 1, bias=False)
    saver = BestModelSaver(torch.nn.DataParallel(network), tmp_path / "model.pt", "val_auc")  # a wrapped network
    saved = []
    for epoch, value in enumerate([float("nan"), 0.5, 0.7, 0.7, 0.6]):
        with torch.no_grad():
            network.weight.fill_(epoch)
        saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_auc": value})))
        saved.append(_saved_epoch(tmp_path / "model.pt"))
    assert saved == [0, 1, 2, 2, 2]
    assert list(torch.load(tmp_path / "model.pt", weights_only=True)) == ["weight"]  # no DataParallel "module." prefix


@pytest.mark.parametrize("rank, writes", [(0, True), (1, False)])
def test_best_model_saver_writes_on_rank_0_only(tmp_path, monkeypatch, rank, writes):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: rank)
    saver = BestModelSaver(torch.nn.Linear(1, 1), tmp_path / "model.pt", "val_dice")
    saver(SimpleNamespace(state=SimpleNamespace(metrics={"val_dice": 0.5})))
    assert (tmp_path / "model.pt").is_file() == writes and saver.best == 0.5  # every rank follows the best value


def test_probability_writer_writes_only_the_last_runs_predictions(tmp_path):
    """An evaluator run twice (a workflow run again from Python) writes the second run's probabilities, not both."""
    from dira3d.evaluation import ProbabilityWriter

    path = tmp_path / "prob.json"
    writer = ProbabilityWriter(path, ["nodule"], output_transform=lambda output: output)
    engine = Engine(lambda engine, batch: [batch])
    writer.attach(engine)
    engine.run([("a.nii.gz", [0.25]), ("b.nii.gz", [0.75])])
    engine.run([("c.nii.gz", [0.5])])
    written = json.loads(path.read_text())
    assert written["predictions"] == [{"image": "c.nii.gz", "probabilities": [0.5]}]


@pytest.mark.parametrize("wrapper", [None, "model", "network", "state_dict"])
def test_fine_tuned_weights_accepts_a_state_dict_wrapped_as_checkpointloader_unwraps_it(tmp_path, wrapper):
    from dira3d.evaluation.handlers import fine_tuned_weights

    network = torch.nn.Linear(2, 1)
    state = network.state_dict()
    torch.save(state if wrapper is None else {wrapper: state}, tmp_path / "model.pt")
    assert fine_tuned_weights(tmp_path / "model.pt", network) == str(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not fit"):
        fine_tuned_weights(tmp_path / "model.pt", torch.nn.Linear(3, 1))


def test_an_inference_batch_stopped_before_its_single_output_file_reports_no_input_written(tmp_path):
    """A classifier's probabilities are written to one file when the run completes: inputs predicted before the batch
    stopped are not written (failed, naming the file), not counted as written."""
    from dira3d.evaluation.batch import InferenceBatch

    batch = InferenceBatch([{"image": f"{name}.nii.gz"} for name in "abc"], output_path=tmp_path / "prob.json")

    class Stopped:
        def run(self):
            batch.done.update({0, 1})
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        batch.run(Stopped())
    rows = batch.rows(completed=False)
    assert [row["status"] for row in rows] == ["failed", "failed", "not run"]
    assert f"the batch stopped before {tmp_path / 'prob.json'} was written" in rows[0]["reason"]


# ---------------------------------------------------------------- Grad-CAM localisation (METHOD.md: boxes, IoU >= delta)


class _PositiveCAM(torch.nn.Module):
    """Features x + 1 (all positive) and a positive class weight: the Grad-CAM map is x + 1, positive everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.features.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def test_gradcam_maps_are_min_max_normalised_per_image_when_no_pixel_is_zero():
    """A map of x + 1 with x in [0, 1] is min-max normalised to x: 0 at the darkest pixel, not 1/2 (dividing by the
    span alone), so the binarisation threshold cuts the same share of every image."""
    images = torch.zeros(2, 1, 6, 6)
    images[0, 0, :3] = 1.0
    images[1, 0, 2:4, 2:4] = 0.5
    maps = gradcam_maps(_PositiveCAM(), images, target_layer="features")
    expected = [images[0, 0].numpy(), images[1, 0].numpy() / 0.5]
    assert maps[0] == pytest.approx(expected[0], abs=1e-6) and maps[1] == pytest.approx(expected[1], abs=1e-6)


def test_boxes_are_drawn_on_the_min_max_normalised_heatmap_at_threshold_inclusive():
    """A raw heatmap of 10..20 is normalised first (a raw 0.5 threshold would box everything); a region at exactly the
    threshold (15 -> 0.5) is in the binarised map ("heatmap >= threshold")."""
    heat = np.full((10, 10), 10.0)
    heat[1:3, 1:4] = 20.0
    heat[6:9, 6:8] = 15.0
    assert sorted(boxes_from_heatmap(heat, 0.5)) == [(1, 1, 3, 4), (6, 6, 9, 8)]
    assert boxes_from_heatmap(heat, 0.75) == [(1, 1, 3, 4)]


def test_localisation_scores_the_best_of_several_boxes():
    """Two regions, one on the ground truth (IoU 1) and one away from it (IoU 0): the image is localised."""
    heat = np.zeros((12, 12))
    heat[1:4, 1:4] = 1.0
    heat[7:10, 7:10] = 1.0
    assert localisation_accuracy([heat], [(7, 7, 10, 10)], deltas=(0.1, 0.6)) == {0.1: 1.0, 0.6: 1.0}


def _one_box_datalist(folder, pixels: np.ndarray, box: list[int]):
    from PIL import Image

    (folder / "images").mkdir()
    Image.fromarray(pixels).save(folder / "images" / "img0.png")
    path = folder / "bbox_datalist.json"
    path.write_text(json.dumps({"test": [{"image": "images/img0.png", "case_id": "p0", "label": "finding0",
                                          "label_index": 0, "box": box}]}))
    return path


def _localise(datalist, out, **kwargs):
    from test_localise_2d import _ImageCAM  # its Grad-CAM of class 0 is the image itself

    from dira3d.evaluation.localise import load_box_entries, localise

    return localise(_ImageCAM(), load_box_entries(datalist, "test"), out, target_layer="features", roi_size=(64, 48),
                    prepared_size=0, **kwargs)


def test_localise_counts_a_box_whose_iou_equals_delta_in_every_accuracy(tmp_path):
    """The bright region covers the top half of its ground-truth box (IoU exactly 0.5): correct at delta 0.5 (IoU >=
    delta) in the accuracy over boxes, in its finding's accuracy and in the mean over findings; not at 0.6."""
    pixels = np.zeros((96, 128), np.uint8)  # rows y, columns x; 128 x 96 -> 64 x 48 halves every side
    pixels[30:40, 20:60] = 255
    result = _localise(_one_box_datalist(tmp_path, pixels, [20, 30, 40, 20]), tmp_path / "out", deltas=(0.5, 0.6))
    assert result["boxes"][0]["best_iou"] == pytest.approx(0.5)
    assert result["accuracy"] == result["accuracy_per_finding"]["finding0"] == result["mean_accuracy_over_findings"] \
        == {"0.5": 1.0, "0.6": 0.0}


@pytest.mark.parametrize("threshold, iou", [(0.75, 1.0), (0.4, 0.5)])
def test_localise_binarises_every_heatmap_at_its_threshold(tmp_path, threshold, iou):
    """A bright (255) region on the ground truth above a half-bright (128) one: at threshold 0.75 the box is the
    bright region (IoU 1), at 0.4 both (IoU 1/2); the per-box IoU and the accuracies agree with the threshold."""
    pixels = np.zeros((96, 128), np.uint8)
    pixels[30:40, 20:60] = 255
    pixels[40:50, 20:60] = 128
    result = _localise(_one_box_datalist(tmp_path, pixels, [20, 30, 40, 10]), tmp_path / "out", threshold=threshold,
                       deltas=(0.6,))
    assert result["boxes"][0]["best_iou"] == pytest.approx(iou) and result["threshold"] == threshold
    assert result["accuracy"] == result["mean_accuracy_over_findings"] == {"0.6": float(iou > 0.6)}


# ---------------------------------------------------------------- what the network is given: preprocessing kept with the model


def test_normalize_scand_uses_its_hu_window_and_its_percentiles():
    """CT: (clip(x, lo, hi) - lo) / (hi - lo) with the recorded window (-100, 400), by hand; MR: the recorded
    percentiles (0, 100) map the foreground's minimum to 0 and maximum to 1 (the default 0.5 / 99.5 would not)."""
    ct = torch.tensor([[-1000.0, -100.0, 150.0, 400.0, 2000.0]])
    out = NormalizeScand("image", modality="ct", hu_window=(-100, 400))({"image": ct})["image"]
    assert torch.as_tensor(out)[0].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    mr = torch.arange(1.0, 202.0)[None]  # 1..201, no background
    out = NormalizeScand("image", modality="mr", percentiles=(0, 100))({"image": mr})["image"]
    assert torch.as_tensor(out)[0].tolist() == pytest.approx(((mr[0] - 1) / 200).tolist())


def test_preprocessing_json_records_the_image_channels_setting_and_a_native_prepared_size(tmp_path):
    """image_channels (the sequences the images hold) wins over the datalist's meta.channels; a 2D datalist prepared
    at its native size (meta.size 0) records prepared_size 0, so inference does not resize through the default 512."""
    from dira3d.evaluation.preprocessing import datalist_preprocessing, training_preprocessing

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"modality": "mr", "channels": ["t1", "t1ce", "t2", "flair"]}}))
    settings = training_preprocessing(datalist, modalities="flair", image_channels=["flair", "t1"])
    assert settings == {"modality": "mr", "channels": ["flair", "t1"], "modalities": ["flair"]}
    for size, expected in ((0, {"prepared_size": 0}), (256, {"prepared_size": 256}), (True, {}), (-1, {})):
        datalist.write_text(json.dumps({"training": [], "meta": {"size": size}}))
        assert datalist_preprocessing(datalist) == expected, size


def test_build_resnet_task_network_puts_its_dropout_before_the_classifier():
    from dira3d.evaluation import build_resnet_task_network

    network = build_resnet_task_network("classification", out=3, backbone="resnet10", dropout=0.3)
    assert [m.p for m in network.modules() if isinstance(m, torch.nn.Dropout)] == [0.3]


# ---------------------------------------------------------------- fine-tuning: model selection, early stopping, metrics.json


def test_metrics_json_writes_an_undefined_metric_as_null():
    """metrics.json must stay strict JSON (json.dumps writes NaN as a bare NaN token) and the grid reads None
    as an undefined metric: a NaN, a tensor and a numpy value become null / a float."""
    assert finetune._number(float("nan")) is None and finetune._number(torch.tensor(float("nan"))) is None
    assert finetune._number(torch.tensor(0.25)) == 0.25 and finetune._number(np.float32(0.5)) == 0.5
    assert finetune._number("text") == "text"


@pytest.mark.slow
def test_finetune_records_the_best_holdout_value_the_epochs_run_and_tests_the_fine_tuned_weights(tmp_path, monkeypatch,
                                                                                                    capsys):
    """The holdout Dice is scripted 0.9, 0.3, 0.2 over the epochs, with patience 1: early stopping ends the run after
    epoch 2 (of max_epochs 3). metrics.json must record the best holdout value (0.9, not the last epoch's 0.3), the
    2 epochs run (not max_epochs), and the test run must build its network without the pretrained checkpoint (the
    fine-tuned model.pt is loaded into it): the pretrained load is reported once, by training."""
    from test_bundles_finetune import make_segmentation, tiny_checkpoint

    from dira3d.evaluation import metrics

    datalist, _ = make_segmentation(tmp_path / "data", "lidc_datalist.json", (16, 16, 8), None)
    checkpoint = tiny_checkpoint(tmp_path / "pretrained.pt")
    scripted = iter([0.9, 0.3, 0.2])
    real = metrics._CountsForeground.compute

    def compute(self):
        value = real(self)
        return next(scripted) if self._name == "val_dice" else value

    monkeypatch.setattr(metrics._CountsForeground, "compute", compute)
    result = finetune.run_finetune("lidc_nodule_seg", {"datalist": str(datalist), "pretrained": str(checkpoint),
                                                        "patience": 1, "seed": 0}, output_dir=tmp_path / "run", tiny=True)
    assert result["holdout"] == {"best_val_dice": 0.9}
    assert result["epochs"] == 2 and result["settings"]["max_epochs"] == 3
    assert set(result["metrics"]) == {"dice", "iou"} and all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    assert capsys.readouterr().out.count(f"pretrained: {checkpoint}") == 1


# ---------------------------------------------------------------- the task bundles' holdout and test evaluation


def _bundle_parser(bundle: str, *files: str):
    from monai.bundle import ConfigParser

    from dira3d.evaluation.finetune import bundle_path

    parser = ConfigParser()
    parser.read_config([str(bundle_path(bundle) / "configs" / f) for f in files])
    return parser


@pytest.mark.parametrize("bundle", finetune.BUNDLES + finetune.BUNDLES_2D)
def test_model_selection_early_stopping_and_lr_plateau_maximise_the_holdouts_key_metric(bundle):
    """The holdout's key metric (AUC, Dice) is what BestModelSaver keeps the best epoch of, what early stopping
    waits on (ignite maximises its score) and what ReduceLROnPlateau steps on in max mode."""
    parser = _bundle_parser(bundle, "train.json")
    (name,) = parser.get("validate#key_metric")
    handlers = parser.get("validate#handlers")
    savers = [h for h in handlers if isinstance(h, dict) and h.get("_target_", "").endswith("BestModelSaver")]
    assert [saver["metric_name"] for saver in savers] == [name]
    engine = SimpleNamespace(state=SimpleNamespace(metrics={name: 0.7}))
    assert parser.get_parsed_content("validate#early_stop#score_function")(engine) == 0.7
    if parser.get("lr_scheduler#_target_").endswith("ReduceLROnPlateau"):
        assert parser.get("lr_scheduler#mode") == "max"
        steps = [i for i, h in enumerate(handlers) if isinstance(h, dict) and h.get("_target_") == "LrScheduleHandler"]
        assert [parser.get_parsed_content(f"validate#handlers#{i}#step_transform")(engine) for i in steps] == [0.7]


@pytest.mark.parametrize("bundle", finetune.BUNDLES + finetune.BUNDLES_2D)
@pytest.mark.parametrize("files", [("train.json",), ("train.json", "evaluate.json")], ids=["holdout", "test"])
def test_holdout_and_test_predictions_are_sigmoid_probabilities_binarised_at_one_half(bundle, files):
    """Logits -2, -0.1, 0.1, 3: a classifier's AUC is scored on their sigmoid (14 independent labels, not a softmax
    over them), a segmentation mask is sigmoid >= 0.5, i.e. logit >= 0 (a threshold on the logits, or at 0.4, moves
    every Dice)."""
    parser = _bundle_parser(bundle, *files)
    logits = torch.tensor([[[-2.0, -0.1], [0.1, 3.0]]])
    pred = parser.get_parsed_content("validate#postprocessing")({"pred": logits.clone()})["pred"]
    pred = torch.from_numpy(np.asarray(pred, dtype=np.float32))
    if any(t.get("_target_") == "AsDiscreted" for t in parser.get("validate#postprocessing#transforms")):  # segmentation
        assert torch.equal(pred, (logits >= 0).float())
    else:
        torch.testing.assert_close(pred, torch.sigmoid(logits))
