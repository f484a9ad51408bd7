"""``dira3d pretrain``: run the ``bundles/dira_pretrain`` bundle (a thin wrapper over ``monai.bundle.run``).

Example::

    dira3d pretrain --datalist data/luna16/pretrain_datalist.json --output runs/dira --tiny \\
        --override dis_mode=moco --override "lambda_res=10"
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dira3d.engines.checkpoint_folder import check_checkpoint_folder_free
from dira3d.utils.atomic import removed_if_failed_empty
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.folder_lock import FolderInUseError
from dira3d.utils.interrupts import StoppedBySignal, interrupt_exit_code, loading_stopped, sigterm_as_interrupt
from dira3d.utils.overrides import as_bool, format_overrides, parse_value, shell_word

__all__ = ["BUNDLE_DIR", "parse_override", "interrupted_message", "visual_words_mismatch", "early_stop_note",
           "finished_message", "single_process_under_torchrun", "main"]

BUNDLE_DIR = Path(__file__).resolve().parents[2] / "bundles" / "dira_pretrain"


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` → ``(key, value)``, the value read by :func:`dira3d.utils.overrides.parse_value`
    (JSON, else a Python literal such as ``False`` or ``[{'name': 'res', 'losses': ['res']}]``, else text).

    Raises:
        ValueError: no ``=`` in ``text``.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--override {text!r}: write key=value, e.g. --override dis_mode=moco or --override max_epochs=10")
    return key.strip(), parse_value(value)


def interrupted_message(output: Path, overrides: dict, stopped: BaseException | None = None) -> str:
    """The one line printed when ``dira3d pretrain`` is stopped with Ctrl-C or SIGTERM: where the last
    checkpoint is (``<output>/models/last.pt``) and how to resume from it. ``stopped``: a
    :class:`StoppedBySignal`, the run finished its step and wrote ``last.pt`` at that iteration
    (:mod:`dira3d.engines.stopping`); else the interrupt that stopped it at once (a second Ctrl-C, or a
    Ctrl-C or SIGTERM before training started, e.g. while the data were cached; None: Ctrl-C)."""
    last = output / "models" / "last.pt"
    what = ("interrupted" if interrupt_exit_code(stopped) == 130 else "stopped by SIGTERM") if not isinstance(
        stopped, StoppedBySignal) else str(stopped)
    if not last.is_file():
        return f"{what} before the first checkpoint ({last} does not exist); rerunning the same command starts afresh"
    try:  # resume=False or "false" alike, as the checkpoint handler reads it
        resume = as_bool(overrides.get("resume", True), "resume")
    except ValueError:
        resume = True
    where = f"{last} saved" if isinstance(stopped, StoppedBySignal) else f"the last checkpoint is {last}"
    if not resume:
        return f"{what}; {where}; rerun without --override resume=false to resume from it"
    return f"{what}; {where}; rerun the same command to resume from it"


def _merged_config(configs: list[str], overrides: dict) -> Any:
    """The bundle configs merged as ``monai.bundle run`` merges them (later files win), overrides applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([c for c in configs if Path(c).is_file()])
    parser.update(dict(overrides))
    return parser


def visual_words_mismatch(datalist: Path, configs: list[str], overrides: dict) -> str:
    """Why ``datalist`` does not fit the configs ('' when it does): the output of ``dira3d visual-words``
    (``visual_words.json``: shards of patches) needs ``configs/visual_words.json``, which in turn reads only
    such an output. Without it the bundle loaded the shards as 5D images after caching, and said only that
    3D pretraining needs 3D volumes."""
    from dira3d.visual_words.writer import FORMAT as VW_FORMAT

    try:
        content = json.loads(datalist.read_text(encoding="utf-8"))
        meta = content.get("meta")
    except (OSError, ValueError, AttributeError):
        return ""  # not readable as a datalist: the bundle names the problem
    # visual_words.json records the command; manifest.json (which the dataset reads as well) its format
    is_vw = (isinstance(meta, dict) and meta.get("command") == "dira3d visual-words") or content.get("format") == VW_FORMAT
    target = str(_merged_config(configs, overrides).get("train#dataset#_target_", ""))
    reads_vw = "VisualWordPairDataset" in target
    if is_vw and not reads_vw:
        return (f"--datalist {datalist} is the output of `dira3d visual-words` (patch shards, not volumes); "
                "pretrain on it with --config visual_words.json")
    if reads_vw and not is_vw:
        return (f"--config visual_words.json reads the output of `dira3d visual-words`, but --datalist {datalist} is not "
                f"one; run `dira3d visual-words --datalist {datalist} --out VW_FOLDER` first and pass --datalist "
                "VW_FOLDER/visual_words.json, or leave out --config visual_words.json to pretrain on the volumes "
                "(every training volume a class)")
    return ""


def single_process_under_torchrun(configs: list[str], overrides: dict) -> str:
    """Why the configs do not fit a ``torchrun`` of several processes ('' when they do, or in one process): without
    ``--config multi_gpu_train.json`` (no ``init_distributed`` in the merged ``initialize``) every rank trained a run of
    its own into the same ``--output``; all but one were refused, each with a traceback, as the folder was in use."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 2:
        return ""
    steps = _merged_config(configs, overrides).get("initialize", [])
    if any("init_distributed" in str(step) or "init_process_group" in str(step) for step in steps):
        return ""
    return (f"torchrun started {world} processes (WORLD_SIZE={world}), but the configs train in one process: every "
            "process would pretrain on its own into the same --output; add --config multi_gpu_train.json "
            "(docs/reliability.md, Distributed training)")


def early_stop_note(last: Path) -> str:
    """Why the run in ``last`` (a ``last.pt``) ended before ``max_epochs``, when early stopping ended it; else ''.
    The file is memory-mapped (only the ``trainer`` entries are read); an unreadable one gives ''."""
    import torch

    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["trainer"].get("early_stop") or {}
    except Exception:  # no checkpoint of ours: the other lines say what there is
        return ""
    if state.get("stopped_epoch") is None:
        return ""
    return (f"stopped early after epoch {state['stopped_epoch']}: {state.get('metric', 'the validation loss')} had not "
            f"improved for {state['counter']} validation(s) in the final stage '{state['stage']}' (early_stop_patience="
            f"{state['patience']}); best.pt holds its best epoch, {state['best_epoch']}; rerun with a larger "
            "--override early_stop_patience=N (or null) to train on")


def finished_message(output: Path, configs: list[str], overrides: dict) -> str:
    """What ``dira3d pretrain`` prints at the end of a run: why it ended early when early stopping ended it
    (:func:`early_stop_note`), where the checkpoints and the TensorBoard logs are, and the fine-tuning command
    that starts from them (with the width the task bundle needs)."""
    from dira3d.engines.checkpoint import pretrained_checkpoint

    models, best, last = output / "models", output / "models" / "best.pt", output / "models" / "last.pt"
    if not last.is_file():
        return f"no checkpoint was written in {models}"
    parser = _merged_config(configs, overrides)
    try:
        width = float(parser.get_parsed_content("width"))
    except Exception:  # an expression of the user's: leave the width out of the hint
        width = 1.0
    start = pretrained_checkpoint(models)  # best.pt, or last.pt after a run without validation
    width_hint = "" if width == 1.0 else f" --set width={width:g}"
    stopped = early_stop_note(last)
    hint, doc = (_resnet_hint(parser), "docs/2d.md") if "backbone" in parser.get() else (width_hint, "docs/finetuning.md")
    channels = _channels_line(parser, overrides)
    return "\n".join(([stopped] if stopped else []) + [
        f"checkpoints: {best} (lowest validation loss of the last stage) and {last} (rerun the same command to resume "
        "or, with a higher --override max_epochs=N, to train on)" if start == best else
        f"checkpoint: {last} (no validation ran, so there is no best.pt: the last epoch's weights)" if not best.is_file()
        else f"checkpoint: {last} (no validation ran: the last epoch's weights; {best} is an earlier run's, not updated)",
        f"TensorBoard: tensorboard --logdir {output / 'eval'}",
        f"fine-tune:   dira3d finetune --bundle BUNDLE --datalist DATALIST --pretrained {shell_word(str(start))}{hint} "
        f"--output-dir runs/ft ({doc})",
    ] + ([channels] if channels else []))


def _channels_line(parser: Any, overrides: dict) -> str:
    """For a checkpoint of several input channels pretrained on a datalist of MR sequences (``dira3d prepare brats``,
    ``generic --sequences``: ``meta.channels``), the line saying to fine-tune ``brats_tumor_seg`` on those sequences, in
    their order: the task bundles' default is one channel (FLAIR), into which the fine-tuning averages the
    checkpoint's first convolution (a walk of 2026-11-28: the ``fine-tune:`` line named no channels). Else ''."""
    from dira3d.data.datalist import datalist_meta

    try:
        in_channels = int(parser.get_parsed_content("in_channels"))
    except Exception:  # an expression of the user's: no line
        return ""
    channels = datalist_meta(overrides.get("datalist") or parser.get("datalist")).get("channels") or []
    if in_channels < 2 or len(channels) != in_channels:
        return ""
    modalities = "all" if list(channels) == ["t1", "t1ce", "t2", "flair"] else ",".join(map(str, channels))
    return (f"             its {in_channels} input channels are the sequences {', '.join(map(str, channels))}: fine-tune "
            f"on them, in this order, with --bundle brats_tumor_seg --set modalities={modalities} (the bundle's "
            "default, flair alone, averages the first convolution over them; docs/data.md)")


def _resnet_hint(parser: Any) -> str:
    """The ``dira3d finetune`` options a 2D (``2d.json``: ResNet U-Net) checkpoint needs: ``--tiny`` for the network
    of ``2d_tiny.json`` (what the 2D bundles' ``tiny.json`` builds), ``--set`` of the settings that differ from the
    2D bundles' defaults otherwise; the width hint said nothing of them, and the bundles' resnet50 refused the weights."""
    from dira3d.evaluation.finetune import BUNDLES_2D, bundle_path, tiny_settings

    try:
        used = {key: parser.get_parsed_content(key) for key in ("backbone", "decoder_channels")}
    except Exception:  # an expression of the user's: leave the settings out of the hint
        return ""
    used["decoder_channels"] = [int(c) for c in used["decoder_channels"]]
    tiny = tiny_settings(BUNDLES_2D[0], tuple(used))
    if tiny and all(tiny.get(key) == value for key, value in used.items()):
        return " --tiny"
    try:  # the 2D bundles' defaults (they share their network settings)
        defaults = json.loads((bundle_path(BUNDLES_2D[0]) / "configs" / "train.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    changed = {key: value for key, value in used.items() if value != defaults.get(key)}
    return f" {format_overrides(changed, '--set')}" if changed else ""


def _add_2d_tiny(configs: list[str]) -> None:
    """``--tiny`` with ``2d.json``: the 3D ``tiny.json`` before ``2d.json`` was undone by it (batch 32, 224² ResNet-50:
    on a few images, "the training data loader yields no batch"); ``2d_tiny.json`` goes after the bundle's own 2D
    configs (it must follow the method's file, e.g. ``2d_moco.json``'s queue), before any other file of the user's."""
    tiny = BUNDLE_DIR / "configs" / "2d_tiny.json"
    resolved = [Path(path).resolve() for path in configs]
    own = [i for i, path in enumerate(resolved) if path.parent == tiny.parent and path.name.startswith("2d")]
    if tiny not in resolved:
        configs.insert(own[-1] + 1 if own else len(configs), str(tiny))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dira3d pretrain", description="DiRA pretraining (bundles/dira_pretrain).", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--datalist", required=True, help="pretraining datalist JSON (e.g. from `dira3d prepare luna16`)")
    parser.add_argument("--output", default="runs/dira_pretrain", help="folder for models/ (checkpoints) and eval/ (TensorBoard)")
    parser.add_argument("--tiny", action="store_true", help="tiny network and patches for a CPU demo (configs/tiny.json; "
                                                            "with --config 2d.json, 2d_tiny.json after the 2D configs)")
    parser.add_argument("--config", action="append", default=[],
                        help="extra config file(s), applied last: a path, or a name in the bundle's configs/ "
                             "(e.g. performance.json for bf16 + channels-last + torch.compile on a GPU, 2d.json)")
    parser.add_argument("--override", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any bundle id, e.g. dis_mode=moco")
    args = parser.parse_args(argv)
    datalist = Path(args.datalist)
    if datalist.is_dir():  # e.g. the --dst of `dira3d prepare`: name the datalists in it
        from dira3d.data.datalist import folder_not_datalist
        parser.error(folder_not_datalist(datalist))
    if not datalist.is_file():
        parser.error(f"datalist {datalist} does not exist; make one with `dira3d prepare luna16 ...` or `dira3d prepare generic ...`")
    configs = [str(BUNDLE_DIR / "configs" / "train.json")]
    two_d = any(Path(name).name == "2d.json" for name in args.config)
    if args.tiny and not two_d:
        configs.append(str(BUNDLE_DIR / "configs" / "tiny.json"))
    for name in args.config:  # a path, or the name of one of the bundle's own configs (performance.json, 2d.json, ...)
        own = BUNDLE_DIR / "configs" / name
        if Path(name).is_file():
            configs.append(str(name))
        elif "/" not in name and own.is_file():
            configs.append(str(own))
        elif Path(name).is_dir():  # was "--config models: no such file", which the folder is not
            inside = sorted(p.name for p in Path(name).glob("*.json")) + sorted(p.name for p in Path(name).glob("*.yaml"))
            parser.error(f"--config {name} is a folder; give a config file (JSON or YAML) "
                         + (f"in it ({', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}) " if inside else "")
                         + "or one of the bundle's configs by name (e.g. performance.json)")
        else:
            names = sorted(p.name for p in (BUNDLE_DIR / "configs").glob("*.json"))
            parser.error(f"--config {name}: no such file; give a path or one of the bundle's configs: {', '.join(names)}")
    if args.tiny and two_d:
        _add_2d_tiny(configs)
    try:
        overrides = dict(parse_override(text) for text in args.override)
    except ValueError as err:
        parser.error(str(err))
    set_here = {"ckpt_dir": "from --output (models/ go under it)", "output_dir": "from --output (eval/ goes under it)",
           "datalist": "from --datalist", "dataset_dir": "from --datalist (its folder)",
           "bundle_root": "to the bundle's folder (outputs go to --output)"}
    for key in sorted(set_here.keys() & overrides.keys()):  # passed below: the bundle run would get it twice (a TypeError)
        parser.error(f"--override {key}=...: dira3d pretrain sets {key} {set_here[key]}; use that option instead")
    output = Path(args.output)
    try:  # the bundle's own check (its initialize runs it again), here before torch and MONAI load: refused at once
        check_checkpoint_folder_free(output.resolve() / "models")
    except FolderInUseError as err:
        print(f"dira3d pretrain: error: {err}", file=sys.stderr)
        return 2
    except OSError:  # e.g. a folder it may not look into: check_writable below names the problem, as before
        pass

    from dira3d.utils.checkpoint import check_writable
    from dira3d.utils.overrides import check_overrides, run_bundle

    try:  # torch and MONAI load from here on (seconds): a Ctrl-C or SIGTERM meanwhile ends with one line, as in dira3d.cli
        with sigterm_as_interrupt():
            try:  # MONAI would ignore an unknown id silently: a typo would train with the default
                check_overrides(configs, overrides, where="--override")
            except ValueError as err:
                parser.error(str(err))
            mismatch = visual_words_mismatch(datalist, configs, overrides) or single_process_under_torchrun(configs, overrides)
            if mismatch:
                parser.error(mismatch)
            from dira3d.engines.finished import RunAlreadyFinished, finished_line_unlogged
            from dira3d.engines.inputs import setting_error_in
    except KeyboardInterrupt as err:
        if _main_rank():  # under torchrun every rank gets the signal: one line (the others' said the same)
            print(loading_stopped("pretrain", err), file=sys.stderr)
        return interrupt_exit_code(err)

    try:
        with ExitStack() as created:  # a run refused at its start (a bad setting, data that do not fit) or stopped
            # before it wrote anything leaves none of the folders it created, empty, behind
            for folder in (output, output / "models", output / "eval"):
                created.enter_context(removed_if_failed_empty(folder))
            try:  # before minutes of data loading: a read-only or full disk fails now
                check_writable(output, what="output folder (--output)")
            except OSError as err:
                parser.error(str(err))
            # a finished run's line is printed below, naming this command's way to a larger max_epochs: not logged too
            created.enter_context(finished_line_unlogged())
            # run_bundle, not monai.bundle.run: run() drops every override whose value is None, so
            # `--override views=null` (identity views) or `intensity_range=null` would silently keep the default
            with sigterm_as_interrupt():  # before training (caching data): as Ctrl-C; while it runs, stopping.py's stop
                run_bundle(
                    configs,
                    meta_file=str(BUNDLE_DIR / "configs" / "metadata.json"),
                    logging_file=str(BUNDLE_DIR / "configs" / "logging.conf"),
                    bundle_root=str(BUNDLE_DIR),
                    datalist=str(datalist.resolve()),
                    dataset_dir=str(datalist.resolve().parent),
                    # absolute, as datalist: a relative folder named '$...', '%...' or '@...' would be read by MONAI
                    # as an expression (run as Python), a macro or a reference
                    ckpt_dir=str(output.resolve() / "models"),
                    output_dir=str(output.resolve() / "eval"),
                    **overrides,
                )
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM before training: one line on how to go on, not a traceback
        if _main_rank():  # rank 0's alone under torchrun, as after a stop in training: the ranks share --output
            print(f"dira3d pretrain: {interrupted_message(output, overrides, err)}", file=sys.stderr)
        return interrupt_exit_code(err)
    except RunAlreadyFinished as done:  # a rerun of a finished run: nothing loaded or written (engines.finished)
        if _main_rank():
            print(f"dira3d pretrain: {done.told_with('--override max_epochs=N')}", flush=True)
    except StoppedBySignal as stop:  # SIGTERM or Ctrl-C: the step finished and last.pt was written first
        if _main_rank():  # every rank stops at the same iteration (stopping.py): one line says where last.pt is
            print(f"dira3d pretrain: {interrupted_message(output, overrides, stop)}", file=sys.stderr)
        return int(stop.code)
    except Exception as err:
        # MONAI wraps transform and config errors; print the bad file's or setting's own message
        cause = setting_error_in(err)
        if cause is None:
            from dira3d.engines.faults import NonFiniteLossError
            from dira3d.utils.bundle_errors import error_in_chain

            # a NaN/Inf loss (on_nonfinite='stop'): its message names the iteration, the stage and what to change;
            # MONAI's wrapper traceback around it (40 lines) said nothing more
            nonfinite = error_in_chain(err, (NonFiniteLossError,))
            if nonfinite is None:
                raise
            print(f"dira3d pretrain: error: {nonfinite}", file=sys.stderr)
            return 1
        print(f"dira3d pretrain: error: {cause}", file=sys.stderr)
        return 2
    if _main_rank():
        print(finished_message(output, configs, {"datalist": str(datalist.resolve()), **overrides}), flush=True)
    return 0


def _main_rank() -> bool:
    """Whether this process prints the end-of-run lines: every process in one run, rank 0 alone under ``torchrun``
    (``torchrun --nproc_per_node=N -m dira3d pretrain ... --config multi_gpu_train.json``: every rank printed the
    same lines; the line after a Ctrl-C or SIGTERM too, which ``torchrun`` and Slurm send to every rank: a rank stopped
    on its own makes ``torchrun`` stop the others with SIGTERM, so rank 0 still says it). The process group is gone by
    then (the bundle's ``finalize`` leaves it), or not formed yet: ``torchrun``'s ``RANK``."""
    from dira3d.engines.distributed import launcher_rank

    return launcher_rank() == 0
