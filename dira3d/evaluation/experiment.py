"""``dira3d experiment``: the paper's evaluation protocol as one resumable command.

A grid of initialisations (random, L_dis only, L_dis + L_res, full DiRA, any checkpoint) x label fractions x seeds
(x cross-validation folds) is fine-tuned through one task bundle; methods with a pretrain entry are pretrained
first. The config is checked before any run (a bad setting is refused, named). Each finished run is added to
results.csv at once: rerunning the same command goes on where it stopped, runs only what is missing and retries
failed runs (failures.json); a rerun with other settings on the same output_dir is refused rather than mixed into one
table. The table (mean ± std over seeds, p-values against the baseline, 95 % confidence intervals), summary.json and
the plots are rewritten as runs finish; the command ends by naming its outputs.

Config (YAML or JSON)::

    bundle: luna16_nodule_fpr          # a folder under bundles/, or a path to a bundle
    datalist: prepared/ncc_datalist.json
    metric: auc                        # key of the metrics dict the fine-tuning returns
    output_dir: runs/experiment
    baseline: random                   # method the t-tests compare against (default: the first method)
    test: student                      # or welch, or paired (by seed)
    seeds: [0, 1, 2, 3, 4]
    split_seed: 0                      # optional: every seed trains on split_seed's label subset
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

Relative paths in the config are relative to its folder. The full documentation (every setting, what a rerun reuses
or refuses, the columns of results.csv, the outputs): docs/results.md, "The dira3d experiment command"; folds,
split_seed and the t-tests: docs/finetuning.md.
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
    parser = argparse.ArgumentParser(prog="dira3d experiment", description=__doc__.split("\n\n")[0].replace("``", ""),
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
    # the methods pretrained here log their pretraining to pretrain/<method>/eval, outside runs/
    pretrains = any(isinstance(spec, dict) for spec in (config.get("methods") or {}).values())
    pretrained = f"; pretraining: tensorboard --logdir {out / 'pretrain'} (<method>/eval)" if pretrains else ""
    return (f"results:     {out / 'results.csv'} (one row per run; mean ± std, 95 % CI and p-values in {out / 'summary.json'})\n"
            f"table:       {out / 'table.md'}; plots: {out / (config['metric'] + '_vs_label_fraction.png')}, "
            f"{out / 'ablation.png'}\n"
            f"each run:    {out / 'runs'}/{run}/ (metrics.json: test metric, splits, settings; splits.json: the cases "
            f"of each split; {cases}: each case's metrics (segmentation) or label(s) and probability(ies) "
            "(classification); models/model.pt; TensorBoard files: curves, and the test metrics as test/<metric>)\n"
            f"TensorBoard: tensorboard --logdir {out / 'runs'}" + pretrained)


if __name__ == "__main__":
    raise SystemExit(main())
