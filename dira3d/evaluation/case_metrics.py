"""Per-case test metrics of a segmentation evaluation: ``test_cases.csv`` beside ``metrics.json``.

``evaluate.json`` of the segmentation bundles lists :class:`CaseMetricsWriter`, which writes one row per scored
case: its id as ``splits.json`` names it (:func:`dira3d.evaluation.split_ids.case_id`: the image path relative to the
datalist's folder), each metric of that case (the per-case values MONAI's metric handlers keep in
``engine.state.metric_details``: ``dice``, ``iou``) and ``empty_reference`` (1 when the case's reference mask has no
foreground voxel, as :class:`~dira3d.evaluation.ForegroundDice` tells it). A case with an empty reference scores 1
when the prediction is empty too, else 0 (``ignore_empty=False``), and counts in the mean: the mean of a column over
every row (a NaN value, an empty cell, left out, as MONAI's mean leaves it out) is the figure of ``metrics.json``.

In a distributed evaluation (``DistributedSampler`` with ``even_divisible=False``, as ``multi_gpu_train.json`` sets
the validation) every rank scores its own cases; the ids are gathered as MONAI's ``MetricsSaver`` gathers its file
names and the values as the metrics gather theirs (both in rank order), and rank 0 writes the file: every case once.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dira3d.evaluation.split_ids import case_id
from dira3d.utils.atomic import atomic_write_text

__all__ = ["CASES_FILE", "CaseMetricsWriter", "case_rows", "write_case_rows"]

CASES_FILE = "test_cases.csv"  # in the evaluation's output_dir (dira3d finetune: beside metrics.json)
EMPTY_COLUMN = "empty_reference"


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
    """Ignite handler: write the evaluation's per-case metrics to ``<save_dir>/test_cases.csv`` when it completes.

    Listed in ``validate#handlers`` of ``evaluate.json`` after the metrics (MONAI attaches the metrics first, so their
    per-case values are there at ``EPOCH_COMPLETED``); keeps the written path in ``engine.state.case_metrics_file``.

    Args:
        save_dir: the folder of the file (``@output_dir``).
        datalist: the datalist file, whose folder the case ids are relative to (``@datalist``); None: absolute paths.
        entries: the entries the evaluator scores (``@validate#datalist``), for the ids of entries of several images.
        filename: the file's name in ``save_dir``.
        batch_transform: the meta data of each item of a (decollated) batch, whose ``filename_or_obj`` names its image.
    """

    def __init__(self, save_dir: str | os.PathLike, datalist: str | os.PathLike | None = None,
                 entries: Sequence[Mapping] = (), filename: str = CASES_FILE,
                 batch_transform: Callable[[Any], list] = _image_meta) -> None:
        self.path = Path(save_dir) / filename
        self.root = Path(datalist).resolve().parent if datalist else None
        self.ids: dict[str, str] = {}  # first image of an entry -> its id
        for entry in entries or ():
            image = entry.get("image")
            first = image[0] if isinstance(image, (list, tuple)) and image else image
            if first is not None:
                self.ids[os.path.normpath(str(first))] = case_id(entry, self.root)
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

    def __call__(self, engine: Any) -> None:
        import ignite.distributed as idist
        from monai.utils import string_list_all_gather

        names = string_list_all_gather(self._names) if idist.get_world_size() > 1 else list(self._names)
        details = dict(getattr(engine.state, "metric_details", None) or {})
        flags = getattr(engine.state, "foreground_flags", None) or {}
        positive = next((flags[name] for name in details if name in flags), None)
        empty = None if positive is None else [not p for p in positive]
        rows = case_rows([self.case_id(n) for n in names], details, empty)
        if idist.get_rank() == 0:
            engine.state.case_metrics_file = str(write_case_rows(self.path, rows))
