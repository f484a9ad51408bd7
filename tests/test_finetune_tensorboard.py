"""``dira3d finetune`` puts the test metrics in the run's TensorBoard logdir, beside its training and validation curves.

The training / validation curves were in the event files but the test metrics (AUC, Dice, ...) only in
``metrics.json``: a user comparing runs in TensorBoard (``tensorboard --logdir <output-dir>``, or the ``runs/`` folder
of ``dira3d experiment``, whose runs go through the same ``run_finetune``) could not see the test numbers there.
Now each is a scalar ``test/<metric>`` at the last epoch trained, read back here with TensorBoard's own reader.
"""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_bundles_2d import write_cxr
from test_bundles_finetune import SEGMENTATION, make_segmentation

from dira3d.evaluation.finetune import run_finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _data(bundle, root):
    if bundle == "chestxray14_cls":  # 2D, multi-label: auc
        return write_cxr(root, "cxr14_datalist.json", 14)
    name, shape, channels = SEGMENTATION[bundle]  # 3D segmentation: dice and iou
    return make_segmentation(root, name, shape, channels, n_train=4, n_test=2)[0]


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("bundle", ["lidc_nodule_seg", "chestxray14_cls"])
def test_the_test_metrics_are_tensorboard_scalars_at_the_last_epoch(bundle, tmp_path):
    datalist = _data(bundle, tmp_path / "data")
    out = tmp_path / "run"
    result = run_finetune(bundle, {"datalist": str(datalist), "seed": 0}, output_dir=out, tiny=True)
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["eval_split"] == "test" and "test" in recorded["splits"]  # the split the scalars are named after
    scalars = _scalars(out)
    tests = {tag: points for tag, points in scalars.items() if tag.startswith("test/")}
    assert recorded["metrics"] and set(tests) == {f"test/{name}" for name in recorded["metrics"]}, sorted(scalars)
    for name, value in recorded["metrics"].items():
        assert len(tests[f"test/{name}"]) == 1, tests
        step, logged = tests[f"test/{name}"][0]
        assert step == recorded["epochs"] == result["epochs"] and logged == pytest.approx(value, rel=1e-6), (name, value)
    # beside the run's own curves, one run in TensorBoard: its validation metric over the epochs trained
    key = "val_auc" if bundle == "chestxray14_cls" else "val_dice"
    assert [step for step, _ in scalars[key]] == list(range(1, recorded["epochs"] + 1)), sorted(scalars)
    # and the learning rate (ReduceLROnPlateau steps it), at every iteration that logs train_loss: it was only printed
    iterations = [step for step, _ in scalars["train_loss"]]
    assert [step for step, _ in scalars.get("lr", [])] == iterations and iterations, sorted(scalars)
    assert scalars["lr"][0][1] == pytest.approx(0.0002 if bundle == "chestxray14_cls" else 0.001), scalars["lr"]


def test_the_learning_rate_curve_follows_the_schedule(tmp_path):
    """montgomery_lung_seg's cosine schedule (``T_max`` = ``max_epochs`` = 2, stepped after each epoch's validation):
    the ``lr`` scalar is ``learning_rate`` through epoch 1 and half of it through epoch 2, at the iterations
    (the steps of ``train_loss``)."""
    datalist = write_cxr(tmp_path / "data", "montgomery_lung_seg.json", None, train=4, test=2)
    out = tmp_path / "run"
    result = run_finetune("montgomery_lung_seg", {"datalist": str(datalist), "seed": 0, "learning_rate": 0.004},
                          output_dir=out, tiny=True)
    assert result["epochs"] == 2
    scalars = _scalars(out)
    losses, rates = scalars["train_loss"], scalars.get("lr", [])
    assert [step for step, _ in rates] == [step for step, _ in losses] and len(losses) % 2 == 0, sorted(scalars)
    per_epoch = len(losses) // 2
    expected = [0.004] * per_epoch + [0.002] * per_epoch
    assert [value for _, value in rates] == pytest.approx(expected, rel=1e-6), rates
