"""The entries of a batch given to a task bundle's ``inference.json`` (``--datalist``): a list, or a JSON file of one
or a datalist whose ``"test"`` list holds them (:func:`batch_entries`, used by
:class:`~dira3d.evaluation.batch.InferenceBatch`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATALIST_KEY", "batch_entries"]

# the key of a datalist file's inputs (MONAI's decathlon datalists and `dira3d prepare`'s keep the test images there)
DATALIST_KEY = "test"
_FORMS = (f'--datalist takes a list of inputs [{{"image": path}}, ...] (on the command line or in a JSON file) or a '
          f'datalist JSON file whose "{DATALIST_KEY}" key lists them')


def batch_entries(datalist: Sequence[Mapping[str, Any]] | str | os.PathLike) -> list[Mapping[str, Any]]:
    """The entries of a batch: ``datalist`` as given (a list, relative paths as they are), or read from the JSON file it
    names (``--datalist path/to/file.json``): a list of inputs (``[{"image": path}, ...]`` or bare paths) or a MONAI
    decathlon-style datalist whose :data:`DATALIST_KEY` (``"test"``) list holds them. A file's relative ``image`` paths
    are resolved against its folder, as every datalist file's are (:func:`dira3d.data.datalist.datalist_entries`, as
    :func:`monai.data.load_decathlon_datalist`).

    Raises:
        FileNotFoundError: no such file.
        DatalistError: not JSON or neither form (one message naming the file and the forms taken), or entries that
            are not inputs: without an ``image``, or a number or an object in a list of bare paths (one message naming
            the file and each such entry).
        DataError: a list given as it is holds entries that are not objects or have no ``image`` (one message naming
            ``--datalist`` and each such entry; it stopped the batch with MONAI's tracebacks of a ``KeyError``).
    """
    from dira3d.data.datalist import DatalistError, datalist_entries

    if not isinstance(datalist, (str, os.PathLike)):
        return _listed(list(datalist))
    path = Path(datalist)
    if not str(datalist).strip() or not path.is_file():
        raise FileNotFoundError(f"datalist {str(datalist)!r} is not a file; {_FORMS}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(path, f"is not valid JSON ({err}); {_FORMS}") from err
    listed = isinstance(content, list)  # a list of inputs itself: its errors say so, not "bad 'test' entries"
    if listed:
        content = {DATALIST_KEY: content}
    elif not isinstance(content, dict) or DATALIST_KEY not in content:
        held = f"an object with keys {sorted(content)}" if isinstance(content, dict) else f"a JSON {type(content).__name__}"
        raise DatalistError(path, f"holds {held}; {_FORMS}")
    return datalist_entries(path, DATALIST_KEY, content=content, path_keys=("image",), detect_paths=False,
                            bare_list=listed)


def _listed(entries: list) -> list:
    """``entries`` given as a list, checked as a datalist file's are: each an object with an ``image``."""
    from dira3d.data.errors import DataError

    bad = [f"entry {i} ({entry!r}) " + ("is not an object" if not isinstance(entry, Mapping) else "has no 'image'")
           for i, entry in enumerate(entries) if not isinstance(entry, Mapping) or entry.get("image") is None]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(None, f"--datalist: {'; '.join(bad[:3])}{more}; {_FORMS}")
    return entries
