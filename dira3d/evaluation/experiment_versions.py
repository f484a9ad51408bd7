"""What made the runs of ``dira3d experiment``: dira3d's version and each bundle's (``configs/metadata.json``
``version``), recorded in ``<output_dir>/experiment.json``; and the warnings a resume gives about rows that cannot be
checked as new ones are.

A bundle upgraded between two calls of one grid (``git pull``: a new ``train.json``) fine-tunes the later runs
otherwise; its changelog says whether the change touches the results. A resume that adds runs to rows of the grid
warns, naming the bundle and both versions, and goes on (many bumps change messages only); ``earlier_versions`` keeps
what the earlier rows were made with. Rows of a results.csv written before the split digests (2026-11-27) are paired on their split sizes only:
one warning says so (:func:`warn_rows_without_digests`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["VERSIONS", "EARLIER_VERSIONS", "bundle_version", "current_versions", "versions_record",
           "warn_rows_without_digests"]

VERSIONS = "versions"  # experiment.json: {"dira3d": ..., "bundles": {name: version}} of the latest call
EARLIER_VERSIONS = "earlier_versions"  # experiment.json: other such records the rows were made with, oldest first
UNKNOWN = "not recorded (before 2026-11-27)"  # in earlier_versions: rows of a dira3d that recorded no versions


def bundle_version(folder: Path) -> str | None:
    """``version`` of a bundle's ``configs/metadata.json``; None where it cannot be read."""
    try:
        version = json.loads((folder / "configs" / "metadata.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return None if version is None else str(version)


def current_versions(config: Mapping[str, Any]) -> dict:
    """``{"dira3d": version, "bundles": {name: version}}``: the fine-tuning bundle, and ``dira_pretrain`` when a method
    is pretrained by the experiment (``{pretrain: {...}}``)."""
    import dira3d
    from dira3d.engines.command import BUNDLE_DIR
    from dira3d.evaluation.finetune import bundle_path

    folders = [bundle_path(config["bundle"])]
    if any(isinstance(spec, Mapping) for spec in config["methods"].values()):
        folders.append(Path(BUNDLE_DIR))
    return {"dira3d": dira3d.__version__, "bundles": {f.name: bundle_version(f) for f in folders}}


def versions_record(config: Mapping[str, Any], out: Path, rows: list[dict], reused: int | None = None,
                    to_run: int | None = None) -> dict:
    """The ``versions`` (and ``earlier_versions``) to write into ``out/experiment.json``; warns (a ``UserWarning``)
    when a bundle's version differs from the one recorded there, naming the bundle, both versions and where its
    changelog is, if it matters: ``reused`` rows of the grid (default: all ``rows``) are to be joined by ``to_run`` new
    runs (default: some). Nothing recorded (rows of before 2026-11-27): nothing to compare, and ``earlier_versions``
    says :data:`UNKNOWN`, so that the record does not pass for theirs. No run to make (``to_run=0``): the record is
    kept as it is, since it says what made the rows (a later call that adds runs warns then)."""
    now = current_versions(config)
    try:
        old = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
        before, earlier = old.get(VERSIONS), old.get(EARLIER_VERSIONS) or []
    except (OSError, ValueError, AttributeError):  # none yet; a garbled one is refused by check_run_settings
        old, before, earlier = {}, None, []
    if not rows:  # a new table: what made earlier rows no longer matters
        return {VERSIONS: now}
    if to_run == 0:  # nothing is added to the rows: neither a warning (it used to come on every rerun of a finished
        # grid, e.g. to change the test) nor a new record, which would pass the rows off as made by this version
        return {k: old[k] for k in (VERSIONS, EARLIER_VERSIONS) if isinstance(old, dict) and k in old}
    reused = len(rows) if reused is None else reused
    earlier = list(earlier) if isinstance(earlier, list) else []
    if before is None and UNKNOWN not in earlier:  # rows of a dira3d that recorded no versions
        earlier.append(UNKNOWN)
    if isinstance(before, dict) and before != now:
        if before not in earlier:
            earlier.append(before)
        old_bundles = before.get("bundles") if isinstance(before.get("bundles"), dict) else {}
        changed = [f"{name} {old_bundles[name]} -> {version}" for name, version in now["bundles"].items()
                   if old_bundles.get(name) is not None and old_bundles[name] != version]
        if changed and reused:  # no run of the grid reused: the table holds new runs only
            warnings.warn(
                f"{out / 'results.csv'}: bundle version changed since its {reused} runs were made "
                f"({'; '.join(changed)}; recorded in {out / 'experiment.json'}): the new runs are fine-tuned by the new "
                "bundle and added to the same table. Read the bundle's changelog (configs/metadata.json); where a change "
                "there affects training or the splits, rerun the whole grid into another output_dir",
                Dira3dWarning, stacklevel=3)
    return {VERSIONS: now, **({EARLIER_VERSIONS: earlier} if earlier else {})}


def warn_rows_without_digests(rows: list[dict], grid: set, folded: bool, csv_path: Path) -> None:
    """Warn once when rows of the grid record their split sizes but no split digests (``train_digest``, ...: made by
    a dira3d of before 2026-11-27): they are paired with the other methods' runs of their seed on the sizes only, so a
    change of the subset rules that kept the sizes goes unnoticed for them. They are kept, not refused."""
    from dira3d.evaluation.results import row_key
    from dira3d.evaluation.split_ids import DIGEST_FIELDS

    old = [r for r in rows if row_key(r, folded) in grid and (r.get("train_cases") or r.get("test_cases"))
           and not any(r.get(c) for c in DIGEST_FIELDS)]
    if old:
        warnings.warn(
            f"{csv_path}: {len(old)} of its runs (e.g. {old[0]['method']} labels={float(old[0]['label_fraction']):g} "
            f"seed={old[0]['seed']}) were made before dira3d recorded which cases each split holds (train_digest, "
            "holdout_digest, test_digest; each run's splits.json): they are checked against the other methods' runs of "
            "their seed on the split sizes only, so a change of the subset rules that kept the sizes would go unnoticed. "
            "They are kept; rerun the grid into another output_dir to have every pair checked on its cases",
            Dira3dWarning, stacklevel=3)
