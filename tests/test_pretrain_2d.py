"""2D DiRA pretraining variants (bundles/dira_pretrain/configs/2d*.json) on tiny PNG chest X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dira3d.networks import ResNetClassifier, ResNetSegmenter, load_pretrained
from dira3d.utils import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "dira_pretrain" / "configs"
METHODS = ("moco", "barlow", "simsiam")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _config_files(method: str, tiny: bool = True) -> list[str]:
    return [str(CONFIGS / name) for name in ["train.json", "2d.json", f"2d_{method}.json"] + (["2d_tiny.json"] if tiny else [])]


@pytest.fixture(scope="module")
def cxr_dir(tmp_path_factory) -> Path:
    """A ChestX-ray14-like prepared folder: 8-bit grey PNGs of unequal sides and a datalist with 14-label lists."""
    root = tmp_path_factory.mktemp("cxr14")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)

    def entries(count: int, prefix: str) -> list[dict]:
        items = []
        for i in range(count):
            pixels = (rng.random((80, 72)) * 100).astype(np.uint8)
            pixels[20:50, 10 + i:40 + i] += 120  # something to restore
            Image.fromarray(pixels).save(root / "images" / f"{prefix}{i}.png")
            items.append({"image": f"images/{prefix}{i}.png", "case_id": f"{prefix}{i}",
                          "label": [float(rng.random() < 0.3) for _ in range(14)]})
        return items

    datalist = {"training": entries(4, "tr"), "validation": entries(2, "va"), "test": [], "meta": {"dataset": "synthetic"}}
    (root / "chestxray14_datalist.json").write_text(json.dumps(datalist))
    return root


def test_full_2d_configs_follow_method_md(cxr_dir):
    """The non-tiny 2D overrides hold the paper's 2D settings (docs/method.md) (parsed, not run)."""
    from monai.bundle import ConfigParser

    for method in METHODS:
        parser = ConfigParser()
        parser.read_config(_config_files(method, tiny=False))
        parser["dataset_dir"] = str(cxr_dir)
        get = parser.get_parsed_content
        assert get("spatial_dims") == 2 and get("in_channels") == 1 and get("patch_size") == [224, 224]
        assert (get("lambda_dis"), get("lambda_res"), get("lambda_adv")) == (1.0, 10.0, 0.001)
        assert get("distortion") == "dira2d" and get("pair") == "views"
        views = get("views").settings  # T(.): MoCo-v2's crop 0.2-1, flip, ColorJitter (brightness scales), blur
        assert views.scale == (0.2, 1.0) and views.flip_axes == [0] and views.jitter_prob == 0.8
        assert (views.brightness, views.brightness_kind, views.contrast) == (0.4, "scale", 0.4)
        assert views.blur_sigma == (0.1, 2.0) and views.blur_prob == 0.5
        net = get("network_def")
        assert type(net).__name__ == "ResNetUNet" and net.bottleneck_channels == 2048
        head = get("dis_head")
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        if method == "moco":  # 2048 -> 2048 -> 128 MLP, queue 65,536, m 0.999, tau 0.2, SGD 0.03
            assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048), (2048, 128)]
            assert (get("queue_size"), get("moco_momentum"), get("temperature"), get("lr_g")) == (65536, 0.999, 0.2, 0.03)
        else:  # 3-layer projector
            assert len(linears) == 3 and linears[0].in_features == 2048
        if method == "simsiam":  # 2-layer predictor, lr 0.05 * batch / 256
            pred = [m for m in get("predictor").modules() if isinstance(m, torch.nn.Linear)]
            assert len(pred) == 2 and get("lr_g") == pytest.approx(0.05 * get("batch_size") / 256)
        opt_g, opt_d = get("optimizer_g"), get("optimizer_d")
        assert isinstance(opt_g, torch.optim.SGD)
        assert opt_g.defaults["momentum"] == 0.9 and opt_g.defaults["weight_decay"] == (1.5e-6 if method == "barlow" else 1e-4)
        assert isinstance(opt_d, torch.optim.Adam) and opt_d.defaults["lr"] == 2e-4 and tuple(opt_d.defaults["betas"]) == (0.5, 0.999)
        convs = [m for m in get("adversary").modules() if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1] and [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
        assert all(c.kernel_size == (3, 3) for c in convs)


@pytest.mark.parametrize("method", METHODS)
def test_2d_variant_runs_and_transfers(method, cxr_dir, tmp_path):
    from dira3d.utils.overrides import run_bundle  # as `dira3d pretrain` runs it (monai.bundle.run warns of eval)

    out = tmp_path / method
    run_bundle(config_file=_config_files(method), meta_file=str(CONFIGS / "metadata.json"),
               logging_file=str(CONFIGS / "logging.conf"), dataset_dir=str(cxr_dir), bundle_root=str(out))
    last, best = out / "models" / "last.pt", out / "models" / "best.pt"
    assert last.is_file() and best.is_file()
    ckpt = load_checkpoint(last)
    assert ckpt["meta"]["spatial_dims"] == 2 and ckpt["meta"]["dis_mode"] == method
    assert ckpt["meta"]["backbone"] == "resnet10" and ckpt["trainer"]["epoch"] == 2
    assert ckpt["trainer"]["stage"] == "dira" and ckpt["optimizer_d"]["state"]  # the adversary trained in stage 2
    assert ckpt["schedulers"]["g"]["last_epoch"] == 2  # cosine schedule stepped once per epoch, saved for resume
    assert ckpt["optimizer_g"]["param_groups"][0]["lr"] == pytest.approx(0.0)  # cosine reaches 0 at max_epochs
    assert ("queue" in ckpt and ckpt["queue"]) if method == "moco" else True
    assert (len(ckpt["predictor"]) > 0) == (method == "simsiam")
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values() if v.is_floating_point())

    classifier = ResNetClassifier(1, 14, backbone="resnet10")
    report = load_pretrained(classifier, best, parts=("encoder",), strict=True)
    assert not report.missing and not report.mismatched and len(report.loaded) > 50
    best_ckpt = load_checkpoint(best)
    assert torch.equal(classifier.encoder.conv1.weight, best_ckpt["encoder"]["conv1.weight"])
    segmenter = ResNetSegmenter(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
    load_pretrained(segmenter, best, parts=("encoder", "decoder"), strict=True)
    key = next(iter(best_ckpt["decoder"]))
    assert torch.equal(segmenter.decoder.state_dict()[key], best_ckpt["decoder"][key])
    assert segmenter(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("settings", [["--config", "2d.json", "--config", "2d_moco.json", "--config", "2d_tiny.json"],
                                      ["--override", "spatial_dims=2", "--override", "patch_size=[32, 32]",
                                       "--override", "intensity_range=null"]])
def test_2d_pretraining_refuses_a_colour_png_naming_it(settings, tmp_path, capsys):
    """2d.json loaded PNGs with channel_dim no_channel: an RGB PNG became a 3-slice volume and stopped in Resized with
    'Sequence must have length 3, got 2', naming no file; train.json with spatial_dims 2 failed in a convolution."""
    from dira3d.engines.command import main

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        grey = (rng.random((80, 72)) * 100).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, -1) if i == 1 else grey).save(tmp_path / "images" / f"tr{i}.png")
        items.append({"image": f"images/tr{i}.png", "case_id": f"tr{i}"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    code = main(["--datalist", str(tmp_path / "datalist.json"), "--output", str(tmp_path / "out"), "--tiny", *settings])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{tmp_path / 'images' / 'tr1.png'}: has 3 channels (loaded shape (3, 72, 80)), not 1: a colour (RGB/RGBA) " \
           "image? run `dira3d prepare <dataset>`" in err, err
    assert not (tmp_path / "out" / "models" / "last.pt").exists()


def test_2d_json_refuses_a_3d_volume_naming_it_and_train_json_with_spatial_dims_2_takes_its_slices(tmp_path, capsys):
    """2d.json resizes whole 2D images: a 3D volume passed CheckVolumed (which let 3D through for any 2D
    pretraining) and stopped in Resized with 'len(spatial_size) must be greater or equal to img spatial
    dimensions', naming no file. train.json with spatial_dims 2 cuts its 2D patches from slices of 3D volumes."""
    import nibabel as nib

    from dira3d.engines.command import main

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        if i == 1:
            volume = tmp_path / "images" / "tr1.nii.gz"
            nib.save(nib.Nifti1Image(rng.random((72, 80, 12)).astype(np.float32), np.eye(4)), volume)
            items.append({"image": "images/tr1.nii.gz", "case_id": "tr1"})
            continue
        Image.fromarray((rng.random((80, 72)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"tr{i}.png")
        items.append({"image": f"images/tr{i}.png", "case_id": f"tr{i}"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    common = ["--datalist", str(tmp_path / "datalist.json"), "--tiny"]
    code = main(common + ["--output", str(tmp_path / "out2d"), "--config", "2d.json", "--config", "2d_moco.json",
                          "--config", "2d_tiny.json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{volume}: loaded as a 3D image of shape (72, 80, 12); 2d.json pretrains on whole 2D images" in err, err
    assert "pretrain with train.json and spatial_dims 2 instead" in err
    assert '(`dira3d pretrain --override spatial_dims=2 --override "patch_size=[224,224]"`, without 2d.json;' in err
    assert not (tmp_path / "out2d" / "models" / "last.pt").exists()
    # the 2D setting of train.json takes the volume's slices (and the PNGs) on purpose
    code = main(common + ["--output", str(tmp_path / "slices"), "--override", "spatial_dims=2",
                          "--override", "patch_size=[32, 32]", "--override", "intensity_range=null"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "slices" / "models" / "last.pt").is_file()
