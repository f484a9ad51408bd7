"""dira3d used as a Python library (no CLI, no bundle): the MONAI transform wrappers check their
items, the DiRA sum takes one term by name, load_pretrained names the way out of an output-head
mismatch, and the trainer's output works with MONAI's stats handlers as its docstring says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.handlers import StatsHandler, ValidationHandler
from monai.transforms import Compose, ScaleIntensityRanged
from torch.utils.data import DataLoader

from dira3d.engines import DiRAEvaluator, DiRATrainer, build_dis_head, scalar_output
from dira3d.losses import DiRALoss
from dira3d.networks import Segmenter, UNet, load_pretrained
from dira3d.transforms import RandDistortion, RandDistortiond, RandViews, RandViewsd


def _hu_item(dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, (1, 16, 16, 8)).astype(dtype)


@pytest.mark.parametrize("make", [lambda: RandDistortiond("image", composition="transvw"),
                                  lambda: RandDistortiond("image", composition="dira2d"),
                                  lambda: RandViewsd("image", spatial_dims=3)])
def test_wrappers_refuse_integer_and_out_of_range_items(make) -> None:
    transform = make()
    with pytest.raises(ValueError, match=r"'image' has dtype torch\.int16: .*ScaleIntensityRanged"):
        transform({"image": _hu_item()})
    with pytest.raises(ValueError, match=r"'image' has intensities from -1000 to 999, outside value_range \[0, 1\]"):
        transform({"image": _hu_item(np.float32)})
    with pytest.raises(ValueError, match=r"dtype torch\.uint8"):
        transform({"image": np.full((1, 16, 16, 8), 200, dtype=np.uint8)})
    # scaled first (the documented way), or a float item a hair outside [0, 1] after resampling: accepted
    scaled = Compose([ScaleIntensityRanged("image", -1000, 1000, 0.0, 1.0, clip=True), transform])
    out = scaled({"image": _hu_item(np.float32)})
    assert all(v.dtype == torch.float32 and not isinstance(v, MetaTensor) for k, v in out.items() if k != "image")
    make()({"image": np.full((1, 16, 16, 8), 1.0 + 1e-5, dtype=np.float32)})


def test_value_range_none_skips_the_check_and_bad_ranges_are_refused() -> None:
    item = _hu_item(np.float32) / 1000.0  # in [-1, 1]: the user's own scaling
    distorted, target = RandDistortion("transvw", value_range=None).set_random_state(0)(item)
    assert distorted.shape == target.shape == (1, 16, 16, 8)
    assert RandDistortion("transvw", value_range=(-1, 1)).set_random_state(0)(item)[0].shape == (1, 16, 16, 8)
    RandViews(3, value_range=None)(item)
    with pytest.raises(ValueError, match=r"value_range=\(1, 0\) must be \(low, high\) with low < high"):
        RandDistortiond("image", value_range=(1, 0))


def test_dira_loss_takes_one_active_term_as_a_string() -> None:
    terms = {"dis": torch.tensor(2.0), "res": torch.tensor(0.5)}
    total, weighted = DiRALoss()(terms, "res")
    assert float(total) == 50.0 and list(weighted) == ["res"]
    assert float(DiRALoss()(terms, "dis")[0]) == 2.0


def test_load_pretrained_names_the_way_out_of_an_output_head_mismatch() -> None:
    torch.manual_seed(0)
    pretrained = UNet(3, 1, 1, width=0.125)
    checkpoint = {"encoder": pretrained.encoder.state_dict(), "decoder": pretrained.decoder.state_dict(),
                  "meta": {"spatial_dims": 3, "in_channels": 1, "width": 0.125}}
    three_classes = Segmenter(3, 1, 3, width=0.125)
    with pytest.raises(ValueError, match=r"Only the decoder's output head differs .*startswith\('head\.'\)"):
        load_pretrained(three_classes, checkpoint, parts=("encoder", "decoder"))
    # the way the message gives: the decoder without its head
    checkpoint["decoder"] = {k: v for k, v in checkpoint["decoder"].items() if not k.startswith("head.")}
    report = load_pretrained(three_classes, checkpoint, parts=("encoder", "decoder"))
    assert report.missing == ["decoder.head.weight", "decoder.head.bias"]
    assert torch.equal(three_classes.decoder.levels[0].up.weight, pretrained.decoder.levels[0].up.weight)
    # another width still gets the general advice
    with pytest.raises(ValueError, match="Build the network with the checkpoint's width") as err:
        load_pretrained(Segmenter(3, 1, 1, width=0.25), checkpoint, parts=("encoder",))
    # and the width to build it with, from the checkpoint's meta (the bundle docs' Classifier(3, 1, ...) of width 1
    # did not fit the walkthrough's --tiny checkpoint, and the message named no value)
    assert str(err.value).endswith("this checkpoint was pretrained at width=0.125: build Segmenter(..., width=0.125)")
    with pytest.raises(ValueError) as err:  # other input channels, same width: no width advice
        load_pretrained(Segmenter(3, 2, 1, width=0.125), checkpoint, parts=("encoder",))
    assert "pretrained at width" not in str(err.value)


def _tiny_trainer(handlers=None) -> DiRATrainer:
    data = [{"image": torch.rand(1, 16, 16, 8), "label": i % 2} for i in range(4)]
    net = UNet(3, 1, 1, width=0.125)
    head = build_dis_head("visual_words", 3, net.bottleneck_channels, num_classes=2, hidden=8)
    return DiRATrainer("cpu", 1, DataLoader(data, batch_size=2), net,
                       torch.optim.Adam([*net.parameters(), *head.parameters()], 1e-3), head, None, None,
                       stages=[{"name": "dis_res", "losses": ["dis", "res"]}], train_handlers=handlers)


def test_trainer_output_feeds_monai_stats_handlers_through_scalar_output(capsys) -> None:
    # the trainer docstring: one dict per iteration; StatsHandler(output_transform=scalar_output)
    trainer = _tiny_trainer([StatsHandler(name="walk_stats", output_transform=scalar_output)])
    trainer.run()
    assert {"loss", "loss_dis", "loss_res", "lr_g", "lr_d", "stage", "stage_index"} <= set(trainer.state.output)
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert "loss_dis:" in logged and "loss_res:" in logged and "train_loss_res:" in logged


def test_evaluator_through_validation_handler_says_how_to_attach_it() -> None:
    data = [{"image": torch.rand(1, 16, 16, 8), "label": 0} for _ in range(2)]
    evaluator = DiRAEvaluator("cpu", DataLoader(data, batch_size=2))
    trainer = _tiny_trainer()
    ValidationHandler(validator=evaluator, interval=1).attach(trainer)
    with pytest.raises(RuntimeError, match=r"evaluator\.attach\(trainer\).*do not wrap it in monai\.handlers\.ValidationHandler"):
        trainer.run()
