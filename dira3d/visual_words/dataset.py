"""Pairs of instances of one visual word, read lazily from memory-mapped shards.

This is the discriminative input of the 3D pretraining engine in ``visual_words`` mode. Each item
is the engine's batch contract::

    {"image": x1 (C, X, Y, Z) float32, "image2": x2 (another instance of the same class),
     "label": class index (int64 scalar tensor)}
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from dira3d.utils.files import FileContentError, json_type, read_json
from dira3d.utils.overrides import format_overrides, override_text, shell_word
from dira3d.utils.seeding import check_whole_numbers
from dira3d.visual_words.writer import DATALIST_NAME, MANIFEST_NAME, read_manifest

__all__ = ["VisualWordPairDataset", "load_visual_word_classes", "has_validation_words"]


NO_VALIDATION_FIX = ("the pretraining bundle validates on them with validation true: rerun `dira3d visual-words` with "
                     "--val-neighbours 2 or more (and 2 or more 'validation' volumes in its datalist) for a validation "
                     "set, or pretrain without one: validation=false (`dira3d pretrain --override validation=false`, "
                     "`--validation false` for monai.bundle run; the default of configs/visual_words.json for such an "
                     "output)")


def has_validation_words(path: str | os.PathLike) -> bool:
    """Whether the output of `dira3d visual-words` at ``path`` has validation words: the default of the pretraining
    bundle's ``validation`` setting in ``configs/visual_words.json``. Without them (``--val-neighbours 0``) a warning
    says that the run pretrains without validation (no ``best.pt``: ``last.pt`` is the result; no early stopping).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_visual_word_classes` (no output there, an incomplete run).
    """
    if load_visual_word_classes(path, "validation", required=False):
        return True
    logging.getLogger(__name__).warning(
        f"{path} lists no 'validation' visual words: pretraining without validation (no val_* losses and no best.pt: "
        "fine-tune from last.pt, the last epoch; early_stop_patience is refused). For a validation set, rerun "
        "`dira3d visual-words` with --val-neighbours 2 or more (docs/visual_words.md)")
    return False


def load_visual_word_classes(path: str | os.PathLike, split: str = "training", required: bool = True) -> list[tuple[Path, int]]:
    """``(shard path, label)`` of every class of a split.

    Args:
        path: ``visual_words.json``, ``manifest.json`` or the output folder holding them.
        split: ``"training"`` or ``"validation"``.
        required: refuse an empty split (False: return ``[]``).

    Raises:
        FileNotFoundError: no datalist/manifest, or a listed shard is missing.
        ValueError: the manifest is not complete, or the split is empty (with ``required``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / DATALIST_NAME if (path / DATALIST_NAME).is_file() else path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; point to the output of `dira3d visual-words`")
    base = path.parent
    fix = ("rerun the same `dira3d visual-words` command: a finished run writes it again from manifest.json (or pass "
           "--overwrite to redo the run)")
    content = read_manifest(path) if path.name == MANIFEST_NAME else read_json(path, "visual-word datalist", fix)
    if "format" in content:  # a manifest (checked by read_manifest; read once: thousands of classes)
        manifest = content if path.name == MANIFEST_NAME else read_manifest(path)
        if manifest["status"] != "complete":
            raise ValueError(f"visual-word run {path} is {manifest['status']!r}, not complete; rerun `dira3d visual-words` to finish it")
        classes = [(base / c["shards"][split], int(c["index"])) for c in manifest["classes"] if split in c["shards"]]
    else:
        entries = content.get(split) or []
        bad = [i for i, e in enumerate(entries) if not (isinstance(e, dict) and isinstance(e.get("image"), str)
                                                          and isinstance(e.get("label"), int) and not isinstance(e.get("label"), bool))] \
            if isinstance(entries, list) else [None]
        if bad:
            where = f"'{split}' is a JSON {json_type(entries)}, not a list" if bad[0] is None else \
                f"entry {bad[0]} of '{split}' is not {{\"image\": <shard path>, \"label\": <whole number>}}"
            raise FileContentError(path, f"visual-word datalist {path}: {where}; {fix}")
        classes = [(base / e["image"], int(e["label"])) for e in entries]
    if not classes and required:
        fix = NO_VALIDATION_FIX if split == "validation" else "rerun `dira3d visual-words`"
        raise ValueError(f"{path} lists no '{split}' visual words; {fix}")
    for shard, _ in classes:
        if not shard.is_file():
            raise FileNotFoundError(f"visual-word shard {shard} listed in {path} is missing; rerun `dira3d visual-words`")
    return classes


def _open_shard(shard: Path) -> np.ndarray:
    """A class shard, memory-mapped; a damaged one (cut short, not a ``.npy``) is a ``ValueError`` naming it."""
    try:
        return np.load(shard, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise FileContentError(shard, f"visual-word shard {shard} cannot be read as a .npy array ({err}); it is damaged "
                                      "(e.g. cut short or copied incompletely): rerun `dira3d visual-words` with "
                                      "--overwrite into its output folder to write it again") from None


class VisualWordPairDataset(Dataset):
    """Yields two different instances of one visual word and the word's index.

    Shards are opened with ``mmap_mode="r"`` on first use in each process, so only the rows read
    are paged in. With ``pairs_per_epoch=None`` every instance is ``image`` once per epoch and its
    partner is drawn from the same class; otherwise each item draws a class, then two instances.
    Draws depend only on ``(seed, epoch, index)``: reproducible with any number of workers.

    Args:
        datalist_or_manifest: ``visual_words.json``, ``manifest.json`` or their folder.
        split: ``"training"`` or ``"validation"``.
        pairs_per_epoch: length of an epoch of random pairs (``None``: one per instance).
        transform: optional callable applied to each item dict (e.g. MONAI dictionary transforms).
        seed: base seed of the pair draws; call :meth:`set_epoch` to vary them per epoch.
        patch_size: the patch size the caller trains with (x, y, z); checked against the shards
            (``None``: not checked).

    Raises:
        ValueError: a class has fewer than two instances (no pair can be formed), or its patches
            are not of ``patch_size``.
    """

    def __init__(
        self,
        datalist_or_manifest: str | os.PathLike,
        split: str = "training",
        pairs_per_epoch: int | None = None,
        transform: Callable[[dict], dict] | None = None,
        seed: int = 0,
        patch_size: Sequence[int] | None = None,
    ) -> None:
        self.classes = load_visual_word_classes(datalist_or_manifest, split)
        self.counts = []
        for shard, label in self.classes:
            shape = tuple(int(n) for n in _open_shard(shard).shape)
            if patch_size is not None and shape[2:] != tuple(int(p) for p in patch_size):
                sizes = [int(n) for n in shape[2:]]
                raise ValueError(
                    f"visual word {label} ({shard}) has patches of {list(shape[2:])}, but this run's patch_size is "
                    f"{[int(p) for p in patch_size]}; set patch_size to {list(shape[2:])} (`--patch_size {shell_word(override_text(sizes))}` "
                    f"for monai.bundle run, `{format_overrides({'patch_size': sizes})}` for dira3d pretrain), or rerun `dira3d visual-words` with --patch-size {' '.join(str(int(p)) for p in patch_size)}")
            rows = shape[0]
            if rows < 2:
                option = "--val-neighbours" if split == "validation" else "--neighbours"
                raise ValueError(f"visual word {label} ({shard}) has {rows} instance(s); pairs need >= 2 (rerun `dira3d visual-words` with {option} >= 2)")
            self.counts.append(rows)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        if pairs_per_epoch is not None:  # null: every instance once per epoch
            pairs_per_epoch = check_whole_numbers(1, pairs_per_epoch=pairs_per_epoch)["pairs_per_epoch"]
        self.pairs_per_epoch, self.transform, self.seed, self.epoch = pairs_per_epoch, transform, seed, 0
        self._shards: dict[int, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        """Number of visual words (labels are 0 … num_classes − 1 in a complete run)."""
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Draw different partners in each epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.pairs_per_epoch if self.pairs_per_epoch is not None else self.offsets[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = {}  # workers reopen the memory maps instead of pickling their contents
        return state

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = _open_shard(self.classes[k][0])
        return self._shards[k]

    def _row(self, k: int, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self._shard(k)[i], dtype=np.float32))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.pairs_per_epoch is None:
            k = int(np.searchsorted(self.offsets, index, side="right") - 1)
            a = index - int(self.offsets[k])
        else:
            k = int(rng.integers(self.num_classes))
            a = int(rng.integers(self.counts[k]))
        b = int(rng.integers(self.counts[k] - 1))
        b += b >= a  # uniform over the other instances
        item = {"image": self._row(k, a), "image2": self._row(k, b), "label": torch.tensor(self.classes[k][1], dtype=torch.int64)}
        return self.transform(item) if self.transform is not None else item
