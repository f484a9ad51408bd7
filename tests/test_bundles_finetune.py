"""End-to-end tests of the five fine-tuning bundles on tiny synthetic data in each task's prepared layout.

Each bundle trains from a tiny dira3d checkpoint and from scratch, is evaluated on its test split and
must beat chance on an easy task (a bright blob = positive / foreground). The bundles' metadata,
network input/output, TorchScript export and whole-scan inference on a real chest CT are checked too.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dira3d.evaluation.finetune import BUNDLES, bundle_path, main, run_finetune
from dira3d.networks import UNet
from dira3d.utils import atomic_save, load_checkpoint

CLASSIFICATION = {"luna16_nodule_fpr": ("ncc_datalist.json", (16, 16, 8)), "pecad_embolism_fpr": ("pecad_datalist.json", (16, 16, 16))}
SEGMENTATION = {"lidc_nodule_seg": ("lidc_datalist.json", (16, 16, 8), None),
                "lits_liver_seg": ("lits_datalist.json", (32, 32, 16), None),
                "brats_tumor_seg": ("brats_datalist.json", (32, 32, 16), 4)}
SCHEMA = Path(__file__).resolve().parents[1].parent / "shared" / "monai" / "meta_schema_20240725.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _save(array, path, dtype=np.float32):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4)), str(path))


def _blob(shape, centre, radius):
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) <= 1.0


def make_classification(root: Path, name: str, shape, folds: bool) -> Path:
    """Cubes in [0, 1]: positives hold a bright central blob; two candidates per patient."""
    rng = np.random.default_rng(0)
    (root / "cubes").mkdir(parents=True)
    entries = []
    for i in range(24):
        image = 0.3 + 0.05 * rng.standard_normal(shape)
        if i % 2:
            image[_blob(shape, [s / 2 for s in shape], [s / 4 for s in shape])] = 0.9
        _save(np.clip(image, 0, 1), root / "cubes" / f"c{i:02d}.nii.gz")
        entries.append({"image": f"cubes/c{i:02d}.nii.gz", "label": i % 2, "case_id": f"pat{i // 2}"})
    if folds:  # PE-CAD: three folds by patient, all under "training"
        for entry in entries:
            entry["fold"] = int(entry["case_id"][3:]) % 3
        datalist = {"training": entries, "meta": {"dataset": "synthetic"}}
    else:
        datalist = {"training": entries[:16], "validation": [], "test": entries[16:], "meta": {"dataset": "synthetic"}}
    (root / name).write_text(json.dumps(datalist))
    return root / name


def make_segmentation(root: Path, name: str, shape, channels, n_train=6, n_test=2) -> tuple[Path, float]:
    """Volumes in [0, 1] with one bright ellipsoid = the foreground mask; returns (datalist, chance Dice)."""
    rng = np.random.default_rng(1)
    (root / "vols").mkdir(parents=True)
    chance = []

    def case(i, split):
        mask = _blob(shape, [rng.uniform(0.4, 0.6) * s for s in shape], [rng.uniform(0.2, 0.3) * s for s in shape])
        image = 0.3 + 0.05 * rng.standard_normal(shape)
        image[mask] = 0.8
        image = np.clip(image, 0, 1)
        if channels:  # BraTS: 4D (x, y, z, 4) t1, t1ce, t2, flair; the tumour shows in FLAIR
            image = np.stack([0.3 + 0.05 * rng.standard_normal(shape)] * (channels - 1) + [image], axis=-1)
        _save(image, root / "vols" / f"{split}{i}_img.nii.gz")
        _save(mask, root / "vols" / f"{split}{i}_seg.nii.gz", np.uint8)
        if split == "test":
            p = mask.mean()
            chance.append(2 * p / (1 + p))  # Dice of marking every voxel foreground
        return {"image": f"vols/{split}{i}_img.nii.gz", "label": f"vols/{split}{i}_seg.nii.gz", "case_id": f"{split}{i}"}

    datalist = {"training": [case(i, "train") for i in range(n_train)], "test": [case(i, "test") for i in range(n_test)], "meta": {}}
    (root / name).write_text(json.dumps(datalist))
    return root / name, float(np.mean(chance))


def tiny_checkpoint(path: Path, in_channels: int = 1) -> Path:
    torch.manual_seed(1234)  # not the fine-tuning seed: pretrained and scratch weights must differ
    unet = UNet(spatial_dims=3, in_channels=in_channels, out_channels=1, width=0.125)
    return atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                        "meta": {"spatial_dims": 3, "in_channels": in_channels, "width": 0.125}}, path)


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(CLASSIFICATION))
def test_classification_bundle_beats_chance(bundle, tmp_path, capsys):
    name, shape = CLASSIFICATION[bundle]
    datalist = make_classification(tmp_path / "data", name, shape, folds=bundle.startswith("pecad"))
    ckpt = tiny_checkpoint(tmp_path / "dira.pt")
    for init, pretrained in (("dira", str(ckpt)), ("scratch", "")):
        result = run_finetune(bundle, {"datalist": str(datalist), "pretrained": pretrained, "seed": 0},
                              output_dir=tmp_path / init, tiny=True)
        assert result["metrics"]["auc"] > 0.75, (init, result)  # chance is 0.5
        assert json.loads((tmp_path / init / "metrics.json").read_text())["metrics"] == result["metrics"]
        state = load_checkpoint(tmp_path / init / "models" / "model.pt")
        assert any(key.startswith("encoder.") for key in state)  # a plain state_dict of the task network
    printed = capsys.readouterr().out
    assert "tensors loaded" in printed and "initialised at random" in printed


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(SEGMENTATION))
def test_segmentation_bundle_beats_chance(bundle, tmp_path):
    name, shape, channels = SEGMENTATION[bundle]
    datalist, chance = make_segmentation(tmp_path / "data", name, shape, channels)
    ckpt = tiny_checkpoint(tmp_path / "dira.pt")
    # BraTS trains on all four sequences here: the 1-channel checkpoint's first conv is repeated
    extra = {"modalities": "all"} if channels else {}
    for init, pretrained in (("dira", str(ckpt)), ("scratch", "")):
        overrides = {"datalist": str(datalist), "pretrained": pretrained, "max_epochs": 10, "patience": 10, **extra}
        result = run_finetune(bundle, overrides, output_dir=tmp_path / init, tiny=True)
        dice, iou = result["metrics"]["dice"], result["metrics"]["iou"]
        # measured 0.68-0.96 (chance 0.10-0.13): a bar near chance would let a silent learning bug (label channel,
        # intensities, post-transform, model selection) that still beats chance by a little pass
        assert dice > max(0.5, chance + 0.3), (init, result, chance)
        assert 0.0 < iou < dice <= 1.0  # foreground IoU = D / (2 - D) per case, below Dice
        assert (tmp_path / init / "models" / "model.pt").is_file()


def test_label_fraction_and_cli(tmp_path, capsys):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    code = main(["--bundle", "luna16_nodule_fpr", "--datalist", str(datalist), "--label-fraction", "0.5",
                 "--seed", "2", "--output-dir", str(tmp_path / "out"), "--tiny", "--set", "max_epochs=1"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["epochs"] == 1 and result["settings"]["label_fraction"] == 0.5
    # the values the run used are recorded, defaults included (holdout, learning rate: not passed)
    settings = result["settings"]
    assert settings["seed"] == 2 and settings["holdout"] == 0.1 and settings["learning_rate"] > 0
    assert settings["datalist"] == str(datalist.resolve()) and settings["max_epochs"] == 1
    assert "pretrained_head" not in settings  # a classifier has no decoder head to choose for
    assert '"auc"' in capsys.readouterr().out and "auc" in result["metrics"]  # printed test metrics
    with pytest.raises(FileNotFoundError, match="nonexistent_bundle"):
        bundle_path("nonexistent_bundle")


def test_a_datalist_without_test_split_fails_before_training(tmp_path, capsys):
    """The test split is scored after training: a datalist without one (e.g. the pretraining datalist)
    must fail at once, as one line naming the fix, not hours later inside a MONAI traceback."""
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    content = json.loads(datalist.read_text())
    del content["test"]
    datalist.write_text(json.dumps(content))
    code = main(["--bundle", "luna16_nodule_fpr", "--datalist", str(datalist), "--output-dir", str(tmp_path / "out"), "--tiny"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dira3d finetune: error: ") and "add a 'test' list" in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "models" / "model.pt").exists()  # nothing was trained


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_metadata_network_and_export(bundle, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    configs = bundle_path(bundle) / "configs"
    for part in ("train", "evaluate", "inference", "multi_gpu_train", "metadata"):
        json.loads((configs / f"{part}.json").read_text())
    assert (configs / "logging.conf").is_file() and (configs.parent / "LICENSE").is_file()
    assert (configs.parent / "docs" / "README.md").is_file()
    meta, inference = str(configs / "metadata.json"), str(configs / "inference.json")
    tiny = {"network_def#width": 0.125}
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference, device="cpu", n=2, **tiny)
    from dira3d.evaluation import build_task_network

    # the fine-tuned weights as the trainer writes them: a plain state_dict of the task network
    kind = "classification" if bundle in CLASSIFICATION else "segmentation"
    network = build_task_network(kind, 3, 1, 1, 0.125, "")
    atomic_save(network.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                meta_file=meta, config_file=inference, **tiny)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.rand(1, 1, 16, 16, 8)
    network.eval()
    torch.testing.assert_close(scripted(x), network(x))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_metadata_offline(bundle):
    from monai.bundle import verify_metadata

    if not SCHEMA.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA} (no internet to download it)")
    verify_metadata(meta_file=str(bundle_path(bundle) / "configs" / "metadata.json"), filepath=str(SCHEMA))


def _run_inference(bundle: str, image: Path, model_dir: Path, **overrides) -> None:
    from monai.bundle import ConfigWorkflow

    configs = bundle_path(bundle) / "configs"
    flow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                          logging_file=False, workflow_type=None, image=str(image), ckpt_dir=str(model_dir),
                          width=0.125, **overrides)
    flow.initialize()
    flow.run()
    flow.finalize()


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["lidc_nodule_seg", "lits_liver_seg"])
def test_segmentation_inference_on_real_ct_keeps_geometry(bundle, real_data, tmp_path):
    scan = tmp_path / "lung1_image.nrrd"
    shutil.copy(real_data / "lung1_image.nrrd", scan)
    from dira3d.evaluation import build_task_network

    atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), tmp_path / "models" / "model.pt")
    # a coarse grid keeps the test fast; it also exercises Spacingd + Invertd back to the input grid
    _run_inference(bundle, scan, tmp_path / "models", pixdim=[4.0, 4.0, 5.0])
    written = tmp_path / "lung1_image_seg.nii.gz"
    assert written.is_file()
    source, mask = sitk.ReadImage(str(scan)), sitk.ReadImage(str(written))
    assert mask.GetSize() == source.GetSize()
    np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(mask.GetDirection(), source.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(mask.GetOrigin(), source.GetOrigin(), atol=1e-3)
    assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


def test_lits_inference_prepares_an_mri_as_prepare_generic_did(real_data, tmp_path):
    """lits_liver_seg is the documented bundle for your own labelled scans, but its inference.json always
    windowed to HU [-1000, 1000]: a model fine-tuned on `prepare generic --modality mr` volumes saw a raw MRI
    (0..3057) as 0.5..1, its brightest tissue clipped, and segmented it without a word. `modality mr` gives the
    network the prepared volume itself; `ct` on it warns, naming the file and the setting."""
    from monai.bundle import ConfigParser

    from dira3d.data.generic import normalise_image
    from dira3d.data.io import read_image

    scan = tmp_path / "brain1_image.nrrd"
    shutil.copy(real_data / "brain1_image.nrrd", scan)
    prepared = sitk.GetArrayFromImage(normalise_image(read_image(scan), "mr")).transpose(2, 1, 0)  # RAS, (x, y, z)
    parser = ConfigParser()
    parser.read_config([str(bundle_path("lits_liver_seg") / "configs" / "inference.json")])
    parser.update({"image": str(scan), "modality": "mr"})
    seen = parser.get_parsed_content("preprocessing", lazy=False)({"image": str(scan)})["image"]
    assert seen.shape[1:] == prepared.shape
    np.testing.assert_allclose(seen[0].numpy(), prepared, atol=1e-5)
    parser["modality"] = "ct"
    with pytest.warns(UserWarning, match=r"brain1_image\.nrrd: no voxel below -500 HU.*modality to mr \(--modality mr\)"):
        windowed = parser.get_parsed_content("preprocessing", lazy=False)({"image": str(scan)})["image"]
    assert float(windowed.min()) == 0.5  # what the network used to see: the MRI squeezed into 0.5..1
    parser["modality"] = "t1"
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps the transform's error
        parser.get_parsed_content("preprocessing", lazy=False)
    assert re.search(r"modality='t1'.*'ct'.*'mr'", str(raised.value.__cause__)), raised.value
    # end to end (coarse grid): Invertd undoes the spatial steps around the MR normalisation
    from dira3d.evaluation import build_task_network

    atomic_save(build_task_network("segmentation", 3, 1, 1, 0.125, "").state_dict(), tmp_path / "models" / "model.pt")
    _run_inference("lits_liver_seg", scan, tmp_path / "models", modality="mr", pixdim=[4.0, 4.0, 6.5])
    mask = sitk.ReadImage(str(tmp_path / "brain1_image_seg.nii.gz"))
    assert mask.GetSize() == sitk.ReadImage(str(scan)).GetSize()


def test_classification_inference_writes_probabilities(tmp_path):
    from dira3d.evaluation import build_task_network

    cube = tmp_path / "candidate_007.nii.gz"
    _save(np.random.default_rng(0).random((16, 16, 8)), cube)
    atomic_save(build_task_network("classification", 3, 1, 1, 0.125, "").state_dict(), tmp_path / "models" / "model.pt")
    _run_inference("luna16_nodule_fpr", cube, tmp_path / "models", roi_size=[16, 16, 8])
    result = json.loads((tmp_path / "candidate_007_prob.json").read_text())
    assert result["classes"] == ["nodule"]
    (prediction,) = result["predictions"]
    assert prediction["image"].endswith("candidate_007.nii.gz")
    assert len(prediction["probabilities"]) == 1 and 0.0 <= prediction["probabilities"][0] <= 1.0


def test_bundle_configs_are_ascii(repo_root=Path(__file__).resolve().parents[1]):
    """MONAI reads bundle JSON with the locale's encoding: keep every config ASCII so that bundles
    load on machines whose locale is not UTF-8."""
    bad = [str(p) for p in (repo_root / "bundles").glob("*/configs/*") if not p.read_bytes().isascii()]
    assert not bad, f"non-ASCII characters in {bad}"


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "chestxray14_cls"])
def test_evaluation_and_inference_do_not_announce_a_random_network(bundle, capsys):
    """train.json reports a random start (an honest fine-tuning log); evaluate.json and inference.json
    load the trained model.pt right after building the network, so a "initialised at random" line
    there read as if an untrained model were evaluated."""
    from monai.bundle import ConfigParser

    configs = bundle_path(bundle) / "configs"
    tiny = json.loads((configs / "tiny.json").read_text())
    small = {k: tiny[k] for k in ("width", "backbone", "decoder_channels") if k in tiny}
    for files, announced in (([configs / "train.json"], True), ([configs / "train.json", configs / "evaluate.json"], False),
                             ([configs / "inference.json"], False)):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.update(small)
        parser.get_parsed_content("network_def")
        assert ("initialised at random" in capsys.readouterr().out) == announced, [f.name for f in files]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_readme_inference_finds_a_finetune_output_and_a_tiny_model(bundle):
    # `dira3d finetune --output-dir D` writes D/models/model.pt, which inference.json (bundle_root/models) does not
    # read: the README must say --ckpt_dir, and how a --tiny model gets tiny.json's network settings
    from monai.bundle import ConfigParser

    root = bundle_path(bundle)
    readme = (root / "docs" / "README.md").read_text(encoding="utf-8")
    assert "--ckpt_dir D/models" in readme
    assert f"'bundles/{bundle}/configs/inference.json','bundles/{bundle}/configs/tiny.json'" in readme
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / "inference.json"), str(root / "configs" / "tiny.json")])
    tiny = json.loads((root / "configs" / "tiny.json").read_text())
    assert parser.get_parsed_content("width") == tiny["width"] and parser.get_parsed_content("roi_size") == tiny["roi_size"]


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "brats_tumor_seg", "lidc_nodule_seg"])
def test_sliding_window_batch_is_one_setting(bundle):
    # 16 windows per forward (H100, LiTS, 512x512x300: 1.94 s against 2.23 s with 4, bf16); one id sets both the
    # validation and the inference windows, so a user short of memory lowers it in one place
    from monai.bundle import ConfigParser

    configs = bundle_path(bundle) / "configs"
    readme = (configs.parent / "docs" / "README.md").read_text(encoding="utf-8")
    assert "`sw_batch_size` (16)" in readme
    for files, inferer in (([configs / "train.json"], "validate#inferer"), ([configs / "inference.json"], "inferer")):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        if parser.get(inferer)["_target_"] != "SlidingWindowInferer":
            continue  # lidc validates on fixed crops (SimpleInferer)
        assert parser.get_parsed_content(inferer).sw_batch_size == 16
        parser["sw_batch_size"] = 2
        assert parser.get_parsed_content(inferer, lazy=False).sw_batch_size == 2


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "brats_tumor_seg"])
def test_patch_bundles_train_on_batch_size_patches_per_step(bundle, tmp_path):
    # batch 16 (docs/finetuning.md) counts the patches of one step: batch_size // num_samples volumes give
    # num_samples patches each (16 volumes x 4 patches = 64 patches per step before)
    from monai.bundle import ConfigParser

    name, shape, channels = SEGMENTATION[bundle]
    datalist, _ = make_segmentation(tmp_path, name, shape, channels, n_train=8)
    parser = ConfigParser()
    parser.read_config([str(bundle_path(bundle) / "configs" / "train.json")])
    parser.update({"datalist": str(datalist), "roi_size": [16, 16, 8], "batch_size": 4, "num_samples": 2,
                   "num_workers": 0, "cache_rate": 0.0})
    batch = next(iter(parser.get_parsed_content("train#dataloader", lazy=False)))
    assert batch["image"].shape[0] == 4 and batch["label"].shape[0] == 4


@pytest.mark.parametrize("readme", sorted(Path(__file__).resolve().parents[1].glob("bundles/*/docs/README.md")),
                         ids=lambda p: p.parents[1].name)
def test_readme_torchscript_export_writes_outside_the_repository(readme):
    """The documented `ckpt_export` commands used to write model.ts into the repository's own
    bundles/<name>/models/; the output goes to a folder of the user's, one that exists when the
    command runs (torch.jit.save does not create it): made by `mkdir -p`, or the fine-tuning output."""
    import shlex

    text = readme.read_text(encoding="utf-8").replace("\\\n", " ")
    commands = [line[line.index("python -m monai.bundle ckpt_export"):].split("`")[0]
                for line in text.splitlines() if "python -m monai.bundle ckpt_export" in line]
    for command in commands:
        words = shlex.split(command)
        args = dict(zip(words[5::2], words[6::2]))  # python -m monai.bundle ckpt_export network_def --key value ...
        filepath, ckpt = Path(args["--filepath"]), Path(args["--ckpt_file"])
        assert not filepath.is_absolute() and filepath.parts[0] != "bundles", command
        assert filepath.parent == ckpt.parent or f"mkdir -p {filepath.parent.as_posix()}" in text, command


def test_docs_say_new_scans_are_resampled_as_the_training_volumes(repo_root=Path(__file__).resolve().parents[1]):
    """A model fine-tuned on `dira3d prepare --spacing` volumes silently sees another resolution on a raw
    scan: the docs name the inference setting (`pixdim`, by default the spacing recorded in preprocessing.json), and
    it is what the bundles really have."""
    finetuning = (repo_root / "docs" / "finetuning.md").read_text(encoding="utf-8")
    deployment = (repo_root / "docs" / "deployment.md").read_text(encoding="utf-8")
    assert '--pixdim "[1, 1, 1]"' in finetuning and "meta.spacing" in finetuning and "--spacing" in finetuning
    assert '"pixdim": [1, 1, 1]' in deployment and "--spacing" in deployment
    for bundle in BUNDLES:
        config = json.loads((bundle_path(bundle) / "configs" / "inference.json").read_text())
        if bundle in CLASSIFICATION:  # documented as taking a prepared cube, without pixdim
            assert "pixdim" not in config and f"`{bundle}`" in finetuning
            continue
        spacing = [t for t in config["preprocessing"]["transforms"] if t["_target_"] == "Spacingd"]
        assert spacing and spacing[0]["pixdim"] == "@pixdim", bundle
        # the training spacing recorded beside the model (tests/test_inference_spacing.py), else the old default
        default = ", [1.0, 1.0, 1.0]" if bundle == "lidc_nodule_seg" else ""
        assert config["pixdim"] == f"$dira3d.evaluation.trained_spacing(@ckpt_dir{default})", bundle
        assert f"`{bundle}`" in finetuning, bundle


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluate_and_inference_name_a_missing_or_unfitting_model(bundle, tmp_path):
    """evaluate.json / inference.json without a trained model.pt raised a bare FileNotFoundError, and a
    --tiny model under the default settings a page of size mismatches, both deep in MONAI's traceback."""
    from monai.bundle import ConfigParser

    configs = bundle_path(bundle) / "configs"
    def error(overrides):  # the check runs when the engine starts (the handler is called), not when it is built
        parser = ConfigParser()
        parser.read_config([str(configs / "inference.json")])
        parser.update({"ckpt_dir": str(tmp_path / "models"), **overrides})
        loader = parser.get_parsed_content("handlers#0")
        with pytest.raises(Exception) as raised:
            loader(None)
        return raised.value

    missing = error({})
    assert isinstance(missing, FileNotFoundError) and "fine-tune first" in str(missing) and "--ckpt_dir" in str(missing)
    tiny = json.loads((configs / "tiny.json").read_text())
    small = {k: tiny[k] for k in ("width", "backbone", "decoder_channels") if k in tiny}
    trained = ConfigParser()
    trained.read_config([str(configs / "inference.json")])
    trained.update(small)
    atomic_save(trained.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    unfitting = error({})
    assert isinstance(unfitting, ValueError), unfitting
    import re

    assert re.search("the weights fit --(width 0.125|backbone resnet10).*tiny.json", str(unfitting)), unfitting
    from dira3d.evaluation import fine_tuned_weights

    path = str(tmp_path / "models" / "model.pt")
    assert fine_tuned_weights(path, trained.get_parsed_content("network_def")) == path
    evaluate = json.loads((configs / "evaluate.json").read_text())
    assert evaluate["validate#handlers"][0]["_target_"] == "dira3d.evaluation.FineTunedCheckpointLoader"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_has_the_required_properties_of_an_infer_workflow(bundle, tmp_path):
    # MONAI's ConfigWorkflow(workflow_type="infer") (Model Zoo checks, MONAI Label) requires dataset_dir among others
    from monai.bundle import ConfigWorkflow

    configs = bundle_path(bundle) / "configs"
    flow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                          logging_file=False, workflow_type="infer", image=str(tmp_path / "scan.nii.gz"))
    flow.initialize()
    assert not flow.check_properties()
    assert flow.dataset_dir == str(tmp_path)


@pytest.mark.parametrize("readme", sorted(Path(__file__).resolve().parents[1].glob("bundles/*/docs/README.md")),
                         ids=lambda p: p.parents[1].name)
def test_readme_runs_write_outside_the_bundle_folder(readme):
    """`--bundle_root bundles/<name>` put models/ and eval/ into the repository's own bundle folder (not ignored by git)."""
    text = readme.read_text(encoding="utf-8")
    assert "--bundle_root bundles/" not in text


@pytest.mark.parametrize("bundle", ["luna16_nodule_fpr", "pecad_embolism_fpr"])
def test_classification_inference_refuses_a_raw_hu_scan(bundle, tmp_path):
    """inference.json on a raw CT (HU) used to print a probability of the centre crop of unscaled HU."""
    import nibabel as nib
    from monai.bundle import ConfigParser

    from dira3d.data.errors import DataError

    scan = tmp_path / "raw_scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(-1024, 747, (40, 40, 20)).astype(np.float32), np.eye(4)), scan)
    parser = ConfigParser()
    parser.read_config([str(bundle_path(bundle) / "configs" / "inference.json")])
    parser.update({"image": str(scan), "roi_size": [32, 32, 16]})
    from dira3d.engines.inputs import data_error_in

    with pytest.raises(RuntimeError) as raised:  # MONAI wraps the transform's error
        parser.get_parsed_content("preprocessing")({"image": str(scan)})
    cause = data_error_in(raised.value)
    assert isinstance(cause, DataError), raised.value
    assert re.search(r"raw_scan\.nii\.gz.*from -10[\d.]+ to 74[\d.]+, outside \[0, 1\].*candidate cube", str(cause)), cause
    parser["intensity_range"] = None  # the way out for scans scaled by the user's own preprocessing
    assert parser.get_parsed_content("preprocessing", lazy=False)({"image": str(scan)})["image"].shape == (1, 32, 32, 16)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "luna16_nodule_fpr"])
def test_finetune_refuses_a_datalist_of_raw_hu_scans_before_training(bundle, tmp_path, capsys):
    """A datalist of raw CTs (HU) instead of `dira3d prepare` output trained on unscaled values without a word."""
    if bundle in SEGMENTATION:
        name, shape, _ = SEGMENTATION[bundle]
        datalist, _ = make_segmentation(tmp_path / "data", name, shape, None, n_train=3, n_test=1)
        task = "lits"
    else:
        name, shape = CLASSIFICATION[bundle]
        datalist = make_classification(tmp_path / "data", name, shape, folds=False)
        task = "luna16"
    for path in sorted((tmp_path / "data").glob("*/*.nii.gz")):
        if not path.name.endswith("_seg.nii.gz"):  # the scans as they come: HU, -1000 air .. 1000 bone
            _save(np.asarray(nib.load(path).dataobj) * 2000 - 1000, path, np.int16)
    code = main(["--bundle", bundle, "--datalist", str(datalist), "--output-dir", str(tmp_path / "out"), "--tiny"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("dira3d finetune: error: "), err
    assert re.search(rf"{re.escape(str(tmp_path / 'data'))}/\w+/\w+\.nii\.gz: has intensities from -\d+ to -?\d+, "
                     rf"outside \[0, 1\]: .*run `dira3d prepare {task} \.\.\.` \(docs/data\.md.*fix the datalist", lines[0]), err
    assert "Traceback" not in err and not (tmp_path / "out" / "models" / "model.pt").exists()  # nothing was trained
    # the way out for volumes scaled by the user's own preprocessing: the check is off, training runs. On these raw HU
    # scans (-400 outside the liver) no voxel but the liver's is above lits' image_threshold 0, so MONAI's
    # RandCropByPosNegLabeld finds no background to sample and says so: what the check above keeps from training
    balance = r"Num foregrounds \d+, Num backgrounds 0, unable to generate class balanced samples"
    with pytest.warns(UserWarning, match=balance) if bundle == "lits_liver_seg" else nullcontext():
        assert main(["--bundle", bundle, "--datalist", str(datalist), "--output-dir", str(tmp_path / "own"), "--tiny",
                     "--set", "intensity_range=null", "--set", "max_epochs=1"]) == 0
    assert (tmp_path / "own" / "models" / "model.pt").is_file()


@pytest.mark.parametrize("bundle", sorted(SEGMENTATION))
def test_segmentation_bundles_refuse_a_label_of_another_shape(bundle, tmp_path):
    """lidc_nodule_seg cropped image and label to roi_size each (misplaced targets, no error); lits_liver_seg
    validated them without a word and failed in RandCropByPosNegLabeld without naming the files."""
    from monai.bundle import ConfigParser

    from dira3d.data.errors import DataError
    from dira3d.engines.inputs import data_error_in

    _, shape, channels = SEGMENTATION[bundle]
    image = np.full((*shape, channels) if channels else shape, 0.5)
    _save(image, tmp_path / "case_img.nii.gz")
    _save(np.zeros((shape[0] - 2, *shape[1:])), tmp_path / "other_seg.nii.gz", np.uint8)
    parser = ConfigParser()
    parser.read_config([str(bundle_path(bundle) / "configs" / f) for f in ("train.json", "tiny.json")])
    item = {"image": str(tmp_path / "case_img.nii.gz"), "label": str(tmp_path / "other_seg.nii.gz")}
    for preprocessing in ("train#preprocessing", "validate#preprocessing"):
        with pytest.raises(RuntimeError) as raised:  # MONAI wraps the transform's error
            parser.get_parsed_content(preprocessing)(dict(item))
        cause = data_error_in(raised.value)
        assert isinstance(cause, DataError), raised.value
        assert re.search(rf"case_img\.nii\.gz: has shape \({shape[0]}, .* its label .*other_seg\.nii\.gz has shape "
                         rf"\({shape[0] - 2}, .*fix the datalist", str(cause)), cause
    _save(np.zeros(shape), tmp_path / "other_seg.nii.gz", np.uint8)  # on the image's grid: accepted
    assert parser.get_parsed_content("validate#preprocessing")(dict(item))["label"].shape[1:] == shape


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_a_checkpoint_of_another_width_names_the_width_setting(kind, tmp_path):
    """`dira3d pretrain --tiny` (width 0.125) then `dira3d finetune --pretrained` at the bundles' default width 1.0
    failed with the shapes of 48 tensors and 'build the network with the checkpoint's width', naming no setting."""
    from dira3d.evaluation import build_task_network

    ckpt = tiny_checkpoint(tmp_path / "best.pt")
    with pytest.raises(ValueError, match=r"pretrained at width 0\.125, but the task network is built at width 1; set the "
                                         r"bundle's width to 0\.125 \(`dira3d finetune --set width=0\.125`"):
        build_task_network(kind, 3, 1, 1, 1.0, str(ckpt))
    build_task_network(kind, 3, 1, 1, 0.125, str(ckpt))  # the width it names loads


@pytest.mark.parametrize("bundle", ["lits_liver_seg", "brats_tumor_seg"])
def test_tiny_validation_takes_whole_volumes_of_different_sizes(bundle, tmp_path):
    """LiTS / BraTS validate on whole volumes (sliding window), which differ in size from scan to scan (LiTS: 74 to
    987 slices): tiny.json's val_batch_size 2 stacked two holdout volumes into one batch, and a `--tiny` smoke run on
    such data ended in its first validation with MONAI's 'stack expects each tensor to be equal size' traceback."""
    from monai.bundle import ConfigParser

    _, _, channels = SEGMENTATION[bundle]
    entries = []
    for i, shape in enumerate([(20, 18, 10), (24, 16, 12)]):
        image = np.full(shape, 0.3)
        mask = np.zeros(shape, np.uint8)
        mask[4:10, 4:10, 2:6] = 1
        image[mask > 0] = 0.8
        if channels:
            image = np.stack([image] * channels, axis=-1)
        _save(image, tmp_path / f"v{i}_img.nii.gz")
        _save(mask, tmp_path / f"v{i}_seg.nii.gz", np.uint8)
        entries.append({"image": str(tmp_path / f"v{i}_img.nii.gz"), "label": str(tmp_path / f"v{i}_seg.nii.gz")})
    configs = bundle_path(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "tiny.json")])
    parser.update({"validate#datalist": entries, "cache_rate": 0.0, "image_channels": None})
    batches = list(parser.get_parsed_content("validate#dataloader", lazy=False))
    assert [tuple(b["image"].shape[2:]) for b in batches] == [(20, 18, 10), (24, 16, 12)]


def test_lidc_trains_on_crops_outlined_by_different_numbers_of_readers(tmp_path):
    """`dira3d prepare lidc` lists `reader_nodule_ids` per crop, one per reader (1 to 4): lidc_nodule_seg's first
    training batch failed in MONAI's collate ('each element in list of batch should be of equal size')."""
    from monai.bundle import ConfigParser

    name, shape, _ = SEGMENTATION["lidc_nodule_seg"]
    datalist, _ = make_segmentation(tmp_path, name, shape, None, n_train=8)
    content = json.loads(datalist.read_text())
    for i, entry in enumerate(content["training"] + content["test"]):
        entry["reader_nodule_ids"] = [f"IL057_{k}" for k in range(1 + i % 4)]
    datalist.write_text(json.dumps(content))
    parser = ConfigParser()
    parser.read_config([str(bundle_path("lidc_nodule_seg") / "configs" / f) for f in ("train.json", "tiny.json")])
    parser.update({"datalist": str(datalist), "batch_size": 4, "cache_rate": 0.0})
    batch = next(iter(parser.get_parsed_content("train#dataloader", lazy=False)))
    assert batch["image"].shape == (4, 1, *shape) and "reader_nodule_ids" not in batch
