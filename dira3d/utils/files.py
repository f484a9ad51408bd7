"""Reading the side files a command relies on (settings records, manifests, box lists, bundle
configs, dataset CSVs): a file that is empty, cut short, not UTF-8, or of the wrong JSON/YAML type
is one :class:`FileContentError` that names the file (with the line and column of a syntax error)
and says what to do, never a bare ``JSONDecodeError`` / ``UnicodeDecodeError`` / ``AttributeError``.
A key written twice in one mapping (two ``seeds:`` lines) is refused too: both parsers would keep the
last value without a word.

Torch-free (``dira3d.data`` uses it); YAML is imported only by :func:`read_yaml`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from dira3d.data.errors import DataError

__all__ = ["FileContentError", "json_type", "looks_like_dicom", "read_json", "read_text", "read_yaml", "same_or_moved", "moved_note"]


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


class _DuplicateKey(ValueError):
    """A JSON object with a key twice (raised from the parser's ``object_pairs_hook``)."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`read_json`: the object, or a :class:`_DuplicateKey` naming the key
    (and the object's first keys, to find it by)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        key = next(k for i, k in enumerate(keys) if k in keys[:i])
        shown = repr(keys[:8])[:-1] + (", ...]" if len(keys) > 8 else "]")
        raise _DuplicateKey(f"has an object with the key {key!r} twice (keys {shown}; JSON keeps only the last value)")
    return obj


def read_json(path: str | os.PathLike, what: str, fix: str,
              expect: type | tuple[type, ...] | None = dict, unique_keys: bool = True) -> Any:
    """The JSON content of ``path``, checked to be of type ``expect``.

    Args:
        path: the file.
        what: what the file is, for the message (``"the experiment's run settings"``).
        fix: what to do, appended to every message: for a file dira3d wrote, how to recover
            (``"delete it and rerun the same command"``); for a user's file, where to fix it.
        expect: the type(s) the top-level value must have (``dict``: a JSON object); None: any.
        unique_keys: refuse an object with a key twice; False for files that another reader takes as
            they are (MONAI bundle configs and metadata, where the last value wins).

    Raises:
        FileContentError: empty, not UTF-8, not valid JSON (line and column named; an error at the
            very end is called cut short), a key twice in one object (with ``unique_keys``), or a
            top-level value not of ``expect``.
    """
    path = Path(path)
    text = _non_empty_text(path, what, fix)
    try:
        content = json.loads(text, object_pairs_hook=_unique_pairs if unique_keys else None)
    except _DuplicateKey as err:
        raise FileContentError(path, f"{what} {path} {err}: remove one of them; {fix}") from None
    except json.JSONDecodeError as err:
        unclosed = err.msg.startswith("Unterminated string") and '"' not in text[err.pos + 1:]
        short = " (it ends before the JSON is complete: cut short?)" if unclosed or err.pos >= len(text.rstrip()) else ""
        raise FileContentError(path, f"{what} {path} is not valid JSON ({err.msg}: line {err.lineno} column "
                                     f"{err.colno}){short}; {fix}") from None
    if expect is not None and not isinstance(content, expect):
        raise FileContentError(path, f"{what} {path} holds a JSON {json_type(content)}, not {_name(expect)}; {fix}")
    return content


@functools.lru_cache(maxsize=None)
def _unique_key_loader() -> tuple[type, type]:
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping, at any depth, and its error.

    It loads everything else as ``yaml.safe_load`` does. The check runs in ``flatten_mapping``, which
    ``construct_mapping`` calls first on every mapping: merge keys (``<<: *base``) are resolved there by
    splicing the merged pairs into the node, and a mapping can be spliced (as another's ``<<``) before it
    is constructed itself, so only the pairs seen on a mapping's first flattening are the ones written.
    Keys merged in and then written again are the merge's purpose, not duplicates.
    """
    import yaml

    class DuplicateKeyError(yaml.constructor.ConstructorError):
        def __init__(self, key: str, first: int, second: int) -> None:
            super().__init__(None, None, f"the key {key!r} is written twice, at lines {first} and {second}")
            self.key, self.lines = key, (first, second)

    class UniqueKeyLoader(yaml.SafeLoader):
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._written: set[int] = set()  # mapping nodes whose own keys are checked

        def flatten_mapping(self, node: Any) -> None:
            if id(node) not in self._written:
                self._written.add(id(node))
                lines: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # a sequence or mapping as a key is refused by the constructor itself
                    # "=" (a value key) is read as the string "=" once flattened; it has no constructor before
                    key = key_node.value if key_node.tag == "tag:yaml.org,2002:value" else self.construct_object(key_node)
                    line = key_node.start_mark.line + 1
                    if key in lines:  # by value, as the dict would merge them: 1 and 1.0, yes and true
                        raise DuplicateKeyError(key_node.value, lines[key], line)
                    lines[key] = line
            super().flatten_mapping(node)

    return UniqueKeyLoader, DuplicateKeyError


def read_yaml(path: str | os.PathLike, what: str, fix: str,
              expect: type | tuple[type, ...] | None = dict, unique_keys: bool = True) -> Any:
    """The YAML (or JSON) content of ``path``, checked as :func:`read_json` does (an empty file is
    refused, a syntax error named with its line and column, a key written twice in one mapping at any
    depth named with both lines; ``unique_keys=False``: taken as ``yaml.safe_load`` takes it, the last
    value winning)."""
    import yaml

    path = Path(path)
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"  # the user's word for the file (JSON is YAML too)
    text = _non_empty_text(path, what, fix)
    loader, duplicate = _unique_key_loader() if unique_keys else (yaml.SafeLoader, ())  # (): catches nothing
    try:
        content = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except duplicate as err:
        raise FileContentError(path, f"{what} {path} has the key {err.key!r} twice, at lines {err.lines[0]} and "
                                     f"{err.lines[1]} ({kind} keeps only the last value): remove one of them; {fix}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f": line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise FileContentError(path, f"{what} {path} is not valid {kind} ({problem}{where}); {fix}") from None
    if expect is not None and not isinstance(content, expect):
        found = {"object": "mapping", "array": "list"}.get(json_type(content), json_type(content))
        wanted = _name(expect).replace("an object", "a mapping").replace("an array", "a list")
        raise FileContentError(path, f"{what} {path} holds a {kind} {found}, not {wanted}; {fix}")
    return content


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble; old ones often end in .dcm/.ima."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".ima", ".dicom"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def same_or_moved(recorded: Any, now: Any, base_now: str | os.PathLike, base_then: Any = None) -> bool:
    """Whether the absolute path ``recorded`` in a record kept in (or under) the folder ``base_now`` names the path
    ``now``, the folders holding both having been moved or copied together since (``mv project_A project_B``, an
    rsync to another machine): the same path, or the same path relative to the record's folder. ``base_then``, where
    known, is where that folder was when the record was written (e.g. an experiment's output_dir, from a results.csv
    row's run_dir); otherwise ``recorded`` must end with the part of ``now`` below the folder it shares with
    ``base_now`` (``/A/prepared`` for ``/B/prepared`` seen from ``/B/runs/exp``). A record that named ``/A/...``
    is then read as ``/B/...`` and nothing is read from ``/A``, even where ``/A`` is still there.
    """
    if recorded == now:
        return True
    if not isinstance(recorded, str) or not isinstance(now, str) or not recorded or not now:
        return False
    rec, cur, base = (Path(os.path.normpath(os.path.abspath(p))) for p in (recorded, now, base_now))
    if not Path(recorded).is_absolute():
        return False
    if base_then is not None and str(base_then):
        then = os.path.normpath(os.path.join(os.path.abspath(str(base_then)), os.path.relpath(cur, base)))
        return Path(then) == rec
    try:
        tail = cur.relative_to(os.path.commonpath([cur, base])).parts
    except ValueError:  # another drive (Windows)
        return False
    return bool(tail) and len(rec.parts) > len(tail) and rec.parts[-len(tail):] == tail


def moved_note(places: list[tuple[str, Any, Any]], other: str | None, record_fix: str) -> str:
    """The part of a refusal that names where a data path it compared was recorded and where it is now (``places``:
    ``(setting, recorded, now)``, e.g. a ``dataset_dir`` moved alone: ``mv prepared /fast/prepared``), then what the
    record tells: ``other`` (which checksum differs, and where it is recorded): other data; None: the record holds no
    checksum of the data (an earlier dira3d wrote it), so a user who knows it is the same data moved there is told to
    write the new place into ``record_fix`` (``"dataset_dir of /runs/exp/pretrain/dira/settings.json"``). It ends
    with ``"; "`` or ``"otherwise "``, for the refusal's way on (a new output folder, ...) to follow."""
    said = ", ".join(f"{key} was {then}, now {now}" for key, then, now in places)
    if other is not None:
        return f"{said}, whose data are not the ones recorded ({other}); "
    return (f"{said}: if that is the same data moved there, the record (made before dira3d recorded checksums of the "
            f"data) cannot tell; write the new place into {record_fix} to go on with it; otherwise ")
