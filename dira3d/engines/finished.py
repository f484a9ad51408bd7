"""A rerun of a pretraining that has already finished: one line and exit 0, before any data is loaded.

Rerunning a finished run (the same ``ckpt_dir``, whose ``last.pt`` is at the run's last epoch) built the trainer first,
and with it the datasets: MONAI's ``CacheDataset`` loaded every volume (minutes to tens of minutes on LUNA16) before the
resume found nothing left to train, and the run then wrote ``last.pt`` again. :func:`exit_if_finished` (a step of the
pretraining bundle's ``initialize``, before any dataset is built) reads ``last.pt`` (``weights_only``, memory-mapped,
on the CPU) and, when the run has finished, logs one line naming ``last.pt``, its epoch and ``max_epochs`` and raises
:class:`RunAlreadyFinished` (a ``SystemExit`` with code 0): nothing is loaded, trained or written.

Finished means all of:

- ``resume`` is on and ``last.pt`` exists and is readable;
- its trainer ``epoch`` is at or past ``max_epochs``, written at that epoch's end (no ``epoch_iteration``), and that end
  is not pending (``epoch_end_pending``, :mod:`dira3d.engines.epoch_end`: it must still run);
- every setting the check is given (the bundle's ``checkpoint_meta`` and the dimensionality, channels and mode: width,
  head sizes, ...) equals the one in ``last.pt``. A setting that differs, or that ``last.pt`` does not record (a
  ``last.pt`` of an older dira3d), leaves the run to the usual path: the resume refuses a checkpoint of other settings
  as before (:func:`~dira3d.engines.checkpoint.restore_checkpoint`);
- the run's data (``data``: the bundle's ``data_source``, the real path of its datalist or visual-word folder, and
  the number of classes, ``num_classes`` in ``last.pt``: the bundle's ``count_classes`` counts the training volumes /
  visual words of that JSON file, no volume read, and only for a run that has otherwise finished, so that
  ``initialize`` reads no datalist otherwise) are the ones in ``last.pt``. A finished run rerun on other data is
  refused there with a one-line ``ValueError`` naming ``last.pt``, what differs, and what to do (another
  ``ckpt_dir``, or ``resume`` false): it was said to be finished and nothing trained. A ``last.pt`` that does not
  record them (dira_pretrain 0.1.32 or earlier) goes the usual way. A ``data_source`` recorded before the run's folder
  and its data were moved together (``mv project_A project_B``: the same path relative to ``ckpt_dir``,
  :func:`~dira3d.utils.files.same_or_moved`) is the same data. Since dira_pretrain 0.1.55 ``last.pt`` also records
  ``data_sha256`` (:func:`data_checksum` of ``data_source``): data prepared again at the same place (``dira3d prepare
  ... --out`` rerun on other data, a visual-word folder rebuilt) are other data; data at another place are refused as
  before (the same datalist content there need not be the same volumes: its paths may be relative to it), said to be
  other data where their checksum differs too; a ``last.pt`` without it is compared by place and classes alone;
- the stage schedule is valid (:class:`~dira3d.engines.stages.StageSchedule`: a bad one is refused as before) and fits
  the one ``last.pt`` records with its loss weights (since dira_pretrain 0.1.59): a schedule that moves a stage end
  over the steps trained, or another λ of the stage trained last, is refused here, finished or not, with the
  one-line ``DataError`` of :func:`~dira3d.engines.stages.check_resume_stages` (the resume would count epochs of one
  stage in another); a ``last.pt`` without the record goes the usual way.

Anything else (a larger ``max_epochs``, ``resume`` false, no ``last.pt``) runs as before. The line advises "a larger
max_epochs", the bundle's setting; a command with its own way to set it prints the line itself,
:meth:`RunAlreadyFinished.told_with` (``dira3d pretrain``: ``--override max_epochs=N``), while
:func:`finished_line_unlogged` keeps the logged one out (the demo prints a line of its own options).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dira3d.utils.files import same_or_moved
from dira3d.utils.log_filter import records_filtered
from dira3d.utils.overrides import as_bool

__all__ = ["RunAlreadyFinished", "finished_note", "exit_if_finished", "data_checksum", "finished_line_unlogged"]


def _note(last: Path, epoch: int, max_epochs: int, setting: str = "max_epochs") -> str:
    return (f"{last} is at epoch {epoch}, max_epochs={int(max_epochs)}: this run has already finished; nothing was "
            f"loaded, trained or written; to train more, rerun with a larger {setting} (it continues from last.pt)")


class RunAlreadyFinished(SystemExit):
    """A rerun of a finished run, ended before anything was loaded: ``SystemExit`` with code 0 (``python -m monai.bundle
    run`` and ``torchrun`` exit 0 without a traceback). ``str()`` is the line :func:`exit_if_finished` logged, which
    names the bundle's setting (``max_epochs``); :meth:`told_with` the same line naming a command's way to set it."""

    def __init__(self, note: str, last: Path | None = None, epoch: int = 0, max_epochs: int = 0) -> None:
        super().__init__(0)
        self.note, self.last, self.epoch, self.max_epochs = note, last, epoch, max_epochs

    def __str__(self) -> str:
        return self.note

    def told_with(self, setting: str) -> str:
        """The line, advising a larger ``setting`` (``dira3d pretrain``: ``--override max_epochs=N``)."""
        return self.note if self.last is None else _note(self.last, self.epoch, self.max_epochs, setting)


@contextmanager
def finished_line_unlogged() -> Iterator[None]:
    """While it lasts, :func:`exit_if_finished` logs no line (``dira3d.finished``): a command that prints the line itself
    in its own words (:meth:`RunAlreadyFinished.told_with`: ``dira3d pretrain``, the demo) shows it once."""
    with records_filtered("dira3d.finished", _unlogged):
        yield


def _unlogged(record: logging.LogRecord) -> bool:
    return False


def _plain(value: Any) -> Any:
    # lists and tuples alike (a config list, a checkpoint list), numbers by value (1 == 1.0)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def data_checksum(path: str | os.PathLike) -> str:
    """The sha256 of a run's data as ``last.pt`` records it (``data_sha256``): of the datalist file's bytes, or, for a
    visual-word folder, of its ``manifest.json`` (seed, settings, source volumes and classes of that build; the
    ``visual_words.json`` that ``dira3d visual-words`` writes from it again may come and go), or of the names and bytes
    of the JSON files directly in a folder without one; '' when it cannot be read (nothing is then compared)."""
    path, digest = Path(path), hashlib.sha256()
    try:
        if not path.is_dir() or (path / "manifest.json").is_file():
            with open(path / "manifest.json" if path.is_dir() else path, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        for file in sorted(path.glob("*.json")):
            with open(file, "rb") as handle:
                digest.update(f"{file.name}\0".encode() + hashlib.file_digest(handle, "sha256").digest())
    except OSError:
        return ""
    return digest.hexdigest()


def finished_note(ckpt_dir: str | os.PathLike, max_epochs: int, resume: Any = True,
                  settings: Mapping[str, Any] | None = None, stages: Sequence[Mapping] | None = None,
                  data: Mapping[str, Any] | None = None, loss_weights: Mapping[str, float] | None = None) -> str:
    """The line saying that the run in ``ckpt_dir`` has finished (see the module's docstring), or '' when it has not
    (or when that cannot be told cheaply: the run then goes the usual way).

    Args:
        ckpt_dir: the run's checkpoint folder (``last.pt``).
        max_epochs: the run's ``max_epochs``.
        resume: the bundle's ``resume`` setting (false: the run starts afresh, as before).
        settings: settings that must equal ``last.pt``'s ``meta`` entries of the same names.
        stages: the stage schedule, checked as the trainer checks it (a bad one raises ``ValueError`` as it does), and
            against the one ``last.pt`` records, finished or not (:func:`~dira3d.engines.stages.check_resume_stages`:
            stage ends moved over the epochs trained are refused, before any data are loaded).
        loss_weights: the run's λ per term (``{"dis": .., "res": .., "adv": ..}``), checked with ``stages`` against
            ``last.pt``'s for the stage of its last step (None: not checked here).
        data: what identifies the run's data, by ``last.pt``'s ``meta`` names (the bundle's ``data_source`` and
            ``num_classes``), each a value or a callable giving it (e.g. counting the classes of a datalist: called
            only when the run has otherwise finished, and only while the entries before it are the same). When the
            run has finished, the first one that differs from ``last.pt``'s raises ``ValueError``; when ``last.pt``
            does not record one of them (an older ``last.pt``), the run goes the usual path and none is called.
            ``data_sha256`` (the bundle's :func:`data_checksum` of ``data_source``) is compared only where ``last.pt``
            records it, with ``data_source``: the same place (or moved with the run's folder) with another checksum is
            other data.

    Raises:
        ValueError: a bad stage schedule, or one (or loss weights) that does not fit ``last.pt``; a finished run in
            ``ckpt_dir`` trained on other ``data``.
    """
    finished = _finished(ckpt_dir, max_epochs, resume, settings, stages, data, loss_weights)
    return _note(*finished) if finished else ""


def _finished(ckpt_dir: str | os.PathLike, max_epochs: int, resume: Any, settings: Mapping[str, Any] | None,
              stages: Sequence[Mapping] | None, data: Mapping[str, Any] | None,
              loss_weights: Mapping[str, float] | None) -> tuple[Path, int, int] | None:
    """:func:`finished_note`'s test: (``last.pt``, its epoch, ``max_epochs``) when the run has finished, else None."""
    if not as_bool(resume, "resume"):
        return None
    last = Path(ckpt_dir) / "last.pt"
    if not last.is_file():
        return None
    schedule = None
    if stages is not None:
        from dira3d.engines.stages import StageSchedule, check_resume_stages

        schedule = StageSchedule(stages)  # a bad schedule is refused as the trainer refuses it, not said to be finished
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        trainer, meta = ckpt["trainer"], ckpt.get("meta", {})
        epoch = int(trainer["epoch"])
        mid_epoch = int(trainer.get("epoch_iteration", 0))
        pending = bool(trainer.get("epoch_end_pending"))
    except Exception:  # not a checkpoint of ours, or truncated: the resume names the problem, as before
        return None
    if schedule is not None:  # stage ends moved over the epochs trained, finished or not: refused before data load
        check_resume_stages(trainer, schedule, loss_weights, str(last))
    if max_epochs is None or epoch < int(max_epochs) or mid_epoch or pending:
        return None
    if any(key not in meta or _plain(meta[key]) != _plain(value) for key, value in dict(settings or {}).items()):
        return None  # another setting: the resume refuses it (or resumes) as before
    data = dict(data or {})
    checksum = data.pop("data_sha256", None)  # recorded since dira_pretrain 0.1.55: compared where last.pt has it
    if any(key not in meta for key in data):
        return None  # a last.pt of an older dira3d: its data cannot be told, the usual path
    recorded = meta.get("data_sha256") if checksum is not None and isinstance(meta.get("data_sha256"), str) else ""

    def content() -> str:  # the sha256 of this run's data, '' where last.pt records none or it cannot be read
        return (checksum() if callable(checksum) else str(checksum)) if recorded else ""

    for key, value in data.items():  # in order, a callable (reading a datalist) only while nothing differs yet
        value = value() if callable(value) else value
        if key == "data_source" and (same_or_moved(meta[key], value, os.path.realpath(ckpt_dir))
                                     or _plain(meta[key]) == _plain(value)):  # the same place, or moved with the
            now = content()  # run's folder (mv project_A project_B): rerun from there, unless prepared again there
            if now and now != recorded:
                _refuse(last, f"data_source {value!r} is where its data were, but they are not those it was trained "
                              "on: their sha256 is not last.pt's data_sha256; prepared again there?")
            continue
        if _plain(meta[key]) != _plain(value):  # the resume would find nothing to train, or refuse the head after
            # caching every volume: say so now; a datalist moved alone (mv prepared /fast/prepared) is named both ways
            now = content() if key == "data_source" else ""
            differ = bool(now) and now != recorded
            told = ("its place and the sha256 of the datalist, the same here, not of the volumes it lists" if now
                    else "their place, not their content")
            moved = (f"; if these are the same data moved there (last.pt records {told}, so cannot tell), the run has "
                     "finished and nothing needs redoing: a larger max_epochs continues it from last.pt"
                     if key == "data_source" and not differ else "")
            either = ", whose sha256 is not last.pt's data_sha256 either" if differ else ""
            _refuse(last, f"{key} {meta[key]!r}, this run's {value!r}{either}", moved)
    return last, epoch, int(max_epochs)


def _refuse(last: Path, what: str, moved: str = "") -> None:
    raise ValueError(f"{last} is a finished run on other data ({what}): it is not resumed and nothing was loaded{moved}; "
                     "to pretrain on these data, use another ckpt_dir (`dira3d pretrain --output`), or set resume to false "
                     f"to start afresh (it replaces last.pt and best.pt in {last.parent})")


def exit_if_finished(ckpt_dir: str | os.PathLike, max_epochs: int, resume: Any = True,
                     settings: Mapping[str, Any] | None = None, stages: Sequence[Mapping] | None = None,
                     what: str = "pretraining", data: Mapping[str, Any] | None = None,
                     loss_weights: Mapping[str, float] | None = None) -> None:
    """A bundle's ``initialize`` step, before any dataset is built: when the run in ``ckpt_dir`` has finished
    (:func:`finished_note`), log that line (on global rank 0) and raise :class:`RunAlreadyFinished` (exit 0).
    Every rank of a ``torchrun`` reads the same ``last.pt`` and ends alike. A no-op otherwise.

    Raises:
        ValueError: as :func:`finished_note` (a finished run on other ``data``, a bad stage schedule, or one or loss
            weights that do not fit ``last.pt``: before anything is loaded, whether the run has finished or not)."""
    finished = _finished(ckpt_dir, max_epochs, resume, settings, stages, data, loss_weights)
    if not finished:
        return
    note = _note(*finished)
    if int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("dira3d.finished").info(f"{what}: {note}")
    raise RunAlreadyFinished(note, *finished)
