"""Visual-word shards, the manifest and the output datalist.

Layout of an output folder::

    manifest.json            seed, parameters, every class's reference, neighbours, centre, status
    embeddings.npy           (N_train + N_val, D) float32 volume embeddings (training rows first)
    extractor.pt             the trained autoencoder's per-epoch checkpoint (dira3d.visual_words.extractor)
    visual_words.json        datalist: one entry per class and split, "image" = its shard
    shards/<split>/class_0000.npy   float16 (K * R, C, X, Y, Z), R = 1 or 3 resolutions

Shards are ``.npy`` files created with ``np.lib.format.open_memmap`` and filled row by row
through short-lived memory maps, so the process never holds more than a patch of a shard. The
manifest is replaced atomically after every finished class: a run killed at any moment leaves a
manifest that lists exactly the classes whose shards are complete.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np

from dira3d.utils.atomic import atomic_write, atomic_write_text
from dira3d.utils.files import FileContentError, read_json
from dira3d.utils.folder_lock import FolderLock

__all__ = [
    "out_folder_lock",
    "MANIFEST_NAME",
    "DATALIST_NAME",
    "EMBEDDINGS_NAME",
    "FORMAT",
    "write_json_atomic",
    "read_manifest",
    "save_embeddings",
    "new_manifest",
    "ShardWriter",
    "write_visual_word_datalist",
]

MANIFEST_NAME = "manifest.json"
DATALIST_NAME = "visual_words.json"
EMBEDDINGS_NAME = "embeddings.npy"
FORMAT = "dira3d-visual-words"
_VERSION = 1


def out_folder_lock(out_dir: str | os.PathLike) -> FolderLock:
    """The lock of a run's ``--out`` (one run per folder: two would plan the same classes and re-create, zeroed, each
    other's finished shards); ``dira3d visual-words`` probes it before torch loads, the run holds it."""
    return FolderLock(out_dir, what="--out folder", clash="a second run into it would re-create the shards it fills")


def write_json_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON so that ``path`` is always either the old or the new file."""
    return atomic_write_text(path, json.dumps(obj, indent=1))


def save_embeddings(embeddings: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a float32 embedding matrix atomically (``.npy``)."""
    array = np.ascontiguousarray(embeddings, dtype=np.float32)
    return atomic_write(path, lambda handle: np.save(handle, array))


def read_manifest(path: str | os.PathLike) -> dict:
    """Read a visual-word manifest (the file, or the output folder holding it).

    Raises:
        FileNotFoundError: no manifest there.
        ValueError: the file is not a dira3d visual-word manifest of a known version.
    """
    path = Path(path)
    path = path / MANIFEST_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"visual-word manifest {path} does not exist; run `dira3d visual-words` first")
    fix = f"move it away (or delete the folder {path.parent}) and rerun `dira3d visual-words`, or choose another --out"
    manifest = read_json(path, "visual-word manifest", fix)
    if manifest.get("format") != FORMAT or manifest.get("version") != _VERSION:
        raise ValueError(
            f"{path} is not a version-{_VERSION} dira3d visual-word manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    kinds = {"seed": int, "params": dict, "volumes": dict, "status": str, "classes": list}
    wrong = [k for k, kind in kinds.items() if not _is(manifest.get(k), kind)]
    wrong += [f"classes[{i}]" for i, c in enumerate(manifest.get("classes") if not wrong else [])
              if not (isinstance(c, dict) and _is(c.get("index"), int) and isinstance(c.get("shards", {}), dict))]
    if wrong:
        raise FileContentError(path, f"visual-word manifest {path} has a missing or malformed {wrong[0]}; {fix}")
    return manifest


def _is(value: object, kind: type) -> bool:
    """``isinstance``, except that JSON's ``true`` / ``false`` are not integers (a class index or a seed)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def new_manifest(seed: int, params: dict, datalist: str, volumes: dict, embedding: dict) -> dict:
    """An empty manifest (no classes yet)."""
    return {
        "format": FORMAT, "version": _VERSION, "seed": seed, "params": params, "datalist": datalist,
        "volumes": volumes, "embedding": embedding, "status": "planning", "classes": [],
    }  # fmt: skip


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of a new (sparse) shard now: a full disk is then an ``OSError`` naming the
    shard, not a ``SIGBUS`` that kills the process when :meth:`ShardWriter.write` touches a memory-mapped page
    no block can back."""
    if not hasattr(os, "posix_fallocate"):  # e.g. macOS: the shard stays sparse
        return
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot reserve: sparse as before
            raise


class ShardWriter:
    """Creates class shards and fills them row by row; records finished classes in the manifest.

    Args:
        out_dir: the output folder.
        patch_size: (x, y, z).
        resolutions: crops per instance (1, or 3 with multi-resolution).
        channels: image channels.
        dtype: storage dtype (float16 halves the disk and page-cache footprint of float32;
            intensities in [0, 1] keep ~3 significant digits).
    """

    def __init__(
        self, out_dir: str | os.PathLike, patch_size: tuple[int, int, int], resolutions: int = 1, channels: int = 1, dtype: str = "float16"
    ) -> None:
        self.out_dir = Path(out_dir)
        self.row_shape = (channels, *patch_size)
        self.resolutions = resolutions
        self.dtype = np.dtype(dtype)

    @staticmethod
    def shard_name(split: str, class_index: int) -> str:
        """Shard path relative to the output folder."""
        return f"shards/{split}/class_{class_index:04d}.npy"

    def create(self, split: str, class_index: int, instances: int) -> Path:
        """Create (or recreate) the shard of one class, ``instances * resolutions`` rows."""
        path = self.out_dir / self.shard_name(split, class_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (instances * self.resolutions, *self.row_shape)
        try:
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
            mm.flush()
            del mm
            _reserve(path)
        except OSError as err:  # a full disk: one message naming the shard, no half-made shard left
            path.unlink(missing_ok=True)
            size = int(np.prod(shape)) * self.dtype.itemsize
            raise OSError(err.errno, f"visual-word shard {path} needs {size / 2**20:.3g} MiB that its disk cannot "
                                     f"provide ({err.strerror}); free space in {self.out_dir} (or choose another --out) "
                                     "and rerun the same command: the finished classes are kept") from err
        return path

    def write(self, split: str, class_index: int, slot: int, patches: np.ndarray) -> None:
        """Write the ``resolutions`` crops of instance ``slot`` (shape ``(R, C, X, Y, Z)``)."""
        if tuple(patches.shape) != (self.resolutions, *self.row_shape):
            raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit shard rows {(self.resolutions, *self.row_shape)}")
        mm = np.load(self.out_dir / self.shard_name(split, class_index), mmap_mode="r+")
        r = self.resolutions
        mm[slot * r : (slot + 1) * r] = np.asarray(patches, dtype=self.dtype)
        mm.flush()
        del mm  # unmap now: the written pages leave this process's resident set

    def finish_class(self, manifest: dict, class_index: int) -> None:
        """Mark a class as done and replace the manifest atomically."""
        manifest["classes"][class_index]["status"] = "done"
        write_json_atomic(manifest, self.out_dir / MANIFEST_NAME)


def write_visual_word_datalist(manifest: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``visual_words.json``: per split, one entry per class with its shard.

    Entries: ``{"image": shard path (relative), "label": class index, "case_id": reference case,
    "num_instances": rows}``; plus ``"meta"`` (classes, patch size, resolutions, seed).
    """
    out_dir = Path(out_dir)
    params = manifest["params"]
    datalist: dict = {"meta": {
        "command": "dira3d visual-words", "classes": len(manifest["classes"]), "patch_size": params["patch_size"],
        "resolutions": params["resolutions"], "seed": manifest["seed"], "dtype": params["dtype"], "manifest": MANIFEST_NAME,
    }}  # fmt: skip
    for split in ("training", "validation"):
        rows = []
        for cls in manifest["classes"]:
            info = cls["neighbours"].get(split)
            if not info or not info["indices"]:
                continue
            rows.append({
                "image": cls["shards"][split], "label": cls["index"], "case_id": cls["reference"]["case_id"],
                "num_instances": len(info["indices"]) * params["resolutions"],
            })  # fmt: skip
        datalist[split] = rows
    return write_json_atomic(datalist, out_dir / DATALIST_NAME)
