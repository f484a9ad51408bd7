"""Weakly supervised localisation on the ChestX-ray14 boxes with Grad-CAM (docs/2d.md).

A fine-tuned image-level classifier (``bundles/chestxray14_cls``, ``models/model.pt``) is asked for the
Grad-CAM heatmap of each box's finding (:func:`dira3d.evaluation.gradcam.gradcam_maps`, target layer
configurable, default the last ResNet stage ``encoder.layer4``). The heatmap is min-max normalised,
binarised at ``threshold``, a box is drawn around every connected region, and the localisation is
correct at level δ when the best box reaches IoU ≥ δ with the ground truth (δ = 0.1 … 0.6).

Inputs: ``bbox_datalist.json`` as written by ``dira3d prepare chestxray14`` (entries ``image``,
``label`` (finding), ``label_index``, ``box`` = ``[x, y, w, h]`` in pixels of the prepared PNG). The
image is loaded like the bundle's inference loads it (a PNG, JPEG, TIFF, BMP or DICOM read as ``dira3d prepare``
reads it, so a 16-bit PNG is min-max scaled; ``(x, y)`` axes, resized to ``prepared_size`` as ``dira3d prepare``
stores it, [0, 1], resized to ``roi_size``) and the box is scaled by the same factors. Outputs in ``output_dir``: ``localisation.json`` (accuracy per δ, the
settings, the model localised (its file, backbone, in_channels, num_classes), the best IoU of every box, the boxes left out) and PNG overlays (heatmap, predicted boxes yellow, truth green).

Command line (``dira3d localise``)::

    dira3d localise --bbox-datalist prepared/bbox_datalist.json --model runs/ft/cxr14/models/model.pt \\
        --output-dir runs/localise --backbone resnet50 --target-layer encoder.layer4

``--backbone``, ``--roi-size`` and ``--num-classes`` default to what ``dira3d finetune`` recorded of the run in its
``metrics.json`` (beside ``models/``, :func:`trained_settings`): a model fine-tuned with ``--tiny`` (``tiny.json``:
ResNet-10, 64x64) or ``--set backbone=...`` is built as it was trained; a model without that record gets ResNet-50,
224x224, 14 classes, and when its weights do not fit, the error says which values do.

The box datalist and image loading live in :mod:`dira3d.evaluation.box_inputs`; the names of ``__all__`` are
importable from here. This module imports torch and MONAI only inside the functions that run the model, so the
command's refusals of a missing --model or --bbox-datalist, an earlier run's localisation.json (without --overwrite)
or a bad --threshold come at once (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from dira3d.data.errors import DataError
from dira3d.evaluation.box_inputs import (DEFAULT_SIZE, check_box_datalist, check_label_index, load_box_entries,
                                          load_cxr_image, prepared_size_of, scale_box, trained_settings)
from dira3d.evaluation.gradcam import (DELTAS, box_iou, box_on_image, boxes_from_heatmap, gradcam_maps,
                                      localisation_accuracy, save_overlay)
from dira3d.utils.atomic import FolderNotWritableError, atomic_write_text, check_writable, removed_if_failed_empty
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.interrupts import WrittenFiles, interrupt_exit_code, interrupted_word, sigterm_as_interrupt
from dira3d.utils.progress import show_progress
from dira3d.utils.warning_format import Dira3dWarning

if TYPE_CHECKING:
    import torch

__all__ = ["load_box_entries", "scale_box", "load_cxr_image", "localise", "run_localisation", "trained_settings", "main"]


def localise(
    model: torch.nn.Module,
    entries: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    target_layer: str = "encoder.layer4",
    roi_size: Sequence[int] = (224, 224),
    prepared_size: int | None = DEFAULT_SIZE,
    threshold: float = 0.5,
    deltas: Sequence[float] = DELTAS,
    max_overlays: int = 20,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = False,
    network: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the Grad-CAM protocol on box entries and write ``localisation.json`` (atomically) and overlays.

    Args:
        model: an image-level classifier returning ``(B, num_classes)`` logits.
        entries: box entries (absolute ``image``, ``box`` ``[x, y, w, h]``, ``label_index``, optional ``label``).
        output_dir: folder for ``localisation.json`` and ``overlays/*.png``.
        target_layer: name of the module whose activations Grad-CAM weighs.
        roi_size: the classifier's input size (x, y).
        prepared_size: the side the training PNGs were stored at (the bundle's ``prepared_size``); 0 or None: none.
        threshold: binarisation level of the min-max normalised heatmap.
        deltas: IoU levels at which accuracy is reported.
        max_overlays: how many overlays to write (the first entries).
        device: where the model runs.
        overwrite: replace the ``localisation.json`` of an earlier run in ``output_dir`` (refused otherwise).
        progress: a progress bar on stderr, one step per box (``dira3d localise``: a ResNet-50 Grad-CAM per box on a CPU
            made a silent run of minutes for ChestX-ray14's ~1,000 boxes; it asks :func:`dira3d.utils.show_progress`,
            so a log file or a pipe gets no bar).
        network: what ``model`` is, recorded in ``localisation.json``: ``model`` (its file) and ``backbone``
            (:func:`run_localisation` passes them); None records them as null.

    Returns:
        ``{"accuracy": {δ: share of all boxes}, "mean_accuracy_over_findings": {δ: mean over findings of
        their accuracy} (the paper's number), "accuracy_per_finding": {finding: {δ: share}}, "count",
        "threshold", "target_layer", "roi_size", "prepared_size", "model", "backbone", "in_channels" (the image
        channels it was given), "num_classes" (its outputs, counted by a forward pass), "flat_heatmaps" (boxes whose Grad-CAM map is zero
        everywhere: no predicted box, IoU 0; each box says ``flat_heatmap``), "boxes": [... each with
        ``predicted_boxes``, the Grad-CAM boxes as ``[x, y, w, h]`` in the image file's pixels, best IoU first],
        "skipped": [{image, label, reason}]}``: a box whose image cannot be used (not an image, a colour PNG, values
        outside 0..255) is left out with a warning naming it and listed under ``skipped``; ``count`` and the
        accuracies are of the other boxes.

    Raises:
        ValueError: unknown ``target_layer``, a ``label_index`` outside the model's outputs, or no entries;
            a :class:`DataError` (the first one) when no box's image can be used.
        FileExistsError: ``output_dir`` holds an earlier run's ``localisation.json`` (without ``overwrite``).
        FolderNotWritableError: ``output_dir`` cannot be created or written to.
    """
    if not entries:
        raise ValueError("no box entries to localise")
    out = Path(output_dir)
    check_earlier_results(out, overwrite)
    with removed_if_failed_empty(out):  # entries the model does not fit (refused before any overlay) leave no empty folder
        return _localise(model, entries, out, target_layer, roi_size, prepared_size, threshold, deltas, max_overlays,
                         device, progress, network or {})


def check_earlier_results(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an ``output_dir`` that holds an earlier run's ``localisation.json``, unless ``overwrite``.

    Raises:
        FileExistsError: it does (without ``overwrite``).
    """
    out = Path(output_dir)
    if (out / "localisation.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'localisation.json'} holds an earlier run's results, which this run would replace; "
                              "choose another --output-dir, or pass --overwrite to replace them")


def _localise(model: torch.nn.Module, entries: Sequence[Mapping[str, Any]], out: Path, target_layer: str,
              roi_size: Sequence[int], prepared_size: int | None, threshold: float, deltas: Sequence[float],
              max_overlays: int, device: str | torch.device, progress: bool = False,
              network: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`localise` once its inputs are checked and ``localisation.json`` may be written."""
    check_writable(out, what="output folder (--output-dir)")
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    heatmaps, truths, records, skipped, first_error = [], [], [], [], None
    built: dict[str, int] = {}  # the image channels and the outputs the model was run with
    for index, entry in enumerate(tqdm(entries, desc="localise", unit="box", disable=not progress, file=sys.stderr)):
        try:
            image, size = load_cxr_image(entry["image"], roi_size, prepared_size)
        except DataError as err:  # this box is left out, the others are scored (docs/2d.md)
            first_error = first_error or err
            skipped.append({"image": entry["image"], "label": entry.get("label"), "reason": str(err)})
            warnings.warn(f"box {index} left out: {err}", Dira3dWarning, stacklevel=2)
            continue
        if not records:  # before any overlay is written
            built = {"in_channels": int(image.shape[0]), "num_classes": _check_entries_fit(model, image, entries, device)}
        gt = scale_box(entry["box"], size, roi_size)
        heatmap = gradcam_maps(model, image[None].to(device), target_layer, class_idx=int(entry["label_index"]))[0]
        predicted = sorted(boxes_from_heatmap(heatmap, threshold), key=lambda box: -box_iou(box, gt))  # best first
        best = box_iou(predicted[0], gt) if predicted else 0.0
        heatmaps.append(heatmap)
        truths.append(gt)
        records.append({"image": entry["image"], "label": entry.get("label"), "label_index": int(entry["label_index"]),
                        "box": list(gt), "best_iou": best, "flat_heatmap": bool(heatmap.max() <= heatmap.min()),
                        "predicted_boxes": [box_on_image(box, roi_size, size) for box in predicted]})
        if index < max_overlays:
            name = f"{index:04d}_{Path(entry['image']).stem}_{entry.get('label', entry['label_index'])}.png"
            save_overlay(image[0].numpy(), heatmap, out / "overlays" / name, gt_box=gt, threshold=threshold)
    if not records:  # every image was bad: nothing to score
        raise first_error
    accuracy = localisation_accuracy(heatmaps, truths, threshold=threshold, deltas=deltas)
    # the paper's number: the accuracy of each finding, then their mean (ChestX-ray14's 8 boxed findings
    # have 79 to 180 boxes each, so the share of all boxes weighs the common findings more)
    findings: dict[str, list[float]] = {}
    for record in records:
        findings.setdefault(str(record["label"] if record["label"] is not None else record["label_index"]), []).append(record["best_iou"])
    per_finding = {name: {f"{delta:g}": sum(iou >= delta for iou in ious) / len(ious) for delta in deltas}
                   for name, ious in sorted(findings.items())}
    mean_over_findings = {f"{delta:g}": sum(acc[f"{delta:g}"] for acc in per_finding.values()) / len(per_finding)
                          for delta in deltas}
    result = {"accuracy": {f"{delta:g}": value for delta, value in accuracy.items()},
              "mean_accuracy_over_findings": mean_over_findings, "accuracy_per_finding": per_finding, "count": len(records),
              "threshold": threshold, "target_layer": target_layer, "roi_size": [int(s) for s in roi_size],
              "prepared_size": prepared_size or 0, "model": (network or {}).get("model"),
              "backbone": (network or {}).get("backbone"), **built,  # which model was localised
              "flat_heatmaps": sum(r["flat_heatmap"] for r in records),
              "boxes": records, "skipped": skipped}
    atomic_write_text(out / "localisation.json", json.dumps(result, indent=2))
    return result


def _check_entries_fit(model: torch.nn.Module, image: torch.Tensor, entries: Sequence[Mapping[str, Any]],
                       device: str | torch.device) -> int:
    """Refuse entries whose ``label_index`` is not one of ``model``'s outputs (one forward pass counts them); returns
    that count."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            classes = int(model(image[None].to(device)).shape[-1])
    finally:
        model.train(was_training)
    for index, entry in enumerate(entries):
        check_label_index(entry["label_index"], classes, f"box entry {index} (image {entry['image']})",
                           "fix the box datalist or use the classifier it was made for")
    return classes


def run_localisation(
    bbox_datalist: str | os.PathLike,
    model_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str | None = "test",
    num_classes: int = 14,
    backbone: str = "resnet50",
    in_channels: int = 1,
    **kwargs: Any,
) -> dict[str, Any]:
    """Load a fine-tuned ChestX-ray14 classifier (a plain ``state_dict``) and run :func:`localise`.

    The refusals that need no torch come first (:func:`check_localisation_inputs`).

    Raises:
        FileNotFoundError: the model file or the datalist is missing.
        FileExistsError: ``output_dir`` holds an earlier run's ``localisation.json`` (without ``overwrite=True``).
        FolderNotWritableError: ``output_dir`` cannot be created or written to.
        ValueError: the state dict does not fit ``ResNetClassifier(in_channels, num_classes, backbone)``
            (a short key summary and the ``--backbone`` / ``--num-classes`` / ``--roi-size`` that fit), or it is a
            classifier of another number of classes than the box datalist's findings (its ``meta.labels``), e.g. a
            chexpert_cls model on the ChestX-ray14 boxes (one line naming both).
    """
    check_localisation_inputs(bbox_datalist, model_path, output_dir, kwargs.get("overwrite", False))
    with removed_if_failed_empty(output_dir):  # a run refused at its start (weights that do not fit, a datalist
        # without boxes) or stopped by Ctrl-C before it wrote anything leaves no empty --output-dir behind
        return _run_localisation(bbox_datalist, model_path, output_dir, split, num_classes, backbone, in_channels, **kwargs)


def check_localisation_inputs(bbox_datalist: str | os.PathLike, model_path: str | os.PathLike,
                              output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """:func:`run_localisation`'s refusals before torch and MONAI are imported: a missing model file or box datalist
    (:func:`~dira3d.evaluation.box_inputs.check_box_datalist`), and an earlier run's results in ``output_dir``
    (:func:`check_earlier_results`).

    Raises:
        FileNotFoundError: the model file or the box datalist does not exist.
        FileExistsError: ``output_dir`` holds an earlier run's ``localisation.json`` (without ``overwrite``).
    """
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model {model_path} does not exist; fine-tune bundles/chestxray14_cls first (models/model.pt)")
    check_box_datalist(bbox_datalist)
    check_earlier_results(output_dir, overwrite)


def _run_localisation(bbox_datalist: str | os.PathLike, model_path: str | os.PathLike, output_dir: str | os.PathLike,
                      split: str | None, num_classes: int, backbone: str, in_channels: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_localisation` inside the guard that removes an output folder it created when it fails."""
    from dira3d.data.datalist import datalist_meta
    from dira3d.networks import ResNetClassifier
    from dira3d.networks.weights_fit import infer_network_settings, mismatch_summary, state_dict_mismatch
    from dira3d.utils.checkpoint import load_checkpoint

    check_writable(output_dir, what="output folder (--output-dir)")  # before the model is built
    model = ResNetClassifier(in_channels, num_classes, backbone=backbone)
    state = load_checkpoint(model_path, map_location="cpu")
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    labels = datalist_meta(bbox_datalist).get("labels")  # the findings each box's label_index counts
    labels = labels if isinstance(labels, list) and labels else None
    missing, unexpected, mismatched = state_dict_mismatch(state, model)
    if missing or unexpected or mismatched:
        out = infer_network_settings(state).get("out")
        if labels and isinstance(out, int) and out != len(labels) and _is_2d_classifier(state):
            raise ValueError(_other_findings(model_path, out, bbox_datalist, labels))
        raise ValueError(f"{model_path} does not fit ResNetClassifier(in_channels={in_channels}, num_classes={num_classes}, "
                         f"backbone={backbone!r}): {mismatch_summary(missing, unexpected, mismatched)}.\n"
                         + _fit_hint(state, backbone, num_classes, in_channels, kwargs.get("roi_size", (224, 224))))
    if labels and num_classes != len(labels):  # --num-classes 5 made a CheXpert classifier fit
        raise ValueError(_other_findings(model_path, num_classes, bbox_datalist, labels))
    model.load_state_dict(state)
    entries = load_box_entries(bbox_datalist, split, num_classes=num_classes)
    return localise(model, entries, output_dir, network={"model": str(Path(model_path).resolve()), "backbone": backbone},
                    **kwargs)


def _is_2d_classifier(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is the weights of a 2D classifier (not a pretraining checkpoint, a 3D or a segmentation network)."""
    from dira3d.networks.weights_fit import infer_network_settings

    return (not (isinstance(state.get("encoder"), Mapping) and isinstance(state.get("meta"), Mapping))
            and infer_network_settings(state).get("spatial_dims") in (None, 2)
            and not any(str(k).startswith("decoder.") for k in state))


def _other_findings(model_path: str | os.PathLike, classes: int, bbox_datalist: str | os.PathLike,
                    labels: Sequence[Any]) -> str:
    """A classifier of ``classes`` outputs given the boxes of a datalist of ``len(labels)`` findings: each box's
    ``label_index`` would pick another class's Grad-CAM (a chexpert_cls model, 5 classes, on the ChestX-ray14 boxes)."""
    return (f"{model_path} is a classifier of {classes} classes, but the boxes of {bbox_datalist} count {len(labels)} "
            f"findings (its meta.labels: {labels[0]} ... {labels[-1]}), so their label_index would pick another class's "
            "Grad-CAM (a model of another bundle? chexpert_cls has 5 classes); pass a model fine-tuned on that dataset "
            "(dira3d finetune --bundle chestxray14_cls: models/model.pt) with --num-classes "
            f"{len(labels)}")


def _fit_hint(state: Mapping[str, Any], backbone: str, num_classes: int, in_channels: int, roi_size: Sequence[int]) -> str:
    """Which ``dira3d localise`` options make ``state`` fit, read from its keys and shapes."""
    if isinstance(state.get("encoder"), Mapping) and isinstance(state.get("meta"), Mapping):
        return ("this is a dira3d pretraining checkpoint (encoder, decoder, heads), not a fine-tuned classifier; "
                "fine-tune it first (dira3d finetune --bundle chestxray14_cls --pretrained <it> --output-dir D) "
                "and pass D/models/model.pt")
    from dira3d.networks.weights_fit import infer_network_settings

    inferred = infer_network_settings(state)
    if inferred.get("spatial_dims") not in (None, 2):
        return f"the weights are of a {inferred['spatial_dims']}D network; localise needs a 2D classifier (bundles/chestxray14_cls)"
    if any(k.startswith("decoder.") for k in state):
        return "the weights are of a segmentation network; localise needs a classifier (bundles/chestxray14_cls models/model.pt)"
    options = []
    if "backbone" in inferred and inferred["backbone"] != backbone:
        options.append(f"--backbone {inferred['backbone']}")
    if "out" in inferred and inferred["out"] != num_classes:
        options.append(f"--num-classes {inferred['out']}")
    if "in_channels" in inferred and inferred["in_channels"] != in_channels:
        options.append(f"in_channels={inferred['in_channels']}")
    from dira3d.evaluation.finetune import tiny_settings

    tiny = tiny_settings("chestxray14_cls", ("backbone", "roi_size"))  # what --tiny trains with
    roi = ""
    if len(tiny) == 2 and inferred.get("backbone", tiny["backbone"]) == tiny["backbone"] and list(roi_size) != tiny["roi_size"]:
        roi = (f"; a model fine-tuned with --tiny ({tiny['backbone']}) also needs --roi-size "
               f"{' '.join(map(str, tiny['roi_size']))}, the size it was trained at")
    if not options:
        return ("pass the settings it was trained with: --backbone (e.g. --backbone resnet10 for a --tiny model), "
                f"--num-classes, --roi-size{roi}")
    return f"the weights fit other settings: pass {' '.join(options)}{roi}"


def interrupted_message(out: Path, written: Sequence[Path]) -> str:
    """What ``dira3d localise`` wrote before Ctrl-C (``written``: the files new or changed in ``out``): the results
    (``localisation.json``) are written last, whole, so an interrupted run has at most some overlays."""
    if out / "localisation.json" in written:
        return f"the results were written to {out / 'localisation.json'}"
    if not written:
        return f"nothing was written to {out}"
    return (f"no localisation.json was written; {len(written)} overlay(s) written to {out / 'overlays'} so far: rerun "
            "the same command for the results")


def main(argv: list[str] | None = None) -> int:
    """``dira3d localise``: Grad-CAM localisation accuracy per δ on the ChestX-ray14 boxes."""
    parser = argparse.ArgumentParser(prog="dira3d localise", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--bbox-datalist", required=True, help="bbox_datalist.json from `dira3d prepare chestxray14`")
    parser.add_argument("--model", required=True, help="fine-tuned classifier state_dict (bundles/chestxray14_cls models/model.pt)")
    parser.add_argument("--output-dir", required=True, help="folder for localisation.json and overlays/")
    parser.add_argument("--split", default="test", help="split of the box datalist ('all' for every split)")
    record = "default: what the fine-tuning run recorded (metrics.json beside the model's models/), else"
    parser.add_argument("--backbone", default=None, help=f"backbone the classifier was built with; {record} resnet50")
    parser.add_argument("--num-classes", type=int, default=None, help=f"the classifier's outputs; {record} 14")
    parser.add_argument("--roi-size", type=int, nargs=2, default=None, help=f"classifier input size (x y); {record} 224 224")
    parser.add_argument("--prepared-size", type=int, default=None,
                        help="side the training PNGs were stored at (`dira3d prepare chestxray14 --size`; the bundle's "
                             "prepared_size): each image is resized to it as preparation does before --roi-size; 0 = "
                             f"straight to --roi-size; default: the box datalist's meta.size, else {DEFAULT_SIZE}")
    parser.add_argument("--target-layer", default="encoder.layer4", help="module Grad-CAM weighs, e.g. encoder.layer3")
    parser.add_argument("--threshold", type=float, default=0.5, help="heatmap binarisation level")
    parser.add_argument("--max-overlays", type=int, default=20)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's localisation.json in --output-dir")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:  # the heatmap is min-max normalised: 0 or above 1 would box everything or nothing
        parser.error(f"--threshold {args.threshold:g} must be between 0 and 1 (the heatmap is scaled to [0, 1]), e.g. 0.5")
    try:  # a --tiny model (ResNet-10, 64x64) is built as it was trained: the printed `dira3d localise` fits it too
        recorded, record = trained_settings(args.model)
    except ValueError as err:
        parser.error(str(err))
    taken = {key: recorded[key] for key in recorded if getattr(args, key) is None}
    for key, default in (("backbone", "resnet50"), ("num_classes", 14), ("roi_size", [224, 224])):
        if getattr(args, key) is None:  # the command line first, then the record, then the bundle's defaults
            setattr(args, key, taken.get(key, default))
    if taken:
        print("dira3d localise: " + " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                             for k, v in taken.items()) + f", as {record} records the model's training",
              file=sys.stderr)
    if args.prepared_size is None:  # the size the box datalist's PNGs were prepared at (a 128 PNG went through 512)
        args.prepared_size = prepared_size_of(args.bbox_datalist)
    if args.prepared_size != 0 and args.prepared_size < 8:
        parser.error(f"--prepared-size {args.prepared_size} is not a storage size; give the --size the PNGs were prepared "
                     f"with (`dira3d prepare chestxray14 --size`, default {DEFAULT_SIZE}), or 0 to resize straight to --roi-size")
    written = WrittenFiles(args.output_dir)
    try:
        # SIGTERM as Ctrl-C: the same one line, exit 143; a left-out box: one line each after the numbers (below),
        # not a warning too
        with sigterm_as_interrupt(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"box \d+ left out: ")
            result = run_localisation(args.bbox_datalist, args.model, args.output_dir, None if args.split == "all" else args.split,
                                      num_classes=args.num_classes, backbone=args.backbone, target_layer=args.target_layer,
                                      roi_size=args.roi_size, prepared_size=args.prepared_size, threshold=args.threshold,
                                      max_overlays=args.max_overlays, overwrite=args.overwrite,
                                      progress=show_progress())  # a bar on a terminal only, never into a log
    except (FileNotFoundError, FileExistsError, ValueError, FolderNotWritableError) as err:
        parser.error(str(err))
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: what was written, in one line, not a traceback
        print(f"dira3d localise: {interrupted_word(err)}; {interrupted_message(Path(args.output_dir), written.since())}",
              file=sys.stderr)
        return interrupt_exit_code(err)
    print(json.dumps({key: result[key] for key in ("mean_accuracy_over_findings", "accuracy", "count")}, indent=2))
    print(f"results: {Path(args.output_dir) / 'localisation.json'} (mean_accuracy_over_findings: the paper's number, "
          "the mean of each finding's accuracy; accuracy: the share of all boxes with IoU >= delta)")
    for item in result["skipped"]:  # after the numbers, so that they are not missed
        print(f"dira3d localise: warning: left out (not in the accuracies): {item['reason']}", file=sys.stderr)
    if result["flat_heatmaps"]:
        print(f"dira3d localise: warning: {flat_message(result)}", file=sys.stderr)
    return 0


def flat_message(result: Mapping[str, Any]) -> str:
    """Why boxes scored IoU 0 without a predicted box: their Grad-CAM map was zero everywhere."""
    coarse = ("; a coarse layer gives them more often (encoder.layer4 is 7x7 at 224, 2x2 at 64): try --target-layer "
              "encoder.layer3" if result["target_layer"] == "encoder.layer4" else "")
    return (f"{result['flat_heatmaps']} of {result['count']} Grad-CAM heatmaps at {result['target_layer']} are zero "
            "everywhere (the class score's gradients weigh that layer's activations negatively or not at all), so those "
            "boxes have no predicted box and score IoU 0 ('flat_heatmap' in localisation.json); an untrained or barely "
            f"trained classifier gives them{coarse}")

