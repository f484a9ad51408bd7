"""Bundle overrides from the command line: their values parsed, their ids checked against the
configs they override (MONAI adds an unknown id silently)."""

from __future__ import annotations

import ast
import difflib
import json
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dira3d.utils.files import read_json, read_yaml

__all__ = ["parse_value", "as_bool", "check_true_false", "shell_word", "override_text", "format_overrides", "check_overrides", "did_you_mean", "keep_disabled_switches", "run_bundle"]


def parse_value(text: str) -> Any:
    """A command-line override value: JSON when it parses (``0.125``, ``[64,64,32]``, ``null``), else a
    Python literal (``False``, ``None``, ``[{'name': 'res', 'losses': ['res']}]``, as ``python -m
    monai.bundle run --<id>`` reads it), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def shell_word(text: str) -> str:
    """``text`` as one word of a command the user pastes: as it is when it needs no quotes (``width=0.125``), in double
    quotes when they keep it whole (``"roi_size=[64,64]"``, ``"['a.json','b.json']"``, as the docs write them), else
    in single quotes (:func:`shlex.quote`). An unquoted ``[...]`` is a glob: zsh stops with "no matches found", bash
    turns it into a file name that matches."""
    quoted = shlex.quote(text)
    if quoted == text or any(c in text for c in '"$`\\!'):
        return quoted
    return f'"{text}"'


def override_text(value: Any) -> str:
    """A setting's value as a command line writes it (before quoting): a string as it is, else compact JSON
    (``[64,64]``, ``0.125``, ``null``), which :func:`parse_value` reads back."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def format_overrides(settings: Mapping[str, Any], option: str = "--override") -> str:
    """``{"backbone": "resnet10", "roi_size": [64, 64]}`` → ``--override backbone=resnet10 --override "roi_size=[64,64]"``
    (``option="--set"`` for ``dira3d finetune``): each ``id=value`` one shell word, quoted when it needs it."""
    return " ".join(f"{option} {shell_word(f'{key}={override_text(value)}')}" for key, value in settings.items())


def as_bool(value: Any, name: str) -> bool:
    """A boolean setting; the strings true/false (any case, as a command line may pass them) too.
    ``bool("False")`` is True: a string must not switch a setting on by being non-empty.

    Raises:
        DataError: other text (a ``ValueError``, naming the setting: one ``error:`` line under ``python -m monai.bundle
            run``, whose bundles read ``validation`` and ``resume`` with it, not MONAI's traceback).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no", "none", "null", ""):
            return False
        from dira3d.data.errors import DataError

        raise DataError(None, f"{name}={value!r} is not a boolean; set {name} to true or false")
    return bool(value)


def check_true_false(**settings: Any) -> None:
    """Refuse text for true/false settings (``name=value``) that are read as Python truth values, naming the first.

    ``python -m monai.bundle run --channels_last maybe`` (or ``--pin_memory false``: the command line hands
    ``false`` on as text) ran with the setting on, as any non-empty text is true; ``True`` and ``False`` are read as
    true and false. The pretraining bundle calls it in ``initialize``, before any data are read (``dira3d pretrain
    --override`` refuses such text earlier, :func:`check_overrides`).

    Raises:
        DataError: naming the setting, its value and what to give.
    """
    from dira3d.data.errors import DataError

    for name, value in settings.items():
        if isinstance(value, str):
            raise DataError(None, f"{name}={value!r} is text, but the setting is true or false; give true or false "
                            f"(python -m monai.bundle run: --{name} True or --{name} False)")


def check_overrides(configs: Iterable[str | os.PathLike], overrides: Mapping[str, Any], where: str = "override") -> None:
    """Refuse override ids (``#``-nested too) that no config in ``configs`` defines.

    A typo (``max_epoch``) would otherwise train with the default.

    Args:
        configs: the bundle config files the overrides apply to (missing files are left out).
        overrides: ``{id: value}``.
        where: how the overrides are named in the error (e.g. ``"--override"``).

    Raises:
        ValueError: names every unknown id, the closest defined one, and the config files; or a config
            that is not a JSON (YAML) mapping, named with the line of its error.
    """
    from monai.bundle import ConfigParser

    files = [Path(c) for c in configs if Path(c).is_file()]
    for file in files:  # MONAI's own reading names no file: a hand-edited config's slip would be a bare JSONDecodeError
        read = read_yaml if file.suffix.lower() in (".yaml", ".yml") else read_json
        # unique_keys=False: MONAI reads the config itself (the last of a repeated id wins); this reading only
        # names the file of a syntax error, it does not add rules of its own
        read(file, "bundle config", "fix it there (a bundle config is one mapping of setting ids to values)", unique_keys=False)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    unknown = [key for key in overrides if key not in parser]
    if unknown:
        hints = did_you_mean(unknown, list(parser.config))
        folder = files[0].parent.parent if files else "the bundle"
        raise ValueError(f"{where}: no setting {hints} in {', '.join(f.name for f in files)} of {folder}; fix or remove it")
    for key, value in overrides.items():
        words = NUMBER_OR_WORD.get(key, ())
        default, name, shown = parser.get(key), key.rpartition("#")[2], None
        if isinstance(default, str) and default.startswith("$") and name in EXPRESSION_DEFAULTS:
            default, shown = EXPRESSION_DEFAULTS[name]
        if isinstance(default, bool) and name in BOOL_OR_TEXT:
            continue
        if isinstance(default, bool) and name in TEXT_AS_BOOL and str(value).strip().lower() in _BOOL_WORDS:
            continue
        problem = "" if value in words else _type_mismatch(default, value, shown)
        if problem and words:
            problem += f" or {' or '.join(map(repr, words))}"
        if problem:
            raise ValueError(f"{where}: {key}={value!r} {problem}; fix the value")


# number settings that also take these words (the fine-tuning bundles' `holdout`: a share, or the datalist's own
# 'validation' list, dira3d.evaluation.load_split)
NUMBER_OR_WORD = {"holdout": ("validation",)}
# true/false settings that also take text: `compile` (a backend name), `amp` (the task bundles' tiny.json sets it
# false; dira_pretrain's takes 'none', 'bf16', 'fp16')
BOOL_OR_TEXT = ("compile", "amp")
# true/false settings read with as_bool, which takes its words as text too (`resume=no`); any other true/false
# setting takes text as true (bool('no') is True), so text is refused there
TEXT_AS_BOOL = ("resume", "validation", "overwrite", "tiny")
_BOOL_WORDS = ("true", "false", "1", "0", "yes", "no", "none", "null", "")
# settings whose default is an expression, which shows no kind: a value of the kind each takes, and its default in
# words (`pin_memory=maybe` ran with pinned memory, as any non-empty text is true; `num_classes=abc` and
# `distortion_args=abc` failed in MONAI's traceback, naming no setting)
EXPRESSION_DEFAULTS = {"pin_memory": (False, "true on a GPU"),
                       "num_classes": (1, "one class per training volume"),
                       "distortion_args": ({}, "the distortion's settings for the patch size")}


def _type_mismatch(default: Any, value: Any, shown: str | None = None) -> str:
    """Why ``value`` cannot replace a setting whose default is ``default`` ('' when it can; ``shown``: the default
    in words, for a setting whose default is an expression, :data:`EXPRESSION_DEFAULTS`).

    Only the plain case is judged: a number replaced by text that is not a ``$`` expression or an
    ``@`` reference (``max_epochs=two`` would otherwise fail deep inside the run, as a TypeError
    wrapped in MONAI's "Failed to evaluate ConfigExpression"); a true/false setting replaced by text
    (``channels_last=maybe`` or ``=no`` switched it on, as any non-empty text is true; the caller leaves out
    :data:`BOOL_OR_TEXT`, which take text too, and :data:`TEXT_AS_BOOL`'s words); a list replaced by text
    (``patch_size=abc`` failed in MONAI's traceback, ``intensity_range=abc`` with ``could not convert string
    to float: 'a'``, naming no setting); a mapping replaced by anything but a mapping or null
    (``distortion_args=abc``, ``=[1,2]``).
    """
    if isinstance(value, str) and value.startswith(("$", "@", "%")):
        return ""
    if isinstance(default, dict) and "_target_" not in default:  # a component may be replaced by what builds one
        if value is None or isinstance(value, Mapping):
            return ""
        kind = ("text" if isinstance(value, str) else "true or false" if isinstance(value, bool)
                else "a list" if isinstance(value, list) else "a number" if isinstance(value, (int, float)) else "not a mapping")
        return (f"is {kind}, but the setting is a mapping of names to values, e.g. {{'sigma': 4.0}} "
                f"(default {shown or json.dumps(default)})")
    if isinstance(default, list) and isinstance(value, (int, float)):  # patch_size=32: a bare "has no len()" TypeError
        shown = shown or json.dumps(default)
        return "is a number, but the setting is a list" + (f" (default {shown})" if len(shown) <= 60 else "")
    if not isinstance(value, str):
        return ""
    if isinstance(default, bool):
        return f"is text, but the setting is true or false (default {shown or str(default).lower()})"
    if isinstance(default, (int, float)):
        return f"is text, but the setting is a number (default {shown or repr(default)})"
    if isinstance(default, list):
        shown = shown or json.dumps(default)
        return "is text, but the setting is a list" + (f" (default {shown})" if len(shown) <= 60 else "")
    return ""


def did_you_mean(unknown: Iterable[Any], known: Iterable[str]) -> str:
    """``'max_epoch' (did you mean 'max_epochs'?); 'xyz'``: each unknown name with its closest known one."""
    known = list(known)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(str(name), known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(hints)


def keep_disabled_switches(configs: Iterable[str | os.PathLike], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with the ``_disabled_`` switch of each component that an override replaces whole put back.

    An override of a whole component (a mapping with ``_target_``, e.g. ``validate#dataset``) replaces the
    component's switch too, and MONAI builds every item a disabled one refers to: with ``validation`` false the
    pretraining bundle's ``validate#dataset`` is off only by its own ``_disabled_``, so a replacement without one
    was built, reading the validation data that the run was told not to use (a ``dira3d visual-words`` output
    without validation words stopped the run). The replaced component's switch is kept unless the override sets
    its own (``"_disabled_": false`` builds it always).

    Args:
        configs: the bundle config files, merged as MONAI merges them (later files win).
        overrides: ``{id: value}`` as given to the run.
    """
    from monai.bundle import ConfigParser

    replaced = {key: value for key, value in overrides.items()
                if isinstance(value, Mapping) and "_target_" in value and "_disabled_" not in value}
    if not replaced:
        return dict(overrides)
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    kept = dict(overrides)
    for key, value in replaced.items():
        original = parser.get(key) if key in parser else None
        if isinstance(original, Mapping) and "_disabled_" in original:
            kept[key] = {**value, "_disabled_": original["_disabled_"]}
    return kept


def run_bundle(config_file: Iterable[str | os.PathLike], meta_file: str | os.PathLike,
               logging_file: str | os.PathLike | None = None, **overrides: Any) -> None:
    """Run a bundle as ``monai.bundle.run`` does (initialize, run, finalize) with ``overrides`` applied.

    Unlike ``monai.bundle.run``, which drops every override whose value is ``None``, a ``None``
    value here sets the id to null: ``views=None`` (identity views) or ``intensity_range=None``
    take effect instead of silently keeping the default. An override that replaces a whole component
    keeps its ``_disabled_`` switch (:func:`keep_disabled_switches`).
    """
    import logging

    from monai.bundle import ConfigWorkflow

    from dira3d.utils.interrupts import quiet_interrupt_logs

    config_file = [str(c) for c in config_file]
    overrides = keep_disabled_switches(config_file, overrides)
    workflow = ConfigWorkflow(config_file=config_file, meta_file=str(meta_file),
                              logging_file=None if logging_file is None else str(logging_file), **overrides)
    workflow.initialize()
    logging.getLogger("dira3d.bundle").info("bundle %s with overrides %s",
                                            [Path(c).name for c in config_file], dict(overrides) or "none")
    with quiet_interrupt_logs():  # Ctrl-C: the caller prints how to go on, not MONAI's traceback
        workflow.run()
    workflow.finalize()
