"""What pretraining's TensorBoard event files hold, read back with TensorBoard's own reader (``EventAccumulator``):
the trainer with the handlers ``bundles/dira_pretrain/configs/train.json`` gives it (one shared lazy writer).

- the per-iteration scalars at the iteration, the epoch values (``train_*``, ``val_*``, ``early_stop_wait``) at the
  epoch; with ``val_interval`` 2 the ``val_*`` curves have a point at the validated epochs only: ignite keeps
  ``state.metrics`` from epoch to epoch, so an epoch without a validation logged the last validation's values again
  as its own (and ``early_stop_wait`` too, which the docs say is logged each validated epoch);
- the ``restoration`` images every ``image_every`` iterations: original | distorted (| restored once ``res`` is on),
  grey levels that are neither black nor white throughout, and the original panel the middle slice of the patch the
  restored panel restores (the trainer's own images of that step).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.handlers import TensorBoardStatsHandler
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_engine import PATCH3, make_trainer, smooth_volumes

from dira3d.engines import DiRACheckpoint, DiRAEvaluator, RandPatchPaird, RestorationImageHandler, scalar_output, side_by_side
from dira3d.engines.summary import LazySummaryWriter

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _events(logdir):
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _steps(events, tag):
    return [e.step for e in events.Scalars(tag)]


def test_validation_values_are_logged_at_the_validated_epochs_only(tmp_path):
    val_loader = DataLoader(Dataset(smooth_volumes(2, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    writer = LazySummaryWriter(log_dir=str(tmp_path / "eval"))
    handlers = [DiRAEvaluator("cpu", val_loader, interval=2, seed=7),
                DiRACheckpoint(tmp_path / "models", early_stop_patience=10),
                TensorBoardStatsHandler(summary_writer=writer, iteration_log=True, output_transform=scalar_output)]
    trainer = make_trainer("visual_words", 3, stages=[{"name": "dis_res", "losses": ["dis", "res"]}], max_epochs=5,
                           volumes=2, batch=2, handlers=handlers)  # one iteration per epoch
    printed = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: printed.append(sorted(e.state.metrics)))
    trainer.run()
    writer.close()
    events = _events(tmp_path / "eval")
    assert _steps(events, "loss") == [1, 2, 3, 4, 5] and _steps(events, "train_loss") == [1, 2, 3, 4, 5]
    for tag in ("val_loss", "val_selection_loss", "val_loss_dis", "val_loss_res", "early_stop_wait"):
        assert _steps(events, tag) == [2, 4], (tag, _steps(events, tag))
    # the console (MONAI's StatsHandler prints the same state.metrics): no val_* at an epoch without a validation
    assert [any(k.startswith("val_") for k in keys) for keys in printed] == [False, True, False, True, False], printed


def test_restoration_images_at_the_interval_in_grey_levels_of_the_patch_restored(tmp_path):
    writer = LazySummaryWriter(log_dir=str(tmp_path / "eval"))
    stages = [{"name": "dis", "until_iteration": 2, "losses": ["dis"]}, {"name": "dis_res", "losses": ["dis", "res"]}]
    trainer = make_trainer("visual_words", 3, stages=stages, max_epochs=3, volumes=4, batch=2,  # 2 iterations an epoch
                           handlers=[RestorationImageHandler(summary_writer=writer, interval=2)])
    shown = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2),
                              lambda e: shown.__setitem__(e.state.iteration, {k: None if v is None else v.clone()
                                                                               for k, v in e.state.images.items()}))
    trainer.run()
    writer.close()
    images = _events(tmp_path / "eval").Images("restoration")
    assert [e.step for e in images] == [2, 4, 6]
    for event in images:
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("L"), dtype=np.float64)
        height, width = pixels.shape
        restored = shown[event.step]["restored"] is not None
        assert restored == (event.step > 2)  # stage dis (iterations 1-2) restores nothing: original | distorted only
        panels = np.split(pixels, 3 if restored else 2, axis=1)
        assert height == PATCH3[1] and width == PATCH3[0] * len(panels)  # middle z slice, x left-right
        for panel in panels:  # grey levels: not all black or white, not flat
            assert 5 < panel.mean() < 250 and panel.std() > 1, (event.step, panel.mean(), panel.std())
        # the panels are those of the step's own patch: its original's middle slice is the first panel, its
        # restoration (of the same patch, the same slice) the last, as side_by_side draws them
        expected = side_by_side(shown[event.step])[0].numpy() * 255
        assert np.abs(pixels - expected).max() <= 1.0, event.step


def test_an_experiment_grid_gives_each_run_its_own_curves_and_names_the_pretraining_ones(tmp_path, capsys):
    """``dira3d experiment``: one TensorBoard run per folder, named by method, label fraction and seed, each with its
    own curves (every step once) and its test metric; the pretraining's curves are in ``pretrain/<method>/eval``,
    outside ``runs/``: the command named ``runs/`` alone, so a user did not find them."""
    import yaml
    from test_bundle_pretrain import write_volumes
    from test_bundles_finetune import SEGMENTATION, make_segmentation

    from dira3d.evaluation.experiment import main

    name, shape, channels = SEGMENTATION["lidc_nodule_seg"]
    datalist = make_segmentation(tmp_path / "data", name, shape, channels, n_train=4, n_test=2)[0]
    (tmp_path / "volumes").mkdir()
    write_volumes(tmp_path / "volumes")
    config = {"bundle": "lidc_nodule_seg", "datalist": str(datalist), "metric": "dice", "output_dir": "out",
              "seeds": [0, 1], "label_fractions": [1.0], "methods": {"random": None, "dira": {"pretrain": {}}},
              "overrides": {"tiny": True, "max_epochs": 2},
              "pretrain": {"dataset_dir": str(tmp_path / "volumes"), "configs": ["train.json", "tiny.json"],
                           "overrides": {"max_epochs": 3, "patch_size": [16, 16, 8]}}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["--config", str(tmp_path / "experiment.yaml")]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert f"TensorBoard: tensorboard --logdir {out / 'runs'}; pretraining: tensorboard --logdir {out / 'pretrain'}" in printed
    folders = {path.parent.relative_to(out).as_posix() for path in out.rglob("events.out.tfevents.*")}
    runs = {f"runs/{method}_lf1_seed{seed}" for method in ("random", "dira") for seed in (0, 1)}
    assert folders == runs | {"pretrain/dira/eval"}, folders
    for folder in sorted(runs):
        events = _events(out / folder)
        for tag in ("train_loss", "lr", "val_dice", "test/dice"):
            steps = _steps(events, tag)
            assert steps and steps == sorted(set(steps)), (folder, tag, steps)
        assert _steps(events, "val_dice") == [1, 2] and _steps(events, "test/dice") == [2]
    pretraining = _events(out / "pretrain/dira/eval")
    assert _steps(pretraining, "train_loss") == [1, 2, 3] and _steps(pretraining, "val_loss") == [1, 2, 3]
    assert pretraining.Images("restoration")
