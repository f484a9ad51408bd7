"""An interrupted visual-word embedding continues after the volumes it finished (they are kept in chunks).

Embedding every volume takes hours on a real dataset; a Ctrl-C or a killed job used to lose all of it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dira3d.visual_words import VolumeAutoencoder, discover_visual_words
from dira3d.visual_words import embedding_chunks
from dira3d.visual_words.command import interrupted_message
from dira3d.visual_words.embedding_chunks import PARTIAL_NAME, extractor_identity
from dira3d.visual_words.synthetic import write_template_datalist

VOLUMES = 12  # 9 training + 3 validation
SETTINGS = dict(classes=2, neighbours=2, val_neighbours=2, patch_size=(16, 16, 8), border=(4, 4, 2),
                extractor_size=(16, 16, 8), seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_template_datalist(tmp_path_factory.mktemp("vw_embed"), templates=3, per_template=3, val_per_template=1,
                                   shape=(48, 48, 24))  # fmt: skip


def _extractor(seed: int = 1) -> VolumeAutoencoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VolumeAutoencoder(width=0.125).eval()


def _watch(monkeypatch, stop_after: int | None = None, at_stop=None) -> list[int]:
    """Count the rows embedded in this process; with ``stop_after``, a Ctrl-C while batch ``stop_after`` (0-based)
    is embedded (``at_stop()`` is called first, to look at the folder as a SIGKILL would leave it)."""
    counts: list[int] = []
    original = embedding_chunks.iter_embeddings

    def watched(*args, **kwargs):
        for batch, rows in enumerate(original(*args, **kwargs)):
            if batch == stop_after:
                if at_stop:
                    at_stop()
                raise KeyboardInterrupt
            counts.append(len(rows))
            yield rows

    monkeypatch.setattr(embedding_chunks, "iter_embeddings", watched)
    return counts


def _interrupted(datalist, out: Path, monkeypatch, stop_after: int = 3, at_stop=None, **settings) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(embedding_chunks, "CHUNK_VOLUMES", 4)
        _watch(patch, stop_after, at_stop)
        with pytest.raises(KeyboardInterrupt):
            discover_visual_words(datalist, out, extractor=_extractor(), **{**SETTINGS, **settings})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".dira3d.lock"}


def test_interrupted_embedding_continues_and_the_outputs_equal_an_uninterrupted_run(datalist, tmp_path, monkeypatch, caplog):
    whole = tmp_path / "whole"
    with monkeypatch.context() as patch:
        counts = _watch(patch)
        discover_visual_words(datalist, whole, extractor=_extractor(), **SETTINGS)
    assert sum(counts) == VOLUMES

    out = tmp_path / "split"
    seen = []  # the chunks on disk while batch 5 is embedded: what a SIGKILL (no clean-up) would leave
    _interrupted(datalist, out, monkeypatch, stop_after=5, at_stop=lambda: seen.extend(sorted(os.listdir(out / PARTIAL_NAME))))
    assert {"rows_0000000-0000004.npy", "rows_0000004-0000008.npy", "key.json"} <= set(seen), seen
    # the Ctrl-C keeps the two finished batches after the last chunk too
    assert sorted(p.name for p in (out / PARTIAL_NAME).glob("rows_*")) == [
        "rows_0000000-0000004.npy", "rows_0000004-0000008.npy", "rows_0000008-0000010.npy"]
    assert "the embeddings of the first 10 are kept in" in interrupted_message(out)

    counts = _watch(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.embedding_chunks"):
        discover_visual_words(datalist, out, extractor=_extractor(), **SETTINGS)
    assert sum(counts) == VOLUMES - 10  # only the volumes left
    assert "embedding: reusing 10 of 12 volumes embedded by an earlier run" in caplog.text
    assert not (out / PARTIAL_NAME).exists()  # planned: the chunks are no longer needed
    assert _files(out) == _files(whole)  # embeddings, manifest, shards, datalist: byte for byte


def _other_datalist(datalist: Path, tmp_path: Path) -> Path:
    content = json.loads(datalist.read_text())
    for split in ("training", "validation"):
        for entry in content[split]:
            entry["image"] = str(datalist.parent / entry["image"])
    content["training"] = content["training"][::-1]
    path = tmp_path / "reversed.json"
    path.write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("change", ["extractor", "volume mtime", "datalist", "extractor size"])
def test_a_changed_extractor_datalist_or_setting_reuses_nothing(change, datalist, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    _interrupted(datalist, out, monkeypatch)  # 3 batches (6 volumes) kept in 2 chunks
    data, settings, extractor = datalist, dict(SETTINGS), _extractor()
    if change == "extractor":
        extractor = _extractor(seed=2)
    elif change == "volume mtime":  # same bytes, rewritten: a prepared volume made again
        image = datalist.parent / json.loads(datalist.read_text())["training"][4]["image"]
        stat = image.stat()
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "datalist":
        data = _other_datalist(datalist, tmp_path)
    else:
        settings["extractor_size"] = (24, 24, 16)
    counts = _watch(monkeypatch)
    try:
        with caplog.at_level(logging.INFO, logger="dira3d.visual_words.embedding_chunks"):
            discover_visual_words(data, out, extractor=extractor, **settings)
    finally:
        if change == "volume mtime":
            os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sum(counts) == VOLUMES
    assert "reusing" not in caplog.text.replace("not reusing", "")
    expected = {"extractor": "made with another extractor", "volume mtime": "the volumes (paths, sizes or modification times)",
                "datalist": "the volumes", "extractor size": "made with another extractor_size"}[change]
    assert "not reusing the 2 embedding chunk(s)" in caplog.text and expected in caplog.text, caplog.text


def test_overwrite_deletes_the_chunks_and_only_them(datalist, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    _interrupted(datalist, out, monkeypatch)
    (out / PARTIAL_NAME / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a visual-word run; pass --overwrite"):
        discover_visual_words(datalist, out, extractor=_extractor(), resume=False, **SETTINGS)
    counts = _watch(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.embedding_chunks"):
        discover_visual_words(datalist, out, extractor=_extractor(), overwrite=True, **SETTINGS)
    assert sum(counts) == VOLUMES and "reusing" not in caplog.text
    assert sorted(os.listdir(out / PARTIAL_NAME)) == ["notes.txt"]


def test_extractor_identity_follows_the_weights_or_the_checkpoint_bytes(tmp_path):
    model = _extractor()
    assert extractor_identity(model) == extractor_identity(_extractor())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert extractor_identity(model) != extractor_identity(_extractor())
    ckpt = tmp_path / "encoder.pt"
    ckpt.write_bytes(b"weights-1")
    first = extractor_identity(model, ckpt)
    assert first == extractor_identity(_extractor(), ckpt)  # the file, not the (partly unseeded) network built from it
    ckpt.write_bytes(b"weights-2")
    assert extractor_identity(model, ckpt) != first
    assert extractor_identity(model, tmp_path / "gone.pt") == extractor_identity(model)  # deleted since it was loaded


def test_a_chunk_of_other_length_than_its_name_is_not_reused(datalist, tmp_path, monkeypatch, caplog):
    """A chunk named rows_4-6 that holds one row would shift every later row onto another volume."""
    out = tmp_path / "out"
    _interrupted(datalist, out, monkeypatch)
    chunk = out / PARTIAL_NAME / "rows_0000004-0000006.npy"
    np.save(chunk, np.load(chunk)[:1])
    counts = _watch(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.embedding_chunks"):
        discover_visual_words(datalist, out, extractor=_extractor(), **SETTINGS)
    assert sum(counts) == VOLUMES and "another number of rows than its name says" in caplog.text


def test_a_damaged_chunk_is_not_reused(datalist, tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    _interrupted(datalist, out, monkeypatch)
    (out / PARTIAL_NAME / "rows_0000004-0000006.npy").write_bytes(b"\x93NUMPY garbage")
    counts = _watch(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.embedding_chunks"):
        discover_visual_words(datalist, out, extractor=_extractor(), **SETTINGS)
    assert sum(counts) == VOLUMES and "a chunk cannot be read" in caplog.text
