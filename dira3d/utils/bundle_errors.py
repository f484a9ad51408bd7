"""A bad file or setting under ``python -m monai.bundle run`` ends in one ``error:`` line, not MONAI's wrapped traceback.

MONAI evaluates every ``$`` expression of a bundle config inside ``eval`` and wraps what it raises in
``RuntimeError: Failed to evaluate ConfigExpression`` (or ``Failed to instantiate``): a garbled
``models/preprocessing.json`` read by ``$dira3d.evaluation.trained_spacing(@ckpt_dir)``, say, printed some 60 lines of
chained tracebacks ending with MONAI's line, not the file's. dira3d's errors about a user's file or setting already
name it and say what to do (:func:`user_error_in`: a :class:`~dira3d.data.errors.DataError`, a missing file, a file
an output would replace, an output folder another run holds or one that cannot be written), so the traceback adds
nothing.

:func:`install_bundle_error_hook` (registered when ``dira3d`` is imported, as the bundles' ``$import dira3d`` does)
sets a ``sys.excepthook`` that, in a ``python -m monai.bundle`` process only, prints such an error, found behind
MONAI's wrappers, as one line, ``error: <file>: <what to do>``; the process exits 1 as after any uncaught error. Any
other error, and every error in another program, keeps its traceback (the hook hands it to the one before it).
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["error_in_chain", "install_bundle_error_hook", "run_by_monai_bundle_command", "setting_error_in", "user_error_in"]


def run_by_monai_bundle_command() -> bool:
    """Whether this process is ``python -m monai.bundle ...`` (whose exit status a script tests)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__"


def user_error_in(err: BaseException | None) -> BaseException | None:
    """The first of dira3d's errors about a user's file or setting behind ``err`` (MONAI wraps them as causes), or None:
    a :class:`~dira3d.data.errors.DataError` (a file or setting that cannot be used, named), a ``FileNotFoundError``,
    a ``FileExistsError`` (an output that would replace a file dira3d did not write: ``--output_path notes.csv``),
    a :class:`~dira3d.utils.folder_lock.FolderInUseError` or a :class:`~dira3d.utils.atomic.FolderNotWritableError`."""
    from dira3d.data.errors import DataError
    from dira3d.utils.atomic import FolderNotWritableError
    from dira3d.utils.folder_lock import FolderInUseError

    return error_in_chain(err, (DataError, FileNotFoundError, FileExistsError, FolderInUseError, FolderNotWritableError))


def setting_error_in(err: BaseException) -> BaseException | None:
    """The bad path or setting (``ValueError`` / ``FileNotFoundError``, an output folder another run is
    writing to or one that cannot be written) behind MONAI's "Failed to instantiate ..." wrappers, or None:
    what a command prints as one ``error:`` line. Light (no torch, no MONAI): ``dira3d finetune`` prints its refusals
    with it before either is imported (also importable from :mod:`dira3d.engines.inputs`)."""
    from dira3d.utils.atomic import FolderNotWritableError
    from dira3d.utils.folder_lock import FolderInUseError

    return error_in_chain(err, (ValueError, FileNotFoundError, FolderInUseError, FolderNotWritableError))


def error_in_chain(err: BaseException | None, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first error of one of ``kinds`` in ``err``'s chain of causes and contexts (``err`` first; MONAI wraps
    transform and config errors), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kinds):
            return err
        err = err.__cause__ or err.__context__
    return None


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    cause = user_error_in(value) if run_by_monai_bundle_command() else None
    if cause is None:
        _previous_hook(kind, value, tb)
        return
    sys.stderr.flush()
    print(f"error: {cause}", file=sys.stderr, flush=True)


_previous_hook = sys.excepthook


def install_bundle_error_hook() -> None:
    """Set :func:`_excepthook` as ``sys.excepthook`` (once; the hook set before it handles every other error)."""
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
