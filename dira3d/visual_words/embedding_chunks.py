"""Resumable volume embedding: finished rows are kept on disk in chunks, so an interrupted run continues.

Embedding every volume of a real dataset takes hours on a CPU (1.4 s per chest CT). While it runs, the rows of the
finished batches are written atomically every :data:`CHUNK_SECONDS` or :data:`CHUNK_VOLUMES` volumes (and when
the embedding stops on an error or Ctrl-C) to ``<out>/embeddings.partial/rows_<start>-<stop>.npy``, next to a
``key.json`` that says what they were made from: the extractor (a SHA-256 of its weights, or of the
``--extractor checkpoint`` file), every volume of the datalist in row order (path, size, modification time) and the
settings that change an embedding (size, orientation, raw-HU window, batch size, device, torch version). The next
run reuses the chunks in row order when the key is the same, and embeds only the volumes after them; with any other
key it deletes them and embeds all. Chunks end on batch boundaries, so the resumed run embeds the same batches and
its rows equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dira3d.utils.atomic import atomic_write, atomic_write_text
from dira3d.visual_words.extractor import iter_embeddings

__all__ = ["PARTIAL_NAME", "CHUNK_SECONDS", "CHUNK_VOLUMES", "embedding_key", "extractor_identity", "weights_digest",
           "file_digest", "embed_resumable", "kept_rows", "clear_partial"]

logger = logging.getLogger(__name__)

PARTIAL_NAME = "embeddings.partial"  # the folder of finished chunks in a visual-words output folder
CHUNK_SECONDS = 60.0  # a chunk is written after the batch that ends this long after the last one ...
CHUNK_VOLUMES = 512  # ... or that reaches this many rows
_KEY_NAME = "key.json"
_FORMAT = "dira3d-visual-words-embedding-chunks"
_CHUNK = re.compile(r"^rows_(\d{7})-(\d{7})\.npy$")


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a module's class and state (every parameter and buffer: name, dtype, shape, bytes)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extractor_identity(model: nn.Module, checkpoint: str | os.PathLike | None = None) -> str:
    """The extractor part of an embedding key: the SHA-256 of ``checkpoint``'s bytes when the model was built from
    that file (an encoder checkpoint: the rest of the network is not seeded), else (or when the file cannot be read
    any more) of the model's weights."""
    if checkpoint:
        try:
            return f"checkpoint {file_digest(checkpoint)}"
        except OSError:
            pass
    return f"weights {weights_digest(model)}"


def _volume_record(entry: dict) -> list:
    path = Path(entry["image"])
    stat = path.stat()
    return [str(path.resolve()), int(stat.st_size), int(stat.st_mtime_ns)]


def embedding_key(extractor: str, entries: Sequence[dict], settings: dict) -> dict:
    """What an embedding is made from: ``extractor`` (a digest of the weights or checkpoint), the volumes in row order
    (path, size, mtime) and ``settings`` (JSON-like: whatever else changes the rows)."""
    return {"format": _FORMAT, "extractor": extractor, "settings": settings, "torch": str(torch.__version__),
            "volumes": [_volume_record(e) for e in entries]}  # fmt: skip


def _differences(before: dict, key: dict) -> str:
    if not isinstance(before, dict) or before.get("format") != _FORMAT:
        return "an unreadable key"
    names = [k for k in ("extractor", "torch") if before.get(k) != key[k]]
    names += [f"{k}" for k in key["settings"] if (before.get("settings") or {}).get(k) != key["settings"][k]]
    if before.get("volumes") != key["volumes"]:
        names.append("the volumes (paths, sizes or modification times)")
    return ", ".join(names) or "the key"


def _finished_chunks(folder: Path, key: dict) -> list[Path]:
    """The chunks in ``folder`` that continue one another from row 0, when its key is ``key``; else none (and the
    folder's chunks and key are deleted, saying why)."""
    if not folder.is_dir():
        return []
    try:
        before = json.loads((folder / _KEY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = None
    if before != key:
        chunks = [p for p in folder.iterdir() if _CHUNK.match(p.name)]
        if chunks:
            logger.info("not reusing the %d embedding chunk(s) in %s: made with another %s", len(chunks), folder,
                        _differences(before, key))
        clear_partial(folder.parent)
        return []
    found = sorted((int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := _CHUNK.match(p.name)))
    kept, row = [], 0
    for start, stop, path in found:
        if start == row and stop > start:
            kept.append(path)
            row = stop
    return kept


def _span(path: Path) -> int:
    """The number of rows a chunk's name ``rows_<start>-<stop>.npy`` says it holds."""
    found = _CHUNK.match(path.name)
    return int(found[2]) - int(found[1])


def kept_rows(out_dir: str | os.PathLike) -> int:
    """How many volumes' embeddings the chunks in ``out_dir`` hold from row 0 on (0 when none)."""
    folder = Path(out_dir) / PARTIAL_NAME
    found = sorted((int(m[1]), int(m[2])) for p in folder.iterdir() if (m := _CHUNK.match(p.name))) if folder.is_dir() else []
    row = 0
    for start, stop in found:
        row = stop if start == row else row
    return row


def clear_partial(out_dir: str | os.PathLike) -> None:
    """Delete the embedding chunks of ``out_dir`` (``embeddings.partial/``: its chunks, its key, the temporary files
    of an interrupted write); anything else in that folder is left, and the folder with it."""
    folder = Path(out_dir) / PARTIAL_NAME
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in folder.iterdir():
        own = _CHUNK.match(path.name) or path.name == _KEY_NAME or path.name.startswith((".rows_", f".{_KEY_NAME}."))
        if own and path.is_file():
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def embed_resumable(model: nn.Module, entries: Sequence[dict], out_dir: str | os.PathLike, key: dict, *,
                    size: Sequence[int], batch_size: int = 2, orient: bool = True, raw_hu_window=None, workers: int = 0,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """:func:`~dira3d.visual_words.extractor.embed_volumes` that keeps its finished rows in ``out_dir`` (see the module)
    and reuses an earlier run's with the same ``key`` (:func:`embedding_key`).

    Returns:
        A ``(N, D)`` float32 CPU tensor, rows in the order of ``entries``.
    """
    folder = Path(out_dir) / PARTIAL_NAME
    reason = ""
    try:
        chunks = _finished_chunks(folder, key)
        parts = [torch.from_numpy(np.load(path, allow_pickle=False)) for path in chunks]
    except (OSError, ValueError) as err:  # a damaged file
        chunks, parts, reason = [], [], f"a chunk cannot be read ({err})"
    if any(r.ndim != 2 or r.dtype != torch.float32 for r in parts) or sum(len(r) for r in parts) > len(entries):
        reason = f"they do not fit the {len(entries)} volumes"
    elif any(len(r) != _span(path) for r, path in zip(parts, chunks)):  # every later row would be shifted
        reason = "a chunk holds another number of rows than its name says"
    if reason:
        logger.info("not reusing the embedding chunks in %s: %s", folder, reason)
        clear_partial(out_dir)
        parts = []
    done = sum(len(r) for r in parts)  # parts: the rows so far, reused then new, in order
    if done:
        logger.info("embedding: reusing %d of %d volumes embedded by an earlier run (%s)", done, len(entries), folder)
    if done < len(entries) and not (folder / _KEY_NAME).is_file():
        atomic_write_text(folder / _KEY_NAME, json.dumps(key))
    pending: list[torch.Tensor] = []
    start, last = done, time.monotonic()

    def flush() -> None:
        nonlocal start, last, pending
        if pending:
            rows = torch.cat(pending).numpy()
            atomic_write(folder / f"rows_{start:07d}-{start + len(rows):07d}.npy", lambda handle: np.save(handle, rows))
            parts.append(torch.from_numpy(rows))
            start, pending = start + len(rows), []
        last = time.monotonic()

    try:
        for rows in iter_embeddings(model, entries[done:], size, batch_size, orient, raw_hu_window, workers, device, done=done):
            pending.append(rows)
            if sum(len(r) for r in pending) >= CHUNK_VOLUMES or time.monotonic() - last >= CHUNK_SECONDS:
                flush()
    except BaseException:
        try:
            flush()  # the finished batches are right: a rerun continues after them
        except OSError as err:  # e.g. the full disk that stopped the run: its own error is the one to see
            logger.warning("could not keep the embedding rows before the error: %s", err)
        raise
    flush()
    return torch.cat(parts) if parts else torch.zeros(0, 0)
