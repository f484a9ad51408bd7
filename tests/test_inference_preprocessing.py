"""``inference.json`` of ``lits_liver_seg`` and ``brats_tumor_seg`` prepares a raw scan as the model's training
volumes were: ``dira3d finetune`` records the datalist's ``modality`` / ``window`` / ``percentiles`` / ``channels``
(and the run's ``modalities``) in ``<ckpt_dir>/preprocessing.json`` and the inference defaults are read from there (end to end with a real
fine-tuning run in tests/test_data_generic.py)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.preprocessing import (
    datalist_preprocessing,
    trained_preprocessing,
    training_preprocessing,
    write_preprocessing,
)


def _inference(ckpt_dir) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_path("lits_liver_seg") / "configs" / "inference.json")])
    parser.update({"ckpt_dir": str(ckpt_dir)})
    return parser


def test_a_soft_tissue_window_recorded_by_prepare_reaches_inference(tmp_path):
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"dataset": "lits", "window": [-100, 400], "spacing": None}}))
    # nulls and other keys left out, but a null spacing is kept: the volumes kept their own voxel size
    assert datalist_preprocessing(datalist) == {"window": [-100, 400], "spacing": None}
    write_preprocessing(tmp_path / "models", datalist_preprocessing(datalist))
    parser = _inference(tmp_path / "models")
    assert parser.get_parsed_content("hu_window") == [-100, 400]
    assert parser.get_parsed_content("modality") == "ct"  # not recorded: the default


def test_without_the_file_the_bundle_defaults_hold(tmp_path):
    parser = _inference(tmp_path / "models")  # a model trained before dira3d recorded it, or by train.json alone
    assert parser.get_parsed_content("hu_window") == [-1000, 1000]
    assert parser.get_parsed_content("modality") == "ct"
    assert parser.get_parsed_content("percentiles") == [0.5, 99.5]
    assert write_preprocessing(tmp_path / "models", {}) is None and not (tmp_path / "models").exists()


@pytest.mark.parametrize("content, message", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON array"),
                                              ("", "is empty")])
def test_a_garbled_file_is_named_with_what_to_do(tmp_path, content, message):
    (tmp_path / "preprocessing.json").write_text(content)
    with pytest.raises(ValueError, match=rf"preprocessing\.json.*{message}") as raised:
        trained_preprocessing(tmp_path, "modality", "ct")
    assert "delete" in str(raised.value)


@pytest.mark.parametrize("key, value, setting", [
    ("modality", 5, "--modality"), ("modality", "pet", "--modality"), ("window", "lung", "--hu_window"),
    ("window", [400, -100], "--hu_window"), ("percentiles", [0.5], "--percentiles"), ("percentiles", [1, 101], "--percentiles"),
    ("channels", "flair", "--image_channels"), ("modalities", ["flair", "t9"], "--modalities"),
    ("prepared_size", "512", "--prepared_size"), ("prepared_size", True, "--prepared_size"), ("spacing", "1.0", "--pixdim"),
])
def test_a_value_of_the_wrong_form_is_named_with_its_setting(tmp_path, caplog, key, value, setting):
    # valid JSON edited by hand: its value went on as the setting and failed later, elsewhere, or not at all
    from dira3d.data.errors import DataError

    (tmp_path / "preprocessing.json").write_text(json.dumps({key: value}))
    with caplog.at_level("INFO", logger="dira3d.evaluation.preprocessing"), pytest.raises(DataError) as raised:
        trained_preprocessing(tmp_path, key, None)
    assert str(raised.value).startswith(f"{tmp_path / 'preprocessing.json'}: {key} {value!r} is not "), raised.value
    assert f"pass {setting} on the command line" in str(raised.value) and "fine-tune again" in str(raised.value)
    assert not caplog.records  # no "inference <key> <value>: as the model was trained" before the error


# --- brats_tumor_seg: the percentiles, the sequences and their channel order ------------------------------------

BRATS_ORDER = ["flair", "t2", "t1ce", "t1"]  # `dira3d prepare brats --modalities flair t2 t1ce t1`


def _brats_inference(ckpt_dir) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_path("brats_tumor_seg") / "configs" / "inference.json")])
    parser.update({"ckpt_dir": str(ckpt_dir)})
    return parser


def _raw_brats_scan(path) -> np.ndarray:
    """A raw (unnormalised) 4D scan in BRATS_ORDER, channels last as prepare writes them; each sequence its own
    intensity scale, so that a swapped channel or other percentiles show in the numbers."""
    rng = np.random.default_rng(0)
    array = np.stack([rng.uniform(0, 100 * (c + 1), (12, 10, 8)) for c in range(4)], axis=-1).astype(np.float32)
    array[:2] = 0  # background
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return array


def test_brats_inference_prepares_a_scan_as_the_training_volumes_were(tmp_path):
    """Data prepared with `--percentiles 2 98 --modalities flair t2 t1ce t1` and fine-tuned on t2,flair: inference
    used 0.5 / 99.5 percentiles, took the channels as t1, t1ce, t2, flair and gave the network FLAIR alone."""
    from dira3d.data.normalize import normalize_mr
    from dira3d.evaluation.transforms import datalist_channels

    datalist = tmp_path / "brats_datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"dataset": "brats2018", "channels": BRATS_ORDER,
                                                             "percentiles": [2.0, 98.0], "spacing": None}}))
    settings = training_preprocessing(datalist, modalities="t2,flair", image_channels=datalist_channels(str(datalist)))
    assert settings == {"percentiles": [2.0, 98.0], "channels": BRATS_ORDER, "modalities": ["t2", "flair"],
                        "spacing": None}
    write_preprocessing(tmp_path / "models", settings)
    parser = _brats_inference(tmp_path / "models")
    assert parser.get_parsed_content("in_channels") == 2
    raw = _raw_brats_scan(tmp_path / "scan.nii.gz")
    seen = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "scan.nii.gz")})["image"]
    for channel, name in enumerate(["t2", "flair"]):
        expected = normalize_mr(raw[..., BRATS_ORDER.index(name)], lower=2.0, upper=98.0)
        np.testing.assert_allclose(seen[channel].numpy(), expected, atol=1e-5, err_msg=name)
    # the command line wins
    parser = _brats_inference(tmp_path / "models")
    parser.update({"percentiles": [0.5, 99.5], "modalities": "flair", "image_channels": ["t1", "t1ce", "t2", "flair"]})
    seen = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "scan.nii.gz")})["image"]
    np.testing.assert_allclose(seen[0].numpy(), normalize_mr(raw[..., 3], lower=0.5, upper=99.5), atol=1e-5)


def test_brats_inference_without_the_file_keeps_its_defaults(tmp_path):
    parser = _brats_inference(tmp_path / "models")
    assert parser.get_parsed_content("modalities") == "flair" and parser.get_parsed_content("image_channels") is None
    assert parser.get_parsed_content("percentiles") == [0.5, 99.5]


def test_finetune_records_the_sequences_brats_inference_needs(tmp_path, monkeypatch):
    """`dira3d finetune --bundle brats_tumor_seg` writes the datalist's channels and percentiles and the run's
    modalities to models/preprocessing.json before it trains (stopped here right there)."""
    from monai.bundle import ConfigWorkflow
    from test_bundles_finetune import make_segmentation

    from dira3d.evaluation.finetune import run_finetune

    datalist, _ = make_segmentation(tmp_path / "data", "brats_datalist.json", (32, 32, 16), 4, n_train=3, n_test=1)
    content = json.loads(datalist.read_text())
    content["meta"] = {"dataset": "brats2018", "channels": BRATS_ORDER, "percentiles": [1.0, 99.0]}
    datalist.write_text(json.dumps(content))

    class Stop(BaseException):
        pass

    def stop(self):
        raise Stop

    monkeypatch.setattr(ConfigWorkflow, "run", stop)
    with pytest.raises(Stop):
        run_finetune("brats_tumor_seg", {"datalist": str(datalist), "modalities": "t1ce,flair"},
                     output_dir=tmp_path / "out", tiny=True)
    recorded = json.loads((tmp_path / "out" / "models" / "preprocessing.json").read_text())
    assert recorded == {"percentiles": [1.0, 99.0], "channels": BRATS_ORDER, "modalities": ["t1ce", "flair"]}
    parser = _brats_inference(tmp_path / "out" / "models")
    assert parser.get_parsed_content("modalities") == ["t1ce", "flair"]
    assert parser.get_parsed_content("image_channels") == BRATS_ORDER


def test_the_model_saver_keeps_the_sequences_of_a_brats_run(tmp_path):
    """`dira3d finetune --bundle brats_tumor_seg --set modalities=t1ce,flair` wrote the run's modalities to
    preprocessing.json, but train.json's BestModelSaver, given only the datalist's settings, replaced the file at
    the first validation without them: inference.json then took FLAIR alone and could not load the 2-channel model."""
    from test_bundles_finetune import make_segmentation

    from dira3d.evaluation.finetune import run_finetune

    datalist, _ = make_segmentation(tmp_path / "data", "brats_datalist.json", (32, 32, 16), 4, n_train=3, n_test=1)
    content = json.loads(datalist.read_text())
    content["meta"] = {"dataset": "brats2018", "channels": BRATS_ORDER, "percentiles": [1.0, 99.0]}
    datalist.write_text(json.dumps(content))
    run_finetune("brats_tumor_seg", {"datalist": str(datalist), "modalities": "t1ce,flair"},
                 output_dir=tmp_path / "out", tiny=True)
    models = tmp_path / "out" / "models"
    assert (models / "model.pt").is_file()
    recorded = json.loads((models / "preprocessing.json").read_text())
    assert recorded == {"percentiles": [1.0, 99.0], "channels": BRATS_ORDER, "modalities": ["t1ce", "flair"]}
    assert _brats_inference(models).get_parsed_content("in_channels") == 2


def _sequence_files(folder, raw: np.ndarray, affines: dict[int, np.ndarray] | None = None,
                    sizes: dict[int, int] | None = None) -> list[str]:
    """The 4 sequences of ``raw`` (BRATS_ORDER, channels last) as one 3D NIfTI each, as BraTS delivers a case;
    ``affines`` / ``sizes``: another header or a shorter first axis for a channel."""
    files = []
    for channel, name in enumerate(BRATS_ORDER):
        array = raw[: (sizes or {}).get(channel), ..., channel]
        path = folder / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, (affines or {}).get(channel, np.eye(4))), str(path))
        files.append(str(path))
    return files


def _data_error_raised(transform, data):
    """The DataError that ``transform(data)`` raised, found along the chain MONAI's transform errors wrap it in."""
    from dira3d.data.errors import DataError

    with pytest.raises(Exception) as raised:
        transform(data)
    error = raised.value
    while error is not None and not isinstance(error, DataError):
        error = error.__cause__ or error.__context__
    assert error is not None, f"not a DataError: {raised.value!r}"
    return error


def test_brats_inference_takes_a_case_as_its_four_sequence_files(tmp_path):
    """A new BraTS case comes as four files (<id>_t1, _t1ce, _t2, _flair): `--image "['t1', ..., 'flair']"` in
    image_channels order is read as the 4D volume `prepare brats` would stack (a walk of 2026-11-28, documented in the
    bundle's README). A file on another grid than the first was refused as "cannot be loaded (ValueError: all input
    arrays must have the same shape); the file is truncated, corrupt or not an image", naming no file, or, of another
    spacing or origin, stacked onto the first file's grid without a word; it is named as a sequence off the grid."""
    write_preprocessing(tmp_path / "models", {"percentiles": [0.5, 99.5], "channels": BRATS_ORDER,
                                              "modalities": ["t1", "t1ce", "t2", "flair"], "spacing": None})
    preprocessing = _brats_inference(tmp_path / "models").get_parsed_content("preprocessing")
    raw = _raw_brats_scan(tmp_path / "scan.nii.gz")
    stacked = preprocessing({"image": str(tmp_path / "scan.nii.gz")})["image"]
    files = _sequence_files(tmp_path, raw)
    seen = preprocessing({"image": files})["image"]
    assert seen.shape == (4, 12, 10, 8)
    np.testing.assert_allclose(seen.numpy(), stacked.numpy(), atol=1e-6)

    shifted = np.eye(4)
    shifted[2, 3] = 5.0  # the FLAIR 5 mm further up
    for bad in ({"sizes": {3: 10}}, {"affines": {3: np.diag([1.0, 1.0, 2.0, 1.0])}}, {"affines": {3: shifted}}):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        files = _sequence_files(folder, raw, **bad)
        error = _data_error_raised(preprocessing, {"image": files})
        assert str(error).startswith(f"{files[3]}: sequence does not match image {files[0]}: "), error
        assert "co-registered on one voxel grid" in str(error)


@pytest.mark.parametrize("modalities, advice", [(["t1", "t1ce", "t2", "flair"], "model"), (["flair"], "image_channels")])
def test_three_sequence_files_are_told_what_the_model_takes(tmp_path, modalities, advice):
    """A case given as 3 of its sequence files: for a model of the four sequences (in_channels 4) the error said to set
    --image_channels to those three, with which the model (modalities all) cannot run either; it now says the model
    takes four and names the four files to give. For a model of FLAIR alone the image_channels example still fits."""
    write_preprocessing(tmp_path / "models", {"percentiles": [0.5, 99.5], "channels": BRATS_ORDER,
                                              "modalities": modalities, "spacing": None})
    parser = _brats_inference(tmp_path / "models")
    assert parser.get_parsed_content("in_channels") == len(modalities)
    preprocessing = parser.get_parsed_content("preprocessing")
    files = _sequence_files(tmp_path, _raw_brats_scan(tmp_path / "scan.nii.gz"))
    three = [files[0], files[1], files[3]]  # no T2
    error = _data_error_raised(preprocessing, {"image": three})
    if advice == "model":
        assert "image has 3 channel(s) but the model takes 4, the sequences ['t1', 't1ce', 't2', 'flair']" in str(error)
        assert "--image \"['<id>_t1.nii.gz', '<id>_t1ce.nii.gz', '<id>_t2.nii.gz', '<id>_flair.nii.gz']\"" in str(error)
        assert "--image_channels" not in str(error), error
    else:  # an example of 3 sequences, FLAIR first (the names are the files' own to give), with which it runs
        assert str(error).endswith("(e.g. --image_channels \"['flair', 't1', 't1ce']\")"), error
        parser.update({"image_channels": ["flair", "t1", "t1ce"]})
        assert parser.get_parsed_content("preprocessing")({"image": three})["image"].shape == (1, 12, 10, 8)
