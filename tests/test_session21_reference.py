"""Session-21 mutation audit: what the audit's surviving mutations showed unpinned, checked against independent
references (hand-computed names, counts and keys; hashlib; the settings as passed).

Areas: the embedding key discover builds, iter_embeddings' mode, the per-case file's name, load_split's world_mm
placeholder, metric_reports' per-case files, LoadReport's summary of load_into.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math

import pytest
import torch

from dira3d.evaluation.case_metrics import cases_file
from dira3d.evaluation.datalists import load_split
from dira3d.evaluation.run_folders import metric_reports
from dira3d.networks import LoadReport
from dira3d.visual_words import VolumeAutoencoder, discover_visual_words
from dira3d.visual_words.extractor import embed_volumes, iter_embeddings
from dira3d.visual_words.synthetic import write_template_datalist

discover = importlib.import_module("dira3d.visual_words.discover")

SETTINGS = dict(classes=2, neighbours=2, val_neighbours=2, patch_size=(16, 16, 8), border=(4, 4, 2),
                extractor_size=(16, 16, 8), seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_template_datalist(tmp_path_factory.mktemp("vw_key"), templates=3, per_template=3, val_per_template=1,
                                   shape=(48, 48, 24))  # fmt: skip


class _Stop(Exception):
    pass


def _key(datalist, out, monkeypatch, **kwargs) -> dict:
    """The key discover_visual_words passes to embed_resumable (the embedding itself is not run)."""
    seen = {}

    def capture(model, entries, out_dir, key, **kw):
        seen["key"] = json.loads(json.dumps(key))
        raise _Stop

    monkeypatch.setattr(discover, "embed_resumable", capture)
    with pytest.raises(_Stop):
        discover_visual_words(datalist, out, **{**SETTINGS, **kwargs})
    return seen["key"]


def _extractor() -> VolumeAutoencoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return VolumeAutoencoder(width=0.125).eval()


def test_the_embedding_key_holds_every_setting_that_changes_the_rows(datalist, tmp_path, monkeypatch):
    key = _key(datalist, tmp_path / "a", monkeypatch, extractor=_extractor())
    assert key["settings"] == {"extractor_size": [16, 16, 8], "orient": True, "raw_hu_window": None, "batch_size": 2,
                               "device": "cpu"}  # fmt: skip
    assert len(key["volumes"]) == 12
    other = _key(datalist, tmp_path / "b", monkeypatch, extractor=_extractor(), orient=False, raw_hu=True,
                 hu_window=(-900.0, 900.0), device="meta")  # fmt: skip
    assert other["settings"] == {**key["settings"], "orient": False, "raw_hu_window": [-900.0, 900.0], "device": "meta"}


def test_a_checkpoint_extractor_is_keyed_by_the_checkpoint_bytes(datalist, tmp_path, monkeypatch):
    checkpoint = tmp_path / "pretrained.pt"
    checkpoint.write_bytes(b"a dira3d checkpoint")
    monkeypatch.setattr(discover, "extractor_from_checkpoint", lambda path: _extractor())
    key = _key(datalist, tmp_path / "out", monkeypatch, extractor="checkpoint", checkpoint=str(checkpoint))
    assert key["extractor"] == "checkpoint " + hashlib.sha256(b"a dira3d checkpoint").hexdigest()


def test_iter_embeddings_puts_the_encoders_mode_back_even_when_left_early(datalist):
    content = json.loads(datalist.read_text())
    entries = [{**e, "image": str(datalist.parent / e["image"])} for e in content["training"][:4]]
    model = _extractor().train()
    rows = embed_volumes(model, entries[:2], size=(16, 16, 8))
    assert rows.shape[0] == 2 and model.training
    batches = iter_embeddings(model, entries, size=(16, 16, 8), batch_size=2)
    assert next(batches).shape[0] == 2 and not model.training  # embedding: eval mode
    batches.close()  # a Ctrl-C between two batches
    assert model.training


# ---- the per-case file's name ----

@pytest.mark.parametrize("split", ["holdout/../../x", "test\n", "holdout.v2", "..", "", "a b"])
def test_a_split_that_is_not_a_plain_name_is_refused(split):
    with pytest.raises(ValueError, match="cannot name the per-case results file"):
        cases_file(split)


def test_a_split_is_named_by_its_text():
    assert cases_file("fold-2_B") == "fold-2_B_cases.csv"
    assert cases_file(2) == "2_cases.csv"  # a command-line override parsed as a number


# ---- load_split's placeholder ----

def _datalist(tmp_path, positions: list[bool]):
    test = []
    for i, has in enumerate(positions):
        (tmp_path / f"c{i}.npy").touch()
        entry = {"image": f"c{i}.npy", "label": i % 2, "case_id": f"s{i}"}
        if has:
            entry["world_mm"] = [float(i), 1.5, -2.0]
        test.append(entry)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{**e, "case_id": "t" + e["case_id"]} for e in test], "test": test}))
    return path


def test_no_placeholder_where_no_entry_has_a_position(tmp_path):
    entries = load_split(_datalist(tmp_path, [False, False, False]), "test")
    assert [sorted(e) for e in entries] == [["case_id", "image", "label"]] * 3


def test_the_placeholder_is_three_nan_and_each_entry_has_its_own(tmp_path):
    entries = load_split(_datalist(tmp_path, [True, False, True, False]), "test")
    assert entries[0]["world_mm"] == [0.0, 1.5, -2.0] and entries[2]["world_mm"] == [2.0, 1.5, -2.0]
    for i in (1, 3):
        assert isinstance(entries[i]["world_mm"], list) and len(entries[i]["world_mm"]) == 3
        assert all(math.isnan(v) for v in entries[i]["world_mm"])
    assert entries[1]["world_mm"] is not entries[3]["world_mm"]


# ---- metric_reports: every split's per-case file, nothing else ----

def test_metric_reports_lists_the_per_case_file_of_every_split(tmp_path):
    names = ["train_cases.csv", "holdout_cases.csv", "validation_cases.csv", "test_cases.csv"]
    for name in names + ["other_cases.csv", "mine.csv"]:
        (tmp_path / name).write_text("case\n")
    assert sorted(p.name for p in metric_reports(tmp_path)) == sorted(names)


# ---- LoadReport.summary of load_into: counts by hand ----

def _report(**kwargs) -> LoadReport:
    fields = dict(loaded=["a", "b", "c"], missing=["m1", "m2"], unexpected=["u1"], mismatched={"w": ((4, 1), (8, 1))},
                  parts=("encoder",), source="enc.pt", target="Net", dropped=["d1", "d2"])  # fmt: skip
    return LoadReport(**{**fields, **kwargs})


def test_the_summary_counts_the_files_and_the_networks_tensors_apart():
    # the file: 3 loaded + 1 unexpected + 1 of another shape + 2 dropped = 7; Net: 3 loaded + 2 missing + 1 mismatched = 6
    lines = _report().summary().split("\n")
    assert lines[0] == ("encoder weights from enc.pt into Net: 3 tensors loaded, of the file's 7 and of Net's 6; 2 of "
                        "Net's not in the file (kept their initial values), 1 of the file's not in Net (ignored), 2 of "
                        "the file's dropped by the mapping, 1 of another shape (not loaded)")
    assert lines[1] == "  in Net, not in the file (kept their initial values): m1, m2"
    assert lines[2] == "  in the file, not in Net (ignored): u1"
    first = _report(dropped=[], unexpected=[], mismatched={}).summary().split("\n")[0]
    assert first == ("encoder weights from enc.pt into Net: 3 tensors loaded, of the file's 3 and of Net's 5; 2 of Net's "
                     "not in the file (kept their initial values), 0 of the file's not in Net (ignored)")


def test_the_summary_of_load_pretrained_keeps_its_form():
    report = _report(target="", dropped=[], mismatched={}, parts=("encoder", "decoder"), source="<dict>")
    assert report.summary().split("\n")[:3] == [
        "pretrained weights from <dict> into encoder, decoder: 3 tensors loaded, 2 missing, 1 unexpected",
        "  missing (kept their initial values): m1, m2", "  unexpected (ignored): u1"]


# ---- MR normalisation: percentiles without a second copy of the foreground; slabs of at least one slice ----

def test_mr_range_holds_the_foreground_once():
    import tracemalloc

    import numpy as np

    from dira3d.data.normalize import mr_range

    rng = np.random.default_rng(0)
    volume = (rng.gamma(2.0, 300.0, (40, 64, 64)) * (rng.random((40, 64, 64)) < 0.6)).astype(np.int16)
    foreground_bytes = 4 * int(np.count_nonzero(volume))
    mr_range(volume[:2])  # numpy's first-call set-up is not the function's memory
    tracemalloc.start()
    try:
        offset, width = mr_range(volume)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    values = volume[volume != 0].astype(np.float64)
    assert (offset, width) == (np.float32(np.percentile(values, 0.5)),
                               np.float32(np.percentile(values, 99.5) - np.percentile(values, 0.5)))
    assert peak < 1.4 * foreground_bytes, f"peak {peak / foreground_bytes:.2f}x the float32 foreground"


def test_a_slice_larger_than_the_slab_is_scaled_on_its_own(monkeypatch):
    import numpy as np
    import SimpleITK as sitk

    from dira3d.data import pipeline
    from dira3d.data.io import to_ras

    volume = np.random.default_rng(5).normal(-300, 600, (4, 6, 5)).astype(np.int16)
    image = sitk.GetImageFromArray(volume)
    ras = sitk.GetArrayFromImage(to_ras(image))  # the voxels normalise_image scales, in its order
    monkeypatch.setattr(pipeline, "_SLAB_BYTES", 1)  # less than one slice
    got = sitk.GetArrayFromImage(pipeline.normalise_image(image, "ct", window=(-160.0, 240.5)))
    expected = np.clip((ras.astype(np.float32) - np.float32(-160.0)) / np.float32(400.5), 0.0, 1.0)
    assert got.dtype == np.float32 and got.tobytes() == expected.astype(np.float32).tobytes()


def test_a_bad_ct_window_is_refused_naming_the_file():
    import numpy as np
    import SimpleITK as sitk

    from dira3d.data.errors import DataError
    from dira3d.data.pipeline import normalise_image

    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    with pytest.raises(DataError, match=r"^scan\.nii\.gz: HU window must satisfy lo < hi, got \[100\.0, -100\.0\]"):
        normalise_image(image, "ct", window=(100.0, -100.0), path="scan.nii.gz")
