"""Bad input everywhere data enter: each kind of broken file or datalist is fed to the pretraining
loader and to the ``dira3d`` commands; each must fail with an error that names the file and the
problem, and must not touch what an earlier run wrote. The number of bad inputs tried is printed."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import pytest
from monai.data import Dataset
from monai.transforms import Compose, EnsureChannelFirstd

from dira3d.engines import CheckVolumed, load_datalist
from dira3d.engines.inputs import LoadVolumed, data_error_in

TRIED: list[str] = []


def volume(path: Path, shape=(24, 24, 12), nan: bool = False, spacing=(1.0, 1.0, 2.0)) -> Path:
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    if nan:
        data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0][: 4]) if len(shape) == 3 else np.eye(4)), path)
    return path


def with_pixdim(path: Path, index: int, value: float) -> Path:
    """Write ``value`` into pixdim[index] of a NIfTI header (readers would 'repair' it on save)."""
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    raw[76 + 4 * index: 80 + 4 * index] = struct.pack("<f", value)
    raw[252:256] = struct.pack("<hh", 0, 0)  # qform/sform codes 0: the header's pixdim is the spacing
    path.write_bytes(gzip.compress(bytes(raw)) if path.suffix == ".gz" else bytes(raw))
    return path


def datalist(folder: Path, entries: list[dict], name="pretrain_datalist.json") -> Path:
    path = folder / name
    path.write_text(json.dumps({"training": entries, "validation": entries[:1], "meta": {}}))
    return path


def load_all(path: Path) -> None:
    """The pretraining bundle's loading path: checked datalist, then load + check every volume."""
    items = load_datalist(path, "training")
    transform = Compose([LoadVolumed("image", image_only=True), EnsureChannelFirstd("image"), CheckVolumed("image")])
    dataset = Dataset(items, transform)
    for i in range(len(dataset)):
        dataset[i]


def expect_error(func, *names: str, problem: str) -> str:
    """Call ``func``; the error (or the DataError behind MONAI's wrapper) must name every ``names`` and ``problem``."""
    with pytest.raises(Exception) as info:
        func()
    err = data_error_in(info.value) or info.value
    message = str(err)
    for text in (*names, problem):
        assert text in message, f"{text!r} not in {message!r}"
    TRIED.append(problem)
    return message


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def good(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        volume(folder / f"ok{i}.nii.gz")
    return folder


def test_pretraining_loader_rejects_each_bad_input_naming_the_file(good):
    ok = [{"image": "ok0.nii.gz", "case_id": "a"}, {"image": "ok1.nii.gz", "case_id": "b"}]
    load_all(datalist(good, ok))  # the good data pass

    expect_error(lambda: load_all(good / "nope.json"), "nope.json", problem="does not exist")
    (good / "broken.json").write_text("{not json")
    expect_error(lambda: load_all(good / "broken.json"), "broken.json", problem="not valid JSON")
    path = datalist(good, [*ok, {"case_id": "c"}], "no_image.json")
    expect_error(lambda: load_all(path), "no_image.json", problem="entry 2 has no 'image'")
    path = datalist(good, [*ok, {"image": "gone.nii.gz", "case_id": "c"}], "missing.json")
    expect_error(lambda: load_all(path), "gone.nii.gz", problem="does not exist")
    path = datalist(good, ok, "wrong_key.json")
    expect_error(lambda: load_datalist(path, "train"), "wrong_key.json", problem="has no 'train' key")
    path.write_text(json.dumps({"training": ok, "validation": []}))  # `dira3d prepare` defaults to --val-fraction 0
    expect_error(lambda: load_datalist(path, "validation"), "wrong_key.json", problem="empty 'validation' list; prepare a validation share (`dira3d prepare generic ... --val-fraction`)")

    volume(good / "nan.nii.gz", nan=True)
    expect_error(lambda: load_all(datalist(good, [{"image": "nan.nii.gz"}], "d1.json")), "nan.nii.gz", problem="1 NaN/Inf voxels")
    volume(good / "flat.nii.gz", shape=(24, 24))
    expect_error(lambda: load_all(datalist(good, [{"image": "flat.nii.gz"}], "d2.json")), "flat.nii.gz", problem="2D image")
    volume(good / "slice.nii.gz", shape=(24, 24, 1))
    expect_error(lambda: load_all(datalist(good, [{"image": "slice.nii.gz"}], "d3.json")), "slice.nii.gz", problem="single slice")
    with_pixdim(volume(good / "zero.nii.gz"), 1, 0.0)
    expect_error(lambda: load_all(datalist(good, [{"image": "zero.nii.gz"}], "d4.json")), "zero.nii.gz", problem="spacing")
    with_pixdim(volume(good / "neg.nii.gz"), 3, -2.0)
    expect_error(lambda: load_all(datalist(good, [{"image": "neg.nii.gz"}], "d5.json")), "neg.nii.gz", problem="spacing")
    (good / "trunc.nii.gz").write_bytes((good / "ok0.nii.gz").read_bytes()[:200])
    expect_error(lambda: load_all(datalist(good, [{"image": "trunc.nii.gz"}], "d6.json")), "trunc.nii.gz", problem="trunc.nii.gz")


def test_pretrain_command_names_the_bad_file_and_keeps_earlier_outputs(good, tmp_path, capsys):
    from dira3d.engines.command import main

    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    (out / "models" / "last.pt").write_bytes(b"an earlier run's checkpoint")
    before = digest(out)
    volume(good / "nan.nii.gz", nan=True)
    path = datalist(good, [{"image": "ok0.nii.gz"}, {"image": "nan.nii.gz"}])
    assert main(["--datalist", str(path), "--output", str(out), "--tiny", "--override", "num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "nan.nii.gz" in err and "NaN/Inf voxels" in err
    TRIED.append("pretrain: NaN volume")
    path = datalist(good, [{"image": "ok0.nii.gz"}, {"image": "gone.nii.gz"}], "missing.json")
    assert main(["--datalist", str(path), "--output", str(out), "--tiny"]) == 2
    assert "gone.nii.gz" in capsys.readouterr().err
    TRIED.append("pretrain: missing datalist entry")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        main(["--datalist", str(path), "--output", str(blocker / "run")])
    assert "not writable" in capsys.readouterr().err
    TRIED.append("pretrain: unwritable output")
    path = datalist(good, [{"image": "ok0.nii.gz"}, {"image": "ok1.nii.gz"}], "typo.json")
    with pytest.raises(SystemExit):  # MONAI ignores unknown ids: a typo would silently train with the default
        main(["--datalist", str(path), "--output", str(out), "--tiny", "--override", "max_epoch=1"])
    assert "no setting 'max_epoch' (did you mean 'max_epochs'?)" in capsys.readouterr().err
    TRIED.append("pretrain: misspelt override")
    with pytest.raises(SystemExit):  # a bundle config by name is found in the bundle (the check lists it) ...
        main(["--datalist", str(path), "--output", str(out), "--config", "performance.json", "--override", "max_epoch=1"])
    assert "in train.json, performance.json of" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # ... and a name that is neither a file nor a bundle config is refused
        main(["--datalist", str(path), "--output", str(out), "--config", "performanc.json"])
    assert "--config performanc.json: no such file" in (err := capsys.readouterr().err) and "performance.json" in err
    TRIED.append("pretrain: unknown --config")
    (tmp_path / "models").mkdir()  # a folder where the config file goes: it was "--config models: no such file"
    (tmp_path / "models" / "mine.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["--datalist", str(path), "--output", str(out), "--config", str(tmp_path / "models")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dira3d pretrain: error: --config {tmp_path / 'models'} is a folder; give a config file (JSON or YAML) in it "
        "(mine.json) or one of the bundle's configs by name (e.g. performance.json)")
    TRIED.append("pretrain: a folder as --config")
    assert main(["--datalist", str(path), "--output", str(out), "--tiny", "--override", "dis_mode=mocoo"]) == 2
    err = capsys.readouterr().err
    assert "dira3d pretrain: error: dis_mode='mocoo' is not supported" in err and "Traceback" not in err, err
    TRIED.append("pretrain: unknown dis_mode")
    assert digest(out) == before  # nothing an earlier run wrote was touched


def test_prepare_generic_reports_bad_masks_and_volumes(tmp_path, capsys):
    from dira3d.data.generic import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in ("good", "empty", "shifted", "flat"):
        volume(src / f"{name}_image.nii.gz", shape=(24, 24) if name == "flat" else (24, 24, 12))
        mask = np.zeros((24, 24, 12), np.uint8)
        if name != "empty":
            mask[8:12, 8:12, 4:6] = 1
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        if name == "shifted":
            affine[0, 3] = 5.0  # misaligned: another origin
        nib.save(nib.Nifti1Image(mask, affine), src / f"{name}_label.nii.gz")
    dst.mkdir()
    (dst / "earlier.txt").write_text("kept")
    before = digest(dst)
    code = main(["--src", str(src), "--dst", str(dst), "--image-suffix", "_image", "--label-suffix", "_label",
                 "--keep-going", "--workers", "1", "--modality", "mr"])  # 0..1 noise: no air, so no CT
    captured = capsys.readouterr()
    text = captured.err + captured.out + "".join(p.read_text() for p in dst.rglob("*report*.json"))
    assert code == 0  # --keep-going: bad cases are reported, the good ones written
    assert (dst / "earlier.txt").is_file() and list(dst.rglob("good*.nii.gz"))
    for name, problem in (("empty_label", "is empty"), ("shifted_label", "does not match image"), ("flat_image", "2D image")):
        assert f"{name}.nii.gz" in text and problem in text, (name, problem, text[-2000:])
        TRIED.append(f"prepare: {problem}")
    assert (dst / "earlier.txt").read_text() == "kept" and before["earlier.txt"] == digest(dst)["earlier.txt"]


def test_visual_words_and_finetune_commands_name_missing_files(good, tmp_path, capsys):
    from dira3d.evaluation.finetune import main as finetune
    from dira3d.visual_words.command import main as visual_words

    missing = tmp_path / "absent.json"
    for name, call in (("visual-words", lambda: visual_words(["--datalist", str(missing), "--out", str(tmp_path / "vw")])),
                       ("finetune", lambda: finetune(["--bundle", "luna16_nodule_fpr", "--datalist", str(missing),
                                                      "--output-dir", str(tmp_path / "ft"), "--tiny"]))):
        try:
            code = call()
        except SystemExit as exit_:
            code = exit_.code
        except Exception as err:  # noqa: BLE001 - a raised error must name the file too
            code, text = 2, str(data_error_in(err) or err)
        else:
            text = ""
        text += capsys.readouterr().err
        assert code not in (0, None) and "absent.json" in text, (name, text)
        TRIED.append(f"{name}: missing datalist")


def test_zz_print_count():
    print(f"\nbad inputs tried: {len(TRIED)} ({'; '.join(TRIED)})")
    assert len(TRIED) >= 10 or not TRIED  # (when run alone, the other tests did not fill the list)


def test_nrrd_and_metaimage_in_a_pretraining_datalist_load_like_nifti(good):
    # MONAI reads NRRD / MetaImage only with the itk package (not a dependency): LoadVolumed reads them with
    # SimpleITK, so the same volume gives the same array, and a raw-HU one meets the intensity check, named
    import SimpleITK as sitk
    from monai.transforms import Orientationd

    array = np.random.default_rng(0).random((12, 20, 24)).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    for name in ("scan.nrrd", "scan.mha", "scan.nii.gz"):
        sitk.WriteImage(image, str(good / name))
    load = Compose([LoadVolumed("image", image_only=True), EnsureChannelFirstd("image"),
                    Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))])
    nifti = load({"image": str(good / "scan.nii.gz")})["image"]
    assert tuple(nifti.shape) == (1, 24, 20, 12)
    assert np.allclose(np.diag(nifti.affine)[:3], (0.7, 0.8, 2.5))  # RAS: the spacing on the diagonal
    for name in ("scan.nrrd", "scan.mha"):
        other = load({"image": str(good / name)})["image"]
        assert torch.equal(other.as_tensor(), nifti.as_tensor()) and np.allclose(other.affine, nifti.affine), name
    load_all(datalist(good, [{"image": "scan.nrrd"}, {"image": "scan.mha"}], "itk.json"))  # checked: they pass

    sitk.WriteImage(sitk.GetImageFromArray(array * 2000 - 1000), str(good / "raw_hu.nrrd"))
    bad = datalist(good, [{"image": "raw_hu.nrrd"}], "raw.json")
    transform = Compose([LoadVolumed("image", image_only=True), EnsureChannelFirstd("image"),
                         CheckVolumed("image", value_range=(0.0, 1.0))])
    expect_error(lambda: transform(load_datalist(bad, "training")[0]), "raw_hu.nrrd", problem="outside [0, 1]")
