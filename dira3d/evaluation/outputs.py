"""Prediction files of the task bundles' ``inference.json``: written atomically, recognisable, never over a user's file.

``inference.json`` writes next to the input scan by default (``case1.nii.gz`` → ``case1_seg.nii.gz``), which is
also where a manual label commonly lies. So every prediction dira3d writes carries a mark with a checksum of
its own content (:func:`prediction_mark`): the NIfTI header's ``descrip`` field, a PNG text chunk ``dira3d``, or
the ``written_by`` / ``sha256`` keys of a ``_prob.json``. :func:`is_own_prediction` accepts a file only when the
mark is there AND the content still has that checksum: a rerun may replace dira3d's own earlier, unchanged
prediction; a file from anywhere else — a manual label, or a dira3d prediction corrected by hand and saved
again (which may keep the header) — is refused before anything is written (:func:`check_prediction_targets`),
unless ``overwrite`` is set.

- :class:`SavePredictiond`: MONAI's ``SaveImaged`` (MONAI Label still filters it out of the served
  post-transforms) that marks the file, writes it under a temporary name and renames it (a killed run leaves
  at most a hidden ``.<name>.<random>.nii.gz``, never a half-written ``<name>``) and refuses a target that is
  not its own.
- :class:`CheckPredictionFiles`: an ignite handler that checks every target of the run when the evaluator
  starts, before any scan is read (the classification bundles' ``ProbabilityWriter`` checks its file then too).
- :func:`check_probability_path`: the classification bundles' probabilities file must be named ``.json``.
- :class:`PredictionNiftiWriter`, :class:`PredictionPNGWriter`: MONAI's ``NibabelWriter`` / ``PILWriter`` with the mark.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import FolderLayout
from monai.data.image_writer import ImageWriter, NibabelWriter, PILWriter
from monai.transforms import SaveImage, SaveImaged
from monai.utils import ImageMetaKey

from dira3d.data.nifti_header import PREDICTION_MARK_PREFIX
from dira3d.utils.atomic import atomic_path
from dira3d.utils.overrides import as_bool

__all__ = ["CheckPredictionFiles", "PredictionNiftiWriter", "PredictionPNGWriter", "SavePredictiond", "array_digest",
           "check_prediction_targets", "check_probability_path", "is_own_prediction", "json_digest", "prediction_mark",
           "prediction_target", "write_error"]

logger = logging.getLogger(__name__)

MARK_PREFIX = PREDICTION_MARK_PREFIX  # dira3d prepare generic leaves such files out of the scans
_MARK = re.compile(r"^dira3d prediction sha256:(?P<digest>[0-9a-f]{32})$")
PNG_KEY = "dira3d"
NIFTI_EXTS = (".nii.gz", ".nii")
PNG_EXTS = (".png",)
SEG_HINT = "choose another --output_dir or --output_postfix"


def array_digest(array: Any) -> str:
    """128-bit SHA-256 digest (32 hex digits) of an array's shape, dtype and values (little-endian bytes)."""
    array = np.asarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.byteorder not in ("|", "<") else array
    h = hashlib.sha256(f"{array.shape}|{array.dtype.kind}{array.dtype.itemsize}|".encode())
    h.update(np.ascontiguousarray(little).tobytes())
    return h.hexdigest()[:32]


def json_digest(payload: dict) -> str:
    """Digest of a prediction JSON's content: every key but ``written_by`` and ``sha256``, canonically dumped."""
    body = {k: v for k, v in payload.items() if k not in ("written_by", "sha256")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def prediction_mark(digest: str) -> str:
    """The mark dira3d stores in a prediction image (57 ASCII characters: fits NIfTI's 80-byte ``descrip``)."""
    return f"{MARK_PREFIX}{digest}"


def _mark_digest(text: Any) -> str | None:
    if isinstance(text, np.ndarray) and text.ndim == 0:  # a NIfTI header field
        text = text.item()
    if isinstance(text, (bytes, np.bytes_)):
        text = bytes(text).split(b"\x00", 1)[0].decode("ascii", "replace")
    match = _MARK.match(str(text).strip()) if text is not None else None
    return match["digest"] if match else None


def is_own_prediction(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a prediction dira3d wrote and nobody changed since (mark present, checksum still right).

    Reads ``.nii`` / ``.nii.gz`` (header ``descrip``), ``.png`` (text chunk ``dira3d``) and ``.json``
    (``written_by`` and ``sha256`` keys). Anything else, unreadable or unmarked, is not ours: ``False``.
    """
    return _prediction_state(Path(path)) == "own"


def _prediction_state(path: Path) -> str:
    """``"own"`` (dira3d's mark, checksum right), ``"edited"`` (the mark, content changed since) or ``"unmarked"``
    (no mark: another file, one dira3d cannot mark, one unreadable, or a prediction from before the marks)."""
    name = path.name.lower()
    if not path.is_file():
        return "unmarked"
    try:
        if name.endswith(NIFTI_EXTS):
            import nibabel as nib

            image = nib.load(str(path))
            digest = _mark_digest(image.header.get("descrip"))
            content = None if digest is None else array_digest(np.asanyarray(image.dataobj))
        elif name.endswith(PNG_EXTS):
            from PIL import Image

            with Image.open(path) as image:
                digest = _mark_digest(getattr(image, "text", {}).get(PNG_KEY))
                content = None if digest is None else array_digest(np.asarray(image))
        elif name.endswith(".json"):
            payload = json.loads(path.read_text(encoding="utf-8"))
            marked = isinstance(payload, dict) and str(payload.get("written_by", "")).startswith("dira3d")
            digest = payload.get("sha256") if marked else None
            content = None if digest is None else json_digest(payload)
        else:
            return "unmarked"
    except Exception:  # noqa: BLE001 - unreadable or truncated: not a file dira3d finished writing
        logger.debug("could not read %s as a dira3d prediction", path, exc_info=True)
        return "unmarked"
    if digest is None:
        return "unmarked"
    return "own" if digest == content else "edited"


def _not_own_reason(path: Path, before_marks: bool) -> str:
    """Why ``path`` is not taken for dira3d's own prediction, for the refusal (after "it has")."""
    if not path.name.lower().endswith((*NIFTI_EXTS, *PNG_EXTS, ".json")):
        return (f"the suffix {''.join(path.suffixes) or '(none)'}, which dira3d cannot mark as its own, so it never "
                "replaces such a file unasked")
    if _prediction_state(path) == "edited":
        return "dira3d's mark, but its content changed since dira3d wrote it (e.g. corrected by hand)"
    if not before_marks:
        return "no dira3d mark (a file from elsewhere)"
    return ("no dira3d mark (e.g. a manual label next to the scan, or a prediction of a task bundle before 0.1.4, which "
            "did not mark its files: nothing else tells such a file from a label saved under the same name)")


def check_prediction_targets(targets: Iterable[str | os.PathLike], overwrite: Any = False, hint: str = SEG_HINT,
                             inputs: Iterable[str | os.PathLike] = (), before_marks: bool = True) -> list[Path]:
    """Refuse, before anything is written, output files that would replace a file dira3d did not write.

    Args:
        targets: the files the run will write.
        overwrite: replace existing files whatever wrote them (``True`` / ``"true"``).
        hint: where else the user can write (names the settings), for the errors; the refusal of an existing
            file adds ``or pass --overwrite True to replace it``.
        inputs: the run's input scans: a target that is one of them is refused even with ``overwrite``.
        before_marks: the targets may be predictions of a task bundle before 0.1.4 (unmarked): the refusal says so.

    Returns:
        The targets as paths.

    Raises:
        DataError: a target is an input scan, or two inputs would write the same file (a ``ValueError``).
        FileExistsError: a target exists, is not dira3d's own unchanged prediction, and ``overwrite`` is off (names
            every such target, up to 3, and why it is not taken for dira3d's own); or a target is a folder.
    """
    from dira3d.data.errors import DataError  # a ValueError: one `error:` line under python -m monai.bundle run

    overwrite = as_bool(overwrite, "overwrite")
    paths = [Path(t) for t in targets]
    sources = {}
    for source in inputs:
        try:
            sources[Path(source).resolve()] = source
        except OSError:
            continue
    seen: dict[Path, Path] = {}
    refused: list[Path] = []
    for path in paths:
        resolved = path.resolve()
        if resolved in sources:
            raise DataError(None, f"the prediction file {path} is the input scan {sources[resolved]} itself; {hint}")
        if resolved in seen:
            # (a ValueError ended python -m monai.bundle run in three chained tracebacks)
            raise DataError(None, f"two inputs would write the same prediction file {path}; give them different names "
                                  f"or run them separately with different --output_dir")
        seen[resolved] = path
        if path.is_dir():
            raise FileExistsError(f"the prediction file {path} is an existing folder; {hint}")
        if os.path.lexists(path) and not overwrite and not is_own_prediction(path):
            refused.append(path)
    if refused:  # all of them: --overwrite True would replace every one, so the user checks them all first
        raise FileExistsError(_refusal(refused, hint, before_marks))
    return paths


def check_probability_path(output_path: str | os.PathLike) -> Path:
    """``output_path`` of the classification bundles' probabilities (``ProbabilityWriter``, ``InferenceBatch``), which
    are written as JSON: a name that does not end in ``.json`` is refused before any input is read
    (``--output_path probs.csv`` wrote JSON into a file named ``.csv``).

    Raises:
        DataError: naming the setting, its value and the suffix to give (one ``error:`` line under ``python -m
            monai.bundle run``).
    """
    from dira3d.data.errors import DataError

    path = Path(output_path)
    if path.suffix.lower() != ".json":
        raise DataError(None, f"output_path={str(output_path)!r}: the probabilities are written as JSON, so the file "
                        f"name must end in .json; pass --output_path with a .json file (e.g. {path.stem or 'probs'}.json)")
    return path


def check_class_names(class_names: Any, out_channels: Any) -> list[str]:
    """``class_names`` of a classification bundle's inference: one name per output of the network (``out_channels``),
    refused before any input is read otherwise. ``--out_channels 14`` without 14 names wrote the probabilities file with
    5 names over 14 probabilities, the first 5 of them named as the bundle's 5 classes, without a word.

    Raises:
        DataError: naming both settings and what to pass (one ``error:`` line under ``python -m monai.bundle run``).
    """
    from dira3d.data.errors import DataError

    names = [str(n) for n in class_names] if isinstance(class_names, (list, tuple)) else None
    if names is None or len(names) != int(out_channels):
        count = "not a list" if names is None else f"{len(names)} name(s)"
        raise DataError(None, f"class_names={class_names!r} ({count}) does not name the {out_channels} outputs of the "
                              "network (out_channels): pass --class_names with one name per output, in the order of the "
                              "training datalist's labels (the fine-tuning command prints them)")
    return names


def _refusal(refused: Sequence[Path], hint: str, before_marks: bool) -> str:
    """The error for existing targets that are not dira3d's own: the first 3 named, why, and what to do."""
    path, more = refused[0], refused[1:]
    if not more:
        return (f"{path} exists and is not a prediction written by dira3d, as far as it can tell: it has "
                f"{_not_own_reason(path, before_marks)}; inference would replace it, so it was left as it is; {hint}, "
                "or pass --overwrite True to replace it (check first that it holds nothing you need)")
    reasons = {p: _not_own_reason(p, before_marks) for p in refused[:3]}
    why = (f"they have {next(iter(reasons.values()))}" if len(set(reasons.values())) == 1
           else "; ".join(f"{p.name} has {r}" for p, r in reasons.items()))
    others = ", ".join(map(str, more[:2])) + (f" and {len(more) - 2} more" if len(more) > 2 else "")
    return (f"{path} and {len(more)} more of this run's targets ({others}) exist and are not predictions written by "
            f"dira3d, as far as it can tell: {why}; inference would replace them, so they were left as they are; {hint}, "
            "or pass --overwrite True to replace them all (check first that none of them holds anything you need)")


def prediction_target(image: str | os.PathLike, output_dir: str | os.PathLike, output_postfix: str,
                      output_ext: str) -> str:
    """The file ``SaveImaged`` / :class:`SavePredictiond` writes for ``image`` (``output_dir/<stem>_<postfix><ext>``).

    Uses MONAI's own naming (``FolderLayout`` without a separate folder), as the saver does with the
    ``filename_or_obj`` that ``LoadImaged`` records (the datalist's path as given); creates no folder.
    """
    layout = FolderLayout(output_dir=output_dir, postfix=output_postfix, extension=_ext(output_ext), parent=False, makedirs=False)
    return str(layout.filename(subject=output_subject(image)))


def output_subject(image: Any) -> str:
    """``image`` as the ``subject`` that MONAI's naming reads: a DICOM folder keeps its whole name (MONAI takes the
    text after a name's last dot for an extension, so the series folder ``1.2.826.0.1.9`` gave ``1.2.826.0.1_seg.nii.gz``
    and TCIA's ``3000566.000000-03192`` ``3000566_seg.nii.gz``), and a trailing ``/`` is dropped (it gave ``_seg.nii.gz``)."""
    path = str(image)
    folder = path.rstrip("/\\")
    if folder and os.path.isdir(folder):
        return os.path.join(folder, f"{os.path.basename(folder)}.dir")  # the ``.dir`` is the "extension" MONAI drops
    return path


def _ext(output_ext: str) -> str:
    ext = str(output_ext or "").lower()
    return f".{ext}" if ext and not ext.startswith(".") else ext


class PredictionNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that puts :func:`prediction_mark` (checksum of the stored voxels) into ``descrip``."""

    @classmethod
    def create_backend_obj(cls, data_array: Any, affine: Any = None, dtype: Any = None, **kwargs: Any) -> Any:
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        image.header["descrip"] = prediction_mark(array_digest(np.asanyarray(image.dataobj)))
        return image


class PredictionPNGWriter(PILWriter):
    """MONAI's ``PILWriter`` that saves PNG with a text chunk ``dira3d`` holding :func:`prediction_mark`."""

    def write(self, filename: Any, verbose: bool = False, **kwargs: Any) -> None:
        from PIL.PngImagePlugin import PngInfo

        ImageWriter.write(self, filename, verbose=verbose)
        image = self.create_backend_obj(data_array=self.data_obj, dtype=self.output_dtype,
                                        reverse_indexing=kwargs.pop("reverse_indexing", True),
                                        image_mode=kwargs.pop("image_mode", None), scale=self.scale, **kwargs)
        info = PngInfo()
        info.add_text(PNG_KEY, prediction_mark(array_digest(np.asarray(image))))
        image.save(filename, format="PNG", pnginfo=info, **kwargs)
        self.data_obj = image


def _writer_for(ext: str) -> type[ImageWriter] | None:
    if ext in NIFTI_EXTS:
        return PredictionNiftiWriter
    if ext in PNG_EXTS:
        return PredictionPNGWriter
    return None  # MONAI's writer for the extension: no mark, so an existing file is always refused


def _reporting_writer(writer_cls: type[ImageWriter], failures: list[OSError]) -> type[ImageWriter]:
    """``writer_cls`` whose ``write`` also appends an ``OSError`` it raises to ``failures``: MONAI's ``SaveImage``
    catches every writer's exception and reports them all as "cannot find a suitable writer" (with advice to
    install writer libraries), which hides a full disk."""

    def write(self: ImageWriter, filename: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return writer_cls.write(self, filename, *args, **kwargs)
        except OSError as err:
            failures.append(err)
            raise

    return type(writer_cls.__name__, (writer_cls,), {"write": write, "__doc__": writer_cls.__doc__})


def write_error(target: str | os.PathLike, err: OSError) -> OSError:
    """The error for a prediction that could not be written (``err`` from the writer or the file system): names
    the target, not the temporary file, says what the system said and what to do."""
    full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    todo = ("free space on that disk (or raise your quota)" if full else "check that this folder can be written")
    return OSError(err.errno, f"could not write the prediction {target}: {err.strerror or err}; {todo}, or choose "
                              "another --output_dir (no partial file was left)")


class _GuardedSaveImage(SaveImage):
    """``SaveImage`` that checks its target, writes to a temporary name beside it and renames it."""

    overwrite: bool = False
    hint: str = SEG_HINT

    def __call__(self, img: Any, meta_data: dict | None = None, filename: Any = None) -> Any:
        from monai.data import MetaTensor

        meta = img.meta if isinstance(img, MetaTensor) else meta_data
        if filename is not None:
            target = f"{filename}{self.output_ext}"
        else:
            names = self.fname_formatter(meta, self)
            if "subject" in names:
                names["subject"] = output_subject(names["subject"])
            target = str(self.folder_layout.filename(**names))
        check_prediction_targets([target], self.overwrite, self.hint,
                                 inputs=[meta[ImageMetaKey.FILENAME_OR_OBJ]] if meta and meta.get(ImageMetaKey.FILENAME_OR_OBJ) else [])
        verbose = self.write_kwargs.get("verbose", False)
        self.write_kwargs["verbose"] = False  # the temporary name would be logged
        writers, failures = self.writers, []
        self.writers = tuple(_reporting_writer(w, failures) for w in writers)
        try:
            with atomic_path(target, suffix=self.output_ext or ".tmp") as tmp:
                out = super().__call__(img, meta_data, filename=str(tmp)[: len(str(tmp)) - len(self.output_ext)])
        except (OSError, RuntimeError) as err:
            cause = err if isinstance(err, OSError) else (failures[-1] if failures else None)
            if cause is None:
                raise
            raise write_error(target, cause) from cause
        finally:
            self.writers = writers
            self.write_kwargs["verbose"] = verbose
        if verbose:
            logger.info(f"writing: {target}")
        return out


class SavePredictiond(SaveImaged):
    """MONAI's ``SaveImaged`` for ``inference.json``: marked, atomic, and never over a file dira3d did not write.

    Takes every argument of ``SaveImaged``. ``.nii.gz`` / ``.nii`` go through :class:`PredictionNiftiWriter`
    and ``.png`` through :class:`PredictionPNGWriter` (unless ``writer`` names another); other extensions use
    MONAI's writer for them, whose files carry no mark (an existing one is then always refused without
    ``overwrite``). The file is written under a temporary name in its folder and renamed.

    Args:
        overwrite: replace an existing target whatever wrote it (default: only dira3d's own unchanged prediction).
        kwargs: ``SaveImaged``'s arguments (``keys``, ``output_dir``, ``output_postfix``, ``output_ext`` ...).

    Raises:
        FileExistsError: (when called) the target holds a file dira3d did not write, see :func:`check_prediction_targets`.
        OSError: (when called) the file could not be written (a full disk, a folder that cannot be written): names the
            target and the system's reason (:func:`write_error`); no temporary file is left.
    """

    def __init__(self, keys: Any, overwrite: Any = False, **kwargs: Any) -> None:
        ext = _ext(kwargs.get("output_ext", ".nii.gz") or kwargs.get("output_format", ""))
        if kwargs.get("writer") is None:
            kwargs["writer"] = _writer_for(ext)
        super().__init__(keys, **kwargs)
        saver = self.saver
        saver.__class__ = _GuardedSaveImage  # same state, guarded __call__
        saver.overwrite = as_bool(overwrite, "overwrite")

    def targets(self, images: Sequence[str | os.PathLike]) -> list[str]:
        """The files this saver would write for ``images`` (paths as the datalist gives them)."""
        layout = self.saver.folder_layout
        return [prediction_target(image, layout.output_dir, layout.postfix, layout.ext or "") for image in images]


class CheckPredictionFiles:
    """Ignite handler: when the evaluator starts, refuse output files that would replace a file dira3d did not write.

    ``inference.json`` lists it right after the checkpoint loader (which tests expect at ``handlers#0``): the
    run stops before any scan is read. The per-file check is :func:`check_prediction_targets`.

    Args:
        images: the input scans (``[d['image'] for d in @datalist]``).
        output_dir, output_postfix, output_ext: as given to ``SavePredictiond`` (segmentation bundles).
        output_path: the single output file instead (classification bundles' ``_prob.json``).
        overwrite: replace existing targets whatever wrote them.
        hint: what to do instead, for the error message.
    """

    def __init__(self, images: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None,
                 output_postfix: str = "", output_ext: str = ".nii.gz", output_path: str | os.PathLike | None = None,
                 overwrite: Any = False, hint: str = SEG_HINT) -> None:
        # a list of files per entry (one per channel): LoadImaged records the first, which names the output
        self.images = [str(i[0] if isinstance(i, (list, tuple)) and i else i) for i in images]
        self.output_dir, self.output_postfix, self.output_ext = output_dir, output_postfix, output_ext
        self.output_path = output_path
        self.overwrite = as_bool(overwrite, "overwrite")
        self.hint = hint

    def targets(self) -> list[str]:
        """The files the run will write."""
        if self.output_path is not None:
            return [str(self.output_path)]
        return [prediction_target(i, self.output_dir or "", self.output_postfix, self.output_ext) for i in self.images]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        check_prediction_targets(self.targets(), self.overwrite, self.hint, inputs=self.images)
