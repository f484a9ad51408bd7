"""Per-case test results: ``test_cases.csv`` beside ``metrics.json`` (``<split>_cases.csv`` for another ``eval_split``).

Segmentation: ``evaluate.json`` lists :class:`CaseMetricsWriter`, which writes one row per scored
case: its id as ``splits.json`` names it (:func:`dira3d.evaluation.split_ids.case_id`: the image path relative to the
datalist's folder), each metric of that case (the per-case values MONAI's metric handlers keep in
``engine.state.metric_details``: ``dice``, ``iou``) and ``empty_reference`` (1 when the case's reference mask has no
foreground voxel, as :class:`~dira3d.evaluation.ForegroundDice` tells it). A case with an empty reference scores 1
when the prediction is empty too, else 0 (``ignore_empty=False``), and counts in the mean: the mean of a column over
every row (a NaN value, an empty cell, left out, as MONAI's mean leaves it out) is the figure of ``metrics.json``.

Classification: the AUC is not a per-case metric; :class:`CasePredictionsWriter` writes what it is computed from,
one row per case: its id, the reference label(s) and the predicted probability(ies) as the AUC metric sees them
(:func:`prediction_rows`), and for the candidates of LUNA16 / PE-CAD their scan and world position, so that the AUC
can be bootstrapped, two models compared case by case, or the LUNA16 challenge's FROC evaluation run on it.

The file is named after the split the evaluation scores (:func:`cases_file`: ``evaluate.json`` passes its
``eval_split``): ``test_cases.csv`` for the test split, ``holdout_cases.csv`` when the holdout is scored.

In a distributed evaluation (``DistributedSampler`` with ``even_divisible=False``, as ``multi_gpu_train.json`` sets
the validation) every rank scores its own cases; the ids, and a classification's values, are gathered as each rank's
list (``ignite.distributed.all_gather`` of the list), the segmentation metrics' values as the metrics gather them (all in
rank order), and rank 0 writes the file: every case once. A rank without a case adds no id (MONAI's
``string_list_all_gather``, used before, gave it one empty id) and no row of another width (:func:`merge_rank_values`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.evaluation.split_ids import case_id
from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["CASES_FILE", "CaseMetricsWriter", "CasePredictionsWriter", "case_rows", "cases_file", "merge_rank_values",
           "prediction_columns", "prediction_rows", "write_case_rows"]

CASES_FILE = "test_cases.csv"  # the test split's, in the evaluation's output_dir (dira3d finetune: beside metrics.json)


def cases_file(split: str = "test") -> str:
    """The name of the per-case file of an evaluation of ``split`` (a bundle's ``eval_split``): ``<split>_cases.csv``,
    :data:`CASES_FILE` for ``"test"``.

    Raises:
        ValueError: ``split`` is not a plain name (letters, digits, ``_``, ``-``), naming the setting.
    """
    split = str(split)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", split):
        raise ValueError(f"eval_split={split!r} cannot name the per-case results file (<split>_cases.csv); use one of "
                         "the datalist's splits: test (the default) or holdout")
    return f"{split}_cases.csv"
EMPTY_COLUMN = "empty_reference"
LABEL, PROBABILITY = "label", "probability"  # a classifier's columns (with the class name for several classes)
COORDINATES = ("coordX", "coordY", "coordZ")  # a candidate's world position (mm), as the LUNA16 challenge names it


def _image_meta(batch: Any) -> list:
    return [item["image"].meta for item in batch]


def case_rows(ids: Sequence[str], details: Mapping[str, Any], empty: Sequence[bool] | None = None) -> list[dict]:
    """One row per case: ``case``, each metric of ``details`` (``{name: values}``, one value per case, as
    ``engine.state.metric_details`` holds them: ``(N, 1)`` tensors), and :data:`EMPTY_COLUMN` (0 / 1) when
    ``empty`` is given.

    Raises:
        ValueError: a metric or ``empty`` holds another number of values than there are ids.
    """
    columns = {}
    for name, values in details.items():
        flat = [float(v) for v in _flat(values)]
        if len(flat) != len(ids):
            raise ValueError(f"the per-case values of metric {name!r} are {len(flat)} for {len(ids)} scored cases; "
                             "every case must be scored once (a distributed evaluation needs even_divisible=False)")
        columns[name] = flat
    if empty is not None and len(empty) != len(ids):
        raise ValueError(f"{len(empty)} empty-reference flags for {len(ids)} scored cases")
    rows = []
    for i, case in enumerate(ids):
        row: dict[str, Any] = {"case": case, **{name: values[i] for name, values in columns.items()}}
        if empty is not None:
            row[EMPTY_COLUMN] = int(bool(empty[i]))
        rows.append(row)
    return rows


def _flat(values: Any) -> list:
    if hasattr(values, "detach"):
        return values.detach().cpu().reshape(-1).tolist()
    return [v for item in values for v in (_flat(item) if isinstance(item, (list, tuple)) or hasattr(item, "detach")
                                           else [item])]


def write_case_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as CSV (a header, then one line per row; NaN as an empty cell), atomically."""
    fields = list(rows[0]) if rows else ["case"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return atomic_write_text(path, text.getvalue())


class CaseMetricsWriter:
    """Ignite handler: write the evaluation's per-case metrics to ``<save_dir>/<split>_cases.csv`` when it completes.

    Listed in ``validate#handlers`` of ``evaluate.json`` after the metrics (MONAI attaches the metrics first, so their
    per-case values are there at ``EPOCH_COMPLETED``); keeps the written path in ``engine.state.case_metrics_file``.

    Args:
        save_dir: the folder of the file (``@output_dir``).
        datalist: the datalist file, whose folder the case ids are relative to (``@datalist``); None: absolute paths.
        entries: the entries the evaluator scores (``@validate#datalist``), for the ids of entries of several images.
        filename: the file's name in ``save_dir``; None: named after ``split`` (:func:`cases_file`).
        batch_transform: the meta data of each item of a (decollated) batch, whose ``filename_or_obj`` names its image.
        split: the split the evaluation scores (``@eval_split``): ``test`` writes ``test_cases.csv``, ``holdout``
            ``holdout_cases.csv``.
    """

    def __init__(self, save_dir: str | os.PathLike, datalist: str | os.PathLike | None = None,
                 entries: Sequence[Mapping] = (), filename: str | None = None,
                 batch_transform: Callable[[Any], list] = _image_meta, split: str = "test") -> None:
        self.path = Path(save_dir) / (filename or cases_file(split))
        self.root = Path(datalist).resolve().parent if datalist else None
        self.entries: dict[str, Mapping] = {}  # first image of an entry -> the entry
        for entry in entries or ():
            image = entry.get("image")
            first = image[0] if isinstance(image, (list, tuple)) and image else image
            if first is not None:
                self.entries[os.path.normpath(str(first))] = entry
        self.ids = {image: case_id(entry, self.root) for image, entry in self.entries.items()}
        self.batch_transform = batch_transform
        self._names: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, engine: Any = None) -> None:
        self._names = []

    def _collect(self, engine: Any) -> None:
        from monai.utils import ImageMetaKey

        for meta in self.batch_transform(engine.state.batch):
            self._names.append(str(meta.get(ImageMetaKey.FILENAME_OR_OBJ)))

    def case_id(self, filename: str) -> str:
        """The id (as ``splits.json`` lists it) of the case whose image is ``filename``."""
        return self.ids.get(os.path.normpath(filename)) or case_id({"image": filename}, self.root)

    def _gathered_names(self) -> list[str]:
        # every rank's list as it is (MONAI's string_list_all_gather joins them into one text: a rank without a case
        # added one name "")
        return [name for names in _gathered_per_rank(list(self._names)) for name in names]

    def rows(self, engine: Any, names: list[str]) -> list[dict]:
        """The rows of the cases whose images are ``names`` (gathered over the ranks, in the order of their values)."""
        details = dict(getattr(engine.state, "metric_details", None) or {})
        flags = getattr(engine.state, "foreground_flags", None) or {}
        positive = next((flags[name] for name in details if name in flags), None)
        empty = None if positive is None else [not p for p in positive]
        return case_rows([self.case_id(n) for n in names], details, empty)

    def __call__(self, engine: Any) -> None:
        import ignite.distributed as idist

        rows = self.rows(engine, self._gathered_names())
        if idist.get_rank() == 0:
            engine.state.case_metrics_file = str(write_case_rows(self.path, rows))


def prediction_columns(class_names: Sequence[str], count: int) -> tuple[list[str], list[str]]:
    """The label and probability columns of a classifier of ``count`` outputs: ``label`` and ``probability`` for one;
    ``label_<class>`` and ``probability_<class>`` for each class of several, named by ``class_names`` (numbered,
    ``class<k>``, where it names fewer; a warning names the setting when it names another number)."""
    if count == 1:
        return [LABEL], [PROBABILITY]
    names = [str(n) for n in class_names][:count]
    if class_names and len(class_names) != count:
        import warnings

        warnings.warn(f"class_names names {len(class_names)} classes for the {count} outputs of the network; "
                      "the per-case file numbers the columns of the classes it does not name (class<k>); set class_names to "
                      "one name per output (out_channels)", Dira3dWarning, stacklevel=2)
    names += [f"class{k}" for k in range(len(names), count)]
    return [f"{LABEL}_{n}" for n in names], [f"{PROBABILITY}_{n}" for n in names]


def prediction_rows(ids: Sequence[str], labels: Any, probabilities: Any, class_names: Sequence[str] = (),
                    candidates: Sequence[Mapping[str, Any]] | None = None) -> list[dict]:
    """One row per case of a classification: ``case``, the columns of its ``candidates`` mapping (e.g. the candidate's
    scan and world position), the reference label of each class, binarised at 0.5 as the AUC binarises it (0 / 1),
    and the predicted probability of each class, as the AUC scores it (:func:`prediction_columns`).

    Args:
        labels, probabilities: ``(N, C)`` (or ``(N,)``) values, one row per id.

    Raises:
        ValueError: ``labels``, ``probabilities`` or ``candidates`` hold another number of rows than there are ids,
            or the labels another number of classes than the probabilities.
    """
    import numpy as np

    truth = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1) if len(labels) else np.zeros((0, 1))
    scores = np.asarray(probabilities, dtype=np.float64).reshape(len(probabilities), -1) if len(probabilities) else truth
    if len(truth) != len(ids) or len(scores) != len(ids) or (candidates is not None and len(candidates) != len(ids)):
        raise ValueError(f"{len(scores)} predictions and {len(truth)} labels for {len(ids)} scored cases; every case must "
                         "be scored once (a distributed evaluation needs even_divisible=False)")
    if truth.shape != scores.shape:
        raise ValueError(f"labels of {truth.shape[1]} classes for probabilities of {scores.shape[1]}")
    label_columns, probability_columns = prediction_columns(class_names, scores.shape[1])
    rows = []
    for i, case in enumerate(ids):
        row: dict[str, Any] = {"case": case, **(candidates[i] if candidates is not None else {})}
        row.update(zip(label_columns, (int(v >= 0.5) for v in truth[i])))
        row.update(zip(probability_columns, (float(v) for v in scores[i])))
        rows.append(row)
    return rows


def merge_rank_values(per_rank: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """The rows of every rank (one list per rank, in rank order, as the ids are gathered) as one list. A rank without a
    case adds none: the width of the rows is the other ranks' (a rank that scored nothing cannot know the number of
    outputs of the network; it padded its empty rows to ``class_names``' width before, which does not match a network of
    several outputs without ``class_names``).

    Raises:
        ValueError: the rows are not all of one width (labels and probabilities of another number of classes).
    """
    rows = [[float(v) for v in row] for values in per_rank for row in values]
    widths = sorted({len(row) for row in rows})
    if len(widths) > 1:
        raise ValueError(f"the per-case rows gathered from the ranks hold {' or '.join(map(str, widths))} values; every "
                         "rank must score the same network (labels and probabilities of the same classes)")
    return rows


def _gathered_per_rank(items: list) -> list[list]:
    """``items`` of every rank, one list per rank in rank order (``[items]`` when not distributed)."""
    import ignite.distributed as idist

    return list(idist.all_gather(items)) if idist.get_world_size() > 1 else [items]


def _pred_and_label(output: Any) -> tuple:
    from monai.handlers import from_engine

    return from_engine(["pred", "label"])(output)


class CasePredictionsWriter(CaseMetricsWriter):
    """Ignite handler: write a classification's per-case predictions to ``<save_dir>/<split>_cases.csv``.

    The AUC of the classification bundles is not a per-case metric; this file holds what it is computed from, one
    row per test case (:func:`prediction_rows`): its id (as ``splits.json``), the reference label(s) and the
    probability(ies), taken from the evaluator's output as its AUC metric takes them (``output_transform``: after the
    evaluator's postprocessing, the sigmoid). ``sklearn.metrics.roc_auc_score`` over a class's two columns is that
    class's AUC (the mean over the classes of both values: ``metrics.json``'s mean AUC). Distributed: as
    :class:`CaseMetricsWriter`, every case once.

    Args:
        save_dir, datalist, entries, filename, batch_transform, split: as :class:`CaseMetricsWriter`.
        class_names: the names of the network's outputs (``@class_names``), for the columns of several classes.
        id_column: where the entries carry the candidate's world position (``world_mm``, as ``dira3d prepare luna16`` /
            ``pecad`` write it), add its scan (the entry's ``case_id``) as this column and the position (mm) as
            ``coordX``, ``coordY``, ``coordZ`` (the LUNA16 challenge's ``seriesuid,coordX,coordY,coordZ,probability``);
            empty cells for an entry without it (or with :func:`~dira3d.evaluation.load_split`'s placeholder, three
            NaN, where other entries of the split have one); None, or no scored entry with it: no such columns.
        output_transform: maps ``engine.state.output`` to ``(probabilities, labels)``, as the AUC metric's.
    """

    def __init__(self, save_dir: str | os.PathLike, datalist: str | os.PathLike | None = None,
                 entries: Sequence[Mapping] = (), class_names: Sequence[str] = (), id_column: str | None = None,
                 output_transform: Callable[[Any], tuple] = _pred_and_label, filename: str | None = None,
                 batch_transform: Callable[[Any], list] = _image_meta, split: str = "test") -> None:
        super().__init__(save_dir, datalist, entries, filename, batch_transform, split)
        self.class_names = [str(n) for n in class_names or ()]
        self.id_column = id_column
        self.output_transform = output_transform
        self._values: list[list[float]] = []  # per case: its labels, then its probabilities

    def _started(self, engine: Any = None) -> None:
        super()._started(engine)
        self._values = []

    def _collect(self, engine: Any) -> None:
        super()._collect(engine)
        probabilities, labels = self.output_transform(engine.state.output)
        for p, y in zip(probabilities, labels):
            p, y = _flat(p), _flat(y)
            if len(p) != len(y):
                raise ValueError(f"labels of {len(y)} classes for probabilities of {len(p)}")
            self._values.append([float(v) for v in [*y, *p]])

    def _gathered_values(self) -> list[list[float]]:
        return merge_rank_values(_gathered_per_rank(self._values))

    def _candidate(self, filename: str) -> dict:
        entry = self.entries.get(os.path.normpath(filename)) or {}
        where = entry.get("world_mm")
        where = [float(v) for v in where] if isinstance(where, (list, tuple)) and len(where) == 3 else ["", "", ""]
        if not all(isinstance(v, str) or math.isfinite(v) for v in where):  # load_split's placeholder: no position
            where = ["", "", ""]
        return {str(self.id_column): entry.get("case_id", ""), **dict(zip(COORDINATES, where))}

    def rows(self, engine: Any, names: list[str]) -> list[dict]:
        values = self._gathered_values()
        half = len(values[0]) // 2 if values else 0
        candidates = [self._candidate(n) for n in names] if self.id_column else None
        if candidates is not None and all(c[COORDINATES[0]] == "" for c in candidates):
            candidates = None  # entries without positions (not prepared by dira3d prepare): no such columns
        return prediction_rows([self.case_id(n) for n in names], [v[:half] for v in values], [v[half:] for v in values],
                               self.class_names, candidates)
