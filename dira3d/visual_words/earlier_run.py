"""An earlier ``dira3d visual-words`` run in ``--out``: its manifest (:func:`earlier_manifest`, refusing a
``manifest.json`` of something else), what differs from this run's settings (:func:`settings_differ`, for a resume)
and the removal of its own files for ``--overwrite`` (:func:`clear_outputs`).
"""

from __future__ import annotations

from pathlib import Path

from dira3d.utils.files import FileContentError
from dira3d.visual_words.embedding_chunks import clear_partial
from dira3d.visual_words.extractor import EXTRACTOR_NAME, extractor_progress
from dira3d.visual_words.loading import SPLITS
from dira3d.visual_words.writer import DATALIST_NAME, EMBEDDINGS_NAME, MANIFEST_NAME, read_manifest

__all__ = ["earlier_manifest", "settings_differ", "clear_outputs"]


def earlier_manifest(out_dir: Path) -> dict:
    """The manifest of the earlier run in ``out_dir``; a ``manifest.json`` of something else is refused."""
    try:
        return read_manifest(out_dir)
    except FileContentError:  # garbled (e.g. cut short): its message names the file and what to do already
        raise
    except ValueError as err:
        raise ValueError(f"{err}: --out {out_dir} holds files that are not a `dira3d visual-words` run, which "
                         "--overwrite would delete; choose another --out") from None


def clear_outputs(out_dir: Path) -> None:
    """Delete an earlier run's own files (``--overwrite``): its manifest, datalist, embeddings (and their chunks),
    extractor checkpoint and class shards; anything else in ``out_dir`` (or in ``shards/``) is left alone."""
    if (out_dir / MANIFEST_NAME).exists():
        earlier_manifest(out_dir)
    if (out_dir / EXTRACTOR_NAME).exists() and extractor_progress(out_dir / EXTRACTOR_NAME) is None:
        raise ValueError(f"{out_dir / EXTRACTOR_NAME} is not a `dira3d visual-words` extractor checkpoint, which --overwrite "
                         "would delete; move it away or choose another --out")
    for name in (MANIFEST_NAME, DATALIST_NAME, EMBEDDINGS_NAME, EXTRACTOR_NAME):
        (out_dir / name).unlink(missing_ok=True)
    clear_partial(out_dir)
    for split in SPLITS:
        for shard in (out_dir / "shards" / split).glob("class_*.npy"):
            shard.unlink()
    for folder in [out_dir / "shards" / split for split in SPLITS] + [out_dir / "shards"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def settings_differ(manifest: dict, params: dict, seed: int, volumes: dict) -> str:
    """What differs between the run in a manifest and this one, as ``name: before → now``; '' when nothing."""
    # a run from before the lung_filter setting filtered; one from before the body filter had none
    before = {"lung_filter": "on", "max_outside_fraction": 1.0, "air_threshold": 0.25, **manifest["params"]}
    differences = [f"{k}: {before.get(k)!r} → {params[k]!r}" for k in params if before.get(k) != params[k]]
    if manifest["seed"] != seed:
        differences.append(f"seed: {manifest['seed']!r} → {seed!r}")
    if manifest["volumes"] != volumes:
        differences.append("the datalist's volumes")
    return "; ".join(differences)
