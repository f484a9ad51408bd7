"""Reading the side files a command relies on (settings records, manifests, box lists, bundle
configs, dataset CSVs): a file that is empty, cut short, not UTF-8, or of the wrong JSON/YAML type
is one :class:`FileContentError` that names the file (with the line and column of a syntax error)
and says what to do, never a bare ``JSONDecodeError`` / ``UnicodeDecodeError`` / ``AttributeError``.

Torch-free (``dira3d.data`` uses it); YAML is imported only by :func:`read_yaml`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dira3d.data.errors import DataError

__all__ = ["FileContentError", "json_type", "read_json", "read_text", "read_yaml"]


class FileContentError(DataError):
    """A file whose content cannot be used; ``path`` names it. A :class:`~dira3d.data.errors.DataError`
    (so a ``ValueError``) whose message starts with what the file is and its path."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        super().__init__(None, message)
        self.path = Path(path)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: ``object``, ``array``, ``string``, ``number``, ``true``/``false``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    for kind, name in ((dict, "object"), ((list, tuple), "array"), (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _name(expect: type | tuple[type, ...]) -> str:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def read_text(path: str | os.PathLike, what: str, fix: str, encoding: str = "utf-8") -> str:
    """The text of ``path``, refusing bytes that are not UTF-8 with their line and byte offset.

    Args:
        path: the file (it must exist: callers say how to make a missing one).
        what: what the file is, for the message (``"experiment config"``).
        fix: what to do, appended to every message (``"fix it there"``).
        encoding: ``"utf-8"`` or ``"utf-8-sig"`` (a byte-order mark, as spreadsheets write, dropped).

    Raises:
        FileContentError: the bytes are not UTF-8.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise FileContentError(path, f"{what} {path} is not UTF-8 text (byte {data[err.start]:#04x} at line {line}, "
                                     f"byte offset {err.start}: saved in another encoding, or damaged); {fix}") from None


def _non_empty_text(path: Path, what: str, fix: str) -> str:
    """:func:`read_text`, refusing a file of nothing but white space."""
    text = read_text(path, what, fix)
    if not text.strip():
        raise FileContentError(path, f"{what} {path} is empty; {fix}")
    return text


def read_json(path: str | os.PathLike, what: str, fix: str,
              expect: type | tuple[type, ...] | None = dict) -> Any:
    """The JSON content of ``path``, checked to be of type ``expect``.

    Args:
        path: the file.
        what: what the file is, for the message (``"the experiment's run settings"``).
        fix: what to do, appended to every message: for a file dira3d wrote, how to recover
            (``"delete it and rerun the same command"``); for a user's file, where to fix it.
        expect: the type(s) the top-level value must have (``dict``: a JSON object); None: any.

    Raises:
        FileContentError: empty, not UTF-8, not valid JSON (line and column named; an error at the
            very end is called cut short), or a top-level value not of ``expect``.
    """
    path = Path(path)
    text = _non_empty_text(path, what, fix)
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        unclosed = err.msg.startswith("Unterminated string") and '"' not in text[err.pos + 1:]
        short = " (it ends before the JSON is complete: cut short?)" if unclosed or err.pos >= len(text.rstrip()) else ""
        raise FileContentError(path, f"{what} {path} is not valid JSON ({err.msg}: line {err.lineno} column "
                                     f"{err.colno}){short}; {fix}") from None
    if expect is not None and not isinstance(content, expect):
        raise FileContentError(path, f"{what} {path} holds a JSON {json_type(content)}, not {_name(expect)}; {fix}")
    return content


def read_yaml(path: str | os.PathLike, what: str, fix: str,
              expect: type | tuple[type, ...] | None = dict) -> Any:
    """The YAML (or JSON) content of ``path``, checked as :func:`read_json` does (an empty file is
    refused, a syntax error named with its line and column)."""
    import yaml

    path = Path(path)
    text = _non_empty_text(path, what, fix)
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f": line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise FileContentError(path, f"{what} {path} is not valid YAML ({problem}{where}); {fix}") from None
    if expect is not None and not isinstance(content, expect):
        found = {"object": "mapping", "array": "list"}.get(json_type(content), json_type(content))
        wanted = _name(expect).replace("an object", "a mapping").replace("an array", "a list")
        raise FileContentError(path, f"{what} {path} holds a YAML {found}, not {wanted}; {fix}")
    return content
