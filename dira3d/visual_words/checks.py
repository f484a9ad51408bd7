"""Up-front checks of ``dira3d visual-words``: counts and volume sizes that the datalist cannot supply are refused
before the extractor trains (minutes to hours), each naming the option or the volume and what to do."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dira3d.data.datalist import more_training_advice, split_option
from dira3d.visual_words.coordinates import CoordinateRules, VolumeTooSmallError, centre_range

__all__ = ["entry_name", "check_counts", "check_volume_sizes", "check_validation_sizes"]


def entry_name(entry: dict) -> str:
    """``volume <image> (case <case_id>)``: how errors name a datalist entry."""
    return f"volume {entry['image']} (case {entry['case_id']})"


def check_counts(datalist: str | os.PathLike, n_train: int, n_val: int, classes: int, neighbours: int,
                 val_neighbours: int) -> None:
    """Refuse class and neighbour counts that the datalist's volumes cannot supply.

    Every count that is wrong is named in the one error (each used to be refused on its own, so a small
    datalist took one run per option to find them all).

    Raises:
        ValueError: fewer than 2 classes, validation neighbours without validation volumes, or a count
            outside its range (naming the option and the range).
    """
    problems = []
    if classes < 2:  # cross-entropy over one class: log softmax of a single logit is 0, whatever the network does
        problems.append(
            f"classes={classes}: visual-word classification needs at least 2 visual words (with one, loss_dis is "
            f"always 0 and pretraining learns nothing from it); "
            + (f"choose classes (--classes) between 2 and {n_train}, the training volumes in {datalist}" if n_train >= 2 else
               f"{datalist} has {n_train} training volume: add more (one reference volume per class)")
        )
    if n_train < 2:  # no count fits ("choose classes between 2 and 1"): the split is what to change
        problems.append(f"classes={classes} and neighbours={neighbours} are not possible with {n_train} training and "
                        f"{n_val} validation volumes in {datalist}: visual words need 2 or more training volumes (one "
                        "reference volume per class, 2 or more instances of each); add scans, or "
                        f"{more_training_advice(datalist)}; with no validation volumes left, pass --val-neighbours 0 "
                        "here")
    for name, value, limit in (("classes", classes, n_train), ("neighbours", neighbours, n_train)):
        if n_train >= 2 and (value > limit or value < 2) and not (name == "classes" and value < 2):
            problems.append(f"{name}={value} is not possible with {n_train} training and {n_val} validation volumes in "
                            f"{datalist}; choose {name} (--{name.replace('_', '-')}) between 2 and {limit}")
    # pretraining (configs/visual_words.json) validates on pairs of two instances of one visual word: a split of
    # one instance per class passed here and failed there, after the whole extraction
    more_volumes = (f"prepare the scans with 2 or more validation volumes ({split_option(datalist, 'validation')}; "
                    f"{Path(datalist).name} has {n_val}), or pass --val-neighbours 0 (no validation words; pretraining on "
                    "them with configs/visual_words.json then runs without validation: no best.pt, no early stopping)")
    if val_neighbours > 0 and n_val == 0:
        problems.append(f"val_neighbours={val_neighbours} (--val-neighbours) but {datalist} has no 'validation' volumes: "
                        + more_volumes)
    elif val_neighbours == 1:
        problems.append("val_neighbours=1 (--val-neighbours): pretraining pairs two instances of each validation visual word; "
                        + (f"choose 0 (no validation words) or between 2 and {n_val}" if n_val >= 2 else more_volumes))
    elif val_neighbours > n_val or val_neighbours < 0:
        problems.append(f"val_neighbours={val_neighbours} is not possible with {n_train} training and {n_val} validation "
                        f"volumes in {datalist}; "
                        + (f"choose val_neighbours (--val-neighbours) 0 or between 2 and {n_val}" if n_val >= 2 else more_volumes))
    if problems:
        raise ValueError("; ".join(problems))


def check_volume_sizes(train: list[dict], shapes: list[tuple[int, int, int]], rules: CoordinateRules) -> None:
    """Refuse, from the shapes alone, training volumes that cannot hold patch + borders.

    Any training volume can be drawn as a class reference, and the planner stops at one that is too
    small: checked here, before the extractor is trained, such a run fails in seconds, not minutes.

    Raises:
        VolumeTooSmallError: names the first such volume, the options to change, and the others' count and names.
    """
    errors = []
    for entry, shape in zip(train, shapes):
        try:
            centre_range(shape, rules, entry_name(entry))
        except VolumeTooSmallError as err:
            errors.append((entry, err))
    if len(errors) > 1:
        others = ", ".join(str(entry["image"]) for entry, _ in errors[1:4]) + (", …" if len(errors) > 4 else "")
        more = len(errors) - 1
        raise VolumeTooSmallError(f"{errors[0][1]} ({more} other of the {len(train)} training volumes "
                                  f"{'is' if more == 1 else 'are'} too small as well: {others})")
    if errors:
        raise errors[0][1]


def check_validation_sizes(val: list[dict], shapes: list[tuple[int, int, int]], patch_size: Sequence[int]) -> None:
    """Refuse validation volumes smaller than the patch: every neighbour is cut at its reference's centre,
    so such a volume, once a neighbour, rejects every reference with a reason that does not name it.

    Raises:
        VolumeTooSmallError: names the first such volume and its size.
    """
    for entry, shape in zip(val, shapes):
        axes = [axis for axis, (s, p) in zip("xyz", zip(shape, patch_size)) if s < p]
        if axes:
            raise VolumeTooSmallError(
                f"validation {entry_name(entry)} has size {tuple(shape)}, smaller than the patch {tuple(patch_size)} on axis "
                f"{', '.join(axes)}: no patch can be cut from it; leave it out of the datalist or use a smaller --patch-size"
            )
