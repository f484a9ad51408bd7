"""The 2D fine-tuning path's loaders, resizing and Grad-CAM, pinned against independent references.

- Grad-CAM (``dira3d.evaluation.gradcam.gradcam_maps``) worked by hand with ``torch.autograd`` on a tiny network:
  the weights are the spatially averaged gradients of the class score, the map the ReLU of the weighted sum of the
  target layer's activations, upsampled bilinearly (``align_corners=False``) to the input size, min-max per image;
  computed with the network in eval mode, whose train/eval mode is given back.
- ``PrepareRadiographd`` against a block mean worked by hand (area averaging, rounded to 8 bits).
- ``LoadRadiographd`` chooses its reader per key (a radiograph and a NIfTI mask in one dict).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dira3d.evaluation.gradcam import gradcam_maps

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ---------------------------------------------------------------- Grad-CAM by hand


class _TinyNet(torch.nn.Module):
    """conv (stride 2) -> batch norm -> ReLU (the target layer, ``act``) -> global mean -> linear (2 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _tiny_net(seed: int = 0) -> _TinyNet:
    torch.manual_seed(seed)
    net = _TinyNet()
    with torch.no_grad():  # running statistics far from a batch's own: eval and train mode give other maps
        net.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        net.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        net.head.weight.copy_(torch.tensor([[1.0, -0.5, 0.8], [-0.7, 0.9, 0.4]]))
    return net


def _hand_grad_cam(net: torch.nn.Module, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM as defined (Selvaraju et al.), image by image, in float64 with torch.autograd."""
    net = net.double().eval()
    maps = []
    for image, cls in zip(images.double(), classes):
        acts = net.act(net.bn(net.conv(image[None])))  # (1, K, h, w)
        score = net.head(acts.mean(dim=(2, 3)))[0, cls]
        (grads,) = torch.autograd.grad(score, acts)
        weights = grads.mean(dim=(2, 3), keepdim=True)  # alpha_k: the spatially averaged gradient
        cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=image.shape[1:], mode="bilinear", align_corners=False)[0, 0].detach().numpy()
        span = cam.max() - cam.min()
        assert span > 0, "the reference map must not be flat for this test to mean anything"
        maps.append((cam - cam.min()) / span)
    net.float()
    return np.stack(maps)


def test_gradcam_maps_equal_grad_cam_worked_by_hand():
    """Each image's map of the class asked for; the class of the highest logit when none is asked (the two differ
    here for one image, so a map of the wrong class shows). The network runs in eval mode (running statistics: the
    BatchNorm's batch statistics over two images would give other maps)."""
    torch.manual_seed(1)
    images = torch.rand(2, 1, 10, 6)  # not square: the upsampling keeps (x, y) apart
    net = _tiny_net()
    with torch.no_grad():
        top = net.eval()(images).argmax(1).tolist()
    net.train()
    for cls in (0, 1):
        assert gradcam_maps(net, images, "act", class_idx=cls) == pytest.approx(_hand_grad_cam(net, images, [cls] * 2),
                                                                                 abs=1e-5)
    assert gradcam_maps(net, images, "act") == pytest.approx(_hand_grad_cam(net, images, top), abs=1e-5)
    assert gradcam_maps(net, images, "act").shape == (2, 10, 6)


def test_gradcam_maps_asked_for_another_class_than_the_top_one_differ():
    """The class asked for is the one mapped, not the top logit's: pick an image whose top class is 0 and ask for 1."""
    torch.manual_seed(1)
    images = torch.rand(4, 1, 10, 6)
    net = _tiny_net().eval()
    with torch.no_grad():
        top = net(images).argmax(1).tolist()
    other = [1 - t for t in top]
    maps = gradcam_maps(net, images, "act", class_idx=None)
    asked = [gradcam_maps(net, images[i:i + 1], "act", class_idx=other[i])[0] for i in range(len(images))]
    assert maps == pytest.approx(_hand_grad_cam(net, images, top), abs=1e-5)
    assert np.stack(asked) == pytest.approx(_hand_grad_cam(net, images, other), abs=1e-5)
    assert not np.allclose(np.stack(asked), maps, atol=1e-3)


@pytest.mark.parametrize("training", [True, False])
def test_gradcam_maps_give_the_network_its_mode_back(training):
    net = _tiny_net().train(training)
    gradcam_maps(net, torch.rand(2, 1, 8, 8), "act", class_idx=0)
    assert net.training is training and net.bn.training is training


def test_a_map_that_is_zero_everywhere_stays_zero():
    """Class scores that weigh every activation negatively: ReLU(weighted sum) is 0 everywhere. The flat map is 0 (no
    box, 'flat_heatmap' in localisation.json), not 1 (a box over the whole image)."""
    net = _tiny_net().eval()
    with torch.no_grad():
        net.head.weight.fill_(-1.0)  # activations >= 0 (ReLU), every weight alpha_k < 0
    maps = gradcam_maps(net, torch.rand(2, 1, 8, 8), "act", class_idx=0)
    assert maps.dtype == np.float32 and np.array_equal(maps, np.zeros((2, 8, 8), np.float32))


# ---------------------------------------------------------------- PrepareRadiographd by hand


def _prepare(image: torch.Tensor, size: int):
    from monai.data import MetaTensor

    from dira3d.evaluation.radiographs import PrepareRadiographd

    transform = PrepareRadiographd("image", size)
    return transform, transform({"image": MetaTensor(image)})


def test_prepare_radiographd_area_averages_each_block_as_worked_by_hand():
    """A (rows 16, cols 32) radiograph, held width first as MONAI holds it, to 8 x 8: the mean of each 2 x 4 block
    of the file's pixels, rounded to whole grey levels (a block mean of x.5 and others), width first again."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(16, 32)).astype(np.uint8)  # (rows y, cols x) as the file stores them
    _, out = _prepare(torch.as_tensor(pixels.T[None].astype(np.float32)), 8)
    blocks = pixels.reshape(8, 2, 8, 4).astype(np.float64).mean(axis=(1, 3))  # (y, x)
    expected = np.rint(blocks).T  # (x, y)
    assert out["image"].shape == (1, 8, 8)
    assert np.array_equal(out["image"][0].numpy(), expected)


def test_prepare_radiographd_rounds_and_clips_to_grey_levels_and_leaves_the_input_alone():
    """Values of another format are rounded to the nearest level (10.6 -> 11, not 10) and clipped to 0..255 (300 ->
    255, not 300 mod 256); an image already size x size keeps its size, and the caller's tensor is not written to."""
    image = torch.tensor([[[10.6, 300.0], [-5.0, 127.4]]])
    before = image.clone()
    _, out = _prepare(image, 8)  # 2 x 2 -> 8 x 8 (bilinear) for the size check; the same size below
    assert out["image"].shape == (1, 8, 8)
    image8 = torch.full((1, 8, 8), 10.6)
    image8[0, 0, 0], image8[0, 1, 1], image8[0, 2, 2] = 300.0, -5.0, 127.4
    kept = image8.clone()
    _, out = _prepare(image8, 8)
    expected = torch.full((1, 8, 8), 11.0)
    expected[0, 0, 0], expected[0, 1, 1], expected[0, 2, 2] = 255.0, 0.0, 127.0
    assert torch.equal(out["image"].as_tensor(), expected)
    assert torch.equal(image8, kept) and torch.equal(image, before)


def test_prepare_radiographd_of_size_0_changes_nothing_and_inverts_to_itself():
    """prepared_size 0: the image goes on as it is (no rounding, nothing recorded), and Invertd's inverse is a no-op."""
    image = torch.tensor([[[10.6, 300.0], [-5.0, 127.4]]])
    transform, out = _prepare(image, 0)
    assert torch.equal(out["image"].as_tensor(), image) and not out["image"].applied_operations
    assert torch.equal(transform.inverse(out)["image"].as_tensor(), image)


# ---------------------------------------------------------------- LoadRadiographd: the reader per key


def _wide_png(path):
    """A 16-bit grey PNG with values 1000..1000+255*4: read as preparation reads it, min-max scaled to 0..255."""
    levels = np.arange(48, dtype=np.uint16).reshape(6, 8) * 5
    Image.fromarray(1000 + levels * 4).save(path)
    return path, np.rint((levels - levels.min()) * 255.0 / (levels.max() - levels.min()))


def test_a_radiograph_beside_a_nifti_mask_is_still_read_as_preparation_reads_it(tmp_path):
    """A dict with a radiograph (16-bit PNG) and a NIfTI mask: the PNG through RadiographReader (min-max scaled to
    0..255, as `dira3d prepare` reads it), the mask by the configured reader with its own values. The reader was
    chosen for the whole dict, RadiographReader only when every file was a radiograph, so the PNG was read by
    PILReader with its raw 16-bit values (1000 and above)."""
    import nibabel as nib

    from dira3d.evaluation import LoadRadiographd

    png, expected = _wide_png(tmp_path / "image.png")
    mask = np.zeros((8, 6), np.float32)
    mask[2:5, 1:3] = 1.0
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    loaded = LoadRadiographd(["image", "label"])({"image": str(png), "label": str(tmp_path / "mask.nii.gz")})
    assert np.array_equal(loaded["image"].numpy(), expected.T)  # width first, as PILReader gives it
    assert np.array_equal(loaded["label"].numpy(), mask)
    # the same radiograph alone, and beside another radiograph (an 8-bit PNG mask, taken as its values 0/1)
    Image.fromarray(mask.T.astype(np.uint8)).save(tmp_path / "mask.png")
    alone = LoadRadiographd("image")({"image": str(png)})
    both = LoadRadiographd(["image", "label"])({"image": str(png), "label": str(tmp_path / "mask.png")})
    assert np.array_equal(alone["image"].numpy(), expected.T) and np.array_equal(both["image"].numpy(), expected.T)
    assert np.array_equal(both["label"].numpy(), mask)


def test_load_radiographd_keeps_meta_keys_per_key_when_it_splits_the_readers(tmp_path):
    import nibabel as nib

    from dira3d.evaluation import LoadRadiographd

    png, _ = _wide_png(tmp_path / "image.png")
    nib.save(nib.Nifti1Image(np.zeros((8, 6), np.float32), np.eye(4)), str(tmp_path / "mask.nii.gz"))
    loaded = LoadRadiographd(["image", "label"], image_only=False, meta_keys=["image_m", "label_m"])(
        {"image": str(png), "label": str(tmp_path / "mask.nii.gz")})
    assert loaded["image_m"]["filename_or_obj"] == str(png)
    assert loaded["label_m"]["filename_or_obj"] == str(tmp_path / "mask.nii.gz")


def test_a_reader_given_to_the_call_reads_every_key(tmp_path):
    """LoadImaged's runtime reader is used as given, for a radiograph too (here PILReader: the raw 16-bit values)."""
    from monai.data import PILReader

    from dira3d.evaluation import LoadRadiographd

    png, _ = _wide_png(tmp_path / "image.png")
    raw = np.asarray(Image.open(png)).T
    loaded = LoadRadiographd("image")({"image": str(png)}, reader=PILReader())
    assert np.array_equal(loaded["image"].numpy(), raw) and raw.min() >= 1000


def test_the_radiograph_reader_reads_several_files_as_several_images(tmp_path):
    from dira3d.evaluation.radiographs import RadiographReader

    png, expected = _wide_png(tmp_path / "a.png")
    Image.fromarray(np.full((6, 8), 7, np.uint8)).save(tmp_path / "b.png")
    images = RadiographReader().read([str(png), str(tmp_path / "b.png")])
    assert isinstance(images, list) and len(images) == 2
    assert np.array_equal(np.asarray(images[0]), expected) and np.array_equal(np.asarray(images[1]), np.full((6, 8), 7))


def test_radiograph_format_is_told_by_the_first_bytes_and_a_folder_is_none(tmp_path):
    """A file whose bytes hold a signature later on ('BM' at byte 2) is no radiograph; a folder named like a DICOM
    file is no DICOM file (LoadVolumed reads a folder as a DICOM series)."""
    from dira3d.evaluation.radiographs import is_dicom, radiograph_format

    (tmp_path / "other.bin").write_bytes(b"\x00\x00BM\x89PNG" + bytes(32))
    (tmp_path / "series.dcm").mkdir()
    assert radiograph_format(tmp_path / "other.bin") is None
    assert is_dicom(tmp_path / "series.dcm") is False and radiograph_format(tmp_path / "series.dcm") is None


# ---------------------------------------------------------------- build_resnet_task_network / settings_mismatch


def test_a_random_2d_network_is_reported_unless_its_weights_are_loaded_later(capsys):
    """The bundle's report of a random initialisation; none when the caller loads weights afterwards (inference)."""
    from dira3d.evaluation import build_resnet_task_network

    net = build_resnet_task_network("classification", 1, 2, backbone="resnet10", pretrained="", bn_momentum=0.3)
    assert capsys.readouterr().out == "pretrained: none; 2D classification network (resnet10) initialised at random\n"
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.3}
    build_resnet_task_network("segmentation", 1, 2, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8),
                              pretrained="", weights_loaded_later=True)
    assert capsys.readouterr().out == ""


def test_a_checkpoint_whose_settings_fit_but_not_its_channels_keeps_the_shape_error(tmp_path):
    """A 3-channel checkpoint of the network's own backbone: no backbone / decoder setting fits better, so the error
    is the load's own (the input channels and in_channels_policy), not 'fit  (read from its weights)' with nothing
    named."""
    from dira3d.evaluation import build_resnet_task_network
    from dira3d.networks import ResNetUNet
    from dira3d.utils import atomic_save

    net = ResNetUNet(3, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict()}, tmp_path / "rgb.pt")
    with pytest.raises(ValueError) as err:
        build_resnet_task_network("classification", 1, 2, backbone="resnet10", pretrained=str(tmp_path / "rgb.pt"))
    assert "encoder.conv1.weight: checkpoint (64, 3, 7, 7) vs network (64, 1, 7, 7)" in str(err.value)
    assert "in_channels_policy='repeat'" in str(err.value) and "read from its weights" not in str(err.value)


def test_a_checkpoint_that_is_no_dict_is_refused_with_the_loads_value_error(tmp_path):
    """settings_mismatch cannot read a list: it gives no hint, and the load's ValueError stands (no AttributeError)."""
    from dira3d.evaluation import build_resnet_task_network
    from dira3d.evaluation.tasks2d import settings_mismatch
    from dira3d.utils import atomic_save

    atomic_save([1, 2], tmp_path / "list.pt")
    assert settings_mismatch(tmp_path / "list.pt", "classification", "resnet10", (16, 16, 8, 8, 8)) == ""
    assert settings_mismatch(tmp_path / "missing.pt", "classification", "resnet10", (16, 16, 8, 8, 8)) == ""
    with pytest.raises(ValueError, match="holds a list"):
        build_resnet_task_network("classification", 1, 2, backbone="resnet10", pretrained=str(tmp_path / "list.pt"))


def test_the_tiny_hint_needs_every_setting_that_fits_to_be_tiny_jsons(tmp_path):
    """A resnet10 checkpoint (tiny.json's backbone) with a decoder of other channels than tiny.json's: `--tiny` would
    not fit it, so the error names both settings and does not point at --tiny."""
    from dira3d.evaluation import build_resnet_task_network
    from dira3d.networks import ResNetUNet
    from dira3d.utils import atomic_save

    net = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=(32, 32, 16, 16, 16))
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict()}, tmp_path / "r10.pt")
    with pytest.raises(ValueError) as err:
        build_resnet_task_network("segmentation", 1, 1, pretrained=str(tmp_path / "r10.pt"))
    message = str(err.value)
    assert "fit backbone resnet10, decoder_channels [32, 32, 16, 16, 16] (read from its weights)" in message
    assert "--tiny" not in message and '--set "decoder_channels=[32,32,16,16,16]"' in message


# ---------------------------------------------------------------- boxes, IoU and the accuracy, by hand


def test_a_flat_heatmap_has_no_box_and_scores_zero():
    """A heatmap equal everywhere (Grad-CAM zero everywhere) is no region: no box, best IoU 0 at every delta (not a
    box over the whole image, which would score the area ratio)."""
    from dira3d.evaluation.gradcam import boxes_from_heatmap, localisation_accuracy

    flat = np.full((8, 8), 0.25)
    assert boxes_from_heatmap(flat, 0.5) == [] and boxes_from_heatmap(np.zeros((8, 8)), 0.1) == []
    assert localisation_accuracy([flat], [(0, 0, 8, 8)], deltas=(0.1, 0.6)) == {0.1: 0.0, 0.6: 0.0}


@pytest.mark.parametrize("a, b, iou", [
    ((0, 0, 4, 4), (5, 5, 9, 9), 0.0),  # apart along both axes: (-1) * (-1) is no overlap of 1
    ((0, 0, 4, 2), (2, 0, 6, 2), 4 / 12),  # overlap 2 x 2 of a union 8 + 8 - 4
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # empty boxes: no union, IoU 0 (not 1)
    ((1, 1, 1, 3, 3, 2), (2, 2, 1, 4, 4, 2), 1 / 7),  # 3D: 1 x 1 x 1 of 4 + 4 - 1
])
def test_box_iou_by_hand(a, b, iou):
    from dira3d.evaluation.gradcam import box_iou

    assert box_iou(a, b) == pytest.approx(iou) and box_iou(b, a) == pytest.approx(iou)


def test_boxes_end_one_past_their_last_pixel():
    from dira3d.evaluation.gradcam import boxes_from_heatmap

    heat = np.zeros((6, 7))
    heat[2, 3] = 1.0  # one pixel: (2, 3) .. (3, 4)
    heat[4:6, 0:2] = 1.0
    assert sorted(boxes_from_heatmap(heat, 0.5)) == [(2, 3, 3, 4), (4, 0, 6, 2)]


def test_a_3d_overlay_draws_the_boxes_through_the_peak_slice_only(tmp_path, monkeypatch):
    """save_overlay of a volume shows the axial slice through the hottest voxel and the boxes that cross it."""
    import matplotlib.axes

    from dira3d.evaluation.gradcam import save_overlay

    drawn = []
    real = matplotlib.axes.Axes.add_patch

    def recording(self, patch):
        drawn.append((tuple(patch.get_xy()), patch.get_width(), patch.get_height()))
        return real(self, patch)

    monkeypatch.setattr(matplotlib.axes.Axes, "add_patch", recording)
    heat = np.zeros((8, 8, 6))
    heat[1:3, 1:3, 0:2] = 1.0  # a box on slices 0..1
    heat[5:7, 4:8, 3:5] = 0.9  # a box on slices 3..4
    heat[1, 1, 1] = 2.0  # the peak: slice 1
    save_overlay(np.zeros((8, 8, 6)), heat, tmp_path / "o.png", gt_box=(0, 0, 1, 4, 4, 2), threshold=0.4)
    assert (tmp_path / "o.png").stat().st_size > 0
    assert drawn == [((0.5, 0.5), 2, 2), ((-0.5, -0.5), 4, 4)]  # the predicted box, then the ground truth


def test_scale_box_widens_to_whole_pixels_and_keeps_an_empty_box_one_pixel_wide():
    """[x, y, w, h] on a 100 x 60 image to 50 x 30 (factors 1/2): start floored, end ceiled, at least one pixel."""
    from dira3d.evaluation.localise import scale_box

    assert scale_box([8, 10, 0, 0], (100, 60), (50, 30)) == (4, 5, 5, 6)  # an empty box on whole pixels: one pixel
    assert scale_box([7, 9, 0, 0], (100, 60), (50, 30)) == (3, 4, 4, 5)  # 3.5 -> 3 (not round()'s 4)
    assert scale_box([7, 9, 4, 6], (100, 60), (50, 30)) == (3, 4, 6, 8)  # ends 5.5 -> 6, 7.5 -> 8
