"""Ignite handlers of the fine-tuning bundles.

:class:`ProbabilityWriter` collects a classifier's probabilities during an evaluator run and
writes them as one JSON file (the classification bundles' ``inference.json`` output).
:class:`BestModelSaver` keeps the fine-tuned weights of the best validation epoch as a plain
``state_dict`` written atomically. :func:`prediction_path` names an output file next to an input scan.
:class:`ClosingProgressBar` is ignite's ``ProgressBar`` over the cases, also closed when a run ends early.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.engines import Workflow
from monai.handlers import CheckpointLoader
from monai.utils import ImageMetaKey

from dira3d.data.errors import DataError
from dira3d.utils.atomic import atomic_write_bytes, atomic_write_text

__all__ = ["BestModelSaver", "ClosingProgressBar", "ProbabilityWriter", "FineTunedCheckpointLoader", "fine_tuned_weights",
           "prediction_path", "scan_stem"]

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def scan_stem(path: str | os.PathLike) -> str:
    """File name of ``path`` without its image extension (``a/b.nii.gz`` → ``b``; a folder keeps its name)."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def fine_tuned_weights(path: str | os.PathLike, network: torch.nn.Module | None = None) -> str:
    """``path`` (``<ckpt_dir>/model.pt``), checked before MONAI's ``CheckpointLoader`` of ``evaluate.json`` / ``inference.json`` reads it.

    Without this check a missing model or one of other network settings surfaced as a bare
    ``FileNotFoundError`` or a page of ``size mismatch`` lines deep in the evaluator's traceback.

    Args:
        path: the fine-tuned weights (``model.pt`` in the bundle's ``ckpt_dir``).
        network: the bundle's network; when given, the weights' keys and shapes are compared with it.

    Raises:
        FileNotFoundError: no ``model.pt``: says to train first or to point ``--ckpt_dir`` at it.
        DataError: (a ``ValueError``) the weights do not fit ``network``: the counts of differing keys and the
            settings that fit (e.g. ``--width 0.125``: a model fine-tuned with ``tiny.json``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"fine-tuned weights {path} do not exist: fine-tune first (train.json with the same --bundle_root writes "
            "<bundle_root>/models/model.pt), or pass --ckpt_dir with the folder that holds model.pt "
            "(`dira3d finetune --output-dir D` writes D/models)")
    if network is not None:
        from dira3d.networks.weights_fit import infer_network_settings, mismatch_summary, same_value, state_dict_mismatch
        from dira3d.utils.checkpoint import load_checkpoint
        from dira3d.utils.overrides import override_text, shell_word

        state = load_checkpoint(path)
        for wrapper in ("model", "network", "state_dict"):  # what CheckpointLoader unwraps too
            if isinstance(state.get(wrapper), dict) and len(state) == 1:
                state = state[wrapper]
        missing, unexpected, mismatched = state_dict_mismatch(state, network)
        if missing or unexpected or mismatched:
            built, saved = infer_network_settings(network.state_dict()), infer_network_settings(state)
            fits = {k: v for k, v in saved.items() if k in built and not same_value(v, built[k])}
            hint = ("the weights fit " + " ".join(f"--{k} {shell_word(override_text(v))}" for k, v in fits.items())
                    + "; a model fine-tuned with tiny.json: add the bundle's configs/tiny.json to --config_file "
                    "(its network settings and roi_size)") if fits else \
                "use the model fine-tuned with this bundle and these settings"
            # a DataError (a ValueError) naming the file: one `error:` line under `python -m monai.bundle run`
            # (dira3d.utils.bundle_errors), where it ended about 100 lines of tracebacks
            raise DataError(path, f"does not fit this bundle's network: {mismatch_summary(missing, unexpected, mismatched)}; "
                                  f"{hint}")
    return str(path)


class FineTunedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` that checks the fine-tuned ``model.pt`` with :func:`fine_tuned_weights` when the
    engine starts (not when the config is parsed: ``ConfigWorkflow.check_properties`` builds the handlers before any
    model exists): a missing model or one of other network settings stops the run with what to do."""

    def __call__(self, engine: Engine) -> None:
        network = self.load_dict.get("model") if len(self.load_dict) == 1 else None
        network = getattr(network, "module", network)  # DataParallel / DDP
        fine_tuned_weights(self.load_path, network if isinstance(network, torch.nn.Module) else None)
        super().__call__(engine)


def prediction_path(image: str | os.PathLike, postfix: str, ext: str) -> str:
    """``<folder of image>/<stem>_<postfix><ext>``: the prediction next to its input.

    A DICOM folder gets its output beside the folder, not inside it. No ``image`` (an ``inference.json`` run
    over a ``--datalist`` without ``--output_dir`` / ``--output_path``): ``./inference_<postfix><ext>`` in the
    current folder (the empty path was taken for the current folder itself, so the outputs went to its parent).
    """
    if not str(image).strip():
        return str(Path.cwd() / f"inference_{postfix}{ext}")
    image = Path(str(image).rstrip("/\\")).resolve()
    return str(image.parent / f"{scan_stem(image)}_{postfix}{ext}")


_PROB_HINT = "pass --output_path with another file"


def _default_output(engine_output: Any) -> list[tuple[str, list[float]]]:
    """(source file, probabilities) per decollated sample of a SupervisedEvaluator output."""
    rows = []
    for item in engine_output if isinstance(engine_output, list) else [engine_output]:
        image = item.get("image")
        meta = getattr(image, "meta", {}) or {}
        source = meta.get(ImageMetaKey.FILENAME_OR_OBJ, "")
        probabilities = torch.as_tensor(item["pred"]).detach().float().flatten().cpu().tolist()
        rows.append((str(source), probabilities))
    return rows


class ProbabilityWriter:
    """Write per-candidate probabilities of an evaluator run to a JSON file.

    The file holds ``{"classes": [...], "predictions": [{"image": path, "probabilities": [...]}],
    "written_by": "dira3d <version>", "sha256": <checksum of the rest>}`` and is written atomically when the
    run completes (in one process, a batch that stops writes it too, with the rows of the inputs it ran:
    :func:`~dira3d.evaluation.batch_resume.write_stopped_rows`). ``written_by`` and ``sha256`` mark it as dira3d's own (see :mod:`dira3d.evaluation.outputs`):
    when the run starts, an existing ``output_path`` that is not dira3d's own unchanged prediction stops it
    (unless ``overwrite``), before anything is written.

    Under ``torchrun`` each rank runs a share of the inputs: given the run's ``batch``
    (:class:`~dira3d.evaluation.InferenceBatch`, the bundles' ``batch=@inference_batch``) the writer keeps its rows and
    the batch gathers every rank's, which rank 0 writes (:meth:`write`) in datalist order
    (:mod:`dira3d.evaluation.batch_ranks`); without one it is refused when the run starts, as each rank would write the
    file with its own share. The inputs the batch keeps from an earlier run (``--skip_written True``) have their earlier
    rows written with this run's, in datalist order (:meth:`~dira3d.evaluation.InferenceBatch.probability_rows`).

    Args:
        output_path: the JSON file to write.
        class_names: names of the output channels (e.g. ``["nodule"]``).
        output_transform: maps ``engine.state.output`` to ``[(source path, [p, ...]), ...]``.
        overwrite: replace an existing ``output_path`` whatever wrote it.
        batch: the :class:`~dira3d.evaluation.InferenceBatch` of the run (needed under ``torchrun``).

    Raises:
        DataError: ``output_path`` does not end in ``.json`` (``--output_path probs.csv`` wrote JSON into a ``.csv``).
        FileExistsError: (when the run starts) ``output_path`` holds a file dira3d did not write.
        DataError: (when the run starts) under ``torchrun`` without ``batch``: one ``error:`` line under ``python -m
            monai.bundle run`` (:mod:`dira3d.utils.bundle_errors`), not a traceback.
    """

    def __init__(self, output_path: str | os.PathLike, class_names: list[str] | None = None, output_transform: Callable = _default_output,
                 overwrite: Any = False, batch: Any = None) -> None:
        from dira3d.evaluation.outputs import check_probability_path
        from dira3d.utils.overrides import as_bool

        self.output_path = check_probability_path(output_path)  # a .json file: --output_path probs.csv got JSON
        self.class_names = list(class_names or [])
        self.output_transform = output_transform
        self.overwrite = as_bool(overwrite, "overwrite")
        self.rows: list[dict] = []
        self.batch = batch
        if batch is not None:
            batch.writer = self

    def attach(self, engine: Workflow) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _check(self) -> None:
        from dira3d.evaluation.outputs import check_prediction_targets

        check_prediction_targets([self.output_path], self.overwrite, hint=_PROB_HINT)

    def _reset(self, engine: Workflow) -> None:
        from dira3d.engines.distributed import get_world_size

        if self.batch is None and get_world_size() > 1:  # a setting: one error line under monai.bundle run
            from dira3d.data.errors import DataError

            raise DataError(None, f"the ProbabilityWriter of {self.output_path} has no \"batch\" setting: under "
                            f"torchrun each of the {get_world_size()} processes would write the file with its own "
                            "share of the inputs; give the writer \"batch\": \"@inference_batch\" in inference.json "
                            "(as the bundles do: every rank's rows reach rank 0, which writes the one file), or run "
                            "without torchrun")
        self._check()
        self.rows = []

    def _collect(self, engine: Workflow) -> None:
        for source, probabilities in self.output_transform(engine.state.output):
            self.rows.append({"image": source, "probabilities": probabilities})

    def _write(self, engine: Workflow) -> None:
        if self.batch is not None and self.batch.world > 1:
            return  # under torchrun: the batch gathers every rank's rows when the ranks' shares end; rank 0 writes them
        # with the rows of the inputs the batch kept from an earlier run (--skip_written True), in datalist order
        with_kept = getattr(self.batch, "probability_rows", None)  # (an InferenceBatch's)
        self.write(with_kept(self.rows) if with_kept is not None else self.rows)

    def write(self, rows: list[dict]) -> None:
        """Write ``rows`` (``{"image": path, "probabilities": [...]}`` each) into ``output_path``, atomically."""
        import dira3d
        from dira3d.evaluation.outputs import json_digest

        self._check()  # a file put there during the run is not replaced either
        payload = {"classes": self.class_names, "predictions": rows}
        payload.update(written_by=f"dira3d {dira3d.__version__}", sha256=json_digest(payload))
        atomic_write_text(self.output_path, json.dumps(payload, indent=2))


class ClosingProgressBar(ProgressBar):
    """ignite's :class:`~ignite.handlers.ProgressBar`, also closed when its engine's run ends early.

    ignite closes the bar at ``EPOCH_COMPLETED``, which a run that is terminated (a validation cut short by
    SIGTERM / Ctrl-C, :mod:`dira3d.evaluation.stopping`) or that raises (a second Ctrl-C, a fault in a case) never
    fires: the bar stayed on the terminal and the run's last line (``fine-tuning stopped by SIGTERM ...``, the
    traceback) was written after it, on its line. This one closes it on ``TERMINATE``, ``COMPLETED`` and
    ``EXCEPTION_RAISED`` too, where it is left as it stood (ignite's close fills it to 100 % first). The exception
    handler goes before the engine's others (ignite's handler list: ``StatsHandler``'s, listed earlier in a bundle,
    raises the exception again, so no later handler would run); it raises the exception itself only when it is the
    engine's one exception handler, as ignite does when there is none. Same arguments as ignite's.
    """

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().attach(engine, *args, **kwargs)
        engine.add_event_handler(Events.TERMINATE, self._close_early)
        engine.add_event_handler(Events.COMPLETED, self._close_early)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close_on_exception)
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]  # ignite's list, run in order
        handlers.insert(0, handlers.pop())

    def _close_early(self, engine: Engine) -> None:
        if self.pbar is not None:
            self.pbar.close()
        self.pbar = None

    def _close_on_exception(self, engine: Engine, err: BaseException) -> None:
        self._close_early(engine)
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 1:
            raise err


class BestModelSaver:
    """Save ``network.state_dict()`` atomically whenever the validation metric improves.

    Attached to the validation evaluator. The file is a plain ``state_dict`` (keys of the task
    network, a DDP ``module.`` wrapper removed), loadable with ``torch.load(..., weights_only=True)``,
    MONAI's ``CheckpointLoader`` and ``ckpt_export``. The first validation always saves, so a
    metric that is undefined (NaN, e.g. an AUC on one class) still leaves a model behind. Only
    rank 0 writes in a distributed run.

    With ``preprocessing`` (how the training volumes were scaled, see
    :func:`dira3d.evaluation.preprocessing.datalist_preprocessing`), the first save also makes
    ``preprocessing.json`` beside the model say so: an earlier run's file that says otherwise is removed
    just before the model is replaced and this run's written just after it (none when the datalist
    records nothing), so an earlier model never sits beside this run's file or this run's model beside
    the earlier one's (``inference.json`` scales a raw scan by it).

    Args:
        network: the trained network (possibly wrapped in ``DistributedDataParallel``).
        output_path: the file to write, e.g. ``models/model.pt``.
        metric_name: the metric in ``engine.state.metrics`` to maximise.
        preprocessing: the settings for ``preprocessing.json``; None leaves that file alone.
    """

    def __init__(self, network: torch.nn.Module, output_path: str | os.PathLike, metric_name: str,
                 preprocessing: dict[str, Any] | None = None) -> None:
        self.network = network
        self.output_path = Path(output_path)
        self.metric_name = metric_name
        self.preprocessing = None if preprocessing is None else dict(preprocessing)
        self.best: float | None = None

    def attach(self, engine: Workflow) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Workflow) -> None:
        from dira3d.utils import atomic_save

        value = float(engine.state.metrics.get(self.metric_name, float("nan")))
        improved = self.best is None or (value == value and (self.best != self.best or value > self.best))
        if not improved:
            return
        self.best = value
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        module = getattr(self.network, "module", self.network)
        stale = self._stale_preprocessing()
        earlier = stale.read_bytes() if stale is not None and stale.is_file() else None
        if stale is not None:
            stale.unlink(missing_ok=True)
        try:
            atomic_save({k: v.detach().cpu() for k, v in module.state_dict().items()}, self.output_path)
        except BaseException:  # the earlier model stays: so does the file that describes it
            if earlier is not None:
                atomic_write_bytes(stale, earlier)
            raise
        if stale is not None:
            from dira3d.evaluation.preprocessing import write_preprocessing

            write_preprocessing(self.output_path.parent, self.preprocessing)

    def _stale_preprocessing(self) -> Path | None:
        """``preprocessing.json`` beside the model when it does not say what ``preprocessing`` says."""
        from dira3d.evaluation.preprocessing import PREPROCESSING_FILE

        if self.preprocessing is None:
            return None
        path = self.output_path.parent / PREPROCESSING_FILE
        try:
            current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            current = None  # unreadable: replaced
        return None if current == self.preprocessing else path
