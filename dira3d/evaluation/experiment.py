"""``dira3d experiment``: the paper's evaluation protocol as one resumable command.

A grid of initialisations (random, L_dis only, L_dis + L_res, full DiRA, any checkpoint) × label
fractions × seeds (× cross-validation folds) is fine-tuned through one task bundle. Each finished
run is added to ``results.csv`` at once (the file is replaced atomically), so an interrupted experiment picks up where it stopped; the aggregation
(mean ± std, t-tests against the baseline), a Markdown table and PNG plots are rewritten after
every run (the plots at the end).

Config (YAML or JSON)::

    bundle: luna16_nodule_fpr          # a folder under bundles/, or a path to a bundle
    datalist: prepared/ncc_datalist.json
    metric: auc                        # key of the metrics dict the fine-tuning returns
    output_dir: runs/experiment
    baseline: random                   # method the t-tests compare against (default: the first method)
    test: student                      # or welch, or paired (by seed; see below)
    seeds: [0, 1, 2, 3, 4]
    split_seed: 0                      # optional: every seed trains on split_seed's label subset (see below)
    label_fractions: [0.1, 0.25, 1.0]
    folds: [0, 1, 2]                   # optional: cross-validation (PE-CAD); absent: the datalist's test list
    methods:                           # name: checkpoint path, null (random init), or {pretrain: {...}}
      random: null
      mine: runs/pretrain/best.pt
      dis: {pretrain: {stages: [{name: dis, losses: [dis]}]}}
      dira: {pretrain: {}}             # the pretraining bundle's own stages
    overrides: {tiny: true, max_epochs: 10}   # bundle ids for every run; `tiny` adds configs/tiny.json
    pretrain:                          # only for methods with a `pretrain` entry
      dataset_dir: visual_words        # folder given to bundles/dira_pretrain as dataset_dir
      configs: [train.json, tiny.json, visual_words.json]   # in bundles/dira_pretrain/configs, or paths
      overrides: {max_epochs: 6}       # bundle ids shared by every pretraining run

Relative paths in the config (datalist, output_dir, checkpoints, the pretraining's dataset_dir, config paths and a
``datalist`` in its overrides, e.g. a prepared Montgomery datalist for 2d.json) are relative to the config file's
folder, not to the folder the command runs in. A project moved or copied with its data (``mv project_A project_B``:
output_dir, datalist, checkpoints and dataset_dir at the same places relative to each other) reruns from the new place
as the same experiment: its records are read as the new paths, and nothing is read from or written to the old place.
The datalist or the pretraining's dataset_dir moved alone (``mv prepared /fast/prepared``) is the same data where
the sha256 recorded of its content (``experiment.json``; ``settings.json``'s ``dataset_files``) is; other data, or
a record without them, are refused naming both places; so are, naming the files, other data prepared again at the
recorded place (``dira3d prepare ... --dst`` rerun into it), where ``settings.json`` holds those checksums.

A method with a ``pretrain`` entry is pretrained first (``<output_dir>/pretrain/<method>``, the
entry's ids on top of ``pretrain.overrides``) and fine-tuned from its ``best.pt`` (its ``last.pt`` when
it had no validation, ``validation: false``); a finished
pretraining (``done.json``) is not repeated; its settings (``settings.json``) must match the
config's, and rows of a method fine-tuned from another checkpoint are not reused either: another
path, or the same path holding another file (a pretraining rerun into the same folder; the sha256 of
each checkpoint is recorded in ``checkpoints.json``) is refused while the method has rows, and so are rows of a
method the config now pretrains itself that were fine-tuned from random init or a checkpoint file. A checkpoint
file replaced while the grid runs (a pretraining still writing it) stops the grid after the run that noticed it,
without adding that run; so does a run whose split sizes (train_cases, test_cases, test_positive) or cases
(train_digest, holdout_digest, test_digest) differ from another method's run of the same label fraction and seed (and
fold; with ``split_seed``, from any run of the label fraction; the split rules changed since, e.g. an upgrade; the
error names both runs' splits.json), and a results.csv that already holds such runs is refused. Rows of before the digests are kept, with one warning (checked on sizes only). The
fine-tuning settings (bundle, datalist, metric, overrides, folds) and the datalist's sha256 are recorded in
``experiment.json``: a rerun with other ones (or a datalist prepared again at the same path) on a ``results.csv``
that has rows is refused rather than mixed into one table. It also records ``versions`` (dira3d's, and each bundle's
configs/metadata.json ``version``: the fine-tuning bundle, and dira_pretrain when a method is pretrained); a bundle
upgraded since the rows were made is warned about, not refused, and the earlier record kept (``earlier_versions``),
when new runs join rows of the grid (a rerun with nothing to run keeps the record as it was, and says nothing).

A seed seeds both a run's split (its label subset and early-stopping holdout) and its training (initialisation,
augmentation, batch order), so the spread over seeds mixes "which cases were labelled" with "how training went".
``split_seed: <n>`` (a whole number >= 0) gives every run the bundle's ``split_seed`` n: all seeds of a label fraction
(and fold) train on one subset and holdout, and the spread, the intervals and the t-tests measure the variance of
training alone (the table's note says so). ``results.csv`` then gains a ``split_seed`` column (after ``seed``), and
``split_seed`` is a recorded setting (``experiment.json``): a rerun with another one, or without it, on the same
``results.csv`` is refused. The runs of one label fraction (and fold) must then have drawn the same split across seeds
too, checked as across methods below. The bundle must have a ``split_seed`` setting (every task bundle does).

With ``folds``, every (method, label fraction, seed) runs once per fold, with the bundle's ``fold``
set to it (that fold is the test set, the others are trained on;
``runs/<method>_lf<f>_seed<s>_fold<k>``), and ``results.csv`` gains a ``fold`` column. A seed is one
repetition of the whole cross-validation: its folds draw their label subset and holdout with the
seed's rule (each from its own training folds), so its value in the statistics is the mean over its
folds, and mean ± std and the t-tests are over seeds, as without folds (the folds of one seed are
not independent samples). A seed whose folds are not all in ``results.csv`` (not run yet, or failed)
is left out of the statistics, never averaged over fewer folds, and listed under the table and in
the log with the folds it lacks. The folds
list is a recorded setting: a rerun with another one on the same ``results.csv`` is refused. The
bundle must have a ``fold`` setting and the datalist's ``training`` entries must carry every listed
``fold``, else the config is refused.

``overrides: {holdout: validation}`` early-stops every run on the datalist's own ``validation`` list instead of
10 % of the selected training patients (docs/finetuning.md); it is recorded in ``experiment.json`` and each run's
``metrics.json`` as any override, and refused before any run with ``folds`` or where the runs would refuse it
(no or an empty ``validation`` list, a patient in it also in ``training`` or ``test``, one class only).
The runs are scored on the test split, which the table compares: ``overrides: {eval_split: holdout}`` (or any split
but ``test``) is refused before any run, and a run whose ``metrics.json`` records another ``eval_split`` (a bundle whose
evaluate.json scores another split) fails with that reason and is not added to ``results.csv``.

``results.csv`` has one row per finished run: method, checkpoint, label_fraction, seed (split_seed) (fold), metric,
value, seconds, run_dir, and test_cases / test_positive, the test split's size and positives from the run's
``metrics.json`` (multi-label: each class's positives, ``;``-joined; empty where not known; docs/finetuning.md),
then train_cases, the cases the run trained on (the label fraction's selection less the early-stopping holdout), and
train_digest, holdout_digest, test_digest: which cases each split held (16 hex digits of a sha256 of the sorted case
ids; each run's ``splits.json`` lists them; docs/finetuning.md).
A results.csv written before those columns is resumed as it is (its rows keep them empty).

The config is checked before any run: unknown keys, missing checkpoints, datalist or bundle, and
override ids no bundle config defines are refused with the setting named; so are a negative seed (or split_seed, or
one that is not a whole number), two label fractions that the run folders or the table write alike (0.1 and 0.1000001: ``lf0.1``) or that keep the same
training entries for every seed (10 % and 25 % of 4 patients both keep 1: counts are rounded to whole patients, or
samples per class, at least one; without folds), a label fraction whose subset no run could train on for some seed
(and fold: fewer than 2 patients for the early-stopping holdout, or a classification holdout of one class; use a
larger fraction), a key beside ``pretrain`` in a method's mapping (a method has no
fine-tuning settings of its own: ``overrides`` are the same for every method), an empty checkpoint path (use null
for random init), a method name
that is not text (quote ``'2024':``) or not a plain folder name, ``overrides`` the grid sets for every run
(datalist, pretrained, label_fraction, seed, split_seed, output_dir, bundle_root, ckpt_dir: use the config's own
settings),
pretraining overrides that move its folders (dataset_dir, bundle_root, ckpt_dir, output_dir), a method's checkpoint
pretrained at another width than the runs build the network at (2D: another backbone or decoder_channels; the error
names the ``overrides`` to set, e.g. ``overrides: {width: 0.125}``), a method's own pretraining (``{pretrain: {...}}``)
whose settings build another network than the runs (the error names the method and the setting to change, in its
``pretrain:`` or in ``overrides``), and a method's
pretraining stages the bundle would refuse or its max_epochs never reaches. A run that fails is
logged and listed in ``failures.json`` (rewritten after every run, so it is there after Ctrl-C too); the other
runs go on, the command exits 1 at the end, and rerunning it retries only the failed runs. The command ends by
naming its outputs (results.csv, table.md, summary.json, the plots, runs/ with each run's metrics.json and
TensorBoard files, where its test metrics are the scalars test/<metric> at its last epoch; the plots' error bars are
the sample std over seeds). The table and ``summary.json`` count each run of the current grid once (rows of seeds,
fractions or methods no longer in the config stay in
``results.csv`` but out of the statistics). The note under the table gives the number of seeds and
the test; a cell of fewer seeds says ``n=…`` and every run left out (failed, or not run yet) is
named below it (and, at the end, in the log); a cell whose t-test is undefined (fewer than two
seeds on a side, or one value in every seed of both sides) says ``p n/a`` rather than showing none. A second table
gives the 95 % confidence interval of each cell's mean over its seeds (t-based; ``n/a`` for one seed; ``n/a (seeds
agree)`` where every seed gave one value; ``(2 seeds)``: one degree of freedom, mean ± 9.0 × std; ``(clipped)``: cut at
the range of an auc, dice or iou, [0, 1]), also in ``summary.json`` (``ci_low``, ``ci_high``, ``ci_note``). The table
names ``failures.json`` only while a failed run is listed there. One experiment runs in an ``output_dir`` at a time: a
second ``dira3d experiment`` on the same folder is refused at once, before its bundle checks load MONAI (the folder
lock of every dira3d output folder, ``<output_dir>/.dira3d.lock``, released by the system when the first process ends,
however it ends), so two processes never run the same grid twice into one ``results.csv``.

``test`` is the t-test of each method against the baseline at each label fraction: ``student`` (the
default: the paper's independent two-sample Student's test), ``welch`` (Welch's, for unequal spreads;
``welch: true`` is its older spelling and is refused beside another ``test``) or ``paired``
(``scipy.stats.ttest_rel``). Within one experiment a seed gives every method the same label subset,
early-stopping holdout and training seed (and, with folds, the same folds; with ``split_seed`` every seed has the
same subset and holdout, and a pair shares its training seed), so the runs of one seed
form a pair and the paired test is over the per-seed differences: more powerful than the independent
tests when a seed's draw makes the task easier or harder for every method alike. It is over the seeds
both methods have at that label fraction (with folds, a seed's value is its mean over folds); the
note gives the number of pairs, a cell tested on fewer pairs than it has seeds says ``pairs=…``, the
seeds of one side only are named under the table (``dira vs random @ 10 % labels: seed 3 (random
only)``), and ``p n/a`` there means fewer than 2 pairs or the same difference in every pair. The test
is not a setting of the runs: changing it and rerunning rewrites the table without running anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dira3d.utils.atomic import FolderNotWritableError
from dira3d.utils.cli_help import DefaultsRawDescriptionHelpFormatter
from dira3d.utils.interrupts import StoppedBySignal, interrupt_exit_code, interrupted_word, sigterm_as_interrupt
from dira3d.evaluation.results import write_report

# The command's parts, split out of this module; the names of ``__all__`` are importable from here as
# before: the config check (experiment_config), the methods' pretraining (experiment_pretrain), the grid
# of runs (experiment_grid); results.csv and the report are dira3d.evaluation.results.
from dira3d.evaluation.experiment_config import KNOWN, REQUIRED, check_config_bundle, load_config, read_config
from dira3d.evaluation.experiment_grid import (
    ExperimentBusy, ExperimentRunsFailed, Runner, cause_of, check_experiment_free, run_experiment,
)  # fmt: skip
from dira3d.evaluation.experiment_pretrain import SETTINGS_NAME, pretrain_method

__all__ = ["load_config", "run_experiment", "write_report", "main", "ExperimentRunsFailed", "ExperimentBusy", "Runner",
           "pretrain_method", "SETTINGS_NAME", "REQUIRED", "KNOWN"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dira3d experiment", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=DefaultsRawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML/JSON")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)  # the checks that need neither torch nor MONAI, then (as quick) the lock:
        check_experiment_free(config["output_dir"])  # a busy output_dir is refused before MONAI and torch load
        check_config_bundle(config, args.config)
    except ExperimentBusy as err:
        print(f"dira3d experiment: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    from dira3d.evaluation.finetune_messages import show_cache_lines

    show_cache_lines()  # each fine-tuning's cache: its size, or with cache_dir how many entries are already there
    try:
        with sigterm_as_interrupt():  # SIGTERM (SLURM preemption, scancel) as Ctrl-C; a pretraining stops gently itself
            run_experiment(config)
    except ExperimentRunsFailed as err:
        print(f"dira3d experiment: error: {err}", file=sys.stderr)
        return 1
    except ExperimentBusy as err:
        print(f"dira3d experiment: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StoppedBySignal) as err:  # Ctrl-C, SIGTERM: one line on how to go on, not a traceback
        # (a pretraining stopped by a signal wrote its last.pt first: the rerun resumes it); 130 / 143
        print(f"dira3d experiment: {interrupted_word(err)}; the finished runs are in {Path(config['output_dir']) / 'results.csv'}; "
              "rerun the same command to go on from there", file=sys.stderr)
        return interrupt_exit_code(err)
    except Exception as err:
        cause = cause_of(err)
        if cause is err and not isinstance(err, (ValueError, FileNotFoundError, FolderNotWritableError)):
            raise
        print(f"dira3d experiment: error: {cause}", file=sys.stderr)
        return 2
    print((Path(config["output_dir"]) / "table.md").read_text(encoding="utf-8"))
    print(written_message(config))
    return 0


def written_message(config: dict) -> str:
    """Where the experiment's outputs are, printed after the table (as every dira3d command ends)."""
    from dira3d.evaluation.case_metrics import cases_file

    out = Path(config["output_dir"])
    run = "<method>_lf<fraction>_seed<seed>" + ("_fold<fold>" if "folds" in config else "")
    cases = cases_file((config.get("overrides") or {}).get("eval_split") or "test")  # the split evaluate.json scored
    return (f"results:     {out / 'results.csv'} (one row per run; mean ± std, 95 % CI and p-values in {out / 'summary.json'})\n"
            f"table:       {out / 'table.md'}; plots: {out / (config['metric'] + '_vs_label_fraction.png')}, "
            f"{out / 'ablation.png'}\n"
            f"each run:    {out / 'runs'}/{run}/ (metrics.json: test metric, splits, settings; splits.json: the cases "
            f"of each split; {cases}: each case's metrics (segmentation) or label(s) and probability(ies) "
            "(classification); models/model.pt; TensorBoard files: curves, and the test metrics as test/<metric>)\n"
            f"TensorBoard: tensorboard --logdir {out / 'runs'}")


if __name__ == "__main__":
    raise SystemExit(main())
