"""The segmentation bundles' ``pretrained_head`` setting (session 28): a DiRA checkpoint's decoder output layer is the
pretraining's restoration head (1 channel: it predicts image intensity), whose shape fits a 1-channel segmentation, so
fine-tuning loaded it as the segmentation output layer; on a prepared Montgomery set the network then started by
predicting brightness, the inverse of the dark lung mask. ``pretrained_head: initialise`` (``load_pretrained``'s
``head_policy="always"``) leaves that layer at random and says so in the load report; ``load`` copies it when it fits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dira3d.data.errors import DataError
from dira3d.evaluation import build_resnet_task_network, build_task_network, check_pretrained_head
from dira3d.networks import ResNetSegmenter, Segmenter, UNet, load_pretrained
from dira3d.utils import atomic_save
from dira3d.utils.bundle_errors import user_error_in

SEGMENTATION_BUNDLES = ("brats_tumor_seg", "lidc_nodule_seg", "lits_liver_seg", "montgomery_lung_seg",
                        "siim_pneumothorax_seg")
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _checkpoint_3d() -> dict:
    torch.manual_seed(1234)  # not the task network's weights
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    return {"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
            "meta": {"spatial_dims": 3, "in_channels": 1, "width": 0.125}}


def _head(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.decoder.state_dict().items() if k.startswith("head.")}


def test_head_policy_always_leaves_a_fitting_output_head_as_initialised_and_reports_it():
    ckpt = _checkpoint_3d()
    ckpt_head = {k: v for k, v in ckpt["decoder"].items() if k.startswith("head.")}
    assert set(ckpt_head) == {"head.weight", "head.bias"}
    loaded = Segmenter(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    report = load_pretrained(loaded, ckpt, parts=("encoder", "decoder"), strict=True, head_policy="initialise")
    assert all(torch.equal(_head(loaded)[k], ckpt_head[k]) for k in ckpt_head)  # "initialise": loaded when it fits
    assert report.initialised == [] and "output head initialised" not in report.summary()

    torch.manual_seed(0)
    network = Segmenter(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    own_head = _head(network)
    report = load_pretrained(network, ckpt, parts=("encoder", "decoder"), strict=True, head_policy="always")
    assert report.initialised == ["decoder.head.weight", "decoder.head.bias"]
    assert all(torch.equal(_head(network)[k], own_head[k]) for k in own_head)  # kept as initialised
    assert not any(torch.equal(_head(network)[k], ckpt_head[k]) for k in ckpt_head)
    assert "decoder.head.weight" not in report.loaded and "decoder.head.weight" not in report.missing
    rest = {k: v for k, v in ckpt["decoder"].items() if not k.startswith("head.")}
    assert all(torch.equal(network.decoder.state_dict()[k], v) for k, v in rest.items())  # the rest is loaded
    assert "output head initialised, not loaded (head_policy 'always'): decoder.head.weight, decoder.head.bias" \
        in report.summary()
    # a head of other output channels is not an error either
    three = Segmenter(spatial_dims=3, in_channels=1, out_channels=3, width=0.125)
    assert load_pretrained(three, ckpt, parts=("encoder", "decoder"), head_policy="always").initialised == \
        ["decoder.head.weight", "decoder.head.bias"]
    with pytest.raises(ValueError, match=r"head_policy='sometimes' is not supported; use one of .*'always'"):
        load_pretrained(network, ckpt, parts=("encoder", "decoder"), head_policy="sometimes")


def _resnet_checkpoint(path: Path) -> Path:
    torch.manual_seed(1234)
    seg = ResNetSegmenter(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
    return atomic_save({"encoder": seg.encoder.state_dict(), "decoder": seg.decoder.state_dict(),
                        "meta": {"spatial_dims": 2, "in_channels": 1}}, path)


@pytest.mark.parametrize("dims", [3, 2])
def test_the_task_network_builders_honour_pretrained_head(dims, tmp_path, capsys):
    if dims == 3:
        path = atomic_save(_checkpoint_3d(), tmp_path / "dira.pt")

        def build(head):
            return build_task_network("segmentation", 3, 1, 1, width=0.125, pretrained=str(path), pretrained_head=head)
    else:
        path = _resnet_checkpoint(tmp_path / "dira2d.pt")

        def build(head):
            return build_resnet_task_network("segmentation", 1, 1, backbone="resnet10",
                                             decoder_channels=(16, 16, 8, 8, 8), pretrained=str(path),
                                             pretrained_head=head)
    ckpt_head = {k[len("head."):]: v for k, v in torch.load(path, weights_only=True)["decoder"].items()
                 if k.startswith("head.")}
    loaded = _head(build("load"))
    assert loaded and all(torch.equal(v, ckpt_head[k[len("head."):]]) for k, v in loaded.items())
    assert "output head initialised" not in capsys.readouterr().out
    torch.manual_seed(0)
    fresh = _head(build("initialise"))
    assert not any(torch.equal(v, ckpt_head[k[len("head."):]]) for k, v in fresh.items())
    printed = capsys.readouterr().out
    assert "output head initialised, not loaded" in printed and "decoder.head." in printed, printed


@pytest.mark.parametrize("value", ["maybe", "Load", "", None, 1])
def test_a_bad_pretrained_head_is_refused_in_one_line(value):
    with pytest.raises(DataError) as err:
        check_pretrained_head(value)
    message = str(err.value)
    assert "\n" not in message and f"pretrained_head={value!r} is not a choice" in message
    assert "initialise" in message and "load" in message
    with pytest.raises(DataError, match="pretrained_head"):
        build_task_network("segmentation", 3, 1, 1, width=0.125, pretrained="", pretrained_head=value)
    assert check_pretrained_head("load") == "load" and check_pretrained_head("initialise") == "initialise"


@pytest.mark.parametrize("bundle", SEGMENTATION_BUNDLES)
def test_each_segmentation_bundle_passes_and_checks_pretrained_head(bundle):
    """train.json defines the setting, hands it to the network and refuses a bad value first in initialize (before
    the datalist is read), as `dira3d finetune --set pretrained_head=...` and `--pretrained_head ...` set it."""
    from monai.bundle import ConfigParser

    config = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    assert config["pretrained_head"] == "initialise"  # the default since 2026-11-28 (docs/results.md)
    assert config["network_def"]["pretrained_head"] == "@pretrained_head"
    multi_gpu = json.loads((BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text())
    step = "$dira3d.evaluation.check_pretrained_head(@pretrained_head)"
    # after check_split_settings and the counts' and amp's checks, before anything is read or written
    assert multi_gpu["initialize"][4] == step and config["initialize"][4] == step
    parser = ConfigParser(config)
    parser["pretrained_head"] = "maybe"
    with pytest.raises(RuntimeError) as err:  # MONAI wraps it; monai.bundle run prints it as one `error:` line
        parser.get_parsed_content("initialize#4")
    found = user_error_in(err.value)
    assert isinstance(found, DataError) and "pretrained_head='maybe' is not a choice" in str(found), err.value
