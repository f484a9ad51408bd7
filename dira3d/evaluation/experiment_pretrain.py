"""``dira3d experiment``'s pretraining of the methods given as ``{pretrain: {...}}``: run once with
``bundles/dira_pretrain`` into ``<output_dir>/pretrain/<method>``, resumed or reused on a rerun, and
refused when the recorded settings (``settings.json``) differ from the config's, and, before any run, when it
would build another network than the fine-tuning bundle loads (:func:`pretrain_fit_mismatch`), and, once pretrained,
when it never reached one of its stages (:func:`check_stages_ran`: ``until_iteration`` bounds, which need the run's
epoch length).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import pydoc
from pathlib import Path
from typing import Any, Callable, Mapping

from dira3d.utils.atomic import atomic_write_text
from dira3d.utils.files import FileContentError, moved_note, read_json, same_or_moved

__all__ = ["SETTINGS_NAME", "pretrain_method", "pretrain_fit_mismatch", "check_pretrainings_unchanged", "check_stages_ran"]

SETTINGS_NAME = "settings.json"  # what a method's pretraining was made with (output_dir/pretrain/<method>/)
DATA_FILES = "dataset_files"  # settings.json: the sha256 of each JSON file in dataset_dir (from 2026-11-28)
DATALIST_SHA256 = "datalist_sha256"  # settings.json: that of overrides.datalist (from 2026-11-28)


def pretrain_method(name: str, spec: Mapping[str, Any], config: Mapping[str, Any], log: Callable[[str], None] = print) -> str:
    """Pretrain one method of the grid with ``bundles/dira_pretrain``; returns its ``best.pt``, or its ``last.pt``
    when it has no ``best.pt`` (pretrained without validation: ``validation`` false, or visual words without
    validation words).

    Resumable twice over: a finished run (``done.json``) is skipped, an interrupted one resumes
    from its ``last.pt`` (the bundle's own resume).
    """
    from dira3d.engines.checkpoint import pretrained_checkpoint
    from dira3d.engines.command import BUNDLE_DIR
    from dira3d.evaluation.experiment_method_checks import check_pretrain_datalist
    from dira3d.utils.overrides import run_bundle

    out, settings = pretrain_settings(name, spec, config)
    check_pretrain_settings(name, out, settings)
    if (out / "done.json").is_file() and pretrained_checkpoint(out / "models").is_file():
        check_stages_ran(name, out, settings)
        return str(pretrained_checkpoint(out / "models"))
    out.mkdir(parents=True, exist_ok=True)
    overrides = settings["overrides"]
    datalist_sum = _sha256(overrides["datalist"]) if isinstance(overrides.get("datalist"), str) else ""
    record = {**_recorded(settings), DATA_FILES: dataset_files(settings["dataset_dir"]),
              **({DATALIST_SHA256: datalist_sum} if datalist_sum else {})}  # what tells the data moved from other data
    atomic_write_text(out / SETTINGS_NAME, json.dumps(record, indent=1))
    log(f"experiment: pretraining {name!r} into {out}")
    try:
        run_bundle(settings["configs"], meta_file=str(BUNDLE_DIR / "configs" / "metadata.json"),  # null overrides kept
                   logging_file=str(BUNDLE_DIR / "configs" / "logging.conf"), bundle_root=str(out),
                   dataset_dir=settings["dataset_dir"], **overrides)
    except Exception as err:  # the bundle's 'datalist ... does not exist' (in MONAI's RuntimeError) names no setting
        check_pretrain_datalist(name, settings["configs"], overrides, settings["dataset_dir"], "the experiment config",
                                cause=err)
        raise
    check_stages_ran(name, out, settings)  # before done.json: a rerun checks again instead of reusing it
    atomic_write_text(out / "done.json", json.dumps({"method": name, "overrides": overrides}, default=str))
    return str(pretrained_checkpoint(out / "models"))


def check_stages_ran(name: str, out: Path, settings: Mapping[str, Any]) -> None:
    """Refuse a method's pretraining that ended before one of its stages (one bounded by ``until_iteration``, which
    the check before any run cannot judge): its ``last.pt`` gives the iterations per epoch
    (:func:`dira3d.evaluation.experiment_method_checks.check_pretrain_run`)."""
    import torch

    from dira3d.evaluation.experiment_method_checks import check_pretrain_run

    try:  # memory-mapped: only the trainer's record is read
        epoch_length = int(torch.load(out / "models" / "last.pt", map_location="cpu", weights_only=True,
                                      mmap=True)["trainer"]["epoch_length"])
    except Exception:  # noqa: BLE001 - no last.pt (or one without the record): nothing to judge by
        return
    check_pretrain_run(name, [Path(c) for c in settings["configs"]], settings["overrides"], "the experiment config",
                       epoch_length=epoch_length, folder=out)


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


def _recorded(settings: Mapping[str, Any]) -> dict:
    """``settings`` as ``settings.json`` holds and compares them: a config file of ``bundles/dira_pretrain`` by its
    name (``train.json``), as the experiment config names it, since the bundle's folder is where dira3d is installed:
    a record of its absolute path refused every rerun from another checkout or environment of the same dira3d
    ('configs changed'; an upgrade of the bundle is warned of by ``experiment.json``'s ``versions``)."""
    def name(config: Any) -> Any:
        path = Path(str(config))
        return path.name if (path.parent.name, path.parent.parent.name) == ("configs", "dira_pretrain") else config

    configs = settings.get("configs")
    return {**settings, "configs": [name(c) for c in configs] if isinstance(configs, list) else configs}


def dataset_files(folder: Any) -> dict[str, str]:
    """``{name: sha256}`` of the JSON files directly in ``folder`` (its datalists; a visual-word folder's
    ``manifest.json`` and ``visual_words.json``), recorded in ``settings.json``: what tells the same prepared data moved
    alone to another place (``mv prepared /fast/prepared``) from other data there. Empty where none can be read."""
    try:
        paths = sorted(Path(str(folder)).glob("*.json"))
    except OSError:
        return {}
    files = {path.name: _sha256(path) for path in paths}
    return {} if not all(files.values()) else files


def _sha256(path: Any) -> str:
    """The sha256 of a file's content; '' where it is no readable file."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return ""


def check_pretrain_settings(name: str, out: Path, settings: dict) -> None:
    """Refuse to reuse (or resume) a pretraining of ``name`` made with other settings: its
    ``best.pt`` and the fine-tuning rows built on it would be reported under the new settings."""
    changed, note = _compared(name, out, settings, f"dataset_dir of {out / SETTINGS_NAME}")
    if changed:
        raise ValueError(f"method {name!r} was pretrained in {out} with other settings ({', '.join(changed)} changed); "
                         f"{note}{_REDO}")


_REDO = ("its checkpoint and the results built on it would be reported under the new ones. Give the method a new name or "
         "use another output_dir (or delete that folder and its rows in results.csv to redo it)")


def check_pretrainings_unchanged(config: Mapping[str, Any]) -> None:
    """:func:`check_pretrain_settings` for every method the experiment pretrains, refused naming all those whose
    settings changed: a setting of the ``pretrain`` section (e.g. its ``max_epochs``) changes every method's, and
    the error named the first one, so each fix (a new name, or its folder deleted) met the next error."""
    changes, notes = {}, {}
    for method, spec in config["methods"].items():
        if isinstance(spec, Mapping):
            out, settings = pretrain_settings(method, spec, config)
            changed, note = _compared(method, out, settings, f"dataset_dir of {SETTINGS_NAME} in each method's folder")
            if changed:
                changes[method] = (out, changed)
                notes[note] = None  # the same for every method pretrained on the moved dataset_dir: said once
    if len(changes) == 1:
        method, (out, changed) = next(iter(changes.items()))
        check_pretrain_settings(method, out, pretrain_settings(method, config["methods"][method], config)[1])
    if changes:
        listed = "; ".join(f"{method!r} in {out} ({', '.join(changed)} changed)" for method, (out, changed) in changes.items())
        raise ValueError(f"methods {', '.join(map(repr, changes))} were pretrained with other settings: {listed}; "
                         + "".join(notes)
                         + _REDO.replace("its checkpoint", "their checkpoints").replace("built on it", "built on them")
                         .replace("the method", "each method")
                         .replace("that folder and its rows in results.csv to redo it",
                                  "those folders and their rows in results.csv to redo them"))


def pretrain_settings_changed(name: str, out: Path, settings: dict) -> list[str]:
    """The settings of method ``name``'s pretraining in ``out`` that differ from ``settings`` (``overrides.max_epochs``);
    empty when they agree or nothing was pretrained there yet. Raises FileContentError for a damaged record."""
    return _compared(name, out, settings, f"dataset_dir of {out / SETTINGS_NAME}")[0]


def _compared(name: str, out: Path, settings: dict, record_fix: str) -> tuple[list[str], str]:
    """:func:`pretrain_settings_changed`, and a note naming the recorded and the new place of a ``dataset_dir`` or
    datalist that changed, and whether its data are the pretraining's (``record_fix``: where a user who knows it is
    the same data, moved, writes the new place, for a record of before :data:`DATA_FILES`)."""
    if not (out / "done.json").is_file() and not any((out / "models").glob("*.pt")):
        return [], ""  # nothing was made with the recorded settings (e.g. a run that failed at its start)
    fix = (f"it records what method {name!r} was pretrained with; delete the folder {out} (and the method's rows "
           "in results.csv) to pretrain it again, or put the file back")
    if (out / SETTINGS_NAME).is_file():
        record = out / SETTINGS_NAME
        old = read_json(record, "pretraining settings", fix)
    elif (out / "done.json").is_file():  # a run from before settings.json: it recorded its overrides
        record = out / "done.json"
        old = {**settings, "overrides": read_json(record, "pretraining record", fix).get("overrides")}
    else:
        return [], ""
    if not isinstance(old.get("overrides") or {}, dict):
        raise FileContentError(record, f"pretraining record {record} holds overrides {old['overrides']!r}, not a "
                                       f"mapping; {fix}")
    files, datalist_sum = old.pop(DATA_FILES, None), old.pop(DATALIST_SHA256, None)
    old, settings = _recorded(old), _recorded(settings)
    before, now = (old.get("overrides") or {}).get("datalist"), settings["overrides"].get("datalist")
    if isinstance(before, str) and isinstance(now, str) and not Path(before).is_absolute() and Path(now).is_absolute():
        tail = tuple(part for part in Path(before).parts if part not in (".", ".."))  # read from the working folder
        if tail and Path(now).parts[-len(tail):] == tail:  # until 2026-11-28; from the config's folder now
            old = {**old, "overrides": {**old["overrides"], "datalist": now}}
    moved = before != now and same_or_moved(before, now, out)  # recorded before the output_dir was moved (with the
    # data: mv project_A project_B); or moved alone (mv prepared /fast/prepared): its content, recorded, the same
    if moved or before != now and isinstance(now, str) and isinstance(datalist_sum, str) and _sha256(now) == datalist_sum:
        old = {**old, "overrides": {**old["overrides"], "datalist": now}}
    data_then, data_now = old.get("dataset_dir"), settings["dataset_dir"]
    now_files = dataset_files(data_now) if data_then != data_now and isinstance(files, dict) and files else {}
    if same_or_moved(data_then, data_now, out) or _holds_recorded(now_files, files):  # moved with the output_dir, or
        old = {**old, "dataset_dir": data_now}  # alone: the same JSON files (datalists, manifest), the same data
    again = _prepared_again(old, settings, files, datalist_sum)
    if old == settings and not again:
        return [], ""
    changed = sorted(k for k in settings if old.get(k) != settings[k])
    if "overrides" in changed:
        before, now = old.get("overrides") or {}, settings["overrides"]
        changed.remove("overrides")
        changed += [f"overrides.{k}" for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    changed += [f"the data of {key}" for key in again]
    said = "".join(f"{key} {place} holds other data than recorded ({names} not the same: sha256 in "
                   f"{SETTINGS_NAME}; prepared again there?); " for key, (place, names) in again.items())
    return changed, _data_note(old, settings, changed, (files, now_files, datalist_sum), record_fix) + said


def _holds_recorded(now_files: Mapping[str, str], files: Any) -> bool:
    """Whether a folder's JSON files (``now_files``, :func:`dataset_files`) hold every recorded one unchanged: a file
    added beside them (``prepared.json`` of a later ``dira3d prepare`` rerun) is no other data, as in
    :func:`_prepared_again`."""
    return bool(now_files) and isinstance(files, dict) and all(now_files.get(k) == v for k, v in files.items())


def _prepared_again(old: Mapping[str, Any], settings: Mapping[str, Any], files: Any, datalist_sum: Any) -> dict:
    """``{setting: (place, files that differ)}`` for a ``dataset_dir`` (or ``overrides.datalist``) at the recorded
    place (or moved with the output_dir) whose JSON files are no longer those recorded (:data:`DATA_FILES`,
    :data:`DATALIST_SHA256`): ``dira3d prepare ... --dst`` rerun on other data into the same folder, a visual-word folder
    rebuilt. A record without them (before 2026-11-28) is not compared, nor a datalist that is gone (a finished
    pretraining needs no data); a JSON file added beside the recorded ones is no other data."""
    found = {}
    folder = settings["dataset_dir"]
    if isinstance(files, dict) and files and old.get("dataset_dir") == folder:
        differ = [name + ("" if (Path(str(folder)) / name).is_file() else " (gone)") for name, digest in sorted(files.items())
                  if _sha256(Path(str(folder)) / name) != digest]
        if differ:
            found["dataset_dir"] = (folder, f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}")
    now = settings["overrides"].get("datalist")
    if (isinstance(datalist_sum, str) and isinstance(now, str) and (old.get("overrides") or {}).get("datalist") == now
            and Path(now).is_file() and _sha256(now) != datalist_sum):
        found["overrides.datalist"] = (now, "its content")
    return found


def _data_note(old: Mapping[str, Any], settings: Mapping[str, Any], changed: list[str], sums: tuple,
               record_fix: str) -> str:
    """What a changed ``dataset_dir`` (and ``overrides.datalist``) was and is, and whether the recorded checksums
    (``sums``: :data:`DATA_FILES` as recorded and now, :data:`DATALIST_SHA256` as recorded; None before them) tell other
    data from the same data moved (:func:`~dira3d.utils.files.moved_note`); '' when neither changed."""
    files, now_files, datalist_sum = sums
    places, other = [], []
    if "dataset_dir" in changed and old.get("dataset_dir") is not None:
        places.append(("dataset_dir", old["dataset_dir"], settings["dataset_dir"]))
        if isinstance(files, dict) and files:
            differ = sorted(k for k in set(files) | set(now_files) if files.get(k) != now_files.get(k))
            other.append(f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} of dataset_dir not the same")
    before = (old.get("overrides") or {}).get("datalist")
    if "overrides.datalist" in changed and before is not None:
        places.append(("overrides.datalist", before, settings["overrides"].get("datalist")))
        if isinstance(datalist_sum, str):
            other.append("the datalist's content not the same")
    if not places:
        return ""
    return moved_note(places, f"{'; '.join(other)}: sha256 in {SETTINGS_NAME}" if len(other) == len(places) else None,
                      record_fix)


def _dims_mismatch(name: str, bundle: str, network_def: Mapping[str, Any], task_network_def: Mapping[str, Any],
                   source: str) -> str:
    """The error for a method whose pretraining builds a 2D network for a 3D fine-tuning bundle or the reverse ('' when
    the dimensions agree or cannot be told): its runs refused the checkpoint only after the whole pretraining."""
    pretrained = _network_settings(network_def, ("spatial_dims",)).get("spatial_dims")
    task = 2 if str(task_network_def.get("_target_", "")).endswith(".build_resnet_task_network") else \
        _network_settings(task_network_def, ("spatial_dims",)).get("spatial_dims")
    try:
        pretrained, task = int(pretrained), int(task)
    except (TypeError, ValueError):
        return ""
    if pretrained == task:
        return ""
    how = ("pretrain it in 3D (`configs: [train.json]` in the pretrain section, without 2d.json, and spatial_dims 3)"
           if task == 3 else
           "pretrain it with the 2D configs (`configs: [train.json, 2d.json]` in the pretrain section, docs/2d.md)")
    return (f"method {name!r} pretrains a {pretrained}D network (spatial_dims {pretrained} from {source}), but bundle "
            f"{bundle!r} fine-tunes a {task}D one, so each of its runs would refuse the checkpoint after the whole "
            f"pretraining; {how}, or fine-tune it with a {pretrained}D bundle in another experiment")


def _network_mismatch(name: str, bundle: str, network_def: Mapping[str, Any], task_network_def: Mapping[str, Any],
                      source: str) -> str:
    """The error for a method whose pretraining builds another network than the fine-tuning bundle loads ('' when they
    agree or cannot be told): a U-Net (train.json with spatial_dims 2) for a 2D bundle's ResNet, or the reverse; it
    passed the dimension check, and each run refused the checkpoint only after the whole pretraining."""
    from dira3d.evaluation.pretrained import PRETRAINED_NETWORKS

    def family(target: str, names: dict[str, str]) -> str:
        return next((network for suffix, network in names.items() if target.endswith(suffix)), "")

    pretrained = family(str(network_def.get("_target_", "")), {".ResNetUNet": "ResNetUNet", ".UNet": "UNet"})
    task = family(str(task_network_def.get("_target_", "")),
                  {".build_resnet_task_network": "ResNetUNet", ".build_task_network": "UNet"})
    if not pretrained or not task or pretrained == task:
        return ""
    how = ("the 2D configs (`configs: [train.json, 2d.json]` in the pretrain section, docs/2d.md)"
           if task == "ResNetUNet" else "`configs: [train.json]` in the pretrain section (without 2d.json)")
    return (f"method {name!r} pretrains a {PRETRAINED_NETWORKS[pretrained][0]} (network_def from {source}), but bundle "
            f"{bundle!r} fine-tunes the weights of a {PRETRAINED_NETWORKS[task][0]}, so each of its runs would refuse "
            f"the checkpoint after the whole pretraining; pretrain it with {how}")


def _flow(values: Mapping[str, Any]) -> str:
    """``width: 0.125, decoder_channels: [16, 16, 8, 8, 8]``: settings as the experiment's YAML writes them."""
    return ", ".join(f"{key}: {value if isinstance(value, str) else json.dumps(value, separators=(', ', ': '))}"
                     for key, value in values.items())


def _network_settings(network_def: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` a ``network_def`` (references resolved) builds its network with, its target's defaults
    where it leaves them out; keys the target does not take are left out."""
    target = pydoc.locate(str(network_def.get("_target_", "")))
    try:
        parameters = inspect.signature(target).parameters if target is not None else {}
    except (TypeError, ValueError):
        parameters = {}
    values = {}
    for key in keys:
        if key in network_def:
            values[key] = network_def[key]
        elif key in parameters and parameters[key].default is not inspect.Parameter.empty:
            values[key] = parameters[key].default
    return values


def _task_settings(network_def: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a fine-tuning bundle's ``network_def`` that a pretrained checkpoint must share: ``width``
    (3D task networks), ``backbone`` and, for a segmenter, ``decoder_channels`` (2D); empty for another network."""
    from dira3d.evaluation.pretrained import TASK_KINDS

    target = str(network_def.get("_target_", ""))
    if target.endswith(".build_task_network"):
        keys: tuple[str, ...] = ("width",)
    elif target.endswith(".build_resnet_task_network") and network_def.get("kind") in TASK_KINDS:
        keys = ("backbone",) + (("decoder_channels",) if network_def["kind"] == "segmentation" else ())
    else:
        return {}
    return _network_settings(network_def, keys)


def _same(key: str, a: Any, b: Any) -> bool:
    try:
        if key == "width":
            return float(a) == float(b)
        if key == "decoder_channels":
            return [int(c) for c in a] == [int(c) for c in b]
    except (TypeError, ValueError):
        return True  # a value the network itself refuses, naming it
    return str(a) == str(b)


def pretrain_fit_mismatch(name: str, spec: Mapping[str, Any], config: Mapping[str, Any],
                          task_network_def: Mapping[str, Any]) -> str:
    """The error for method ``name``'s own pretraining (``{pretrain: {...}}``) building its network in other spatial
    dimensions (a 2D pretraining for a 3D bundle or the reverse), another network (a U-Net for a 2D bundle's ResNet) or
    at another width (2D: backbone, decoder_channels)
    than the fine-tuning bundle's ``task_network_def`` (references resolved, the experiment's ``overrides`` applied):
    each of the method's runs refused the checkpoint it pretrained, one after the other, after the whole pretraining.
    '' when they fit, or when either network cannot be judged here."""
    from monai.bundle import ConfigParser

    wanted = _task_settings(task_network_def)
    if not wanted:
        return ""
    section = config["pretrain"]
    own = spec.get("pretrain") or {}
    shared = section.get("overrides") or {}
    parser = ConfigParser()
    parser.read_config(pretrain_configs(section))
    parser.update({**shared, **own})
    try:
        network_def = parser.get_parsed_content("network_def", instantiate=False).get_config()
    except Exception:  # noqa: BLE001 - an expression only a run resolves: the runs check the checkpoint
        return ""
    configs = ", ".join(Path(c).name for c in pretrain_configs(section))

    def source(key: str) -> str:
        if key in own:
            return f"its pretrain: {{{key}: ...}}"
        return "the pretrain section's overrides" if key in shared else f"the pretrain configs ({configs})"

    dims = (_dims_mismatch(name, config["bundle"], network_def, task_network_def, source("spatial_dims"))
            or _network_mismatch(name, config["bundle"], network_def, task_network_def, source("network_def")))
    if dims:
        return dims
    built = _network_settings(network_def, tuple(wanted))
    differ = [key for key in wanted if key in built and not _same(key, built[key], wanted[key])]
    if not differ:
        return ""

    def shown(values: Mapping[str, Any], keys: list[str]) -> str:
        return ", ".join(f"{key} {values[key] if isinstance(values[key], str) else json.dumps(values[key])}" for key in keys)

    sources = {source(key): [k for k in differ if source(k) == source(key)] for key in differ}
    pretrained = "; ".join(f"{shown(built, keys)} from {where}" for where, keys in sources.items())
    task = shown(wanted, differ)
    return (f"method {name!r} pretrains its network with {pretrained}, but bundle {config['bundle']!r} fine-tunes it "
            f"with {task}, so each of its runs would refuse the checkpoint after the whole pretraining; pretrain it "
            f"as the runs build it (`pretrain: {{{_flow({k: wanted[k] for k in differ})}}}` in method {name!r}) or "
            f"fine-tune every method as it is pretrained (`overrides: {{{_flow({k: built[k] for k in differ})}}}` "
            f"in the experiment config{_tiny_way(config, built, differ)})")


def _tiny_way(config: Mapping[str, Any], built: Mapping[str, Any], differ: list[str]) -> str:
    """``, or `tiny: true` ...`` when the fine-tuning bundle's tiny.json builds what a tiny pretraining built (a
    pretraining with ``2d_tiny.json`` or ``tiny.json`` in a grid without ``overrides: {tiny: true}``): the way a
    CPU-scale grid wants, as the settings alone fine-tune at full size and for the bundle's full epochs."""
    if (config.get("overrides") or {}).get("tiny"):
        return ""
    try:
        from dira3d.evaluation.finetune import bundle_path

        tiny = json.loads((bundle_path(config["bundle"]) / "configs" / "tiny.json").read_text())
    except Exception:  # noqa: BLE001 - a bundle without tiny.json
        return ""
    if not all(key in tiny and _same(key, tiny[key], built[key]) for key in differ):
        return ""
    return ("; or, for a CPU-scale grid, `tiny: true` in those overrides: the bundle's tiny.json, which builds that "
            "network and also sets its small input size and few epochs")
