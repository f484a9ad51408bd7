"""``network_data_format`` of the segmentation bundles and of dira_pretrain against the networks they describe.

Session 27 found the 2D segmentation bundles' ``outputs.pred`` in format ``segmentation`` (MONAI's format for a label
map) although the network emits a 1-channel logit map, the 3D ones with an input ``spatial_shape`` of ``8*n`` where
inference feeds ``roi_size`` patches, and no bundle describing the mask that ``inference.json`` writes
(``post_processed_outputs``). The classification bundles' outputs (``tests/test_walk2d_prepared.py``) gave
``spatial_shape`` ``[N]`` for an output of shape ``(batch, N)``: MONAI's spec counts the channels in ``num_channels``
and only the spatial axes in ``spatial_shape``, so it is ``[]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SEGMENTATION = ("lidc_nodule_seg", "lits_liver_seg", "brats_tumor_seg", "siim_pneumothorax_seg", "montgomery_lung_seg")
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
CLASSIFICATION = ("chestxray14_cls", "chexpert_cls", "luna16_nodule_fpr", "pecad_embolism_fpr")


def last_convolution(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """The convolution that runs last in ``net(x)`` (the output head)."""
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in net.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    with torch.no_grad():
        net(x)
    for hook in hooks:
        hook.remove()
    return called[-1]


def described_network(bundle: str):
    """``(metadata, train.json parser, network in eval mode, a random input of the described shape)``."""
    from monai.bundle import ConfigParser

    configs = BUNDLES / bundle / "configs"
    meta = json.loads((configs / "metadata.json").read_text())
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == parser.get_parsed_content("in_channels") == len(image["channel_def"])
    assert all(isinstance(s, int) for s in image["spatial_shape"]), image["spatial_shape"]
    low, high = image["value_range"]
    x = low + (high - low) * torch.rand(1, image["num_channels"], *image["spatial_shape"])
    return meta, parser, net, x


@pytest.mark.parametrize("bundle", SEGMENTATION)
def test_segmentation_metadata_describes_the_logit_map_and_the_mask_inference_writes(bundle):
    from monai.bundle import ConfigParser

    meta, parser, net, x = described_network(bundle)
    image = meta["network_data_format"]["inputs"]["image"]
    out = meta["network_data_format"]["outputs"]["pred"]
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    inference = ConfigParser()
    inference.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    # the input is the patch inference feeds the network (SlidingWindowInferer's roi_size in 3D, the resized image in 2D)
    assert image["spatial_shape"] == parser.get_parsed_content("roi_size") == inference.get_parsed_content("roi_size")
    assert image["is_patch_data"] == (len(image["spatial_shape"]) == 3) == out["is_patch_data"]
    # type image: dira3d.deploy.monailabel.bundle_kind serves it as a segmentation
    assert (out["type"], out["format"], out["value_range"]) == ("image", "logits", [])
    assert out["num_channels"] == parser.get_parsed_content("out_channels") == len(out["channel_def"])
    assert out["spatial_shape"] == image["spatial_shape"]
    head = last_convolution(net, x)
    with torch.no_grad():  # no sigmoid inside: a head that outputs -10 everywhere comes out as -10, outside [0, 1]
        head.weight.zero_()
        head.bias.fill_(-10.0)
        pred = net(x)
    assert pred.shape == (1, out["num_channels"], *out["spatial_shape"]) and pred.dtype == getattr(torch, out["dtype"])
    assert torch.equal(pred, torch.full_like(pred, -10.0))
    # what inference writes: sigmoid, threshold 0.5, (Invertd to the input's grid), saved as uint8 0/1
    assert (post["type"], post["format"], post["value_range"], post["is_patch_data"]) == ("image", "segmentation", [0, 1], False)
    assert post["num_channels"] == out["num_channels"] and post["spatial_shape"] == ["*"] * len(out["spatial_shape"])
    structure = out["channel_def"]["0"]
    assert post["channel_def"] == {"0": f"{structure}: 1 = {structure}, 0 = background"}
    steps = inference.get_parsed_content("postprocessing").transforms
    names = [type(t).__name__ for t in steps]
    assert names == ["Activationsd", "Invertd", "AsDiscreted", "SavePredictiond"], names
    assert inference.get("postprocessing#transforms#0#sigmoid") is True
    assert inference.get("postprocessing#transforms#2#threshold") == 0.5
    assert np.dtype(inference.get_parsed_content("postprocessing#transforms#3#output_dtype")) == np.dtype(post["dtype"])
    with torch.no_grad():
        head.bias.fill_(10.0)
        data = {"pred": net(x)[0]}
    for step in (steps[0], steps[2]):  # the sigmoid and the threshold (Invertd needs the loaded image's history)
        data = step(data)
    assert torch.equal(torch.as_tensor(data["pred"]), torch.ones(out["num_channels"], *out["spatial_shape"]))


def test_dira_pretrain_metadata_describes_the_restored_patch():
    """The pretraining network restores the patch through a sigmoid: metadata says [0, 1], and it is so."""
    meta, parser, net, x = described_network("dira_pretrain")
    image = meta["network_data_format"]["inputs"]["image"]
    out = meta["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == parser.get_parsed_content("patch_size") == out["spatial_shape"]
    assert image["value_range"] == parser.get_parsed_content("intensity_range") == out["value_range"] == [0, 1]
    assert (out["type"], out["format"], out["num_channels"]) == ("image", "magnitude", parser.get_parsed_content("in_channels"))
    head = last_convolution(net, x)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        pred = net(x)
    assert pred.shape == (1, out["num_channels"], *out["spatial_shape"])
    torch.testing.assert_close(pred, torch.full_like(pred, float(torch.sigmoid(torch.tensor(-10.0)))))
    assert 0 < float(pred.min()) and float(pred.max()) < 1


@pytest.mark.parametrize("bundle", CLASSIFICATION)
def test_classification_outputs_have_no_spatial_axes(bundle):
    """The classifier emits ``(batch, N)``: ``num_channels`` N and ``spatial_shape`` [] (it said [N])."""
    meta, parser, net, x = described_network(bundle)
    out = meta["network_data_format"]["outputs"]["pred"]
    post = meta["network_data_format"]["post_processed_outputs"]["pred"]
    assert out["spatial_shape"] == post["spatial_shape"] == []
    with torch.no_grad():
        pred = net(x)
    assert pred.shape == (1, out["num_channels"], *out["spatial_shape"]) == (1, parser.get_parsed_content("out_channels"))
