"""What ``dira3d finetune`` prints when a run has finished: which split its metrics were scored on (:func:`scored_line`),
where its outputs are, the inference command and, for ``chestxray14_cls``, the ``dira3d localise`` command
(:func:`localise_line`); and, before it, the caches' lines (:func:`show_cache_lines`), without
MONAI's warning about the ``logging_file=False`` it asks for (:func:`without_logging_file_warning`).

The command is built from the bundle's ``inference.json`` (with ``tiny.json`` for a ``--tiny`` run) and the
run's own settings that ``inference.json`` defines (e.g. ``width``), so that the network is built as it was
trained; each word is quoted for a shell only where it needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dira3d.utils.log_filter import records_filtered

__all__ = ["finished_message", "localise_line", "scored_line", "show_cache_lines", "without_logging_file_warning"]

# the loggers of the lines on the training caches: their size and, with cache_dir, where they are
CACHE_LOGGERS = ("dira3d.engines.cache", "dira3d.engines.diskcache")
_MARK = "_dira3d_finetune_cache_lines"


def show_cache_lines(stream=None) -> None:
    """Show the caches' INFO lines (``caching N item(s) in memory before training ...: about X GiB``, ``caching on
    disk in DIR (cache_dir): N entries already there ...``) on stderr, as the bundles' ``logging.conf`` does under
    ``python -m monai.bundle run``: :func:`run_finetune` leaves the logging setup as it is (``logging_file=False``),
    and with none these INFO lines were dropped, so ``dira3d finetune`` never said how large its cache was or where.
    Only these two loggers; the handler is silent while the root logger has handlers (they print the line then);
    called twice, one handler."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))  # as MONAI's lines
    handler.addFilter(lambda record: not logging.getLogger().handlers)
    setattr(handler, _MARK, True)
    for name in CACHE_LOGGERS:
        log = logging.getLogger(name)
        log.handlers[:] = [h for h in log.handlers if not getattr(h, _MARK, False)] + [handler]
        log.setLevel(logging.INFO)


def _not_logging_file_false(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Logging file is set to False")


@contextlib.contextmanager
def without_logging_file_warning() -> Iterator[None]:
    """Inside this block, drop MONAI's ``Logging file is set to False, skipping logging.`` (a WARNING of
    ``monai.bundle.workflows``): ``ConfigWorkflow`` says it for ``logging_file=False``, the setting :func:`run_finetune`
    passes to keep the caller's logging as it is, so every ``dira3d finetune`` printed it twice (its training and its
    evaluation workflow) with nothing wrong. Only that record is dropped; the logger's other warnings are kept."""
    with records_filtered("monai.bundle.workflows", _not_logging_file_false):
        yield


def scored_line(result: dict[str, Any]) -> str | None:
    """The line ``dira3d finetune`` prints under its metrics when they are not plainly the datalist's 'test' list: a
    cross-validation run names its test fold (``fold`` of ``result["settings"]``, as metrics.json records it) and that
    split's size, and a run scored on another split (``eval_split``) says so; None otherwise."""
    fold = (result.get("settings") or {}).get("fold")
    fold = int(fold) if isinstance(fold, (int, float)) and not isinstance(fold, bool) and fold >= 0 else None
    split = result.get("eval_split", "test")
    if split != "test":  # the numbers are not test scores
        return (f"scored on:   the {split} split (eval_split={split}), not the test split"
                + ("" if fold is None else f"; test fold {fold} was held out of training"))
    if fold is None:
        return None
    size = (result.get("splits") or {}).get("test") or {}
    counts = [f"{size['cases']} cases"] if isinstance(size.get("cases"), int) else []
    if isinstance(size.get("patients"), int):
        counts.append(f"{size['patients']} patients")
    if isinstance(size.get("positive"), int):
        counts.append(f"{size['positive']} positive")
    return (f"scored on:   fold {fold}, the test split of the cross-validation" + (f" ({', '.join(counts)})" if counts
            else "") + "; trained on the other folds (--fold K tests fold K)")


# ids of inference.json that say where its input and outputs are, not what network was trained: never passed on
_NOT_FOR_INFERENCE = {"bundle_root", "ckpt_dir", "pretrained", "image", "datalist", "dataset_dir", "output_dir",
                      "output_path", "output_postfix", "output_ext", "overwrite", "report_path", "device"}


def finished_message(out: str | os.PathLike, bundle: str | os.PathLike, tiny: bool = False,
                     settings: dict[str, Any] | None = None) -> str:
    """What ``dira3d finetune`` prints after the test metrics: where ``metrics.json``, ``models/model.pt`` and the
    TensorBoard logs are, and the inference command for the model (with ``tiny.json`` for a ``--tiny`` run, and the
    ``--set`` ``settings`` that inference.json defines, e.g. ``width``: the network must be built as it was trained)."""
    from monai.bundle import ConfigParser

    from dira3d.evaluation.finetune import bundle_path  # the module that imports this one
    from dira3d.utils.overrides import shell_word

    out, root = Path(out).resolve(), bundle_path(bundle).resolve()
    lines = [f"metrics:     {out / 'metrics.json'}", f"model:       {out / 'models' / 'model.pt'}",
             f"TensorBoard: tensorboard --logdir {out}"]
    configs = [root / "configs" / "inference.json"] + ([root / "configs" / "tiny.json"] if tiny else [])
    if not all(c.is_file() for c in configs):  # a bundle of the user's without inference.json
        return "\n".join(lines)
    parser = ConfigParser()  # inference.json alone: tiny.json's training settings (max_epochs) are not for it
    parser.read_config(str(configs[0]))
    passed = {k: v for k, v in (settings or {}).items() if k not in _NOT_FOR_INFERENCE and k in parser}
    config_file = str(configs[0]) if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    words = ["python -m monai.bundle run --config_file", shell_word(config_file), "--bundle_root", shell_word(str(root)),
             "--ckpt_dir", shell_word(str(out / "models")), "--image IMAGE"]
    for key, value in passed.items():
        words += [f"--{key}", shell_word(value if isinstance(value, str) else repr(value))]
    doc = root / "docs" / "README.md"
    lines.append(f"inference:   {' '.join(words)} ({doc if doc.is_file() else 'docs/finetuning.md'})")
    return "\n".join(lines)



def localise_line(out: str | os.PathLike, result: dict[str, Any]) -> str | None:
    """The line after :func:`finished_message` for a ``chestxray14_cls`` run (``result``: its metrics.json): ``next:``
    ``dira3d localise`` of the model on the boxes ``dira3d prepare chestxray14`` wrote beside the training datalist
    (``bbox_datalist.json``; Grad-CAM box localisation, the paper's evaluation on ChestX-ray14, docs/2d.md), which
    reads the network's settings from the run's metrics.json, so it fits a ``--tiny`` model too; where that file is
    not there, how to get it. None for the other bundles: only ChestX-ray14 has the official boxes."""
    from dira3d.utils.overrides import shell_word

    datalist = (result.get("settings") or {}).get("datalist")
    if result.get("bundle") != "chestxray14_cls" or not isinstance(datalist, str):
        return None
    boxes, out = Path(datalist).parent / "bbox_datalist.json", Path(out).resolve()
    if not boxes.is_file():
        return (f"localise:    no {boxes}: `dira3d prepare chestxray14` writes it when its --src holds BBox_List_2017.csv; "
                "then dira3d localise scores this model's Grad-CAM boxes (docs/2d.md)")
    return (f"next:        dira3d localise --bbox-datalist {shell_word(str(boxes))} --model "
            f"{shell_word(str(out / 'models' / 'model.pt'))} --output-dir {shell_word(str(out / 'localise'))} "
            "(Grad-CAM box localisation, the paper's evaluation on ChestX-ray14; docs/2d.md)")
