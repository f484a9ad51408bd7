"""Checks of ``dira3d experiment``'s methods before any run (:func:`dira3d.evaluation.experiment_config.load_config`):
a method's checkpoint (:func:`check_checkpoints_fit`) or own pretraining (:func:`check_pretrainings_fit`) must fit the
network the fine-tuning bundle builds, and a method's pretraining stages must all be reached
(:func:`check_pretrain_run`), each refused naming the method and the config; a pretraining stopped by a missing
datalist is named the same way (:func:`check_pretrain_datalist`); a datalist of images in other dimensions than the
bundle's network (3D volumes for a 2D bundle, or 2D images for a 3D one) is refused naming both
(:func:`check_datalist_dims`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

__all__ = ["check_checkpoints_fit", "check_pretrainings_fit", "check_pretrain_run", "check_pretrain_datalist",
           "check_datalist_dims"]


def _task_network_def(bundle_configs: Path, overrides: Mapping[str, Any]) -> dict | None:
    """The fine-tuning bundle's ``network_def`` with the experiment's ``overrides`` (references resolved); None for a
    bundle of the user's without one, or an expression only a run resolves (the runs check then)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_configs / "train.json")] + ([str(bundle_configs / "tiny.json")] if overrides.get("tiny") else []))
    parser.update({key: value for key, value in overrides.items() if key != "tiny"})
    try:
        return parser.get_parsed_content("network_def", instantiate=False).get_config()
    except Exception:  # noqa: BLE001
        return None


def check_checkpoints_fit(config: Mapping[str, Any], path: Path, bundle_configs: Path, overrides: Mapping[str, Any]) -> None:
    """Refuse a method's checkpoint pretrained with another network than the bundle builds with the config's
    overrides (another width; in 2D another backbone or decoder_channels), before any run: each of the method's
    runs failed on it, one after the other (:func:`dira3d.evaluation.pretrained.checkpoint_mismatch`)."""
    from dira3d.evaluation.pretrained import checkpoint_mismatch
    from dira3d.utils.setting_hints import experiment_settings

    checkpoints = {name: spec for name, spec in config["methods"].items() if isinstance(spec, str) and spec}
    network_def = _task_network_def(bundle_configs, overrides) if checkpoints else None
    if network_def is None:
        return
    with experiment_settings():  # the error names overrides: {width: ...}, not dira3d finetune's --set
        for name, checkpoint in checkpoints.items():
            mismatch = checkpoint_mismatch(network_def, checkpoint)
            if mismatch:
                raise ValueError(f"method {name!r} in {path}: {mismatch}; each of its runs of bundle "
                                 f"{config['bundle']!r} would refuse it")


def check_pretrainings_fit(config: Mapping[str, Any], path: Path, bundle_configs: Path, overrides: Mapping[str, Any]) -> None:
    """The same for a method's own pretraining (``{pretrain: {...}}``), from its settings, as its checkpoint does not
    exist yet (:func:`dira3d.evaluation.experiment_pretrain.pretrain_fit_mismatch`): each of its runs failed on it
    after the whole pretraining."""
    from dira3d.evaluation.experiment_pretrain import pretrain_fit_mismatch

    pretrained = {name: spec for name, spec in config["methods"].items() if isinstance(spec, dict)}
    network_def = _task_network_def(bundle_configs, overrides) if pretrained else None
    if network_def is None:
        return
    for name, spec in pretrained.items():
        mismatch = pretrain_fit_mismatch(name, spec, config, network_def)
        if mismatch:
            raise ValueError(f"{mismatch} ({path})")


def check_pretrain_run(name: str, configs: list[Path], overrides: Mapping[str, Any], path: Path | str,
                       epoch_length: int | None = None, folder: Path | None = None) -> None:
    """Check a method's pretraining stages before any run, naming the method: bad stages stopped the experiment only
    when that method's turn came, after the others had pretrained, and a stage that starts after ``max_epochs`` never
    ran, so an ablation arm (``dis+res+adv``) was pretrained as another (``dis`` only) under its name.

    Before the run the epoch length is not known, so stages bounded by ``until_iteration`` are not judged; after the
    pretraining (``epoch_length``: its iterations per epoch, from its ``last.pt``; ``folder``: its folder) they are:
    a ``dira`` whose ``dis_res`` lasted until an iteration the run never reached was fine-tuned and reported as
    ``dira``, with only a warning in the pretraining's log."""
    from monai.bundle import ConfigParser

    from dira3d.engines.stages import StageSchedule

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    stages = overrides["stages"] if "stages" in overrides else parser.get("stages")
    max_epochs = overrides["max_epochs"] if "max_epochs" in overrides else parser.get("max_epochs")
    if isinstance(stages, str) or isinstance(max_epochs, str):
        return  # an expression: the pretraining itself checks it
    try:
        schedule = StageSchedule(stages)
    except ValueError as err:
        raise ValueError(f"pretrain stages of method {name!r} in {path}: {err}") from None
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int):
        return  # the bundle refuses it
    unreached = schedule.unreached(max_epochs, epoch_length)
    if not unreached:
        return
    text = f"pretrain stages of method {name!r} in {path}: {schedule.unreached_text(unreached, max_epochs)}"
    if folder is None:
        raise ValueError(f"{text}; its pretraining would be reported as {name!r} without them. Raise max_epochs (pretrain "
                         "overrides) or lower the stages' until_epoch")
    raise ValueError(f"{text} (of {epoch_length} iterations each), so its pretraining in {folder} trained without them and "
                     f"is not used as {name!r}; lower the stages' until_iteration or raise max_epochs (pretrain overrides), "
                     f"then delete {folder} to pretrain it again")


def check_pretrain_datalist(name: str, configs: list, overrides: Mapping[str, Any], dataset_dir: str,
                            path: str | Path, cause: BaseException | None = None) -> None:
    """Name a method's pretraining datalist that does not exist, and the experiment's setting that gives it: the
    bundle's error named neither (e.g. 2d.json reads ``<dataset_dir>/chestxray14_datalist.json``, absent from a
    prepared Montgomery folder). The grid pretrains before its first fine-tuning run; ``load_config`` does not check
    it, so that a config can be checked without the data. A pretraining on visual words (``visual_words.json``)
    reads no datalist."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update({**overrides, "dataset_dir": dataset_dir})
    reads = json.dumps(parser.get("train#dataset", {}), default=str)
    if "@train::datalist" not in reads and "@train#datalist" not in reads:
        return  # visual words, or a dataset of one's own configs
    try:
        datalist = parser.get_parsed_content("datalist")
    except Exception:  # noqa: BLE001 - an expression only a run resolves: the pretraining names it
        return
    if not isinstance(datalist, (str, Path)) or Path(datalist).is_file():
        return
    if "datalist" in overrides:
        raise FileNotFoundError(f"datalist {datalist} of the pretraining of method {name!r} in {path} does not exist; fix "
                                "the path (relative to the config's folder) or prepare it with `dira3d prepare` "
                                "(docs/data.md)") from cause
    raise FileNotFoundError(f"pretrain dataset_dir {dataset_dir} in {path} has no {Path(datalist).name}, the datalist that "
                            f"the pretraining of method {name!r} (configs {', '.join(Path(c).name for c in configs)}) "
                            "reads there; point dataset_dir to the folder `dira3d prepare` wrote it into, or pretrain on "
                            "another prepared datalist: `pretrain: {dataset_dir: ..., overrides: {datalist: FILE}}` "
                            "(relative to the config's folder; docs/2d.md, 'Grids')") from cause


def check_datalist_dims(config: Mapping[str, Any], path: Path, bundle_configs: Path, overrides: Mapping[str, Any]) -> None:
    """Refuse, before any run (and before a method's pretraining), a datalist whose training images are files of the
    other dimensions than the bundle's network (told by their names: NIfTI, MetaImage, NRRD are 3D volumes; PNG, JPEG,
    BMP, TIFF are 2D images; a volume file of one slice is a 2D image, read from its header): every run failed on it one after the other, after the pretrainings, with an error about
    its labels or the caching of a volume that named neither the bundle's dimensions nor the datalist to use."""
    from dira3d.data.datalist import datalist_entries, read_datalist_json
    from dira3d.evaluation.datalist_dims import fitting_datalist, other_dims_entry

    network_def = _task_network_def(bundle_configs, overrides)
    if network_def is None:
        return
    target = str(network_def.get("_target_", ""))
    dims = 2 if target.endswith(".build_resnet_task_network") else network_def.get("spatial_dims", 3)
    datalist = Path(config["datalist"]).resolve()
    try:  # as load_split reads it
        entries = datalist_entries(datalist, "training", content=read_datalist_json(datalist), path_keys=("image",),
                                   optional=True)
    except Exception:  # noqa: BLE001  (a datalist the runs refuse themselves, with their own error)
        return
    found = other_dims_entry(entries, dims)
    if found is not None:
        index, image = found
        other = 5 - dims
        raise ValueError(f"datalist {datalist} in {path} holds {other}D images (training entry {index}: {image}), but "
                         f"bundle {config['bundle']!r} is {dims}D, so each run of the grid would fail at its start; "
                         f"give the bundle a {dims}D datalist, {fitting_datalist(dims)}, or name a {other}D bundle")
