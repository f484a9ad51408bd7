"""Session-22 mutation audit of how visual words are written, read back and served to pretraining
(dira3d.visual_words.writer, dataset, loading): each test pins a behaviour that a mutation of those modules changed
without any other test failing, against an independent reference: shards and datalists written here by hand with
numpy / json (every row holds ``100 * label + row`` so a wrong class / instance pairing shows in the values), sizes
and names worked out by hand from the docstrings, and MONAI's own loader for the volumes' shapes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dira3d.visual_words import VisualWordPairDataset, has_validation_words, load_visual_word_classes, read_manifest
from dira3d.visual_words.loading import (
    CheckIntensityd,
    case_ids,
    iterate_volumes,
    read_datalist,
    volume_shapes,
    volume_transform,
)
from dira3d.visual_words.writer import ShardWriter, new_manifest, save_embeddings, write_visual_word_datalist

PATCH = (2, 3, 4)


def _shard(folder: Path, name: str, label: int, rows: int) -> str:
    """A class shard written by hand: row ``i`` of class ``label`` holds ``100 * label + i`` everywhere."""
    values = np.stack([np.full((1, *PATCH), 100 * label + i, np.float16) for i in range(rows)])
    np.save(folder / name, values)
    return name


def _words(folder: Path, training: dict[int, int], validation: dict[int, int] | None = None) -> Path:
    """``visual_words.json`` with one shard per ``{label: rows}`` of each split."""
    content = {"training": [{"image": _shard(folder, f"t{label}.npy", label, rows), "label": label}
                            for label, rows in training.items()],
               "validation": [{"image": _shard(folder, f"v{label}.npy", label, rows), "label": label}
                              for label, rows in (validation or {}).items()]}
    path = folder / "visual_words.json"
    path.write_text(json.dumps(content))
    return path


def _label_row(image: torch.Tensor) -> tuple[int, int]:
    value = int(image.flatten()[0])
    assert torch.equal(image, torch.full_like(image, value))
    return value // 100, value % 100


# ---- writer ----------------------------------------------------------------------------------------


def test_multi_resolution_shard_rows_and_name(tmp_path):
    """``instances * resolutions`` rows named ``class_NNNN.npy``; slot ``s`` fills rows ``s*R .. s*R+R-1``."""
    writer = ShardWriter(tmp_path, PATCH, resolutions=3, channels=1)
    path = writer.create("validation", 7, instances=3)
    assert path == tmp_path / "shards" / "validation" / "class_0007.npy"
    patches = np.arange(3, dtype=np.float32)[:, None, None, None, None] + np.zeros((3, 1, *PATCH), np.float32) + 1
    writer.write("validation", 7, 1, patches)
    shard = np.load(path)
    assert shard.shape == (9, 1, *PATCH) and shard.dtype == np.float16
    assert [float(shard[i].max()) for i in range(9)] == [0, 0, 0, 1, 2, 3, 0, 0, 0]
    with pytest.raises(ValueError, match="do not fit shard rows"):
        writer.write("validation", 7, 0, patches[:2])


def test_a_full_disk_removes_the_shard_and_says_its_size(tmp_path, monkeypatch):
    """64 instances of 1 x 16^3 float16 = 64 * 4096 * 2 bytes = 0.5 MiB; no half-made shard is left."""
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform: shards stay sparse")
    calls = []

    def full(fd, offset, length):
        calls.append((offset, length))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    writer = ShardWriter(tmp_path, (16, 16, 16))
    with pytest.raises(OSError, match=r"class_0002\.npy needs 0\.5 MiB") as info:
        writer.create("training", 2, instances=64)
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "shards" / "training" / "class_0002.npy").exists()
    assert calls and calls[0][0] == 0 and calls[0][1] > 64 * 4096 * 2  # the whole file: header and data


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_file_system_that_cannot_reserve_keeps_the_sparse_shard(tmp_path, monkeypatch, code):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform: shards stay sparse")

    def cannot(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", cannot)
    path = ShardWriter(tmp_path, PATCH).create("training", 0, instances=2)
    assert np.load(path).shape == (2, 1, *PATCH)


def test_the_reservation_covers_the_whole_shard_file(tmp_path, monkeypatch):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform: shards stay sparse")
    calls = []
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: calls.append((offset, length)))
    path = ShardWriter(tmp_path, PATCH).create("training", 0, instances=5)
    assert calls == [(0, path.stat().st_size)]


def test_finish_class_marks_it_done_in_the_manifest_on_disk(tmp_path):
    manifest = new_manifest(3, {"patch_size": list(PATCH)}, "d.json", {}, {})
    manifest["classes"] = [{"index": 0, "status": "pending", "shards": {}}, {"index": 1, "status": "pending", "shards": {}}]
    ShardWriter(tmp_path, PATCH).finish_class(manifest, 1)
    on_disk = read_manifest(tmp_path)
    assert [c["status"] for c in on_disk["classes"]] == ["pending", "done"]


@pytest.mark.parametrize("change, problem", [
    ({"version": 2}, "not a version-1"),
    ({"format": "other", "version": 1}, "not a version-1"),
    ({"seed": "0"}, "malformed seed"),
    ({"classes": [{"index": "0", "shards": {}}]}, r"malformed classes\[0\]"),
    ({"classes": [{"index": 0, "shards": ["a.npy"]}]}, r"malformed classes\[0\]"),
    ({"classes": [{"index": True, "shards": {}}]}, r"malformed classes\[0\]"),  # JSON true is not a class index
    ({"seed": False}, "malformed seed"),
])
def test_read_manifest_refuses_other_formats_and_malformed_fields(tmp_path, change, problem):
    manifest = {**new_manifest(0, {}, "d.json", {}, {}), **change}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=problem):
        read_manifest(tmp_path / "manifest.json")


def test_read_manifest_takes_the_output_folder(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(new_manifest(5, {}, "d.json", {}, {})))
    assert read_manifest(tmp_path)["seed"] == 5


def test_the_datalist_lists_each_class_with_its_own_shard_label_and_rows(tmp_path):
    """Written by hand from the docstring: classes without neighbours in a split are left out of it."""
    def cls(index, case, training, validation):
        neighbours = {"training": {"indices": training}}
        shards = {"training": f"shards/training/class_{index:04d}.npy"}
        if validation is not None:
            neighbours["validation"] = {"indices": validation}
            shards["validation"] = f"shards/validation/class_{index:04d}.npy"
        return {"index": index, "reference": {"case_id": case}, "neighbours": neighbours, "shards": shards}

    manifest = new_manifest(7, {"patch_size": [2, 3, 4], "resolutions": 3, "dtype": "float16"}, "d.json", {}, {})
    manifest["classes"] = [cls(0, "a", [1, 2], [3, 4]), cls(1, "b", [5, 6], []), cls(2, "c", [7, 8, 9], None)]
    write_visual_word_datalist(manifest, tmp_path)
    assert json.loads((tmp_path / "visual_words.json").read_text()) == {
        "meta": {"command": "dira3d visual-words", "classes": 3, "patch_size": [2, 3, 4], "resolutions": 3,
                 "seed": 7, "dtype": "float16", "manifest": "manifest.json"},
        "training": [
            {"image": "shards/training/class_0000.npy", "label": 0, "case_id": "a", "num_instances": 6},
            {"image": "shards/training/class_0001.npy", "label": 1, "case_id": "b", "num_instances": 6},
            {"image": "shards/training/class_0002.npy", "label": 2, "case_id": "c", "num_instances": 9},
        ],
        "validation": [{"image": "shards/validation/class_0000.npy", "label": 0, "case_id": "a", "num_instances": 6}],
    }


def test_embeddings_are_saved_as_float32(tmp_path):
    save_embeddings(np.arange(6, dtype=np.float64).reshape(2, 3), tmp_path / "e.npy")
    saved = np.load(tmp_path / "e.npy")
    assert saved.dtype == np.float32 and saved.tolist() == [[0, 1, 2], [3, 4, 5]]


# ---- reading the classes back ----------------------------------------------------------------------


def test_labels_come_from_the_datalist_not_from_the_position(tmp_path):
    """The validation split lists only some classes: label 2 is its second entry."""
    _words(tmp_path, {0: 2, 1: 2, 2: 3}, {0: 2, 2: 2})
    assert load_visual_word_classes(tmp_path, "validation") == [(tmp_path / "v0.npy", 0), (tmp_path / "v2.npy", 2)]
    data = VisualWordPairDataset(tmp_path, "validation")
    assert [int(data[i]["label"]) for i in range(len(data))] == [0, 0, 2, 2]
    assert [_label_row(data[i]["image"]) for i in range(len(data))] == [(0, 0), (0, 1), (2, 0), (2, 1)]


def _complete_manifest(folder: Path, classes: list[dict], status: str = "complete") -> Path:
    manifest = {**new_manifest(0, {}, "d.json", {}, {}), "status": status, "classes": classes}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_a_manifest_gives_each_class_its_index_and_skips_classes_without_the_split(tmp_path):
    _shard(tmp_path, "a.npy", 3, 2)
    _shard(tmp_path, "b.npy", 5, 2)
    path = _complete_manifest(tmp_path, [{"index": 3, "shards": {"training": "a.npy", "validation": "a.npy"}},
                                         {"index": 5, "shards": {"training": "b.npy"}}])
    assert load_visual_word_classes(path) == [(tmp_path / "a.npy", 3), (tmp_path / "b.npy", 5)]
    assert load_visual_word_classes(path, "validation") == [(tmp_path / "a.npy", 3)]
    _complete_manifest(tmp_path, [{"index": 3, "shards": {"training": "a.npy"}}], status="writing")
    with pytest.raises(ValueError, match="'writing', not complete"):
        load_visual_word_classes(path)


def test_a_folder_with_both_files_is_read_through_its_datalist(tmp_path):
    """The datalist is preferred: a folder whose manifest is not (yet) complete still serves its datalist."""
    _words(tmp_path, {0: 2, 1: 2})
    _complete_manifest(tmp_path, [], status="writing")
    assert load_visual_word_classes(tmp_path) == [(tmp_path / "t0.npy", 0), (tmp_path / "t1.npy", 1)]


@pytest.mark.parametrize("training, problem", [
    ([{"image": "t0.npy", "label": True}], "entry 0 of 'training'"),
    ({"image": "t0.npy", "label": 0}, "'training' is a JSON object, not a list"),
])
def test_malformed_datalist_entries_are_refused(tmp_path, training, problem):
    _shard(tmp_path, "t0.npy", 0, 2)
    (tmp_path / "visual_words.json").write_text(json.dumps({"training": training}))
    with pytest.raises(ValueError, match=problem):
        load_visual_word_classes(tmp_path)


def test_a_missing_shard_and_an_empty_split_are_named(tmp_path):
    path = _words(tmp_path, {0: 2, 1: 2})
    (tmp_path / "t1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="t1.npy"):
        load_visual_word_classes(path)
    with pytest.raises(ValueError, match="--val-neighbours 2 or more"):
        load_visual_word_classes(path, "validation")
    assert load_visual_word_classes(path, "validation", required=False) == []


def test_has_validation_words_looks_at_the_validation_split(tmp_path, caplog):
    _words(tmp_path, {0: 2, 1: 2})
    with caplog.at_level(logging.WARNING):
        assert has_validation_words(tmp_path) is False
    assert "pretraining without validation" in caplog.text
    _words(tmp_path, {0: 2, 1: 2}, {1: 2})
    assert has_validation_words(tmp_path) is True


def test_an_empty_shard_file_is_a_clear_error_naming_it(tmp_path):
    _words(tmp_path, {0: 2, 1: 2})
    (tmp_path / "t1.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"t1\.npy cannot be read as a \.npy array"):
        VisualWordPairDataset(tmp_path)


# ---- the pair dataset ------------------------------------------------------------------------------


def test_the_patch_size_check_covers_every_axis(tmp_path):
    _words(tmp_path, {0: 2, 1: 2})
    VisualWordPairDataset(tmp_path, patch_size=PATCH)
    with pytest.raises(ValueError, match=r"patches of \[2, 3, 4\], but this run's patch_size is \[2, 3, 5\]"):
        VisualWordPairDataset(tmp_path, patch_size=(2, 3, 5))


@pytest.mark.parametrize("split, option", [("training", "--neighbours >= 2"), ("validation", "--val-neighbours >= 2")])
def test_a_class_of_one_instance_names_the_option_of_its_split(tmp_path, split, option):
    _words(tmp_path, {0: 2, 1: 1}, {0: 2, 1: 1})
    with pytest.raises(ValueError, match=f"visual word 1 .* has 1 instance.*{option}"):
        VisualWordPairDataset(tmp_path, split)


def test_one_pair_per_instance_walks_every_class_and_row_in_order(tmp_path):
    """Counts 2, 3, 4: items 0-1 are class 0, 2-4 class 1, 5-8 class 2; the partner is another row of the class."""
    _words(tmp_path, {0: 2, 1: 3, 2: 4})
    data = VisualWordPairDataset(tmp_path)
    assert len(data) == 9 and data.num_classes == 3
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    for index, (label, row) in enumerate(expected):
        item = data[index]
        assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
        assert int(item["label"]) == label and _label_row(item["image"]) == (label, row)
        other_label, other_row = _label_row(item["image2"])
        assert other_label == label and other_row != row
    for index in (-1, 9):
        with pytest.raises(IndexError):
            data[index]


def test_random_pairs_reach_every_class_and_instance_and_never_pair_an_instance_with_itself(tmp_path):
    _words(tmp_path, {0: 2, 1: 3, 2: 4})
    data = VisualWordPairDataset(tmp_path, pairs_per_epoch=400, seed=1)
    anchors, partners = set(), set()
    for index in range(len(data)):
        item = data[index]
        label, row = _label_row(item["image"])
        other = _label_row(item["image2"])
        assert int(item["label"]) == label == other[0] and other[1] != row
        anchors.add((label, row))
        partners.add(other)
    every = {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)}
    assert anchors == every and partners == every
    with pytest.raises(IndexError):
        data[400]


def test_the_epoch_changes_the_partners_and_the_same_epoch_repeats_them(tmp_path):
    _words(tmp_path, {0: 6, 1: 6})
    data = VisualWordPairDataset(tmp_path, seed=3)

    def partners():
        return [_label_row(data[i]["image2"]) for i in range(len(data))]

    first = partners()
    assert partners() == first
    data.set_epoch(1)
    second = partners()
    assert second != first
    data.set_epoch(0)
    assert partners() == first


def test_the_transform_is_applied_to_each_item(tmp_path):
    _words(tmp_path, {0: 2, 1: 2})
    data = VisualWordPairDataset(tmp_path, transform=lambda item: {**item, "image": item["image"] * 0 - 1})
    assert float(data[0]["image"].max()) == -1.0


def test_a_pickled_dataset_carries_no_shard_contents(tmp_path):
    """DataLoader workers get the dataset pickled: they reopen the memory maps instead of copying them."""
    np.save(tmp_path / "big0.npy", np.zeros((4, 1, 32, 32, 32), np.float16))  # 256 KiB
    np.save(tmp_path / "big1.npy", np.ones((4, 1, 32, 32, 32), np.float16))
    (tmp_path / "visual_words.json").write_text(json.dumps(
        {"training": [{"image": "big0.npy", "label": 0}, {"image": "big1.npy", "label": 1}]}))
    data = VisualWordPairDataset(tmp_path)
    assert int(data[0]["label"]) == 0 and int(data[5]["label"]) == 1  # both shards opened (memory-mapped) here
    blob = pickle.dumps(data)
    assert len(blob) < 16 * 1024
    again = pickle.loads(blob)
    assert float(again[5]["image"].max()) == 1.0


# ---- loading the volumes ---------------------------------------------------------------------------


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4) if affine is None else affine), path)
    return str(path)


def test_read_datalist_keeps_a_given_case_id_and_names_the_others_after_their_file(tmp_path):
    for name in ("scan.nii.gz", "other.nii.gz"):
        _nifti(tmp_path / name, np.zeros((2, 2, 2)))
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "scan.nii.gz"}, {"image": "other.nii.gz", "case_id": "patient7"}]}))
    data = read_datalist(path)
    assert case_ids(data["training"]) == ["scan", "patient7"] and data["validation"] == []
    assert data["training"][0]["image"] == str(tmp_path / "scan.nii.gz")


def test_read_datalist_refuses_an_empty_training_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="empty 'training' list"):
        read_datalist(path)


def test_case_ids_are_strings():
    assert case_ids([{"case_id": 7}, {"case_id": "b"}]) == ["7", "b"]


@pytest.mark.parametrize("lo, hi, accepted", [
    (-5e-4, 1 + 5e-4, True),   # within the 1e-3 tolerance of [0, 1]
    (0.0, 1.05, False),
    (-2.0, 0.5, False),        # one bound outside is enough
    (0.5, 3.0, False),
])
def test_prepared_volumes_must_lie_in_the_unit_range(lo, hi, accepted):
    check = CheckIntensityd(keys=["image"])
    data = {"image": torch.tensor([[[[lo, hi]]]])}
    if accepted:
        assert check(data)["image"] is data["image"]
    else:
        with pytest.raises(ValueError, match="not the \\[0, 1\\] of a prepared volume"):
            check(data)


def test_raw_hu_refuses_a_volume_already_in_the_unit_range():
    with pytest.raises(ValueError, match="already in \\[0, 1\\]"):
        CheckIntensityd(keys=["image"], raw_hu=True)({"image": torch.tensor([[[[0.0, 0.7]]]])})
    CheckIntensityd(keys=["image"], raw_hu=True)({"image": torch.tensor([[[[-1000.0, 400.0]]]])})


def test_orientation_to_ras_and_its_absence_by_hand(tmp_path):
    """An LPS affine (diag(-1, -1, 1)): RAS flips the first two voxel axes; orient=False keeps the array."""
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 24
    path = _nifti(tmp_path / "lps.nii.gz", array, np.diag([-1.0, -1.0, 1.0, 1.0]))
    ras = volume_transform(orient=True)({"image": path})["image"]
    kept = volume_transform(orient=False)({"image": path})["image"]
    assert ras.dtype == torch.float32 and kept.dtype == torch.float32
    np.testing.assert_array_equal(ras[0].numpy(), array[::-1, ::-1, :])
    np.testing.assert_array_equal(kept[0].numpy(), array)


def test_the_hu_window_maps_lo_to_0_and_hi_to_1_and_clips(tmp_path):
    array = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0], np.float32).reshape(5, 1, 1)
    path = _nifti(tmp_path / "hu.nii.gz", array)
    out = volume_transform(orient=False, raw_hu_window=(-1000.0, 400.0))({"image": path})["image"]
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.flatten().numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_iterate_volumes_yields_each_entry_with_its_own_index(tmp_path):
    entries = [{"image": _nifti(tmp_path / f"v{i}.nii.gz", np.full((2, 2, 2), i / 10))} for i in range(3)]
    load = volume_transform(orient=False)
    got = [(i, round(float(item["image"].max()), 3)) for i, item in iterate_volumes(entries, load)]
    assert got == [(0, 0.0), (1, 0.1), (2, 0.2)]
    got = [(i, round(float(item["image"].max()), 3)) for i, item in iterate_volumes(entries, load, order=[2, 0])]
    assert got == [(2, 0.2), (0, 0.0)]


def test_header_shapes_follow_a_three_axis_rotation_like_the_loader(tmp_path):
    """Voxel axes (0, 1, 2) along world (z, x, y): a 3-cycle, which is not its own inverse."""
    affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    entry = {"image": _nifti(tmp_path / "cyc.nii.gz", np.zeros((2, 3, 4)), affine)}
    loaded = tuple(volume_transform(orient=True, check_intensity=False)(dict(entry))["image"].shape[1:])
    assert loaded == (3, 4, 2)
    assert volume_shapes([entry]) == [loaded]
    assert volume_shapes([entry], orient=False) == [(2, 3, 4)]


def test_shapes_of_a_mixed_list_keep_their_places(tmp_path):
    """A NIfTI read from its header and an NRRD loaded through MONAI (with and without reorientation)."""
    import SimpleITK as sitk

    nifti = {"image": _nifti(tmp_path / "a.nii.gz", np.zeros((5, 6, 7)))}
    image = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))  # sitk (z, y, x) -> voxel (4, 3, 2)
    image.SetDirection((0, 1.0, 0, 1.0, 0, 0, 0, 0, 1.0))  # voxel x along world y, voxel y along world x
    sitk.WriteImage(image, str(tmp_path / "b.nrrd"))
    nrrd = {"image": str(tmp_path / "b.nrrd")}
    assert volume_shapes([nifti, nrrd]) == [(5, 6, 7), (3, 4, 2)]
    assert volume_shapes([nrrd, nifti], orient=False) == [(4, 3, 2), (5, 6, 7)]


def test_a_manifest_is_read_once(tmp_path, monkeypatch):
    """load_visual_word_classes read manifest.json twice (the bundle's num_classes and validation read it at the
    start of every pretraining, also of a finished run's rerun: thousands of classes)."""
    import dira3d.visual_words.dataset as dataset

    _shard(tmp_path, "a.npy", 0, 2)
    path = _complete_manifest(tmp_path, [{"index": 0, "shards": {"training": "a.npy"}}])
    reads = []

    def counted(where):
        reads.append(where)
        return read_manifest(where)

    monkeypatch.setattr(dataset, "read_manifest", counted)
    for where in (path, tmp_path):  # the file, or its folder without a visual_words.json
        reads.clear()
        assert load_visual_word_classes(where) == [(tmp_path / "a.npy", 0)]
        assert reads == [path]
