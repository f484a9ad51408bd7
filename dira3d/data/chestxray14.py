"""NIH ChestX-ray14 → resized 8-bit PNGs + a 14-label multi-label datalist (+ the boxed findings).

Input (``--src``, any folder depth): the PNGs (``images/00000001_000.png``, also split over
``images_001/images`` …), ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``),
``train_val_list.txt``, ``test_list.txt`` and, optionally, ``BBox_List_2017.csv``.

Output (``--dst``): ``images/<Image Index>.png`` (see :mod:`dira3d.data.cxr` for size and format),
``chestxray14_datalist.json`` whose entries are ``{"image", "case_id": patient id, "label":
[14 floats in LABELS order], "view": "PA"|"AP"}``; ``test`` is the official test list, and
``training`` / ``validation`` are a seeded patient-level split of the official train_val list
(default 10 % of its patients for validation), recorded in ``split.json``. With the box file,
``bbox_datalist.json`` lists ``{"image", "case_id", "label": finding, "label_index", "box": [x, y,
w, h]}`` with the box rescaled to the prepared image's pixels, under the split of its image.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

from PIL import Image

from dira3d.data.cxr import convert_image, add_size_argument, check_size, read_csv_rows, scale_box
from dira3d.data.cxr_splits import (asked_no_validation, earlier_patient_split, patient_split, val_fraction_split_advice,
                                    warn_one_validation_image, write_patient_split)
from dira3d.data.errors import OR_KEEP_GOING, join_errors, record_or_raise
from dira3d.data.guards import is_earlier_output
from dira3d.data.io import DataError
from dira3d.data.runner import (
    Case,
    CaseResult,
    add_common_arguments,
    batch_stopped,
    case_outputs,
    run_cases,
    run_prepare,
    update_report,
    write_datalist,
)
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.files import read_text

__all__ = ["LABELS", "parse_findings", "read_data_entry", "read_boxes", "read_image_list", "prepare", "main"]

# The standard order of the 14 labels (Wang et al. 2017 and every later paper).
LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
# BBox_List_2017.csv spells one finding differently from Data_Entry_2017.csv
_BOX_ALIASES = {"Infiltrate": "Infiltration"}
_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
_BOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")


def parse_findings(text: str, where: str = "") -> list[float]:
    """Turn a ``Finding Labels`` cell (``"Cardiomegaly|Effusion"``, ``"No Finding"``) into 14 floats.

    Raises:
        DataError: an unknown finding (``where`` names the file and row).
    """
    vector = [0.0] * len(LABELS)
    for name in (part.strip() for part in text.split("|")):
        if name in ("", NO_FINDING):
            continue
        if name not in LABELS:
            raise DataError(where or None, f"unknown finding {name!r}; expected {NO_FINDING!r} or one of {list(LABELS)}")
        vector[LABELS.index(name)] = 1.0
    return vector


def _find_one(src: Path, patterns: tuple[str, ...], what: str, required: bool = True) -> Path | None:
    for pattern in patterns:  # earlier patterns win (the v2020 data entry over the 2017 one)
        found = sorted(src.rglob(pattern))
        if found:
            return found[0]
    if required:
        raise DataError(src, f"holds no {' or '.join(patterns)}; {what}")
    return None


def read_data_entry(path: str | Path, problems: dict[str, str] | None = None) -> dict[str, dict]:
    """``{image name: {"patient", "label", "view", "row"}}`` from ``Data_Entry_2017*.csv``.

    Args:
        problems: when given, a row with an unknown finding or no Patient ID, and an image listed
            twice, are not raised: they are recorded here as ``{image name: message}`` naming the
            file, row and problem (:func:`~dira3d.data.errors.record_or_raise`), and the image keeps
            its entry (with a bad row's label all zeros), so that it becomes a failed case of its own.

    Raises:
        DataError: missing columns; without ``problems``, also unknown findings, an empty Patient
            ID or an image listed twice.
    """
    entries: dict[str, dict] = {}
    for number, row in enumerate(read_csv_rows(path, _ENTRY_COLUMNS), start=2):
        name = row["Image Index"]
        if name in entries:
            record_or_raise(problems, name, DataError(path, f"rows {entries[name]['row']} and {number} both "
                                                            f"describe image {name}; keep one of them (use the file "
                                                            "as downloaded)"))
            continue
        try:
            if not row["Patient ID"]:
                raise DataError(path, f"row {number}: image {name} has no Patient ID")
            label = parse_findings(row["Finding Labels"], f"{path} row {number}, column 'Finding Labels'")
        except DataError as err:
            record_or_raise(problems, name, err, "; fix or remove the row")
            label = [0.0] * len(LABELS)
        entries[name] = {"patient": row["Patient ID"], "label": label, "view": row.get("View Position", ""),
                         "row": number}
    return entries


def read_image_list(path: str | Path) -> list[str]:
    """Image names of ``train_val_list.txt`` / ``test_list.txt`` (one per line, blanks ignored)."""
    text = read_text(path, "image list", "re-download it", encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_boxes(path: str | Path) -> list[dict]:
    """Rows of ``BBox_List_2017.csv`` as ``{"image", "label", "label_index", "box": [x, y, w, h]}``.

    ``Infiltrate`` (the box file's spelling) is mapped to ``Infiltration``.

    Raises:
        DataError: missing columns, non-numeric or non-positive box sizes, unknown findings.
    """
    boxes = []
    for number, row in enumerate(read_csv_rows(path, _BOX_COLUMNS), start=2):
        label = _BOX_ALIASES.get(row["Finding Label"], row["Finding Label"])
        if label not in LABELS:
            raise DataError(path, f"row {number}: unknown finding {row['Finding Label']!r}; expected one of {list(LABELS)}")
        try:
            box = [float(row[c]) for c in ("Bbox [x", "y", "w", "h]")]
        except ValueError as err:
            raise DataError(path, f"row {number}: box values must be numbers ({err})") from err
        if box[2] <= 0 or box[3] <= 0:
            raise DataError(path, f"row {number}: box {box} has a non-positive width or height")
        boxes.append({"image": row["Image Index"], "label": label, "label_index": LABELS.index(label), "box": box})
    return boxes


def _index_images(src: Path, dst: Path, wanted: set[str], problems: dict[str, str]) -> dict[str, Path]:
    """The wanted PNGs under ``src`` (ignoring ``dst/images``, where the prepared ones go): ``{name: path}``.

    A name found in two places keeps its first path and gets a problem naming both files in
    ``problems`` (the image becomes a failed case; which copy is right cannot be told).

    Raises:
        DataError: the wanted PNGs lie only in ``dst/images`` (``--dst`` is ``--src`` of an archive that
            extracts to ``images/``): the prepared images would be written over them.
    """
    outputs = str((dst / "images").resolve()) + "/"
    files: dict[str, Path] = {}
    in_outputs = 0
    earlier: dict[Path, bool] = {}  # folder holding an images/ folder -> whether it is an earlier run's --dst
    in_earlier: list[Path] = []
    for path in sorted(src.rglob("*.png")):
        if path.name not in wanted:
            continue
        if str(path.resolve()).startswith(outputs):  # an earlier run's output, or a download in --dst/images
            in_outputs += 1
            continue
        folder = path.parent.parent
        if path.parent.name == "images" and folder not in earlier:
            earlier[folder] = is_earlier_output(folder, "chestxray14", "chestxray14_datalist.json")
        if path.parent.name == "images" and earlier[folder]:
            in_earlier.append(path)  # the PNGs an earlier run prepared into a --dst inside --src: not a second copy
            continue
        if path.name in files:
            record_or_raise(problems, path.name, DataError(path, f"duplicate of {files[path.name]}; keep one copy "
                                                                 "of each image"))
            continue
        files[path.name] = path
    if not files and in_outputs:
        raise DataError(dst, f"holds the downloaded images in {dst / 'images'}, where the prepared ones would be written "
                             "over them (--dst is --src?); choose an output folder of its own with --dst")
    if not files and in_earlier:
        raise DataError(src, "holds the PNGs named in the data entry CSV only in the output of an earlier "
                             f"`dira3d prepare chestxray14` ({in_earlier[0].parent}), not as downloaded; extract the "
                             "images_*.tar.gz archives under --src")
    return files


def _process(case: Case, size: int) -> dict:
    return convert_image(case.params["path"], case.outputs[0], size)


def _png_shape(path: Path) -> tuple[int, int]:
    # header only: the box scale needs the source size, not pixels; Pillow reads every PNG's header
    # (SimpleITK's fails on a grey + alpha PNG, which read_grey prepares)
    with Image.open(path) as image:
        cols, rows = image.size
    return rows, cols


def prepare(src: str | Path, dst: str | Path, *, size: int = 512, val_fraction: float = 0.1, seed: int = 0,
            workers: int = 1, overwrite: bool = False, dry_run: bool = False, keep_going: bool = False,
            report_path: str | Path | None = None, progress: bool = True) -> list[CaseResult]:
    """Prepare ChestX-ray14 under ``dst`` (see the module docstring for the outputs).

    Args:
        size: output side in pixels (0 keeps 1024²).
        val_fraction: fraction of the train_val patients held out for validation.
        seed: seed of the patient-level split.

    Returns:
        One result per image of the data entry file; one with a bad row, a duplicate file or no
        file on disk is failed (named in the report) without stopping the others under ``keep_going``.

    Raises:
        DataError: a missing or malformed CSV / list, or no image found. ValueError: bad settings.
    """
    src, dst = Path(src), Path(dst)
    size = check_size(size)
    if not src.is_dir():
        raise DataError(src, "is not a folder; --src must hold the ChestX-ray14 images and CSV files")
    entry_csv = _find_one(src, ("Data_Entry_2017_v2020.csv", "Data_Entry_2017*.csv"), "download the label CSV")
    problems: dict[str, str] = {}  # image name → why its case fails
    entries = read_data_entry(entry_csv, problems)  # a bad row fails the case of its image
    train_val = read_image_list(_find_one(src, ("train_val_list.txt",), "download the official split lists"))
    test = read_image_list(_find_one(src, ("test_list.txt",), "download the official split lists"))
    box_csv = _find_one(src, ("BBox_List_2017.csv",), "", required=False)
    files = _index_images(src, dst, set(entries), problems)
    if not files:
        raise DataError(src, f"holds none of the {len(entries)} PNG images named in {entry_csv.name}; "
                             "extract the images_*.tar.gz archives under --src")
    unknown = [n for n in train_val + test if n not in entries]
    if unknown:
        raise DataError(entry_csv, f"does not describe {len(unknown)} image(s) of the split lists, e.g. {unknown[:3]}; "
                                   "use matching versions of the lists and the CSV")
    overlap = set(train_val) & set(test)
    if overlap:
        raise DataError(src / "test_list.txt", f"shares {len(overlap)} image(s) with train_val_list.txt, e.g. "
                                               f"{sorted(overlap)[:3]}")

    # read the box file now: a malformed row must stop the run before the images, not after them
    boxes = read_boxes(box_csv) if box_csv is not None else None

    # every image of the data entry file is a case; a bad row, a duplicate file or an image missing
    # on disk (a partial download) is a failed case of that image, so --keep-going prepares the rest
    names = sorted(entries)
    absent = {n for n in names if n not in files}
    cases = []
    for name in names:
        if name in absent:
            record_or_raise(problems, name, DataError(entry_csv, f"row {entries[name]['row']}: image {name} is not "
                                                                 f"under {src} (partial download?); extract every "
                                                                 "images_*.tar.gz archive under --src"
                                                                 + OR_KEEP_GOING * (not keep_going)))
        outputs, bad_id = case_outputs(Path(name).stem, [(dst / "images", ".png")], f"{entry_csv} Image Index")
        cases.append(Case(Path(name).stem, outputs, {"path": files.get(name), "name": name},
                          error=join_errors(bad_id, problems.get(name, ""))))
    results = run_cases(cases, partial(_process, size=size), out_dir=dst, workers=workers, overwrite=overwrite,
                        dry_run=dry_run, keep_going=keep_going, report_path=report_path, desc="chestxray14",
                        progress=progress, source=src,
                        datalists=[dst / "chestxray14_datalist.json", dst / "bbox_datalist.json"],
                        settings={"size": size})
    if dry_run or batch_stopped(results, keep_going):
        return results

    done = {case.params["name"]: case for case, result in zip(cases, results) if result.ok}
    patients = sorted({entries[n]["patient"] for n in train_val if n in done})
    split = patient_split(patients, val_fraction, seed=seed,  # a rerun keeps its patients' parts
                          earlier=earlier_patient_split(dst, seed, val_fraction=val_fraction, of="train_val_list.txt patients"))
    split_of_patient = {p: name for name, ids in split.items() for p in ids}
    split_of_image = {n: split_of_patient[entries[n]["patient"]] for n in train_val if n in done}
    split_of_image.update({n: "test" for n in test if n in done})
    lists: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for name in names:
        if name in split_of_image:
            entry = entries[name]
            lists[split_of_image[name]].append({"image": done[name].outputs[0], "case_id": entry["patient"],
                                                "label": entry["label"], "view": entry["view"]})
    missing = len(absent)
    meta = {"dataset": "chestxray14", "labels": list(LABELS), "size": size, "image_format": "png uint8 grey",
            "split": {"test": "official test_list.txt", "training/validation": "patient-level split of train_val_list.txt",
                      "val_fraction": val_fraction, "seed": seed},
            "images_missing_on_disk": missing, "source": str(src.resolve())}
    write_datalist(dst / "chestxray14_datalist.json", lists, meta,
                   split_advice=val_fraction_split_advice(split, of="train_val_list.txt patients",
                                                      test_from="test_list.txt"),
                   asked_empty=asked_no_validation(val_fraction))
    warn_one_validation_image(dst / "chestxray14_datalist.json", lists)
    write_patient_split(dst, split, seed, val_fraction=val_fraction, of="train_val_list.txt patients")
    if boxes is not None:
        boxed: dict[str, list[dict]] = defaultdict(list)
        dropped: Counter[str] = Counter()  # image name -> its boxes left out (the image failed or is not in the CSV)
        for box in boxes:
            name = box["image"]
            if name not in done:
                dropped[name] += 1
                continue
            shape = _png_shape(files[name])
            boxed[split_of_image.get(name, "unlisted")].append(
                {"image": done[name].outputs[0], "case_id": entries[name]["patient"], "label": box["label"],
                 "label_index": box["label_index"], "box": scale_box(box["box"], shape, size)})
        write_datalist(dst / "bbox_datalist.json", dict(boxed),
                       {**meta, "box_format": "[x, y, w, h] in prepared-image pixels (x = column)",
                        "boxes_dropped": sum(dropped.values()), "boxes_dropped_images": sorted(dropped)})
        if dropped:
            _report_dropped_boxes(dropped, box_csv, cases, results, report_path or dst / "report.json")
    return results


def _report_dropped_boxes(dropped: Counter, box_csv: Path, cases: list[Case], results: list[CaseResult],
                          report_path: str | Path) -> None:
    """Name the boxes left out of ``bbox_datalist.json``: a warning on the failed case of each image (in the
    report and the end message) and one line counting them all (also those of images absent from the CSV)."""
    for case, result in zip(cases, results):
        if case.params["name"] in dropped:
            result.warnings.append(f"its {dropped[case.params['name']]} box(es) of {box_csv.name} are left out of "
                                   "bbox_datalist.json, as the image was not prepared")
    update_report(Path(report_path), results)
    names = sorted(dropped)
    print(f"WARNING bbox_datalist.json: {sum(dropped.values())} box(es) of {box_csv} left out, on {len(names)} "
          f"image(s) not prepared ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); they are counted in "
          "its meta.boxes_dropped", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dira3d prepare chestxray14", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_common_arguments(parser)
    add_size_argument(parser)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the train_val patients held out for validation (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_prepare("dira3d prepare chestxray14", prepare, args, size=args.size, val_fraction=args.val_fraction,
                       seed=args.seed)
