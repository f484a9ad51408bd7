"""Unit tests of dira3d.evaluation: splits, metrics, task networks from checkpoints, transforms, reader."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from sklearn.metrics import roc_auc_score

from dira3d.evaluation import (
    SelectModalitiesd,
    SimpleITKReader,
    build_task_network,
    foreground_dice,
    foreground_iou,
    holdout_by_patient,
    load_split,
    prediction_path,
    roc_auc,
    select_fraction,
)
from dira3d.networks import UNet
from dira3d.utils import atomic_save


def _cls_entries(n_patients: int = 20, per_patient: int = 3) -> list[dict]:
    # patient p has candidates with labels (p + k) % 2 -> both classes spread over patients
    return [{"image": f"c{p}_{k}.nii.gz", "label": (p * per_patient + k) % 4 == 0, "case_id": f"p{p}"}
            for p in range(n_patients) for k in range(per_patient)]


def _touch(folder, entries: list[dict]) -> None:
    """Create the image (and label) files of ``entries`` in ``folder``: load_split checks that they exist."""
    for entry in entries:
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                (folder / entry[key]).write_bytes(b"")


def test_select_fraction_is_stratified_seeded_and_keeps_every_class():
    entries = [{"image": str(i), "label": int(i < 10), "case_id": str(i)} for i in range(100)]  # 10 positives
    quarter = select_fraction(entries, 0.25, seed=3)
    assert sum(e["label"] for e in quarter) == 3  # 2.5 of 10 positives, a half rounded up (stratified)
    assert len(quarter) == 3 + 23  # and 22.5 of 90 negatives
    assert quarter == select_fraction(entries, 0.25, seed=3)
    assert quarter != select_fraction(entries, 0.25, seed=4)
    one_percent = select_fraction(entries, 0.01, seed=0)
    assert {e["label"] for e in one_percent} == {0, 1}  # at least one sample per class
    with pytest.raises(ValueError, match="label_fraction"):
        select_fraction(entries, 0.0)


def test_select_fraction_segmentation_samples_patients():
    entries = [{"image": f"{p}_{k}", "label": f"{p}_{k}_seg", "case_id": f"p{p}"} for p in range(8) for k in range(2)]
    half = select_fraction(entries, 0.5, seed=1)
    patients = {e["case_id"] for e in half}
    assert len(patients) == 4 and len(half) == 8  # whole patients, both of their volumes


def _ids(entries: list[dict]) -> set[str]:
    return {e["image"] for e in entries}


@pytest.mark.parametrize("kind", ["classification", "segmentation", "multilabel"])
def test_select_fraction_nests_smaller_fractions_in_larger_ones(kind):
    if kind == "classification":
        entries = [{"image": str(i), "label": int(i % 7 == 0), "case_id": f"p{i // 2}"} for i in range(140)]
    elif kind == "segmentation":
        entries = [{"image": f"{p}_{k}", "label": f"{p}_{k}_seg", "case_id": f"p{p}"} for p in range(50) for k in range(2)]
    else:  # class 2 in one patient, class 1 in three: the small subsets must be completed with their carriers
        entries = [{"image": f"{i}.png", "case_id": f"p{i}", "label": [float(i % 2), float(i in (3, 17, 30)), float(i == 7)]}
                   for i in range(60)]
    fractions = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    for seed in range(4):
        subsets = [_ids(select_fraction(entries, f, seed)) for f in fractions]
        sizes = [len(s) for s in subsets]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == len(entries)
        for small, large in zip(subsets, subsets[1:]):
            assert small <= large, (kind, seed, sorted(small - large))
    # the nesting is per seed, not one fixed order for every seed
    assert _ids(select_fraction(entries, 0.25, 0)) != _ids(select_fraction(entries, 0.25, 1))


def test_holdout_by_patient_has_no_leak_and_both_classes():
    entries = _cls_entries()
    train, held = holdout_by_patient(entries, 0.1, seed=0)
    assert len(train) + len(held) == len(entries)
    assert not {e["case_id"] for e in train} & {e["case_id"] for e in held}
    assert len(held) >= np.ceil(0.1 * len(entries))
    assert {int(e["label"]) for e in held} == {0, 1} == {int(e["label"]) for e in train}
    assert holdout_by_patient(entries, 0.0)[1] == []


def test_holdout_and_label_fraction_keep_the_scans_of_a_patient_id_together():
    # dira3d prepare generic --patient-from/--patient-regex: a case is a scan, patient_id its patient
    entries = [{"image": f"s{p}_{k}.nii.gz", "label": f"m{p}_{k}.nii.gz", "case_id": f"p{p}_scan{k}",
                "patient_id": f"p{p}"} for p in range(10) for k in range(3)]
    train, held = holdout_by_patient(entries, 0.1, seed=0)
    assert held and not {e["patient_id"] for e in train} & {e["patient_id"] for e in held}
    for seed in range(3):
        kept = select_fraction(entries, 0.3, seed)
        assert len(kept) == 9 and len({e["patient_id"] for e in kept}) == 3  # whole patients


def _seg_entries(key: str = "pneumothorax", positives: int = 4, n_patients: int = 20) -> list[dict]:
    """SIIM-ACR-like entries (``pneumothorax`` 0/1) or LIDC-like ones (``voxels``): the first ``positives``
    patients have a non-empty mask."""
    return [{"image": f"{i}.png", "label": f"{i}_mask.png", "case_id": f"p{i}",
             key: int(i < positives) * (1 if key == "pneumothorax" else 37)} for i in range(n_patients)]


def _without(entries: list[dict], key: str) -> list[dict]:
    """The entries as a datalist that does not say which masks are empty: the split drawn before such
    datalists completed their holdout."""
    return [{k: v for k, v in e.items() if k != key} for e in entries]


def _positive(entries: list[dict], key: str) -> bool:
    return any(e[key] > 0 for e in entries)


@pytest.mark.parametrize("key", ["pneumothorax", "voxels"])
def test_segmentation_holdout_keeps_a_non_empty_mask_when_training_can_spare_one(key, tmp_path):
    """SIIM-ACR at a small label fraction: the early-stopping holdout could be all empty masks, whose mean Dice
    (empty prediction of an empty mask = 1) rewards a network predicting nothing."""
    entries = _seg_entries(key)
    completed = 0
    for seed in range(12):
        old_train, old_held = holdout_by_patient(_without(entries, key), 0.1, seed)
        if _positive([e for e in entries if e["case_id"] in _ids_of(old_held)], key):
            continue
        completed += 1
        train, held = holdout_by_patient(entries, 0.1, seed)
        assert _positive(held, key) and _positive(train, key), (seed, held)
        assert not _ids_of(train) & _ids_of(held) and len(train) + len(held) == len(entries)
        # the drawn patients stay; one patient with a non-empty mask is added (the first of the seed's order)
        assert _ids_of(old_held) < _ids_of(held) and len(held) == len(old_held) + 1
        assert (train, held) == holdout_by_patient(entries, 0.1, seed)  # deterministic
    assert completed  # the old rule gave an all-empty holdout for some seeds
    # the bundles' path: load_split on a prepared datalist
    path = tmp_path / "siim_datalist.json"
    path.write_text(json.dumps({"training": entries, "meta": {}}))
    _touch(tmp_path, entries)
    for seed in range(12):
        held = load_split(path, "holdout", seed=seed)
        train = load_split(path, "train", seed=seed)
        assert _positive(held, key) and _positive(train, key), seed


def _ids_of(entries: list[dict]) -> set[str]:
    return {e["case_id"] for e in entries}


@pytest.mark.parametrize("key", ["pneumothorax", "voxels"])
def test_segmentation_holdout_with_a_non_empty_mask_is_unchanged(key):
    # earlier results stay reproducible where the drawn holdout already had a non-empty mask, and for datalists
    # that do not say which masks are empty (Montgomery, LiTS, BraTS: every mask has foreground)
    entries = _seg_entries(key)
    unchanged = 0
    for seed in range(12):
        old = holdout_by_patient(_without(entries, key), 0.1, seed)
        if not _positive([e for e in entries if e["case_id"] in _ids_of(old[1])], key):
            continue
        unchanged += 1
        assert holdout_by_patient(entries, 0.1, seed) == tuple([e for e in entries if e["case_id"] in _ids_of(part)]
                                                               for part in old), seed
    assert unchanged
    # a holdout of non-empty masks only is not completed with an empty one
    everything = _seg_entries(key, positives=20)
    for seed in range(4):
        assert holdout_by_patient(everything, 0.1, seed) == tuple(
            [e for e in everything if e["case_id"] in _ids_of(part)] for part in holdout_by_patient(_without(everything, key), 0.1, seed))


def test_segmentation_holdout_without_a_non_empty_mask_warns_once(tmp_path):
    # one patient (p0) has a pneumothorax: training keeps it, the holdout cannot have one
    entries = _seg_entries(positives=1)
    path = tmp_path / "siim_datalist.json"
    path.write_text(json.dumps({"training": entries, "meta": {}}))
    _touch(tmp_path, entries)
    seed = next(s for s in range(20) if "p0" not in _ids_of(holdout_by_patient(entries, 0.1, s)[1]))
    with pytest.warns(UserWarning, match=r"siim_datalist.json: the early-stopping holdout \(2 entries; label_fraction=1.0, "
                                         rf"seed={seed}, holdout=0.1, fold=None\) has no case with a non-empty mask "
                                         r"\(`pneumothorax` is 0 in all of them\): the only patient .* stays in training\. "
                                         r"Its mean Dice scores an empty prediction of an empty mask as 1"):
        train = load_split(path, "train", seed=seed)
    assert "p0" in _ids_of(train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_split(path, "holdout", seed=seed)) == 2  # warned once: not again for the holdout itself
    # no word for a datalist that does not say which masks are empty
    plain = tmp_path / "plain_datalist.json"
    plain.write_text(json.dumps({"training": _without(entries, "pneumothorax"), "meta": {}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_split(plain, "holdout", seed=seed)
    # no holdout asked (holdout=0.0): nothing to warn about, although no held-out case has a non-empty mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_split(path, "train", seed=seed, holdout=0.0)) == len(entries)


def test_a_foreground_key_on_only_some_entries_leaves_the_holdout_as_drawn(tmp_path):
    """The holdout is completed only when every entry says whether its mask is empty: an entry added by hand without
    ``voxels`` (or with null) must neither fail the split (KeyError / TypeError) nor be taken for an empty mask."""
    for missing in ("absent", None):
        entries = _seg_entries("voxels")
        if missing == "absent":
            del entries[7]["voxels"]
        else:
            entries[7]["voxels"] = None
        for seed in range(6):
            drawn = holdout_by_patient(_without(entries, "voxels"), 0.1, seed)
            assert tuple(_ids_of(part) for part in holdout_by_patient(entries, 0.1, seed)) == tuple(
                _ids_of(part) for part in drawn), (missing, seed)
        path = tmp_path / f"lidc_{missing}.json"
        path.write_text(json.dumps({"training": entries, "meta": {}}))
        _touch(tmp_path, entries)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no warning about the holdout's masks
            assert len(load_split(path, "holdout", seed=0)) == 2


def test_load_split_test_key_fold_and_errors(tmp_path):
    training = [dict(e, label=int(e["label"]), fold=i % 3) for i, e in enumerate(_cls_entries(12, 1))]
    path = tmp_path / "pecad_datalist.json"
    path.write_text(json.dumps({"training": training, "meta": {}}))
    _touch(tmp_path, training)
    test = load_split(path, "test", fold=1)
    train = load_split(path, "train", fold=1, holdout=0.1)
    held = load_split(path, "holdout", fold=1, holdout=0.1)
    assert {e["fold"] for e in test} == {1} and 1 not in {e["fold"] for e in train + held}
    assert len(test) + len(train) + len(held) == 12
    assert all(e["image"].startswith(str(tmp_path)) for e in test)  # paths resolved against the datalist folder
    with pytest.raises(ValueError, match="fold=5"):
        load_split(path, "test", fold=5)
    with pytest.raises(ValueError, match="'test' of datalist"):
        load_split(path, "test")  # no "test" key and no fold
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_split(tmp_path / "missing.json", "train")


def test_foreground_dice_and_iou_by_hand():
    pred = np.zeros((4, 4, 2), np.uint8)
    label = np.zeros((4, 4, 2), np.uint8)
    pred[0:2, 0:2, :] = 1  # 8 voxels
    label[1:3, 0:2, :] = 1  # 8 voxels, 4 shared
    assert foreground_dice(pred, label) == pytest.approx(2 * 4 / (8 + 8))
    assert foreground_iou(pred, label) == pytest.approx(4 / 12)
    # background is excluded: a two-class IoU would add 16/20 of background agreement
    empty = np.zeros_like(pred)
    assert foreground_dice(empty, empty) == 1.0 and foreground_iou(pred, empty) == 0.0
    with pytest.raises(ValueError, match="differs"):
        foreground_dice(pred, label[:2])


def test_roc_auc_matches_sklearn_and_rejects_one_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = labels * 0.3 + rng.random(50)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # hand count: 3 of 4 pairs ordered
    with pytest.raises(ValueError, match="one class"):
        roc_auc([0.2, 0.3], [1, 1])


def _tiny_checkpoint(path, in_channels=1, width=0.125):
    torch.manual_seed(7)
    unet = UNet(spatial_dims=3, in_channels=in_channels, out_channels=1, width=width)
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                 "meta": {"spatial_dims": 3, "in_channels": in_channels, "width": width}}, path)
    return unet


def test_build_task_network_loads_encoder_and_decoder(tmp_path, capsys):
    unet = _tiny_checkpoint(tmp_path / "ckpt.pt")
    seg = build_task_network("segmentation", 3, 1, 1, 0.125, str(tmp_path / "ckpt.pt"))
    cls = build_task_network("classification", 3, 1, 1, 0.125, str(tmp_path / "ckpt.pt"))
    printed = capsys.readouterr().out
    assert "encoder, decoder" in printed and "loaded" in printed
    for key, value in unet.decoder.state_dict().items():
        assert torch.equal(seg.decoder.state_dict()[key], value)
    for key, value in unet.encoder.state_dict().items():
        assert torch.equal(cls.encoder.state_dict()[key], value)
    scratch = build_task_network("classification", 3, 1, 1, 0.125, "", bn_momentum=None)
    assert "initialised at random" in capsys.readouterr().out
    assert all(m.momentum is None for m in scratch.modules() if isinstance(m, torch.nn.BatchNorm3d))


def test_wrong_checkpoint_names_keys_and_shapes(tmp_path):
    _tiny_checkpoint(tmp_path / "wide.pt", width=0.25)
    with pytest.raises(ValueError, match=r"pretrained at width 0\.25, but the task network is built at width 0\.125; "
                                         r"set the bundle's width to 0\.25"):  # its meta names the one setting to change
        build_task_network("segmentation", 3, 1, 1, 0.125, str(tmp_path / "wide.pt"))
    wide = torch.load(tmp_path / "wide.pt", weights_only=True)
    atomic_save({"encoder": wide["encoder"], "decoder": wide["decoder"]}, tmp_path / "wide_no_meta.pt")
    with pytest.raises(ValueError) as err:  # no width recorded: the keys and shapes that differ
        build_task_network("segmentation", 3, 1, 1, 0.125, str(tmp_path / "wide_no_meta.pt"))
    message = str(err.value)
    assert "encoder." in message and "8" in message and "4" in message  # key names and both channel counts
    other = {"encoder": {"features.0.weight": torch.zeros(3, 3)}, "decoder": {}}  # another architecture
    atomic_save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="features.0.weight"):
        build_task_network("classification", 3, 1, 1, 0.125, str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError):
        build_task_network("classification", 3, 1, 1, 0.125, str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="kind"):
        build_task_network("detection", 3, 1, 1, 0.125, "")


def test_select_modalities():
    image = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 2, 2)
    flair = SelectModalitiesd("image", "flair")({"image": image})["image"]
    assert flair.shape == (1, 2, 2, 2) and float(flair.max()) == 3.0  # flair is the 4th channel
    assert SelectModalitiesd("image", "all")({"image": image})["image"].shape[0] == 4
    assert SelectModalitiesd("image", "flair")({"image": image[:1]})["image"].shape[0] == 1
    with pytest.raises(ValueError, match="channel"):
        SelectModalitiesd("image", "t1,t2")({"image": image[:1]})
    with pytest.raises(ValueError, match="unknown"):
        SelectModalitiesd("image", "pet")


def test_select_modalities_follows_the_prepared_channel_order(tmp_path):
    """`dira3d prepare brats --modalities flair t1 t1ce t2` writes FLAIR first; modalities=flair used
    to take channel 3 (the T2) by the fixed t1, t1ce, t2, flair order."""
    import json

    from dira3d.evaluation.transforms import datalist_channels

    datalist = tmp_path / "brats_datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"channels": ["flair", "t1", "t1ce", "t2"]}}))
    order = datalist_channels(str(datalist))
    assert order == ["flair", "t1", "t1ce", "t2"] and datalist_channels(str(tmp_path / "absent.json")) is None
    image = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 2, 2)  # channel value = channel index
    assert float(SelectModalitiesd("image", "flair", order)({"image": image})["image"].max()) == 0.0
    assert SelectModalitiesd("image", "t2,flair", order)({"image": image})["image"][:, 0, 0, 0].tolist() == [3.0, 0.0]
    two = ["t1", "flair"]  # a two-sequence preparation
    assert float(SelectModalitiesd("image", "flair", two)({"image": image[:2]})["image"].max()) == 1.0
    with pytest.raises(ValueError, match=r"asks for \['t2'\], but the images hold \['t1', 'flair'\]"):
        SelectModalitiesd("image", "t2", two)
    with pytest.raises(ValueError, match=r"image_channels says the images hold \['t1', 'flair'\]"):
        SelectModalitiesd("image", "flair", two)({"image": image})


def test_select_modalities_suggests_image_channels_of_the_image_given():
    """A FLAIR file given to a model trained on 4-channel volumes was told to pass
    --image_channels "['t1', 't1ce', 't2', 'flair']", the value it had just been refused for; the example now has the
    image's channel count, the requested sequences first, and running with it works."""
    four = ["t1", "t1ce", "t2", "flair"]
    flair = torch.ones(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"set image_channels to the 1 sequence\(s\) this image holds, in order "
                                         r"\(e\.g\. --image_channels \"\['flair'\]\"\)$"):
        SelectModalitiesd("image", "flair", four)({"image": flair})
    assert SelectModalitiesd("image", "flair", ["flair"])({"image": flair})["image"].shape[0] == 1  # the example runs
    with pytest.raises(ValueError, match=r"\(e\.g\. --image_channels \"\['t2', 'flair'\]\"\)$"):
        SelectModalitiesd("image", "t2,flair", four)({"image": torch.ones(2, 2, 2, 2)})


def test_an_image_that_does_not_fit_without_image_channels_gets_advice_sized_to_the_model():
    """Without image_channels (a run folder without preprocessing.json), a 3-channel image given to a model of
    modalities all (4 channels) was told to set modalities to 'flair', which the 4-channel model cannot take; the advice
    now names the sequences the model takes: the 4 files for a model of four, the one sequence for a model of one."""
    three = torch.ones(3, 2, 2, 2)
    with pytest.raises(ValueError) as four:
        SelectModalitiesd("image", "all")({"image": three})
    said = str(four.value)
    assert "'flair')" not in said and "modalities to" not in said
    assert "one sequence" not in said  # a model of four sequences takes no single-sequence image
    assert said.startswith("<image of case ?>: image has 3 channel(s) but modalities=['t1', 't1ce', 't2', 'flair'] (the model takes 4 "
                           "channel(s), in_channels 4)")
    assert ("--image \"['<id>_t1.nii.gz', '<id>_t1ce.nii.gz', '<id>_t2.nii.gz', '<id>_flair.nii.gz']\"" in said
            and "image_channels" not in said.split("; ", 1)[1])  # four files in order: no image_channels needed
    with pytest.raises(ValueError, match=r"modalities=\['flair'\] \(the model takes 1 channel\(s\), in_channels 1\): "
                                         r"without image_channels it takes an image of 4 channels \[.*\] or of the one "
                                         r"sequence 'flair'; set image_channels to the 3 sequence\(s\) this image "
                                         r"holds, in order \(e\.g\. --image_channels \"\['flair', 't1', 't1ce'\]\"\)$"):
        SelectModalitiesd("image", "flair")({"image": three})
    assert SelectModalitiesd("image", "flair", ["flair", "t1", "t1ce"])({"image": three})["image"].shape[0] == 1
    with pytest.raises(ValueError, match=r"give an image holding the 2 sequences \['t1', 't2'\] and name them in "
                                         r"image_channels, .*--image_channels \"\['t1', 't2'\]\"\)"):
        SelectModalitiesd("image", "t1,t2")({"image": three[:1]})
    assert SelectModalitiesd("image", "t1,t2", ["t1", "t2"])({"image": three[:2]})["image"].shape[0] == 2  # as advised

def test_simpleitk_reader_matches_nibabel(tmp_path):
    from monai.transforms import LoadImage

    array = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -3], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "v.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "v.nii.gz")), str(tmp_path / "v.nrrd"))
    ours = LoadImage(reader=SimpleITKReader(), image_only=True)(str(tmp_path / "v.nrrd"))
    ref = LoadImage(reader="NibabelReader", image_only=True)(str(tmp_path / "v.nii.gz"))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(ref.affine), atol=1e-5)
    assert prediction_path(tmp_path / "v.nrrd", "seg", ".nii.gz") == str(tmp_path / "v_seg.nii.gz")


def test_load_split_drops_keys_some_entries_lack(tmp_path):
    """LUNA16 positives carry diameter_mm, negatives do not: batches must still collate."""
    import json

    from monai.data import list_data_collate

    from dira3d.evaluation import load_split

    entries = [{"image": f"c{i}.nii.gz", "case_id": f"p{i}", "label": i % 2, **({"diameter_mm": 5.0} if i % 2 else {})}
               for i in range(24)]
    # a test list of its own patients (one that repeats training patients is warned of)
    (tmp_path / "dl.json").write_text(json.dumps({"training": entries[:20], "test": entries[20:]}))
    _touch(tmp_path, entries)
    train = load_split(tmp_path / "dl.json", "train", holdout=0.0)
    assert all(set(e) == {"image", "case_id", "label"} for e in train)
    assert list_data_collate(load_split(tmp_path / "dl.json", "test"))["label"].tolist() == [0, 1, 0, 1]


def test_load_split_drops_lists_of_different_lengths(tmp_path):
    """`dira3d prepare lidc` gives each crop `reader_nodule_ids`, one id per reader who outlined the nodule (1 to 4):
    the lidc_nodule_seg bundle's first batch of crops of 1 and 3 readers failed in MONAI's collate ('each element in
    list of batch should be of equal size'), so no LIDC datalist of dira3d could be fine-tuned on."""
    import json

    from monai.data import list_data_collate

    from dira3d.evaluation import load_split

    entries = [{"image": f"c{i}.nii.gz", "label": f"m{i}.nii.gz", "case_id": f"p{i}", "voxels": 10,
                "reader_nodule_ids": [f"r{k}" for k in range(1 + i % 3)], "world_mm": [1.0, 2.0, float(i)]}
               for i in range(24)]
    (tmp_path / "dl.json").write_text(json.dumps({"training": entries[:20], "test": entries[20:]}))
    _touch(tmp_path, entries)
    for split in ("train", "holdout", "test"):
        loaded = load_split(tmp_path / "dl.json", split, holdout=0.2, kind="segmentation")
        assert all(set(e) == {"image", "label", "case_id", "voxels", "world_mm"} for e in loaded), split
        batch = list_data_collate(loaded)  # lists of one length (world_mm) still collate
        assert len(batch["image"]) == len(loaded) and len(batch["world_mm"]) == 3


def test_finetune_set_refuses_a_setting_no_config_defines(tmp_path, capsys):
    # MONAI adds an unknown id silently: `--set max_epoch=1` trained the default 100 epochs
    from dira3d.evaluation.finetune import main as finetune_main

    assert finetune_main(["--bundle", "chestxray14_cls", "--tiny", "--set", "max_epoch=1",
                          "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no setting 'max_epoch'" in err and "did you mean 'max_epochs'?" in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_load_split_names_a_label_fraction_too_small_for_the_holdout(tmp_path):
    # LiTS at 1 %: 100 training volumes -> one patient selected, so the holdout cannot be formed;
    # the error must say that label_fraction is the cause, not only "check the datalist"
    training = [{"image": f"v{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"lits-{i:03d}"} for i in range(100)]
    path = tmp_path / "lits_datalist.json"
    path.write_text(json.dumps({"training": training, "test": training[:1]}))
    _touch(tmp_path, training)
    assert len(load_split(path, "train", label_fraction=0.01)) == 1
    with pytest.raises(ValueError, match=r"label_fraction=0.01 keeps 1 of the 100 training patient\(s\).*at least 0.02"):
        load_split(path, "holdout", label_fraction=0.01)
    assert len(load_split(path, "holdout", label_fraction=0.02)) == 1


def test_load_split_names_too_few_labelled_patients_and_refuses_holdout_zero(tmp_path):
    # two labelled scans prepared with --test-fraction 0.5: one training patient, so no holdout whatever the label
    # fraction (the hint said "use a label_fraction of at least 1 or more patients"); holdout=0 trained and then
    # found no models/model.pt at the test ("fine-tune first"): it is refused before any training
    entries = [{"image": f"v{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"lung{i}"} for i in range(2)]
    path = tmp_path / "pretrain_datalist.json"
    path.write_text(json.dumps({"training": entries[:1], "validation": [], "test": entries[1:]}))
    _touch(tmp_path, entries)
    with pytest.raises(ValueError, match=r"'training' list has 1 patient\(s\).*3 or more labelled patients") as err:
        load_split(path, "holdout")
    assert "label_fraction of at least" not in str(err.value)
    with pytest.raises(ValueError, match=r"holdout=0 holds out no training patient.*models/model.pt.*0\.1"):
        load_split(path, "holdout", holdout=0.0)
    assert len(load_split(path, "train", holdout=0.0)) == 1  # the training split itself is still available


def test_finetune_keeps_an_earlier_run_in_the_output_dir(tmp_path, capsys):
    # a second `dira3d finetune` into the same --output-dir replaced the earlier model.pt (first epoch)
    # and metrics.json without a word; it must refuse before any work unless --overwrite is given
    from dira3d.evaluation.finetune import main as finetune_main, run_finetune

    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(b"the earlier run's model")
    (out / "metrics.json").write_text('{"metrics": {"dice": 0.8}}')
    assert finetune_main(["--bundle", "lits_liver_seg", "--tiny", "--output-dir", str(out),
                          "--datalist", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "models/model.pt" in err and "metrics.json" in err and "--overwrite" in err
    assert (out / "models" / "model.pt").read_bytes() == b"the earlier run's model"
    assert (out / "metrics.json").read_text() == '{"metrics": {"dice": 0.8}}'
    # nothing written but the lock of the folder (held while a run lasts; the empty file stays)
    assert sorted(p.name for p in out.rglob("*")) == [".dira3d.lock", "metrics.json", "model.pt", "models"]
    # with --overwrite the run goes ahead (here to the missing datalist)
    with pytest.raises(Exception, match="none.json"):
        run_finetune("lits_liver_seg", {"datalist": str(tmp_path / "none.json")}, output_dir=out, tiny=True,
                     overwrite=True)


def test_holdout_never_takes_every_patient():
    """However large the holdout share, the last patient of the draw stays in training."""
    entries = [{"image": f"s{p}_{k}", "label": f"m{p}_{k}", "case_id": f"p{p}"} for p in range(3) for k in range(2)]
    for seed in range(5):
        train, held = holdout_by_patient(entries, 0.99, seed=seed)
        assert len(train) == 2 and len(held) == 4 and len({e["case_id"] for e in train}) == 1


class _Killed(BaseException):
    """Stands for a SIGKILL: not an ``Exception``, so ignite's handlers do not catch it."""


def test_overwrite_killed_mid_training_leaves_no_earlier_metrics_beside_the_new_model(tmp_path, monkeypatch):
    # `dira3d finetune --overwrite` killed after its first epoch left the earlier run's metrics.json beside
    # its own unfinished model.pt: the folder looked finished, with metrics of another model, and the
    # earlier TensorBoard files stayed merged into the new run's curves
    from dira3d.evaluation import handlers
    from dira3d.evaluation.finetune import run_finetune
    from test_bundles_finetune import make_classification

    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(b"the earlier run's model")
    (out / "metrics.json").write_text('{"metrics": {"auc": 0.9}}')
    (out / "events.out.tfevents.1.earlier.0").write_bytes(b"the earlier run's curves")
    saved = handlers.BestModelSaver.__call__

    def save_then_die(self, engine):
        saved(self, engine)
        raise _Killed

    monkeypatch.setattr(handlers.BestModelSaver, "__call__", save_then_die)
    torch.set_num_threads(1)
    settings = {"datalist": str(datalist), "max_epochs": 1}
    with pytest.raises(_Killed):
        run_finetune("luna16_nodule_fpr", settings, output_dir=out, tiny=True, overwrite=True)
    assert not (out / "metrics.json").exists()  # the earlier one went before training started
    assert (out / "models" / "model.pt").read_bytes() != b"the earlier run's model"
    assert not (out / "events.out.tfevents.1.earlier.0").exists() and list(out.glob("events.out.tfevents.*"))
    # a rerun without --overwrite is refused, saying the run is unfinished and how to start it again
    with pytest.raises(FileExistsError, match=r"unfinished fine-tuning run .*no metrics.json.*--overwrite"):
        run_finetune("luna16_nodule_fpr", settings, output_dir=out, tiny=True)


def test_overwrite_keeps_the_earlier_run_when_the_new_one_fails_to_set_up(tmp_path):
    # the earlier run is removed only once the new one has set up without error: a typo costs nothing
    from dira3d.evaluation.finetune import run_finetune

    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "model.pt").write_bytes(b"the earlier run's model")
    (out / "metrics.json").write_text('{"metrics": {"auc": 0.9}}')
    with pytest.raises(Exception, match="none.json"):
        run_finetune("luna16_nodule_fpr", {"datalist": str(tmp_path / "none.json")}, output_dir=out, tiny=True,
                     overwrite=True)
    assert (out / "metrics.json").read_text() == '{"metrics": {"auc": 0.9}}'
    assert (out / "models" / "model.pt").read_bytes() == b"the earlier run's model"


def test_load_split_names_every_missing_file_of_the_entries_the_run_uses(tmp_path):
    # the loader met the first missing file after caching the others, and named it alone
    training = [{"image": f"v{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"case{i}", "fold": i % 2}
                for i in range(8)]
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": training}))
    _touch(tmp_path, training)
    for name in ("v2.nii.gz", "l4.nii.gz", "v6.nii.gz"):  # all of fold 0
        (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        load_split(path, "test", fold=0)
    message = str(caught.value)
    assert "has 3 missing files in its 'training' list" in message and "dira3d prepare" in message, message
    for case, name in (("case2", "v2.nii.gz"), ("case4", "l4.nii.gz"), ("case6", "v6.nii.gz")):
        assert f"case {case}: {tmp_path / name} does not exist" in message, message
    assert len(load_split(path, "test", fold=1)) == 4  # the entries of the other fold are all there
    with pytest.raises(FileNotFoundError, match="case2"):
        load_split(path, "train", fold=1, holdout=0.0)


def test_finetune_with_a_missing_file_stops_before_caching_and_leaves_no_folder(tmp_path, capsys):
    from dira3d.evaluation.finetune import main as finetune_main

    training = [{"image": f"c{i}.nii.gz", "case_id": f"p{i}", "label": i % 2} for i in range(16)]
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": training[:12], "test": training[12:]}))  # no patient in both lists
    _touch(tmp_path, training[1:])
    out = tmp_path / "out"
    assert finetune_main(["--bundle", "luna16_nodule_fpr", "--tiny", "--datalist", str(path),
                          "--output-dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"case p0: {tmp_path / 'c0.nii.gz'} does not exist" in captured.err, captured.err
    assert "Loading dataset" not in captured.err
    assert not out.exists()  # a run refused at its start leaves no folder (it left out/ and out/models/ with locks)


def test_brats_input_errors_name_the_file(tmp_path):
    # a raw scan given to brats inference.json with other sequences than the model's, or a constant
    # MRI: the messages named no file
    from monai.data import MetaTensor

    from dira3d.data.errors import DataError
    from dira3d.evaluation import NormalizeMRd

    scan = str(tmp_path / "patient7_t1.nii.gz")
    image = MetaTensor(torch.rand(3, 8, 8, 4), meta={"filename_or_obj": scan})
    with pytest.raises(DataError, match=rf"^{scan}: image has 3 channel\(s\) but image_channels"):
        SelectModalitiesd("image", "flair", ["t1", "t1ce", "t2", "flair"])({"image": image})
    with pytest.raises(DataError, match=rf"^{scan}: .*modalities"):
        SelectModalitiesd("image", "flair")({"image": image})
    with pytest.raises(DataError, match=rf"^{scan}: "):
        NormalizeMRd("image")({"image": MetaTensor(torch.zeros(1, 8, 8, 4), meta={"filename_or_obj": scan})})


def test_a_missing_best_pt_names_the_last_pt_beside_it(tmp_path):
    # pretraining without validation (visual words of --val-neighbours 0, the README's two-scan recipe) writes
    # last.pt only; `dira3d finetune --pretrained .../best.pt` said only that best.pt does not exist
    from dira3d.evaluation.pretrained import initialise_task_network

    network = torch.nn.Sequential(torch.nn.BatchNorm3d(2))
    with pytest.raises(FileNotFoundError, match="best.pt does not exist") as err:
        initialise_task_network(network, "segmentation", str(tmp_path / "best.pt"), "average", 0.1, None)
    assert "last.pt" not in str(err.value)  # nothing beside it: the message stays as it was
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"best.pt does not exist; .*last.pt exists: a pretraining without "
                                                r"validation .* so pass that"):
        initialise_task_network(network, "segmentation", str(tmp_path / "best.pt"), "average", 0.1, None)


def test_a_test_patient_also_in_training_is_warned_about(tmp_path):
    # a datalist edited by hand (two labelled scans: lung1 listed in training and test) was scored without a word
    entries = [{"image": f"v{i}.nii.gz", "label": f"l{i}.nii.gz", "case_id": f"lung{i}"} for i in range(3)]
    _touch(tmp_path, entries)
    path = tmp_path / "hand_datalist.json"
    path.write_text(json.dumps({"training": entries, "test": entries[1:2]}))
    with pytest.warns(UserWarning, match=r"1 patient\(s\) of its 'test' list are also in its 'training' list \(lung1\)"):
        assert len(load_split(path, "test")) == 1
    clean = tmp_path / "clean_datalist.json"
    clean.write_text(json.dumps({"training": entries[:2], "test": entries[2:]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        assert len(load_split(clean, "test")) == 1
