"""The README's main command: DiRA end to end on embedded synthetic data, on a CPU, in minutes.

1. chest-CT phantoms in the LUNA16 layout (``dira3d synthetic``);
2. data preparation: normalised volumes, a pretraining datalist, nodule candidate cubes;
3. TransVW visual-word discovery on the training volumes;
4. staged 3D DiRA pretraining (dis → dis+res → dis+res+adv) with the bundle's tiny preset;
5. a short fine-tuning comparison on nodule false-positive reduction: random init vs DiRA.

Every step is resumable: a second run reuses what the first one wrote. The real work is done by
the same library functions and bundles as the individual commands; this file only chains them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.progress import show_progress

__all__ = ["SMALLEST_SIZES", "check_moved", "check_words", "count_problem", "main", "option_problem", "phantom_size",
           "stage_table", "words_heading"]

REPO = Path(__file__).resolve().parents[1]
# the smallest --size whose phantoms give the demo's visual words (32 x 32 x 16 patches, borders 16 16 8), found by
# trying (2026-11-28, 20 phantoms, 10 words): 112 112 48 and 128 128 32 work; 112 112 40, 104 104 64 and 64 64 32 fail
# (no patch passes the lung filter in enough of the volumes), 128 128 24 too (patch + borders do not fit)
SMALLEST_SIZES = ((112, 112, 48), (128, 128, 32))
PRETRAIN = REPO / "bundles" / "dira_pretrain" / "configs"


def _say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def stage_table(log_dir: Path, stages: list[dict]) -> str:
    """Per-stage loss table from the TensorBoard event files: the epoch means of each term, from the
    stage's first epoch to its last (stages end at their ``until_epoch``; the last runs to the end)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    terms = [t for t in ("loss_dis", "loss_res", "loss_adv", "loss_d", "d_real", "d_fake") if f"train_{t}" in tags]
    epochs = sorted({e.step for t in terms for e in acc.Scalars(f"train_{t}")})
    lines = ["| stage | losses | epochs | " + " | ".join(terms) + " |", "|---|---|---|" + "---|" * len(terms)]
    first = 1
    for stage in stages:
        last = stage.get("until_epoch", epochs[-1] if epochs else first)
        mine = [e for e in epochs if first <= e <= last]
        first = last + 1
        if not mine:
            continue
        cells = []
        for term in terms:
            values = [e.value for e in acc.Scalars(f"train_{term}") if e.step in mine]
            cells.append(f"{values[0]:.4f} → {values[-1]:.4f}" if values else "–")
        lines.append(f"| {stage['name']} | {'+'.join(stage['losses'])} | {mine[0]}–{mine[-1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def count_problem(count: int, classes: int) -> str | None:
    """Why ``count`` phantoms cannot give ``classes`` visual words, or None. Phantom ``i`` goes to LUNA16
    subset ``i % 10``, prepared with the official split: training 0-4, validation 5-6, test 7-9; the
    visual words need 2 validation volumes and ``classes`` (2 or more) training volumes."""
    train = sum(i % 10 < 5 for i in range(count))
    if count < 10:
        return (f"--count {count} is too few phantoms: the demo needs 10 or more (phantom i goes to LUNA16 subset "
                "i % 10, and the validation subsets 5-6 and test subsets 7-9 need one phantom each)")
    if classes < 2 or classes > train:  # (the count needed only for too many classes: none is for fewer than 2)
        need = next(c for c in range(10, 10 * classes + 10) if sum(i % 10 < 5 for i in range(c)) >= classes) \
            if classes >= 2 else 0
        fix = "choose --classes 2 or more" if classes < 2 else f"pass --count {need} or more, or --classes {train} or fewer"
        return (f"--classes {classes} is not possible with --count {count}: its {train} training phantoms "
                f"(subsets 0-4) give 2 to {train} visual words; {fix}")
    return None


def option_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the demo's other numbers (``--count`` / ``--classes``: :func:`count_problem`), or None:
    each was a traceback (``--epochs-per-stage 0``, ``--size 0 0 0``, ``--classes -1``), an error naming no option
    (``--seed -1``) or an empty results table (``--seeds 0``); a ``--size`` below :data:`SMALLEST_SIZES` (64 64 32)
    failed at the visual-word step advising that step's options (``--max-dense-fraction``, ``--lung-filter``)."""
    from dira3d.data.synthetic import MIN_SIZE

    if args.epochs_per_stage < 1:
        return f"--epochs-per-stage {args.epochs_per_stage}: pass 1 or more (each of the 3 stages trains that many epochs)"
    smallest = " or ".join(" ".join(map(str, sizes)) for sizes in SMALLEST_SIZES)
    if min(args.size) < MIN_SIZE:
        return (f"--size {' '.join(map(str, args.size))}: a phantom needs at least {MIN_SIZE} voxels per axis "
                f"and the demo {smallest} (the default is 128 128 64)")
    if not any(all(size >= least for size, least in zip(args.size, sizes)) for sizes in SMALLEST_SIZES):
        return (f"--size {' '.join(map(str, args.size))}: the demo needs phantoms of at least {smallest} voxels "
                "(x y z): in smaller ones too few of its 32 x 32 x 16 visual-word patches pass TransVW's lung filter "
                "(most of each is dense tissue), or none fits (the default is 128 128 64)")
    if args.seeds < 1 and not args.skip_finetune:
        return f"--seeds {args.seeds}: pass 1 or more fine-tuning seeds per initialisation (or --skip-finetune for none)"
    if args.seed < 0:
        return f"--seed {args.seed}: pass 0 or more"
    return None


def _phantoms_and_prepare(out: Path, count: int, size: tuple[int, int, int], seed: int) -> Path:
    from dira3d.data.luna16 import prepare
    from dira3d.data.synthetic import write_luna16_phantoms

    raw, prepared = out / "luna16_raw", out / "luna16_prepared"
    if not (raw / "annotations.csv").is_file():
        _say(f"1/5 writing {count} chest-CT phantoms (LUNA16 layout) to {raw}")
        # overwrite: phantoms without annotations.csv (written last) are those of a demo stopped while writing them
        write_luna16_phantoms(raw, count=count, size=size, spacing=(320 / size[0], 320 / size[1], 320 / size[2]),
                              seed=seed, false_positives=8, overwrite=True)
    else:
        held = sorted(raw.glob("subset*/*.mhd"))
        if len(held) != count:  # another --count: its words and splits would not be those checked in main
            raise ValueError(f"{raw} holds {len(held)} phantoms from an earlier demo, not --count {count}; rerun with "
                             f"--count {len(held)} to go on with them, or choose another --out")
        earlier = phantom_size(held[0]) if held else None
        if earlier is not None and earlier != tuple(size):  # was reused without a word, at the earlier size
            raise ValueError(f"{raw} holds phantoms of --size {' '.join(map(str, earlier))} from an earlier demo, not "
                             f"{' '.join(map(str, size))}; rerun with --size {' '.join(map(str, earlier))} to go on "
                             "with them, or choose another --out")
        _say(f"1/5 phantoms already in {raw}")
    _say(f"2/5 preparing them (HU window → [0, 1], RAS, candidate cubes) into {prepared}")
    results = prepare(raw, prepared, workers=2, progress=show_progress())  # a bar on a terminal only
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"data preparation failed for {len(failed)} case(s); see {prepared / 'report.json'}")
    if results and all(r.status == "skipped" for r in results):
        print(f"    all {len(results)} cases already prepared: reused", flush=True)
    return prepared


def phantom_size(header: Path) -> tuple[int, ...] | None:
    """The voxel size (``DimSize``) a MetaImage header records, or None where it records none readable."""
    from dira3d.data.io import meta_header

    try:
        return tuple(int(v) for v in meta_header(header)["DimSize"].split())
    except (OSError, KeyError, ValueError):  # unreadable, or no DimSize line: nothing to compare
        return None


def check_moved(out: Path) -> None:
    """Refuse an ``--out`` copied or moved from where a demo wrote it: its prepared data record the phantoms' folder
    they were prepared from (``prepared.json``), which ``dira3d prepare`` refuses to change, naming its own
    ``--src`` / ``--dst`` / ``--overwrite``, options the demo does not have; the fine-tuning step records the
    checkpoint's path too. A demo without that record is left as it is."""
    import json

    raw, record = out / "luna16_raw", out / "luna16_prepared" / "prepared.json"
    try:
        source = json.loads(record.read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, TypeError, KeyError):
        return
    if not isinstance(source, str) or Path(source) == raw.resolve():
        return
    earlier = Path(source).parent if Path(source).name == raw.name else Path(source)
    raise ValueError(f"{out} holds a demo written in {earlier} and copied or moved here; a demo goes on only in the "
                     f"folder it was written in: rerun with --out {earlier} to go on with it (move it back if it was "
                     f"moved), or choose a new --out to run the demo again from its first step")


def check_words(vw: Path, classes: int, seed: int) -> None:
    """Refuse visual words an earlier demo discovered with another ``--classes`` or ``--seed`` (their manifest), before
    any step: the visual-word step refused them advising ``--overwrite``, an option the demo does not have."""
    import json

    try:
        manifest = json.loads((vw / "manifest.json").read_text(encoding="utf-8"))
        earlier = {"classes": manifest["params"]["classes"], "seed": manifest["seed"]}
    except (OSError, ValueError, TypeError, KeyError):  # none, or not readable: the step itself says what it finds
        return
    for name, value in (("classes", classes), ("seed", seed)):
        if earlier[name] != value:
            raise ValueError(f"{vw} holds the visual words of an earlier demo with --{name} {earlier[name]}, not "
                             f"{value}; rerun with --{name} {earlier[name]} to go on with them, or choose another "
                             f"--out for a demo with --{name} {value}")


def words_heading(vw: Path, classes: int, n_train: int) -> str:
    """Step 3's heading: the words an earlier demo discovered in ``vw`` (its manifest complete) are reused, as a
    finished pretraining is (it said "discovering" on every rerun); otherwise they are discovered (or resumed)."""
    import json

    try:
        done = json.loads((vw / "manifest.json").read_text(encoding="utf-8")).get("status") == "complete"
    except (OSError, ValueError, AttributeError):
        done = False
    if done:
        return f"3/5 visual words already in {vw}: {classes} TransVW visual words × {n_train} instances reused"
    return f"3/5 discovering {classes} TransVW visual words × {n_train} instances into {vw}"


def _visual_words(prepared: Path, out: Path, classes: int, patch: tuple[int, int, int], seed: int) -> Path:
    import json

    from dira3d.visual_words import discover_visual_words

    vw = out / "visual_words"
    datalist = prepared / "pretrain_datalist.json"
    n_train = len(json.loads(datalist.read_text(encoding="utf-8"))["training"])
    _say(words_heading(vw, classes, n_train))
    discover_visual_words(datalist, vw, classes=classes, neighbours=n_train, val_neighbours=2, patch_size=patch,
                          border=(patch[0] // 2, patch[1] // 2, patch[2] // 2), extractor_size=(64, 64, 32),
                          extractor_epochs=2, extractor_width=0.25, seed=seed)
    return vw


STAGES_RECORD = "demo_stages.json"  # in the pretraining folder: the --epochs-per-stage its last.pt was trained with


def _check_stages(run_dir: Path, epochs_per_stage: int) -> None:
    """Refuse a pretraining folder whose ``last.pt`` an earlier demo trained with another ``--epochs-per-stage`` (its
    record, :func:`_record_stages`): the rerun went on from ``last.pt`` with other stage ends (epochs of one stage's
    losses counted in another's; the table named the wrong epochs) or, with a smaller one, said it had finished. A
    ``last.pt`` without the record (a demo before it) is left as it is."""
    import json

    record = run_dir / STAGES_RECORD
    if not (run_dir / "models" / "last.pt").is_file() or not record.is_file():
        return
    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))["epochs_per_stage"]
    except (OSError, ValueError, TypeError, KeyError):  # garbled: not known, as without the record
        return
    if earlier != epochs_per_stage:
        raise ValueError(f"{run_dir} holds the pretraining of an earlier demo with --epochs-per-stage {earlier}, not "
                         f"{epochs_per_stage}, and its stages cannot be changed; rerun with --epochs-per-stage {earlier} "
                         f"to go on with it, or choose another --out to pretrain with {epochs_per_stage}")


def _record_stages(run_dir: Path, epochs_per_stage: int) -> None:
    """Record the ``--epochs-per-stage`` of the pretraining about to start in ``run_dir`` (for :func:`_check_stages`),
    unless a ``last.pt`` is there (the record of the run it continues is kept)."""
    import json

    from dira3d.utils.atomic import atomic_write_text

    if not (run_dir / "models" / "last.pt").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / STAGES_RECORD, json.dumps({"epochs_per_stage": epochs_per_stage}) + "\n")


def _pretrain(vw: Path, out: Path, patch: tuple[int, int, int], epochs_per_stage: int, seed: int) -> tuple[Path, list]:
    from dira3d.utils.overrides import run_bundle as run  # as `dira3d pretrain` (monai.bundle.run warns of eval)

    run_dir = out / "pretrain"
    stages = [
        {"name": "dis", "until_epoch": epochs_per_stage, "losses": ["dis"]},
        {"name": "dis_res", "until_epoch": 2 * epochs_per_stage, "losses": ["dis", "res"]},
        {"name": "dira", "losses": ["dis", "res", "adv"]},
    ]
    _say(f"4/5 pretraining 3D DiRA (tiny preset, stages dis → dis+res → dis+res+adv) into {run_dir}")
    from dira3d.engines.finished import RunAlreadyFinished, finished_line_unlogged

    _record_stages(run_dir, epochs_per_stage)
    try:  # the pretraining's line that it has finished (its advice, a larger max_epochs, is the bundle's) is not
        # logged: the demo says it in its own options
        with finished_line_unlogged():
            run(config_file=[str(PRETRAIN / "train.json"), str(PRETRAIN / "tiny.json"), str(PRETRAIN / "visual_words.json")],
                meta_file=str(PRETRAIN / "metadata.json"), logging_file=str(PRETRAIN / "logging.conf"),
                bundle_root=str(run_dir), dataset_dir=str(vw), patch_size=list(patch), stages=stages,
                max_epochs=3 * epochs_per_stage, batch_size=8, log_every=5, image_every=20, seed=seed)
    except RunAlreadyFinished:  # a rerun: the finished pretraining is reused, nothing is loaded again
        print(f"    already finished ({run_dir / 'models' / 'last.pt'}, 3 stages of --epochs-per-stage "
              f"{epochs_per_stage}): reused, nothing trained again; to pretrain longer, rerun with a larger "
              "--epochs-per-stage and another --out (a new demo from its first step)", flush=True)
    return run_dir, stages


def _finetune(prepared: Path, checkpoint: Path, out: Path, seeds: int) -> str:
    from dira3d.evaluation.experiment import run_experiment

    _say(f"5/5 fine-tuning nodule false-positive reduction: random init vs DiRA, {seeds} seed{'' if seeds == 1 else 's'}")
    config = {
        "bundle": "luna16_nodule_fpr", "datalist": str(prepared / "ncc_datalist.json"), "metric": "auc",
        "output_dir": str(out / "experiment"), "baseline": "random", "seeds": list(range(seeds)),
        "label_fractions": [1.0], "methods": {"random": None, "dira": str(checkpoint)},
        "overrides": {"tiny": True, "max_epochs": 5},
    }
    run_experiment(config)
    return (out / "experiment" / "table.md").read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from dira3d.cli import quiet_missing_nvimgcodec

    quiet_missing_nvimgcodec()  # `make demo` runs this module directly, not through the dira3d command
    parser = argparse.ArgumentParser(prog="dira3d demo", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
    parser.add_argument("--count", type=int, default=20, help="number of phantoms")
    parser.add_argument("--size", type=int, nargs=3, default=(128, 128, 64), help="phantom size x y z (voxels), at least "
                        + " or ".join(" ".join(map(str, sizes)) for sizes in SMALLEST_SIZES))
    parser.add_argument("--classes", type=int, default=8, help="visual words to discover")
    parser.add_argument("--epochs-per-stage", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per initialisation")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problem = count_problem(args.count, args.classes) or option_problem(args)
    if problem:  # before anything is written, not a traceback from the visual-word step
        parser.error(problem)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder; choose a folder for what the demo writes")
    from dira3d.utils.atomic import FolderNotWritableError, check_writable

    try:  # one line naming the folder before any step, not a traceback from the phantom writer
        check_writable(out, what="output folder (--out)", advice="choose another --out")
    except FolderNotWritableError as err:
        parser.error(str(err))
    patch = (32, 32, 16)
    from dira3d.utils.interrupts import (StoppedBySignal, WrittenFiles, interrupt_exit_code, interrupted_word,
                                         sigterm_as_interrupt)

    written = WrittenFiles(out)
    try:
        with sigterm_as_interrupt():  # SIGTERM as Ctrl-C; the pretraining stops gently itself (last.pt written)
            check_moved(out)  # before any step (the --count and --size checks: step 1)
            check_words(out / "visual_words", args.classes, args.seed)
            _check_stages(out / "pretrain", args.epochs_per_stage)
            prepared = _phantoms_and_prepare(out, args.count, tuple(args.size), args.seed)
            vw = _visual_words(prepared, out, args.classes, patch, args.seed)
            run_dir, stages = _pretrain(vw, out, patch, args.epochs_per_stage, args.seed)
            table = stage_table(run_dir / "eval", stages)
            results = None if args.skip_finetune else _finetune(prepared, run_dir / "models" / "best.pt", out, args.seeds)
    except ValueError as err:  # e.g. phantoms of another --count in --out: one line, not a traceback
        print(f"dira3d demo: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, StoppedBySignal) as err:  # Ctrl-C or SIGTERM: one line on how to go on, not a traceback
        what = (f"nothing was written to {out}" if not written.since() else
                f"what it wrote so far is kept in {out}: rerun the same command to go on (finished steps are reused)")
        print(f"\ndira3d demo: {interrupted_word(err)}; {what}", file=sys.stderr)
        return interrupt_exit_code(err)

    _say(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    print("\nPretraining, per stage (epoch means of each loss, first → last epoch of the stage):\n" + table)
    if results:
        print("\nNodule false-positive reduction (test AUC, tiny fine-tuning):\n" + results)
    print(f"checkpoint:  {run_dir / 'models' / 'best.pt'}  (and last.pt; load with dira3d.networks.load_pretrained)")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'eval'}")
    print("These are tiny CPU settings for a first look, not the paper's: see docs/results.md for the full comparison.")
    return 0


if __name__ == "__main__":  # `make demo`: as `dira3d demo` (dira3d.cli: e.g. `| head` ends quietly, exit 141)
    from dira3d.cli import main as cli_main

    raise SystemExit(cli_main(["demo", *sys.argv[1:]]))
