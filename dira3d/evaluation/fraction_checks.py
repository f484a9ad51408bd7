"""Label fractions that no run of ``dira3d experiment``'s grid could train on, refused before any run.

A run draws its training labels with :func:`~dira3d.evaluation.datalists.select_fraction` and holds out patients
for early stopping with :func:`~dira3d.evaluation.datalists.holdout_by_patient` (``load_split`` in the bundle's
train.json). On a small labelled set a small fraction keeps one patient, and the holdout needs two (one held out,
one to train on); on a classification datalist the holdout may hold one class only, where its AUC is undefined
(:func:`~dira3d.evaluation.split_checks.check_auc_defined`). Each run of such a fraction was refused at its start
and the grid listed every one as failed. :func:`check_fractions_trainable` draws the same splits, with the same
functions and the bundle's ``holdout`` and ``fold``, for every (fraction, seed[, fold]) of the config (with
``split_seed``, for that one seed: every run draws its split with it, :func:`split_seeds`), so that it refuses exactly
what the runs would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["split_settings", "split_seeds", "check_fractions_trainable"]


def split_seeds(config: Mapping[str, Any]) -> list[int]:
    """The seeds the grid's runs draw their label subsets and holdouts with: the config's ``split_seed`` alone when
    it has one (every run shares its split), else each of its ``seeds``."""
    if config.get("split_seed") is not None:
        return [int(config["split_seed"])]
    return [int(s) for s in config["seeds"]]


def split_settings(bundle_configs: Path, overrides: Mapping[str, Any]) -> tuple[Any, Any]:
    """The ``holdout`` and ``fold`` a run of the bundle uses with the experiment's ``overrides`` (None where the
    bundle has no such setting, or an expression only a run resolves)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_configs / "train.json")]
                       + ([str(bundle_configs / "tiny.json")] if overrides.get("tiny") else []))
    parser.update({key: value for key, value in overrides.items() if key != "tiny"})
    values = []
    for key in ("holdout", "fold"):
        try:
            values.append(parser.get_parsed_content(key) if key in parser else None)
        except Exception:  # noqa: BLE001  (the runs refuse it, naming it)
            values.append(None)
    return values[0], values[1]


def check_fractions_trainable(config: Mapping[str, Any], path: Path, holdout: Any, fold: Any) -> None:
    """Refuse ``holdout`` 0, and a label fraction whose subset, for some seed (and fold of ``folds``), leaves an empty early-stopping
    holdout (fewer than 2 patients) or a classification holdout with an undefined AUC.

    Args:
        config: the experiment config (``datalist`` resolved). path: the config file (named in the error).
        holdout: the bundle's ``holdout`` share; 0 is refused (no run could select its model); anything else
            (``"validation"``, a bad value) is left to the checks of that setting, as no label fraction helps there.
        fold: the bundle's ``fold`` (used when the config has no ``folds``).

    Raises:
        ValueError: naming the fraction, the seed (and fold), the patients it keeps, the minimum and what to do.
    """
    from dira3d.data.datalist import datalist_entries, read_datalist_json
    from dira3d.evaluation.datalists import holdout_by_patient, patient_of, select_fraction
    from dira3d.evaluation.split_checks import check_auc_defined
    from dira3d.utils.setting_hints import experiment_settings

    if not isinstance(holdout, bool) and isinstance(holdout, (int, float)) and holdout == 0:
        raise ValueError(
            f"overrides in {path}: holdout=0 holds out no training patient, but fine-tuning selects and saves "
            "models/model.pt at its early-stopping holdout, so every run of the grid would fail at its start; use a "
            "share such as 0.1 (the bundle's default: leave holdout out) or holdout: validation (the datalist's "
            "'validation' list)")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        return
    datalist = Path(config["datalist"]).resolve()
    try:  # as load_split reads it
        content = read_datalist_json(datalist)
        training = datalist_entries(datalist, "training", content=content, path_keys=("image", "label"), optional=True)
    except Exception:  # noqa: BLE001  (a datalist the runs refuse themselves, with their own error)
        return
    for test_fold in config.get("folds") or [fold]:
        folded = test_fold is not None and not isinstance(test_fold, bool) and isinstance(test_fold, int) and test_fold >= 0
        if folded and not any(e.get("fold") == test_fold for e in training):
            continue  # the runs refuse the fold, naming it
        entries = [e for e in training if e.get("fold") != test_fold] if folded else training
        if not entries:
            continue  # the runs refuse the empty split, naming the datalist
        try:
            total = len({patient_of(e) for e in entries})
        except Exception:  # noqa: BLE001  (as above)
            return
        where = f" (fold {test_fold} tested)" if folded else ""
        for fraction in sorted(config["label_fractions"], key=float):
            for seed in split_seeds(config):
                named = f"split_seed {seed}" if config.get("split_seed") is not None else f"seed {seed}"
                try:
                    chosen = select_fraction(entries, float(fraction), seed)
                    _, held = holdout_by_patient(chosen, float(holdout), seed)
                except Exception:  # noqa: BLE001  (entries the runs refuse themselves, e.g. without a case_id)
                    return
                if not held:
                    kept = len({patient_of(e) for e in chosen})
                    todo = (f"use a larger label fraction (at least {2 / total:.3g}) or leave {fraction:g} out"
                            if total >= 2 else
                            "no label fraction helps: add labelled patients, or early-stop on the datalist's own "
                            "'validation' list (overrides: {holdout: validation})")
                    raise ValueError(
                        f"label_fractions in {path}: {fraction:g} keeps {kept} of the {total} training patient(s) of "
                        f"datalist {datalist} with {named}{where}, and the early-stopping holdout needs at least 2 "
                        f"(one held out, one to train on), so each run of {fraction:g} would fail at its start; {todo}")
                settings = f"label_fraction={fraction:g}, seed={seed}, holdout={holdout}, fold={test_fold}"
                try:
                    with experiment_settings():
                        check_auc_defined(datalist, "holdout", held, chosen, settings=settings)
                except ValueError as err:
                    raise ValueError(f"label_fractions in {path}: {fraction:g} with {named}{where} cannot be "
                                     f"trained, each of its runs would fail at its start: {err}") from None
