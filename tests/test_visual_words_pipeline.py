"""End-to-end visual-word discovery on synthetic template volumes (the right answer is known).

Volumes are noisy copies of 3 templates; a volume's true neighbours are its template-mates.
Most runs use a fixed, *untrained* tiny skip-free autoencoder as the extractor (template volumes
differ enough that its pooled features separate them); the CLI test trains one for an epoch.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dira3d.cli import main as cli_main
from dira3d.visual_words import (
    VisualWordPairDataset,
    VolumeAutoencoder,
    VolumeTooSmallError,
    discover_visual_words,
    read_manifest,
)
from dira3d.visual_words.coordinates import is_mostly_lung, patch_slices
from dira3d.visual_words.synthetic import write_template_datalist
from dira3d.visual_words.writer import ShardWriter

PER_TEMPLATE, VAL_PER_TEMPLATE = 4, 2
SETTINGS = dict(
    classes=3, neighbours=PER_TEMPLATE, val_neighbours=VAL_PER_TEMPLATE, patch_size=(16, 16, 8), border=(8, 8, 4),
    extractor_size=(32, 32, 16), seed=0,
)  # fmt: skip


def _extractor() -> VolumeAutoencoder:
    torch.manual_seed(0)
    return VolumeAutoencoder(width=0.125).eval()


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_template_datalist(tmp_path_factory.mktemp("vw_data"), templates=3, per_template=PER_TEMPLATE,
                                   val_per_template=VAL_PER_TEMPLATE, shape=(64, 64, 32))


@pytest.fixture(scope="module")
def run(datalist, tmp_path_factory):
    out = tmp_path_factory.mktemp("vw_run")
    return out, discover_visual_words(datalist, out, extractor=_extractor(), class_block=10, **SETTINGS)


def _template(case_id: str) -> int:
    return int(case_id[1])


def test_neighbours_are_template_mates_and_shards_hold_the_crops(datalist, run):
    out, manifest = run
    data = json.loads(datalist.read_text())
    refs = [c["reference"]["case_id"] for c in manifest["classes"]]
    assert len(set(refs)) == 3
    centres = [c["centre"] for c in manifest["classes"]]
    for cls in manifest["classes"]:
        t = _template(cls["reference"]["case_id"])
        train, val = cls["neighbours"]["training"], cls["neighbours"]["validation"]
        assert train["case_ids"][0] == cls["reference"]["case_id"] and train["distances"][0] == 0.0
        assert [_template(c) for c in train["case_ids"]] == [t] * PER_TEMPLATE
        assert [_template(c) for c in val["case_ids"]] == [t] * VAL_PER_TEMPLATE
        assert train["distances"] == sorted(train["distances"])
        # centre rules: borders (centre in [8 + 8, 64 - 8 - 8]), lung filter in the reference, distance
        x, y, z = cls["centre"]
        assert 16 <= x <= 48 and 16 <= y <= 48 and 8 <= z <= 24
        assert all(math.dist(cls["centre"], c) >= 5 for c in centres if c != cls["centre"])
        for split, info in (("training", train), ("validation", val)):
            shard = np.load(out / cls["shards"][split])
            assert shard.dtype == np.float16 and shard.shape == (len(info["case_ids"]), 1, 16, 16, 8)
            for row, case in enumerate(info["case_ids"]):
                volume = nib.load(datalist.parent / "images" / f"{case}.nii.gz").get_fdata()
                expected = volume[patch_slices(cls["centre"], (16, 16, 8))]
                np.testing.assert_allclose(shard[row, 0], expected, atol=1e-3)  # float16 of [0, 1]
        reference = nib.load(datalist.parent / "images" / f"{cls['reference']['case_id']}.nii.gz").get_fdata()
        assert is_mostly_lung(reference[patch_slices(cls["centre"], (16, 16, 8))], 0.425, 0.15)
    assert sorted(json.loads((out / "visual_words.json").read_text())["training"][i]["label"] for i in range(3)) == [0, 1, 2]
    assert len(data["training"]) == 12


def test_manifest_round_trips_and_bad_manifest_is_refused(run, tmp_path):
    out, manifest = run
    assert read_manifest(out) == manifest == read_manifest(out / "manifest.json")
    assert manifest["status"] == "complete" and manifest["seed"] == 0
    assert manifest["params"]["dense_threshold"] == pytest.approx(0.425)
    assert np.load(out / "embeddings.npy").shape == (18, 64)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a version-1 dira3d visual-word manifest"):
        read_manifest(tmp_path)


def test_same_seed_same_output_other_seed_other_output(datalist, run, tmp_path):
    out, manifest = run
    # other block size and a prefetching worker: neither may change the result
    again = discover_visual_words(datalist, tmp_path / "same", extractor=_extractor(), class_block=1, workers=1, **SETTINGS)
    other = discover_visual_words(datalist, tmp_path / "other", extractor=_extractor(), **{**SETTINGS, "seed": 1})
    assert again["classes"] == manifest["classes"]
    for cls in manifest["classes"]:
        for split in ("training", "validation"):
            assert (out / cls["shards"][split]).read_bytes() == (tmp_path / "same" / cls["shards"][split]).read_bytes()
    plan = lambda m: [(c["reference"]["case_id"], c["centre"]) for c in m["classes"]]  # noqa: E731
    assert plan(other) != plan(manifest)


def test_resume_after_interruption_skips_finished_classes(datalist, run, tmp_path, monkeypatch):
    out_full, full = run
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    original = ShardWriter.finish_class

    def crash_on_third(self, manifest, class_index):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        original(self, manifest, class_index)

    monkeypatch.setattr(ShardWriter, "finish_class", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        discover_visual_words(datalist, out, extractor=_extractor(), class_block=1, **SETTINGS)
    monkeypatch.setattr(ShardWriter, "finish_class", original)
    partial = read_manifest(out)
    assert [c["status"] for c in partial["classes"]] == ["done", "done", "planned"]
    assert not (out / "visual_words.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("class_000[01].npy")}
    assert len(finished) == 4

    with pytest.raises(ValueError, match="neighbours: 4 → 3"):  # other settings must not resume silently
        discover_visual_words(datalist, out, extractor=_extractor(), **{**SETTINGS, "neighbours": 3})
    resumed = discover_visual_words(datalist, out, extractor=_extractor(), class_block=1, **SETTINGS)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not rewritten
    assert resumed["classes"] == full["classes"]
    for path in (out_full / "shards").rglob("*.npy"):
        assert path.read_bytes() == (out / path.relative_to(out_full)).read_bytes()


def test_pair_dataset_yields_two_instances_of_one_class(run):
    out, manifest = run
    ds = VisualWordPairDataset(out / "visual_words.json", seed=0)
    assert len(ds) == 3 * PER_TEMPLATE and ds.num_classes == 3
    shards = {c["index"]: np.load(out / c["shards"]["training"]).astype(np.float32) for c in manifest["classes"]}
    for i in range(len(ds)):
        item = ds[i]
        label = int(item["label"])
        assert item["label"].dtype == torch.int64 and label == i // PER_TEMPLATE
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 16, 16, 8)
        rows = shards[label]
        a = [r for r in range(len(rows)) if np.array_equal(rows[r], item["image"].numpy())]
        b = [r for r in range(len(rows)) if np.array_equal(rows[r], item["image2"].numpy())]
        assert a == [i % PER_TEMPLATE] and len(b) == 1 and b != a  # another instance of the same class
    assert torch.equal(VisualWordPairDataset(out, seed=0)[5]["image2"], ds[5]["image2"])
    val = VisualWordPairDataset(out / "manifest.json", split="validation", pairs_per_epoch=7)
    assert len(val) == 7 and {int(val[i]["label"]) for i in range(7)} <= {0, 1, 2}
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 16, 16, 8) and batch["label"].tolist() == [0, 0, 0, 0]


def test_pair_dataset_checks_the_training_patch_size(run):
    # the pretraining bundle passes its patch_size: shards of another size must not train silently
    out, _ = run
    assert len(VisualWordPairDataset(out, patch_size=(16, 16, 8))) == 3 * PER_TEMPLATE
    with pytest.raises(ValueError, match=r"class_0000\.npy\) has patches of \[16, 16, 8\], but this run's patch_size "
                                         r"is \[64, 64, 32\]; set patch_size to \[16, 16, 8\]") as info:
        VisualWordPairDataset(out, split="validation", patch_size=[64, 64, 32])
    # both commands quote the list for the shell (an unquoted [...] is a glob: zsh stops with "no matches found")
    assert ('(`--patch_size "[16,16,8]"` for monai.bundle run, `--override "patch_size=[16,16,8]"` for dira3d pretrain)'
            in str(info.value)), info.value


def test_one_instance_per_word_is_refused_before_the_extractor_trains(datalist, tmp_path, monkeypatch):
    """Pretraining pairs two instances of a visual word in each split: one per word passed discovery (minutes
    to hours) and failed only when pretraining started."""
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"val_neighbours=1 \(--val-neighbours\): pretraining pairs two instances.*"
                                         r"choose 0 \(no validation words\) or between 2 and 6"):
        discover_visual_words(datalist, tmp_path / "val", **{**SETTINGS, "val_neighbours": 1})
    with pytest.raises(ValueError, match=r"neighbours=1 is not possible .* between 2 and 12"):
        discover_visual_words(datalist, tmp_path / "train", **{**SETTINGS, "neighbours": 1})
    assert not (tmp_path / "val").exists() and not (tmp_path / "train").exists()


def test_one_instance_per_word_names_the_option_to_raise(datalist, tmp_path, monkeypatch):
    """Visual words made before discovery refused one instance per word still name the option at pretraining."""
    from dira3d.visual_words import discover

    monkeypatch.setattr(discover, "check_counts", lambda *args, **kwargs: None)
    out = tmp_path / "one"
    discover_visual_words(datalist, out, extractor=_extractor(), **{**SETTINGS, "val_neighbours": 1})
    with pytest.raises(ValueError, match=r"1 instance\(s\); pairs need >= 2 \(rerun `dira3d visual-words` with --val-neighbours >= 2\)"):
        VisualWordPairDataset(out / "manifest.json", split="validation")
    assert len(VisualWordPairDataset(out / "manifest.json", split="training", pairs_per_epoch=3)) == 3


def test_too_small_volume_is_named(datalist, tmp_path):
    with pytest.raises(VolumeTooSmallError, match=r"t\d_tra\d\.nii\.gz.*\(64, 64, 32\).*at least 220 voxels on axis x"):
        discover_visual_words(datalist, tmp_path, extractor=_extractor(), **{**SETTINGS, "patch_size": (64, 64, 32), "border": (78, 78, 0)})
    with pytest.raises(ValueError, match="neighbours=13 is not possible with 12 training"):
        discover_visual_words(datalist, tmp_path, extractor=_extractor(), **{**SETTINGS, "neighbours": 13})


def _no_training(monkeypatch):
    from dira3d.visual_words import discover

    def refuse(*args, **kwargs):
        raise AssertionError("the feature extractor was trained before the settings were checked")

    monkeypatch.setattr(discover, "train_extractor", refuse)


def test_volumes_too_small_for_the_borders_fail_before_the_extractor_is_trained(datalist, tmp_path, monkeypatch, capsys):
    """48-slice CTs with the default z border 30 used to fail only after minutes of extractor training."""
    _no_training(monkeypatch)
    out = tmp_path / "small"
    args = ["visual-words", "--datalist", str(datalist), "--out", str(out), "--classes", "3", "--neighbours", "4",
            "--val-neighbours", "2", "--patch-size", "16", "16", "8", "--border", "8", "8", "14"]  # z: 2 * 14 + 8 > 32
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: volume \S*t\d_tra\d\.nii\.gz .*\(64, 64, 32\).*at least 36 voxels on axis z", err), err
    assert "(--border)" in err and "11 other of the 12 training volumes are too small as well" in err
    assert not (out / "embeddings.npy").exists()


def test_one_visual_word_is_refused_before_any_work(datalist, tmp_path, monkeypatch, capsys):
    """With one class the cross-entropy loss_dis is always 0: refused, naming --classes."""
    _no_training(monkeypatch)
    args = ["visual-words", "--datalist", str(datalist), "--out", str(tmp_path / "one"), "--classes", "1", "--neighbours", "4",
            "--val-neighbours", "2", "--patch-size", "16", "16", "8", "--border", "8", "8", "4"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "classes=1" in err and "at least 2 visual words" in err and "--classes" in err and "between 2 and 12" in err, err
    with pytest.raises(ValueError, match="loss_dis is always 0"):
        discover_visual_words(datalist, tmp_path / "api", extractor=_extractor(), **{**SETTINGS, "classes": 1})


def test_scans_of_different_sizes_every_patch_fits_its_neighbours(datalist, tmp_path):
    """Real scans differ in size, and every neighbour is cut at the reference's centre: the centre
    is drawn so that the patch fits the smallest neighbour (it used to fail at extraction)."""
    data = json.loads(datalist.read_text())
    smaller = {"training": (40, 44, 20), "validation": (36, 48, 18)}
    entries = {}
    for split in ("training", "validation"):
        entries[split] = []
        for i, entry in enumerate(data[split]):
            image = nib.load(datalist.parent / entry["image"])
            volume = np.asarray(image.dataobj)
            if i % 2:  # every other volume cropped at its far corner (index 0 stays aligned)
                volume = volume[tuple(slice(0, s) for s in smaller[split])]
            path = tmp_path / "images" / f"{entry['case_id']}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(volume, image.affine), path)
            entries[split].append({**entry, "image": str(path)})
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({**data, **entries}))
    out = tmp_path / "out"
    manifest = discover_visual_words(mixed, out, extractor=_extractor(), **SETTINGS)
    sizes = {split: {e["case_id"]: nib.load(e["image"]).shape for e in entries[split]} for split in entries}
    assert any(sizes["training"][c["reference"]["case_id"]] == (64, 64, 32) for c in manifest["classes"])
    for cls in manifest["classes"]:
        for split, info in cls["neighbours"].items():
            for case in info["case_ids"]:
                stop = [c - p // 2 + p for c, p in zip(cls["centre"], SETTINGS["patch_size"])]
                assert all(e <= s for e, s in zip(stop, sizes[split][case])), (cls["index"], case, stop)
            shard = np.load(out / cls["shards"][split], mmap_mode="r")
            assert shard.shape[0] == len(info["case_ids"]) and np.isfinite(shard).all()


def test_volume_shapes_match_what_the_loader_gives(tmp_path, monkeypatch):
    """Header-read NIfTI shapes (axes permuted and flipped), and the loading fallback, equal the loaded volumes'."""
    from dira3d.visual_words import loading

    volume = np.zeros((6, 9, 4), np.float32)
    oblique = np.array([[0, 0, -2.0, 0], [1.5, 0, 0.3, 0], [0.2, 1, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, oblique), tmp_path / "lia.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, 1.0, -2.0, 1.0])), tmp_path / "las.nii")
    entries = [{"image": str(tmp_path / n)} for n in ("lia.nii.gz", "las.nii")]
    for orient in (True, False):
        loaded = [tuple(loading.volume_transform(orient)(dict(e))["image"].shape[1:]) for e in entries]
        assert loading.volume_shapes(entries, orient) == loaded
    assert loading.volume_shapes(entries[:1], True) == [(4, 6, 9)]  # voxel axes (y, z, x) in the world
    monkeypatch.setattr(loading, "_nifti_shape", lambda path, orient: None)  # formats without a header read
    assert loading.volume_shapes(entries, True) == [(4, 6, 9), (6, 9, 4)]


def test_cli_end_to_end_with_trained_extractor_and_multi_resolution(datalist, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["visual-words", "--datalist", str(datalist), "--out", str(out), "--classes", "3", "--neighbours", "4",
            "--val-neighbours", "2", "--patch-size", "16", "16", "8", "--border", "8", "8", "4", "--extractor-size", "32", "32", "16",
            "--extractor-epochs", "1", "--extractor-width", "0.125", "--multi-resolution", "--seed", "3"]  # fmt: skip
    assert cli_main(args) == 0
    # the end names the pretraining command that reads this output, with its patch size
    assert (f"next:     dira3d pretrain --datalist {(out / 'visual_words.json').resolve()} --config visual_words.json "
            '--override "patch_size=[16,16,8]" --output runs/dira_pretrain') in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["params"]["extractor"] == "autoencoder" and manifest["params"]["resolutions"] == 3
    for cls in manifest["classes"]:  # the one-epoch extractor also groups volumes by template
        t = _template(cls["reference"]["case_id"])
        assert {_template(c) for c in cls["neighbours"]["training"]["case_ids"]} == {t}
        assert np.load(out / cls["shards"]["training"], mmap_mode="r").shape == (4 * 3, 1, 16, 16, 8)
    assert cli_main(args) == 0  # a finished run resumes to a no-op
    # seeded end to end, extractor training included: a second run elsewhere gives the same bytes
    out2 = tmp_path / "cli2"
    assert cli_main([a if a != str(out) else str(out2) for a in args]) == 0
    assert read_manifest(out2)["classes"] == manifest["classes"]
    assert (out2 / "embeddings.npy").read_bytes() == (out / "embeddings.npy").read_bytes()
    for path in (out / "shards").rglob("*.npy"):
        assert path.read_bytes() == (out2 / path.relative_to(out)).read_bytes()
    assert cli_main(args[:8] + ["99"] + args[9:]) == 1
    assert "neighbours=99 is not possible" in capsys.readouterr().err


def test_benchmark_quick_runs(repo_root, tmp_path):
    result = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "visual_words.py"), "--quick", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("|") and "MiB" not in line and "---" not in line]
    assert len(rows) >= 2 and all(float(r.split("|")[-2]) > 0 for r in rows)  # peak RSS column


def test_real_ct_reference_borders_and_lung_filter(real_data):
    """On a real chest CT: reference borders do not fit 48 slices (clear error); scaled ones do."""
    import SimpleITK as sitk

    from dira3d.visual_words import CoordinateRules, sample_coordinate

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "lung1_image.nrrd"))).transpose(2, 1, 0)  # (x, y, z)
    volume = np.clip((hu.astype(np.float32) + 1000) / 2000, 0, 1)
    with pytest.raises(VolumeTooSmallError, match=r"lung1 has size \(512, 512, 48\).*axis z"):
        sample_coordinate(volume, CoordinateRules(), np.random.RandomState(0), name="lung1")
    rules = CoordinateRules(border=(100, 100, 8))
    centre = sample_coordinate(volume, rules, np.random.RandomState(0), name="lung1")
    cube = volume[patch_slices(centre, rules.patch_size)]
    assert (cube >= 0.425).mean() <= 0.15 and np.median(cube) < 0.2  # mostly air-filled lung


def _cli_args(datalist, out, *extra: str) -> list[str]:
    return ["visual-words", "--datalist", str(datalist), "--out", str(out), "--classes", "3", "--neighbours", "4",
            "--val-neighbours", "2", "--patch-size", "16", "16", "8", "--border", "8", "8", "4", "--extractor-size", "32", "32", "16",
            "--extractor-epochs", "0", "--extractor-width", "0.125", *extra]  # fmt: skip


def test_overwrite_deletes_only_an_earlier_run_never_other_files(datalist, tmp_path):
    """--overwrite used to delete any manifest.json and the whole shards/ folder, whoever wrote them."""
    foreign = tmp_path / "foreign"
    (foreign / "shards").mkdir(parents=True)
    (foreign / "manifest.json").write_text('{"my": "own manifest"}')
    (foreign / "shards" / "important.bin").write_text("data")
    with pytest.raises(ValueError, match=r"not a `dira3d visual-words` run.*choose another --out"):
        discover_visual_words(datalist, foreign, extractor=_extractor(), overwrite=True, **SETTINGS)
    assert (foreign / "manifest.json").read_text() == '{"my": "own manifest"}' and (foreign / "shards" / "important.bin").exists()
    (foreign / "manifest.json").write_text('{"format": "dira3d-visual-words", "vers')  # cut short: said once what to do
    with pytest.raises(ValueError, match=r"manifest\.json.*cut short") as raised:
        discover_visual_words(datalist, foreign, extractor=_extractor(), overwrite=True, **SETTINGS)
    assert str(raised.value).count("choose another --out") == 1 and (foreign / "shards" / "important.bin").exists()

    out = tmp_path / "run"  # an earlier run plus a user's file in shards/: the run is replaced, the file stays
    discover_visual_words(datalist, out, extractor=_extractor(), **SETTINGS)
    (out / "shards" / "notes.txt").write_text("mine")
    discover_visual_words(datalist, out, extractor=_extractor(), overwrite=True, **{**SETTINGS, "classes": 2})
    assert (out / "shards" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "shards" / "training").iterdir()) == ["class_0000.npy", "class_0001.npy"]


def test_other_settings_name_the_values_and_the_seed(datalist, run):
    out, _ = run
    with pytest.raises(ValueError, match=r"classes: 3 → 2; seed: 0 → 5\).*--overwrite"):
        discover_visual_words(datalist, out, extractor=_extractor(), **{**SETTINGS, "classes": 2, "seed": 5})


def _raw_hu_datalist(folder, values: tuple[float, float]) -> Path:
    """Four 32×32×16 volumes with intensities spanning ``values`` (raw HU, or a prepared [0, 1])."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(4):
        volume = rng.uniform(*values, size=(32, 32, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "images" / f"v{i}.nii.gz")
        entries.append({"image": f"images/v{i}.nii.gz", "case_id": f"v{i}"})
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries, "validation": []}))
    return path


def test_raw_hu_volumes_are_refused_unless_raw_hu_and_prepared_ones_with_it(tmp_path, monkeypatch, capsys):
    """Raw HU used to go through silently: the lung filter (in [0, 1] units) passed air, shards held HU."""
    settings = dict(classes=2, neighbours=2, val_neighbours=0, patch_size=(8, 8, 4), border=(2, 2, 2), max_dense_fraction=1.0)
    raw = _raw_hu_datalist(tmp_path / "raw", (-1024.0, 400.0))
    with pytest.raises(ValueError, match=r"v\d\.nii\.gz: has intensities from -10\d\d.*not the \[0, 1\].*--raw-hu"):
        discover_visual_words(raw, tmp_path / "out_raw", extractor=_extractor(), **settings)
    manifest = discover_visual_words(raw, tmp_path / "out_raw_ok", extractor=_extractor(), raw_hu=True, **settings)
    shard = np.load(tmp_path / "out_raw_ok" / manifest["classes"][0]["shards"]["training"])
    assert 0.0 <= shard.min() and shard.max() <= 1.0
    # raw NRRD: its shape is read by loading it, which must not trip the [0, 1] check
    import SimpleITK as sitk

    raw_data = json.loads(raw.read_text())
    for entry in raw_data["training"]:
        nifti = raw.parent / entry["image"]
        entry["image"] = str(nifti).replace(".nii.gz", ".nrrd")
        sitk.WriteImage(sitk.ReadImage(str(nifti)), entry["image"])
    raw_nrrd = tmp_path / "raw_nrrd.json"
    raw_nrrd.write_text(json.dumps(raw_data))
    discover_visual_words(raw_nrrd, tmp_path / "out_nrrd", extractor=_extractor(), raw_hu=True, **settings)
    prepared = _raw_hu_datalist(tmp_path / "prepared", (0.0, 1.0))
    with pytest.raises(ValueError, match=r"already in \[0, 1\], but --raw-hu"):
        discover_visual_words(prepared, tmp_path / "out_twice", extractor=_extractor(), raw_hu=True, **settings)
    # through the CLI (the extractor's DataLoader wraps the error): one line naming the file
    _no_training(monkeypatch)
    args = ["visual-words", "--datalist", str(raw), "--out", str(tmp_path / "cli"), "--classes", "2", "--neighbours", "2",
            "--val-neighbours", "0", "--patch-size", "8", "8", "4", "--border", "2", "2", "2", "--extractor", "checkpoint",
            "--checkpoint", str(tmp_path / "missing.pt")]  # fmt: skip
    monkeypatch.setattr("dira3d.visual_words.discover.extractor_from_checkpoint", lambda path: _extractor())
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "not the [0, 1]" in err and "Traceback" not in err, err


def test_the_lung_filter_is_off_for_a_datalist_prepared_as_mr(tmp_path, caplog):
    """TransVW's "mostly lung" rule (at most 15 % of a patch >= -150 HU, 0.425) is a CT rule: on percentile-scaled
    MR volumes it used to be applied silently, rejecting the patches with the brightest tissue (on the real brain
    scans, 12-20 % of the centres, a fifth of those holding the enhancing lesion). Here every patch is "dense": a
    CT datalist fails on it, the same volumes prepared as MR (meta.modality) give visual words."""
    settings = dict(classes=2, neighbours=2, val_neighbours=0, patch_size=(8, 8, 4), border=(2, 2, 2), max_tries=5)
    ct = _raw_hu_datalist(tmp_path / "data", (0.5, 1.0))
    with pytest.raises(ValueError, match=r"all 4 training volumes have been used as references.*--lung-filter off"):
        discover_visual_words(ct, tmp_path / "ct", extractor=_extractor(), **settings)
    mr = tmp_path / "data" / "mr.json"
    mr.write_text(json.dumps({**json.loads(ct.read_text()), "meta": {"dataset": "generic", "modality": "mr"}}))
    with caplog.at_level("INFO", logger="dira3d.visual_words.discover"):
        manifest = discover_visual_words(mr, tmp_path / "mr", extractor=_extractor(), **settings)
    assert manifest["params"]["lung_filter"] == "off" and len(manifest["classes"]) == 2
    assert "prepared as MR" in caplog.text and "--lung-filter on" in caplog.text
    with pytest.raises(ValueError, match=r"have been used as references"):  # on request it still applies
        discover_visual_words(mr, tmp_path / "mr_on", extractor=_extractor(), lung_filter="on", **settings)
    assert discover_visual_words(ct, tmp_path / "ct_off", extractor=_extractor(), lung_filter="off", **settings)["params"]["lung_filter"] == "off"
    with pytest.raises(ValueError, match=r"lung_filter must be one of"):
        discover_visual_words(ct, tmp_path / "bad", extractor=_extractor(), lung_filter="maybe", **settings)


def test_validation_volume_smaller_than_the_patch_is_named_before_training(datalist, tmp_path, monkeypatch):
    """It used to reject every reference with 'a neighbour of size (20, 20, 10)', naming no file."""
    _no_training(monkeypatch)
    data = json.loads(datalist.read_text())
    nib.save(nib.Nifti1Image(np.full((20, 20, 10), 0.1, np.float32), np.eye(4)), tmp_path / "tiny.nii.gz")
    for entry in data["training"] + data["validation"]:
        entry["image"] = str(datalist.parent / entry["image"])
    data["validation"].append({"image": str(tmp_path / "tiny.nii.gz"), "case_id": "tiny"})
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(VolumeTooSmallError, match=r"validation volume \S*tiny\.nii\.gz.*\(20, 20, 10\).*patch \(32, 32, 16\) on axis x, y, z"):
        discover_visual_words(bad, tmp_path / "out", extractor="autoencoder", **{**SETTINGS, "patch_size": (32, 32, 16)})


def test_no_validation_volumes_says_how_to_get_some(datalist, tmp_path):
    data = json.loads(datalist.read_text())
    data["validation"] = []
    for entry in data["training"]:
        entry["image"] = str(datalist.parent / entry["image"])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no 'validation' volumes: prepare the scans with 2 or more validation volumes "
                                         r"\(`dira3d prepare generic \.\.\. --val-fraction`; datalist\.json has 0\), or pass "
                                         r"--val-neighbours 0"):
        discover_visual_words(path, tmp_path / "out", extractor=_extractor(), **SETTINGS)
    with pytest.raises(ValueError, match=r"choose classes \(--classes\) between 2 and 12"):
        discover_visual_words(datalist, tmp_path / "out", extractor=_extractor(), **{**SETTINGS, "classes": 13})


def test_cli_ctrl_c_prints_one_line_on_how_to_go_on(datalist, run, tmp_path, monkeypatch, capsys):
    from dira3d.visual_words import discover

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def main(args):  # without the handler Ctrl-C would stop pytest itself
        try:
            return cli_main(args)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped `dira3d visual-words` as a traceback")

    monkeypatch.setattr(discover, "discover_visual_words", interrupt)  # the command looks it up there when it runs
    assert main(_cli_args(datalist, tmp_path / "early")) == 130
    err = capsys.readouterr().err
    assert "interrupted before the classes were planned" in err and "Traceback" not in err, err
    out, manifest = run
    assert main(_cli_args(datalist, out)) == 130
    err = capsys.readouterr().err
    assert f"interrupted; 3 of 3 visual words are complete in {out}; rerun the same command to resume" in err, err


def test_cli_checkpoint_without_extractor_checkpoint_is_refused(datalist, tmp_path, capsys):
    """--checkpoint alone used to be ignored: an autoencoder was trained instead."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_cli_args(datalist, tmp_path / "out", "--checkpoint", str(tmp_path / "best.pt")))
    assert exit_info.value.code == 2
    assert "is used only with --extractor checkpoint" in capsys.readouterr().err


def test_extractor_training_and_embedding_log_progress(datalist, tmp_path, monkeypatch, caplog):
    """At the default size an extractor step takes minutes on a CPU: epochs used to be silent until their end."""
    import logging

    from dira3d.visual_words import extractor as extractor_module

    monkeypatch.setattr(extractor_module, "PROGRESS_SECONDS", 0.0)
    entries = [{"image": str(datalist.parent / e["image"])} for e in json.loads(datalist.read_text())["training"]][:6]
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.extractor"):
        model = extractor_module.train_extractor(entries, size=(32, 32, 16), epochs=1, width=0.125)
        extractor_module.embed_volumes(model, entries, size=(32, 32, 16))
    text = caplog.text
    assert re.search(r"extractor epoch 1/1: 2/6 volumes, \d+ s, about \d+ s to go", text), text
    assert re.search(r"embedding: 4/6 volumes", text), text


def test_a_full_disk_is_one_error_naming_the_shard_and_the_rerun_resumes(datalist, tmp_path, monkeypatch, capsys):
    """Shards are sparse memory maps: on a full disk the first write to a page no block could back killed
    the process with SIGBUS (exit 135, no message). Their blocks are now reserved when they are created."""
    import errno
    import os

    from dira3d.visual_words import writer

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this system")
    real = os.posix_fallocate
    calls = []

    def full_after_the_first_class(fd, offset, length):  # its training and validation shards
        calls.append(length)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(writer.os, "posix_fallocate", full_after_the_first_class)
    out = tmp_path / "full"
    base = _cli_args(datalist, out, "--class-block", "1")
    assert cli_main(base) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"error: .*visual-word shard \S*training/class_0001\.npy needs .* \(No space left on device\); free space", err), err
    assert not (out / "shards" / "training" / "class_0001.npy").exists()  # no shard of unreserved blocks left
    assert [c["status"] for c in json.loads((out / "manifest.json").read_text())["classes"]][0] == "done"
    monkeypatch.setattr(writer.os, "posix_fallocate", real)  # space freed: the same command resumes
    assert cli_main(base) == 0
    assert all(c["status"] == "done" for c in json.loads((out / "manifest.json").read_text())["classes"])
