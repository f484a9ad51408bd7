"""What ``dira3d finetune`` checks in its output folder and settings before a run, with neither torch nor MONAI
imported (a rerun into a folder that holds a run, a typo'd path, are refused at once): :func:`refuse_earlier_run`
(an earlier run, finished or not, kept unless ``--overwrite``), :func:`check_input_paths` (a missing datalist,
checkpoint or dataset folder), :func:`earlier_outputs` (the files of an earlier run that ``--overwrite`` replaces) and
:func:`remove_killed_writes` (the half-written temporary files a killed run left beside the files a run writes).
Used by :func:`dira3d.evaluation.finetune.run_finetune`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dira3d.evaluation.split_ids import SPLITS_FILE

__all__ = ["refuse_earlier_run", "check_input_paths", "earlier_outputs", "remove_killed_writes"]


def check_input_paths(overrides: dict[str, Any]) -> None:
    """Refuse a ``datalist`` or ``pretrained`` file, or (with no ``datalist``) a ``dataset_dir`` folder, that the
    settings name and that is not there: with the messages of the run's own checks
    (:func:`dira3d.data.datalist.check_datalist_file`, :func:`dira3d.utils.checkpoint.check_pretrained_file`), before
    torch and MONAI are imported. A MONAI expression or reference (``$...``, ``@...``) is left to the bundle."""
    from dira3d.data.datalist import check_datalist_file
    from dira3d.utils.checkpoint import check_pretrained_file

    given = {key: value for key, value in overrides.items() if key in ("datalist", "pretrained", "dataset_dir")
             and isinstance(value, (str, os.PathLike)) and not str(value).startswith(("$", "@", "%"))}
    if given.get("datalist"):
        check_datalist_file(given["datalist"])
    elif given.get("dataset_dir") and not Path(given["dataset_dir"]).is_dir():  # where the bundle's datalist is looked for
        raise FileNotFoundError(f"dataset_dir {given['dataset_dir']} (the folder of the prepared datalist, --dataset-dir) "
                                "does not exist; fix the path, or pass the datalist file itself (--datalist)")
    check_pretrained_file(given.get("pretrained"))


def refuse_earlier_run(out: Path, overwrite: bool) -> None:
    """Refuse (without ``overwrite``) an output folder that holds an earlier run: its ``models/model.pt`` or
    ``metrics.json`` (the first epoch would replace the model, and metrics.json after it), or its TensorBoard files."""
    earlier = [p for p in (out / "models" / "model.pt", out / "metrics.json") if p.exists()]
    events = sorted(out.glob("events.out.tfevents.*"))
    if overwrite or not (earlier or events):
        return
    if not (out / "metrics.json").exists():  # killed or failed before its test metrics
        found = "models/model.pt" if earlier else f"the TensorBoard files {events[0].name}{' ...' if len(events) > 1 else ''}"
        raise FileExistsError(
            f"{out} holds an unfinished fine-tuning run ({found} but no metrics.json: it was interrupted "
            "or failed); pass --overwrite to start it again, or choose another output folder (--output-dir)"
        )
    raise FileExistsError(
        f"{out} already holds a fine-tuning run ({', '.join(str(p.relative_to(out)) for p in earlier)}), which "
        "this run would replace; choose another output folder (--output-dir), or pass --overwrite to replace it"
    )


def earlier_outputs(out: Path) -> list[Path]:
    """The files an earlier run (finished or not) left in ``out`` that ``--overwrite`` replaces:
    ``metrics.json`` first, then the model, ``preprocessing.json``, the evaluation's ``metrics.csv`` and
    per-case CSVs (those of the metrics ``metrics.csv`` and ``metrics.json`` name) and the TensorBoard
    event files (:func:`dira3d.evaluation.run_folders.earlier_run_files`)."""
    from dira3d.evaluation.run_folders import earlier_run_files

    try:
        recorded = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("metrics") or {}
    except (OSError, ValueError, AttributeError):  # absent or damaged: metrics.csv still names them
        recorded = {}
    names = list(recorded) if isinstance(recorded, dict) else []
    return [p for p in (out / "metrics.json", out / SPLITS_FILE) if p.is_file()] + earlier_run_files(out / "models", out, names)


def remove_killed_writes(out: Path) -> list[Path]:
    """Remove the hidden temporary files (``.test_cases.csv.<8 characters>.tmp``, ``.model.pt.*.tmp``, ...) that a run
    killed outright (SIGKILL, the OOM killer) in the middle of an atomic write left beside the files a fine-tuning run
    writes atomically in ``out``: ``metrics.json``, ``splits.json``, each split's per-case CSV, ``models/model.pt`` and
    ``models/preprocessing.json`` (:func:`dira3d.utils.atomic.remove_stale_temporaries_of`: a file a live writer holds is
    kept, and no other file is touched). Call it with ``out`` locked, once the run goes ahead; returns what it removed."""
    from dira3d.evaluation.case_metrics import cases_file
    from dira3d.evaluation.datalists import SPLITS
    from dira3d.evaluation.preprocessing import PREPROCESSING_FILE
    from dira3d.evaluation.run_folders import MODEL_FILE
    from dira3d.utils.atomic import remove_stale_temporaries_of

    targets = [out / "metrics.json", out / SPLITS_FILE, *(out / cases_file(split) for split in SPLITS),
               out / "models" / MODEL_FILE, out / "models" / PREPROCESSING_FILE]
    return [p for target in targets for p in remove_stale_temporaries_of(target, what="fine-tuning run")]
