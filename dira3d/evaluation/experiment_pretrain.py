"""``dira3d experiment``'s pretraining of the methods given as ``{pretrain: {...}}``: run once with
``bundles/dira_pretrain`` into ``<output_dir>/pretrain/<method>``, resumed or reused on a rerun, and
refused when the recorded settings (``settings.json``) differ from the config's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.files import FileContentError, read_json

__all__ = ["SETTINGS_NAME", "pretrain_method"]

SETTINGS_NAME = "settings.json"  # what a method's pretraining was made with (output_dir/pretrain/<method>/)


def pretrain_method(name: str, spec: Mapping[str, Any], config: Mapping[str, Any], log: Callable[[str], None] = print) -> str:
    """Pretrain one method of the grid with ``bundles/dira_pretrain``; returns its ``best.pt``, or its ``last.pt``
    when it has no ``best.pt`` (pretrained without validation: ``validation`` false, or visual words without
    validation words).

    Resumable twice over: a finished run (``done.json``) is skipped, an interrupted one resumes
    from its ``last.pt`` (the bundle's own resume).
    """
    from dira3d.engines.checkpoint import pretrained_checkpoint
    from dira3d.engines.command import BUNDLE_DIR
    from dira3d.utils.overrides import run_bundle

    out, settings = pretrain_settings(name, spec, config)
    check_pretrain_settings(name, out, settings)
    if (out / "done.json").is_file() and pretrained_checkpoint(out / "models").is_file():
        return str(pretrained_checkpoint(out / "models"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_NAME, json.dumps(settings, indent=1))
    log(f"experiment: pretraining {name!r} into {out}")
    overrides = settings["overrides"]
    run_bundle(settings["configs"], meta_file=str(BUNDLE_DIR / "configs" / "metadata.json"),  # null overrides kept
               logging_file=str(BUNDLE_DIR / "configs" / "logging.conf"), bundle_root=str(out),
               dataset_dir=settings["dataset_dir"], **overrides)
    atomic_write_text(out / "done.json", json.dumps({"method": name, "overrides": overrides}, default=str))
    return str(pretrained_checkpoint(out / "models"))


def pretrain_configs(section: Mapping[str, Any]) -> list[str]:
    """The pretraining config files of the ``pretrain`` section: paths, or names in the bundle's configs/."""
    from dira3d.engines.command import BUNDLE_DIR

    return [c if Path(c).is_absolute() else str(BUNDLE_DIR / "configs" / c) for c in section.get("configs", ["train.json"])]


def pretrain_settings(name: str, spec: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[Path, dict]:
    """``(folder, settings)`` of a method's pretraining: its config files, data and overrides (JSON values)."""
    section = config["pretrain"]
    configs = pretrain_configs(section)
    overrides = {**section.get("overrides", {}), **(spec.get("pretrain") or {})}
    settings = {"configs": configs, "dataset_dir": section["dataset_dir"], "overrides": overrides}
    return Path(config["output_dir"]) / "pretrain" / name, json.loads(json.dumps(settings, default=str))


def check_pretrain_settings(name: str, out: Path, settings: dict) -> None:
    """Refuse to reuse (or resume) a pretraining of ``name`` made with other settings: its
    ``best.pt`` and the fine-tuning rows built on it would be reported under the new settings."""
    if not (out / "done.json").is_file() and not any((out / "models").glob("*.pt")):
        return  # nothing was made with the recorded settings (e.g. a run that failed at its start)
    fix = (f"it records what method {name!r} was pretrained with; delete the folder {out} (and the method's rows "
           "in results.csv) to pretrain it again, or put the file back")
    if (out / SETTINGS_NAME).is_file():
        record = out / SETTINGS_NAME
        old = read_json(record, "pretraining settings", fix)
    elif (out / "done.json").is_file():  # a run from before settings.json: it recorded its overrides
        record = out / "done.json"
        old = {**settings, "overrides": read_json(record, "pretraining record", fix).get("overrides")}
    else:
        return
    if not isinstance(old.get("overrides") or {}, dict):
        raise FileContentError(record, f"pretraining record {record} holds overrides {old['overrides']!r}, not a "
                                       f"mapping; {fix}")
    if old != settings:
        changed = sorted(k for k in settings if old.get(k) != settings[k])
        if "overrides" in changed:
            before, now = old.get("overrides") or {}, settings["overrides"]
            changed.remove("overrides")
            changed += [f"overrides.{k}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        raise ValueError(f"method {name!r} was pretrained in {out} with other settings ({', '.join(changed)} changed); "
                         "its checkpoint and the results built on it would be reported under the new ones. Give the "
                         "method a new name or use another output_dir (or delete that folder and its rows in "
                         "results.csv to redo it)")
