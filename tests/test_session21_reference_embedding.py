"""Session-21 mutation audit: the resumable visual-word embedding (dira3d.visual_words.embedding_chunks), pinned
against hand-computed chunk layouts and rows.

The embedding itself is replaced by a fake ``iter_embeddings`` whose row for volume ``n`` is ``[n, 2n]``, so every
reused, discarded or re-embedded row can be told apart; a fake clock drives the every-60-seconds rule.
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dira3d.visual_words import embedding_chunks
from dira3d.visual_words.embedding_chunks import (
    CHUNK_SECONDS, PARTIAL_NAME, clear_partial, embed_resumable, embedding_key, kept_rows, weights_digest,
)  # fmt: skip

LOGGER = "dira3d.visual_words.embedding_chunks"


def _entries(tmp_path, count: int = 10) -> list[dict]:
    folder = tmp_path / "volumes"
    folder.mkdir(exist_ok=True)
    entries = []
    for n in range(count):
        path = folder / f"v{n}.npy"
        path.write_bytes(b"volume %d" % n)
        entries.append({"image": str(path), "n": n})
    return entries


def _reference(entries) -> torch.Tensor:
    return torch.tensor([[float(e["n"]), 2.0 * e["n"]] for e in entries], dtype=torch.float32)


class _Fake:
    """iter_embeddings: batches of ``batch_size`` rows ``[n, 2n]``; records the volumes embedded and ``done``;
    ``stop_after`` batches, then a KeyboardInterrupt (or ``error``); ``tick`` seconds of the fake clock per batch."""

    def __init__(self, monkeypatch, stop_after: int | None = None, error: BaseException | None = None, tick: float = 0.0):
        self.embedded: list[int] = []
        self.done: list[int] = []
        self.now = 0.0
        self.stop_after, self.error, self.tick = stop_after, error, tick
        monkeypatch.setattr(embedding_chunks, "iter_embeddings", self)
        monkeypatch.setattr(embedding_chunks, "time", SimpleNamespace(monotonic=lambda: self.now))

    def __call__(self, model, entries, size, batch_size, orient, raw_hu_window, workers, device, done=0):
        self.done.append(done)
        for batch, first in enumerate(range(0, len(entries), batch_size)):
            if batch == self.stop_after:
                raise self.error or KeyboardInterrupt
            chunk = entries[first : first + batch_size]
            self.now += self.tick
            self.embedded += [e["n"] for e in chunk]
            yield _reference(chunk)


def _run(entries, out, key=None):
    key = key or embedding_key("weights x", entries, {"size": [16, 16, 8]})
    return embed_resumable(torch.nn.Identity(), entries, out, key, size=(16, 16, 8), batch_size=2)


def _chunks(out) -> list[str]:
    return sorted(p.name for p in (out / PARTIAL_NAME).glob("rows_*"))


def test_a_chunk_is_written_after_the_batch_that_ends_60_seconds_after_the_last(tmp_path, monkeypatch):
    entries, out = _entries(tmp_path, 14), tmp_path / "out"
    fake = _Fake(monkeypatch, tick=CHUNK_SECONDS / 2.4)  # 25 s a batch: the 3rd batch after a chunk reaches 60 s
    assert CHUNK_SECONDS == 60.0
    rows = _run(entries, out)
    assert torch.equal(rows, _reference(entries)) and fake.embedded == list(range(14))
    # 75 s, 150 s: chunks of 3 batches; the last 1 batch (at 175 s) at the end
    assert _chunks(out) == ["rows_0000000-0000006.npy", "rows_0000006-0000012.npy", "rows_0000012-0000014.npy"]
    for name, first in [("rows_0000000-0000006.npy", 0), ("rows_0000006-0000012.npy", 6)]:
        assert np.array_equal(np.load(out / PARTIAL_NAME / name), _reference(entries[first : first + 6]).numpy())


def test_a_missing_middle_chunk_ends_what_is_reused(tmp_path, monkeypatch):
    entries, out = _entries(tmp_path, 12), tmp_path / "out"
    monkeypatch.setattr(embedding_chunks, "CHUNK_VOLUMES", 4)
    with monkeypatch.context() as patch:
        _Fake(patch, stop_after=5)
        with pytest.raises(KeyboardInterrupt):
            _run(entries, out)
    assert _chunks(out) == ["rows_0000000-0000004.npy", "rows_0000004-0000008.npy", "rows_0000008-0000010.npy"]
    assert kept_rows(out) == 10
    (out / PARTIAL_NAME / "rows_0000004-0000008.npy").unlink()
    assert kept_rows(out) == 4  # rows 8-10 do not continue rows 0-4
    fake = _Fake(monkeypatch)
    rows = _run(entries, out)
    assert fake.embedded == list(range(4, 12)) and fake.done == [4]  # done: the progress line names the rest
    assert torch.equal(rows, _reference(entries))


def test_a_finished_embedding_is_reused_whole(tmp_path, monkeypatch):
    entries, out = _entries(tmp_path, 6), tmp_path / "out"
    _Fake(monkeypatch)
    _run(entries, out)  # complete; discover deletes the chunks only once the plan is written
    fake = _Fake(monkeypatch)
    assert torch.equal(_run(entries, out), _reference(entries)) and fake.embedded == []


@pytest.mark.parametrize("bad", ["float64", "1-D"])
def test_a_chunk_of_another_dtype_or_rank_is_not_reused(bad, tmp_path, monkeypatch, caplog):
    entries, out = _entries(tmp_path, 6), tmp_path / "out"
    with monkeypatch.context() as patch:
        _Fake(patch, stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            _run(entries, out)
    chunk = out / PARTIAL_NAME / "rows_0000000-0000004.npy"
    rows = np.load(chunk)
    np.save(chunk, rows.astype(np.float64) if bad == "float64" else rows[:, 0].copy())
    fake = _Fake(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = _run(entries, out)
    assert "they do not fit the 6 volumes" in caplog.text
    assert fake.embedded == list(range(6)) and torch.equal(result, _reference(entries))


def test_a_key_of_another_torch_version_reuses_nothing(tmp_path, monkeypatch, caplog):
    entries, out = _entries(tmp_path, 6), tmp_path / "out"
    key = embedding_key("weights x", entries, {"size": [16, 16, 8]})
    assert key["torch"] == str(torch.__version__)
    with monkeypatch.context() as patch:
        _Fake(patch, stop_after=2)
        with pytest.raises(KeyboardInterrupt):
            _run(entries, out, key)
    stored = json.loads((out / PARTIAL_NAME / "key.json").read_text())
    assert stored == key
    fake = _Fake(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run(entries, out, {**key, "torch": "0.0.1"})
    assert fake.embedded == list(range(6)) and "made with another torch" in caplog.text


def test_the_volume_record_is_the_resolved_path_size_and_mtime(tmp_path, monkeypatch):
    entries = _entries(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    relative = [{"image": os.path.join("volumes", f"v{n}.npy")} for n in range(2)]
    volumes = embedding_key("weights x", relative, {})["volumes"]
    stats = [os.stat(e["image"]) for e in entries]
    assert volumes == [[str((tmp_path / "volumes" / f"v{n}.npy").resolve()), stats[n].st_size, stats[n].st_mtime_ns]
                       for n in range(2)]  # fmt: skip
    # rewritten with another size and the same mtime (cp -p, rsync -t): another key
    path = tmp_path / "volumes" / "v1.npy"
    path.write_bytes(b"a longer volume 1")
    os.utime(path, ns=(stats[1].st_atime_ns, stats[1].st_mtime_ns))
    assert embedding_key("weights x", relative, {})["volumes"] != volumes


def test_the_weights_digest_tells_dtypes_apart():
    class Holder(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.register_buffer("b", torch.zeros(3, dtype=dtype))  # the same (zero) bytes

    assert weights_digest(Holder(torch.int32)) != weights_digest(Holder(torch.float32))
    assert weights_digest(Holder(torch.int32)) == weights_digest(Holder(torch.int32))


def test_clear_partial_deletes_the_temporary_files_of_an_interrupted_write_and_only_its_own(tmp_path):
    folder = tmp_path / PARTIAL_NAME
    folder.mkdir()
    own = ["rows_0000000-0000004.npy", "key.json", ".rows_0000004-0000008.npy.k2j3.tmp", ".key.json.x8.tmp"]
    others = ["notes.txt", ".rowsx", "rows_4-8.npy"]
    for name in own + others:
        (folder / name).write_bytes(b"x")
    clear_partial(tmp_path)
    assert sorted(os.listdir(folder)) == sorted(others)


def test_clear_partial_leaves_a_linked_folder_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rows_0000000-0000004.npy").write_bytes(b"x")
    (elsewhere / "key.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    try:
        (out / PARTIAL_NAME).symlink_to(elsewhere, target_is_directory=True)
    except OSError as err:  # pragma: no cover - platform-dependent
        pytest.skip(f"symbolic links cannot be made here: {err}")
    clear_partial(out)
    assert sorted(os.listdir(elsewhere)) == ["key.json", "rows_0000000-0000004.npy"]


def test_a_failed_write_after_an_error_keeps_the_error(tmp_path, monkeypatch, caplog):
    entries, out = _entries(tmp_path, 6), tmp_path / "out"
    _Fake(monkeypatch, stop_after=2, error=RuntimeError("the scan is broken"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embedding_chunks, "atomic_write", full_disk)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(RuntimeError, match="the scan is broken"):
        _run(entries, out)
    assert "could not keep the embedding rows before the error" in caplog.text


def test_chunks_with_more_rows_than_volumes_are_not_reused(tmp_path, monkeypatch, caplog):
    entries, out = _entries(tmp_path, 6), tmp_path / "out"
    key = embedding_key("weights x", entries, {"size": [16, 16, 8]})
    (out / PARTIAL_NAME).mkdir(parents=True)
    (out / PARTIAL_NAME / "key.json").write_text(json.dumps(key))
    np.save(out / PARTIAL_NAME / "rows_0000000-0000008.npy", np.ones((8, 2), np.float32))
    fake = _Fake(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        rows = _run(entries, out, key)
    assert "they do not fit the 6 volumes" in caplog.text
    assert fake.embedded == list(range(6)) and torch.equal(rows, _reference(entries))
