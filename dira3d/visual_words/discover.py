"""TransVW self-discovery end to end: embed → plan classes → extract patches → shards.

1. **Embed** every training and validation volume with a feature extractor (a skip-free
   autoencoder trained here, a dira3d pretraining checkpoint, or a given module). The finished rows are kept in
   chunks (:mod:`~dira3d.visual_words.embedding_chunks`): an interrupted embedding continues after them.
2. **Plan** class by class: an unused, seeded-random training reference; its K nearest training
   and K_val nearest validation volumes; a patch centre in the reference under the sampling rules,
   such that the patch also lies inside every neighbour (all are cut at that voxel, and scans
   differ in size; after ``max_tries`` failed draws the reference is dropped for the next one). The plan is
   written to ``manifest.json`` before any patch is cut.
3. **Extract** in blocks of ``class_block`` classes, *volume by volume*: each volume needed by the
   block is loaded once and every crop the block wants from it is cut and written to its
   class shard. Loading class by class would read each volume once per class that lists it
   (C × (K + K_val) loads); a block reads each volume at most once, and memory stays one volume
   plus one crop whatever C and K are. After a block, its classes are marked done in the
   manifest, so a rerun skips them.

Every random draw is derived from ``seed`` and the class / instance index (never a global RNG),
so a resumed run gives the same bytes as an uninterrupted one, whatever the block size.

The ``--lung-filter`` / ``--body-filter`` resolution lives in :mod:`dira3d.visual_words.filter_settings` (its names
are importable from here), the handling of an earlier run in ``--out`` in :mod:`dira3d.visual_words.earlier_run`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dira3d.utils.atomic import remove_stale_temporaries_of, removed_if_failed_empty
from dira3d.utils.checkpoint import check_writable
from dira3d.utils.progress import ProgressLines
from dira3d.utils.seeding import derive_seed
from dira3d.visual_words.coordinates import (
    CoordinateRules, CoordinateSamplingError, VolumeTooSmallError, hu_to_unit, sample_coordinate,
)  # fmt: skip
from dira3d.visual_words.checks import check_counts, check_validation_sizes, check_volume_sizes, entry_name
from dira3d.visual_words.earlier_run import clear_outputs, earlier_manifest, settings_differ
from dira3d.visual_words.embedding_chunks import PARTIAL_NAME, clear_partial, embed_resumable, embedding_key, extractor_identity
from dira3d.visual_words.extractor import EXTRACTOR_NAME, extractor_from_checkpoint, train_extractor
from dira3d.visual_words.filter_settings import (LUNG_FILTER_CHOICES, datalist_modality, resolve_body_filter,
                                                  resolve_lung_filter)
from dira3d.visual_words.loading import SPLITS, case_ids, iterate_volumes, read_datalist, volume_shapes, volume_transform
from dira3d.visual_words.neighbours import ReferenceSampler, nearest_neighbours
from dira3d.visual_words.transforms import VisualWordCropd
from dira3d.visual_words.writer import (
    DATALIST_NAME, EMBEDDINGS_NAME, MANIFEST_NAME, ShardWriter, new_manifest, out_folder_lock, save_embeddings,
    write_json_atomic, write_visual_word_datalist,
)  # fmt: skip

__all__ = ["discover_visual_words", "LUNG_FILTER_CHOICES", "datalist_modality", "resolve_lung_filter", "resolve_body_filter"]

logger = logging.getLogger(__name__)
_SPLIT_ID = {"training": 0, "validation": 1}


EXTRACTOR_SETTINGS = ("extractor", "extractor_size", "extractor_epochs", "extractor_width", "orient", "raw_hu_window")


def _embed(data: dict, params: dict, extractor: str | nn.Module, seed: int, workers: int, device: str, out_dir: Path) -> torch.Tensor:
    kwargs = dict(size=params["extractor_size"], orient=params["orient"], raw_hu_window=params["raw_hu_window"], workers=workers, device=device)
    if isinstance(extractor, nn.Module):
        model = extractor
    elif extractor == "autoencoder":
        logger.info("training the skip-free extractor on %d volumes for %d epochs", len(data["training"]), params["extractor_epochs"])
        # only the settings that shape the extractor: a rerun that changes a planning rule after a failed plan
        # (--max-dense-fraction, --border, --classes, ...) reuses the trained extractor instead of refusing it
        settings = {k: params[k] for k in EXTRACTOR_SETTINGS}
        model = train_extractor(data["training"], epochs=params["extractor_epochs"], width=params["extractor_width"], seed=seed,
                                checkpoint_path=out_dir / EXTRACTOR_NAME, settings=settings, **kwargs)  # fmt: skip
    elif extractor == "checkpoint":
        if not params["checkpoint"]:
            raise ValueError("--extractor checkpoint needs --checkpoint PATH (a dira3d pretraining checkpoint)")
        model = extractor_from_checkpoint(params["checkpoint"])
    else:
        raise ValueError(f"extractor {extractor!r} is not 'autoencoder', 'checkpoint' or a torch module")
    entries = data["training"] + data["validation"]
    identity = extractor_identity(model, params["checkpoint"] if extractor == "checkpoint" else None)
    settings = {"extractor_size": params["extractor_size"], "orient": params["orient"], "raw_hu_window": params["raw_hu_window"],
                "batch_size": 2, "device": str(device)}  # fmt: skip
    return embed_resumable(model, entries, out_dir, embedding_key(identity, entries, settings), **kwargs)


def _rules(params: dict) -> CoordinateRules:
    lung_filter = params.get("lung_filter", "on") == "on"  # (runs before the setting existed always filtered)
    return CoordinateRules(
        patch_size=tuple(params["patch_size"]), border=tuple(params["border"]), min_distance=params["min_distance"],
        dense_threshold=params["dense_threshold"], max_dense_fraction=params["max_dense_fraction"] if lung_filter else 1.0,
        max_tries=params["max_tries"], max_outside_fraction=params.get("max_outside_fraction", 1.0),
        air_threshold=params.get("air_threshold", 0.25),
    )  # fmt: skip


def _plan(data: dict, embeddings: torch.Tensor, params: dict, seed: int,
          shapes: dict[str, list[tuple[int, int, int]]] | None = None) -> tuple[list[dict], int]:
    """Choose references, neighbours and centres for every class; returns (classes, channels).

    ``shapes``: every split's volume shapes (:func:`~dira3d.visual_words.loading.volume_shapes`), read if not given.
    """
    train, val = data["training"], data["validation"]
    emb_train, emb_val = embeddings[: len(train)], embeddings[len(train) :]
    rules = _rules(params)
    load = volume_transform(params["orient"], params["raw_hu_window"])
    # every neighbour is cut at the reference's centre (no registration): the patch must fit the
    # smallest of them, so the centre is drawn within their common extent (scans differ in size)
    if shapes is None:
        shapes = {split: volume_shapes(data[split], params["orient"]) for split in SPLITS}
    sampler = ReferenceSampler(len(train), seed)
    planned: list[dict] = []
    centres: list[tuple[int, int, int]] = []
    channels = 1
    for c in range(params["classes"]):
        rejected: list[dict] = []
        while True:
            try:
                ref = sampler.next()
            except ValueError as err:
                why = "; ".join(f"{r['case_id']}: {r['reason'].partition(': ')[2]}" for r in rejected[:3])
                raise CoordinateSamplingError(f"class {c}: {err}. Rejected: {why}" + ("; ..." if len(rejected) > 3 else "")) from None
            neighbours = _neighbours(ref, emb_train, emb_val, train, val, params)
            fit = np.min([shapes[split][i] for split, info in neighbours.items() for i in info["indices"]], axis=0)
            volume = load(dict(train[ref]))["image"]
            channels = int(volume.shape[0])
            rng = np.random.RandomState(derive_seed(seed, 1, c, len(rejected), bits=32))
            try:
                centre = sample_coordinate(volume.numpy(), rules, rng, centres, name=entry_name(train[ref]), fit=fit.tolist())
                break
            except VolumeTooSmallError:
                raise
            except CoordinateSamplingError as err:
                logger.info("class %d: reference %s rejected: %s", c, train[ref]["case_id"], err)
                rejected.append({"index": ref, "case_id": train[ref]["case_id"], "reason": str(err)})
        centres.append(centre)
        planned.append({
            "index": c, "status": "planned", "reference": {"index": ref, "case_id": train[ref]["case_id"]},
            "rejected_references": rejected, "centre": list(centre), "crop_seed": derive_seed(seed, 2, c, bits=32),
            "neighbours": neighbours, "shards": {s: ShardWriter.shard_name(s, c) for s in neighbours},
        })  # fmt: skip
        logger.info("class %d: reference %s, centre %s", c, train[ref]["case_id"], centre)
    return planned, channels


def _neighbours(ref: int, emb_train: torch.Tensor, emb_val: torch.Tensor, train: list[dict], val: list[dict],
                params: dict) -> dict[str, dict]:
    """The reference's nearest training volumes (itself first) and validation volumes."""
    idx, dist = nearest_neighbours(emb_train[ref], emb_train, params["neighbours"], params["metric"])
    idx, dist = idx[0].tolist(), dist[0].tolist()
    if idx[0] != ref:  # an exact duplicate with a lower index: keep the reference as neighbour 0
        pos = idx.index(ref) if ref in idx else len(idx) - 1
        idx[pos], dist[pos] = idx[0], dist[0]
        idx[0], dist[0] = ref, 0.0
    neighbours = {"training": {"indices": idx, "case_ids": [train[i]["case_id"] for i in idx], "distances": dist}}
    if params["val_neighbours"] > 0:
        vidx, vdist = nearest_neighbours(emb_train[ref], emb_val, params["val_neighbours"], params["metric"])
        neighbours["validation"] = {
            "indices": vidx[0].tolist(), "case_ids": [val[i]["case_id"] for i in vidx[0].tolist()], "distances": vdist[0].tolist(),
        }  # fmt: skip
    return neighbours


def _extract(data: dict, manifest: dict, out_dir: Path, class_block: int, workers: int) -> None:
    params = manifest["params"]
    writer = ShardWriter(out_dir, tuple(params["patch_size"]), params["resolutions"], manifest["channels"], params["dtype"])
    cropper = VisualWordCropd("image", "vw_centres", params["patch_size"], params["multi_resolution"], seeds_key="vw_seeds")
    load = volume_transform(params["orient"], params["raw_hu_window"])
    pending = [cls["index"] for cls in manifest["classes"] if cls["status"] != "done"]
    for start in range(0, len(pending), class_block):
        block = [manifest["classes"][c] for c in pending[start : start + class_block]]
        written: dict[int, int] = defaultdict(int)
        for split in SPLITS:
            tasks: dict[int, list[tuple[dict, int]]] = defaultdict(list)
            for cls in block:
                if split in cls["neighbours"]:
                    writer.create(split, cls["index"], len(cls["neighbours"][split]["indices"]))
                    for slot, index in enumerate(cls["neighbours"][split]["indices"]):
                        tasks[index].append((cls, slot))
            names = f"{block[0]['index']}-{block[-1]['index']}" if len(block) > 1 else str(block[0]["index"])
            lines = ProgressLines(f"classes {names}, {split} volumes", len(tasks), unit="volumes", emit=logger.info)
            for index, item in iterate_volumes(data[split], load, workers, order=sorted(tasks)):
                for cls, slot in tasks[index]:
                    seeds = [derive_seed(cls["crop_seed"], _SPLIT_ID[split], slot, bits=32)]
                    try:
                        patches = cropper({"image": item["image"], "vw_centres": [cls["centre"]], "vw_seeds": seeds})["image_patches"]
                    except ValueError as err:
                        raise ValueError(f"class {cls['index']}: cannot crop {entry_name(data[split][index])} at the centre "
                                         f"chosen in reference {cls['reference']['case_id']}: {err}") from err
                    writer.write(split, cls["index"], slot, patches[0].numpy())
                    written[cls["index"]] += 1
                lines.update()  # a line a minute: a block reads up to every volume (minutes for hundreds of CTs)
        for cls in block:
            expected = sum(len(info["indices"]) for info in cls["neighbours"].values())
            if written[cls["index"]] != expected:  # the reference code silently dropped rows; never mark those done
                raise RuntimeError(f"class {cls['index']}: wrote {written[cls['index']]} of {expected} instances")
            writer.finish_class(manifest, cls["index"])
        logger.info("finished classes %s", [cls["index"] for cls in block])


def _unwrap_data_errors(function):
    """Re-raise the file's own error (a :class:`~dira3d.data.errors.DataError`: a corrupt volume, raw HU)
    that MONAI's transforms wrap in ``RuntimeError("applying transform <...>")``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RuntimeError as err:
            from dira3d.engines.inputs import data_error_in

            cause = data_error_in(err)
            if cause is None:
                raise
            raise cause from err

    return wrapper


@_unwrap_data_errors
def discover_visual_words(
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    classes: int = 50,
    neighbours: int = 200,
    val_neighbours: int = 30,
    patch_size: Sequence[int] = (64, 64, 32),
    border: Sequence[int] = (100, 100, 30),
    min_distance: float = 5.0,
    hu_window: tuple[float, float] = (-1000.0, 1000.0),
    dense_hu: float = -150.0,
    max_dense_fraction: float = 0.15,
    max_tries: int = 200,
    metric: str = "l2",
    multi_resolution: bool = False,
    extractor: str | nn.Module = "autoencoder",
    checkpoint: str | None = None,
    extractor_size: Sequence[int] = (128, 128, 64),
    extractor_epochs: int = 10,
    extractor_width: float = 1.0,
    orient: bool = True,
    raw_hu: bool = False,
    class_block: int = 10,
    workers: int = 0,
    seed: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    lung_filter: str = "auto",
    body_filter: str = "auto",
    max_outside_fraction: float = 0.5,
) -> dict:
    """Discover visual words and write them as shards + manifest + datalist in ``out_dir``.

    Args:
        datalist: the pretraining datalist (``"training"``, optional ``"validation"``).
        out_dir: output folder (see :mod:`dira3d.visual_words.writer` for its layout).
        classes: number of visual words C (at least 2: the classification loss of one word is always 0).
        neighbours, val_neighbours: instances per class from training (includes the reference)
            and from validation volumes (0: no validation shards).
        patch_size, border, min_distance, max_dense_fraction, max_tries: sampling rules
            (:class:`~dira3d.visual_words.coordinates.CoordinateRules`).
        hu_window, dense_hu: the volumes' HU window and the lung-filter threshold in HU.
        lung_filter: ``"auto"`` (off for a datalist whose ``meta.modality`` is ``"mr"``, on otherwise),
            ``"on"`` or ``"off"`` (see :func:`resolve_lung_filter`).
        body_filter, max_outside_fraction: at most ``max_outside_fraction`` of a patch outside the body (air
            connected to its slice's edge, below −500 HU); ``"auto"`` (on for a ``meta.modality`` ``ct`` datalist
            with the lung filter on), ``"on"`` or ``"off"`` (see :func:`resolve_body_filter`).
        metric: ``"l2"`` or ``"cosine"`` neighbour distance.
        multi_resolution: add two rescaled crops per instance.
        extractor: ``"autoencoder"`` (train one), ``"checkpoint"`` (``checkpoint`` = dira3d
            pretraining checkpoint) or a torch module used as is.
        extractor_size, extractor_epochs, extractor_width: the autoencoder's input size and training.
        orient: reorient volumes to RAS on loading.
        raw_hu: volumes are raw HU: window them with ``hu_window`` on loading.
        class_block: classes extracted per pass over the volumes (resume granularity).
        workers: DataLoader workers prefetching volumes.
        seed: the one seed of the whole run.
        resume: continue an interrupted run found in ``out_dir`` (same settings required).
        overwrite: delete an earlier run's outputs in ``out_dir`` first.
        device: where the extractor runs.

    Returns:
        The final manifest.

    Raises:
        FileNotFoundError: datalist or images missing.
        DataError: a volume cannot be loaded or its intensities do not fit ``raw_hu`` (a ``ValueError``, naming the file).
        ValueError: bad settings (e.g. fewer than 2 classes, more neighbours than volumes), or ``out_dir`` holds a run
            with other settings (use ``overwrite``).
        FolderInUseError: another process writes into ``out_dir`` (it is locked while a run lasts).
        OSError: ``out_dir`` cannot be written, or its disk is full (names the file).
        CoordinateSamplingError: no reference satisfies the rules; a :class:`VolumeTooSmallError`
            when a training volume cannot hold patch + borders (checked before the extractor is trained).
    """
    with contextlib.ExitStack() as held:
        held.enter_context(removed_if_failed_empty(out_dir))  # a run refused at its start leaves no empty --out behind
        out_dir = check_writable(out_dir)
        # one run per --out: two would plan the same classes and re-create (zero) each other's finished shards
        held.enter_context(out_folder_lock(out_dir))
        for name in (EXTRACTOR_NAME, EMBEDDINGS_NAME, MANIFEST_NAME, DATALIST_NAME):  # a killed run's half-written files
            remove_stale_temporaries_of(out_dir / name, what="visual-word run")
        data = read_datalist(datalist)
        check_counts(datalist, len(data["training"]), len(data["validation"]), classes, neighbours, val_neighbours)
        lung_filter = resolve_lung_filter(lung_filter, datalist)
        body_on = resolve_body_filter(body_filter, lung_filter, datalist) == "on"
        if class_block < 1:
            raise ValueError(f"class_block must be >= 1, got {class_block}")
        params = {
            "classes": classes, "neighbours": neighbours, "val_neighbours": val_neighbours, "patch_size": [int(p) for p in patch_size],
            "border": [int(b) for b in border], "min_distance": float(min_distance), "hu_window": [float(h) for h in hu_window],
            "dense_hu": float(dense_hu), "dense_threshold": hu_to_unit(dense_hu, tuple(hu_window)),
            "max_dense_fraction": float(max_dense_fraction), "lung_filter": lung_filter, "max_tries": int(max_tries), "metric": metric,
            "max_outside_fraction": float(max_outside_fraction) if body_on else 1.0, "air_threshold": hu_to_unit(-500.0, tuple(hu_window)),
            "multi_resolution": bool(multi_resolution), "resolutions": 3 if multi_resolution else 1,
            "extractor": extractor if isinstance(extractor, str) else type(extractor).__name__,
            "checkpoint": str(checkpoint) if checkpoint else None, "extractor_size": [int(s) for s in extractor_size],
            "extractor_epochs": int(extractor_epochs), "extractor_width": float(extractor_width), "orient": bool(orient),
            "raw_hu_window": [float(h) for h in hu_window] if raw_hu else None, "dtype": "float16",
        }  # fmt: skip
        volumes = {split: case_ids(data[split]) for split in SPLITS}
        if any((out_dir / name).exists() for name in (MANIFEST_NAME, EXTRACTOR_NAME, PARTIAL_NAME)):  # a run, or one stopped before planning
            if overwrite:
                clear_outputs(out_dir)
            elif not resume:
                raise ValueError(f"{out_dir} already holds a visual-word run; pass --overwrite to replace it or choose another --out")
        if (out_dir / MANIFEST_NAME).exists():
            manifest = earlier_manifest(out_dir)
            differences = settings_differ(manifest, params, seed, volumes)
            if differences:
                raise ValueError(
                    f"{out_dir / MANIFEST_NAME} was made with other settings ({differences}); "
                    "rerun with the same settings to resume, or pass --overwrite to start again (or choose another --out)"
                )
            logger.info("resuming: %d of %d classes already done", sum(c["status"] == "done" for c in manifest["classes"]), classes)
        else:
            # shapes from the image headers (NIfTI) before any training: a volume too small for the
            # borders (48 CT slices, default z border 30) fails now, not after the extractor is trained
            shapes = {split: volume_shapes(data[split], params["orient"]) for split in SPLITS}
            check_volume_sizes(data["training"], shapes["training"], _rules(params))
            if val_neighbours > 0:
                check_validation_sizes(data["validation"], shapes["validation"], params["patch_size"])
            embeddings = _embed(data, params, extractor, seed, workers, device, out_dir)
            save_embeddings(embeddings.numpy(), out_dir / EMBEDDINGS_NAME)
            embedding_info = {"file": EMBEDDINGS_NAME, "dim": int(embeddings.shape[1]), "rows": "training then validation"}
            manifest = new_manifest(seed, params, str(Path(datalist).resolve()), volumes, embedding_info)
            manifest["classes"], manifest["channels"] = _plan(data, embeddings, params, seed, shapes)
            manifest["status"] = "planned"
            write_json_atomic(manifest, out_dir / MANIFEST_NAME)
        clear_partial(out_dir)  # the manifest holds the plan: no rerun embeds again
        _extract(data, manifest, out_dir, class_block, workers)
        manifest["status"] = "complete"
        write_json_atomic(manifest, out_dir / MANIFEST_NAME)
        write_visual_word_datalist(manifest, out_dir)
        return manifest
