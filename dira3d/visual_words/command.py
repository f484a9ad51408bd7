"""``dira3d visual-words``: TransVW self-discovery from a pretraining datalist.

Example::

    dira3d visual-words --datalist prepared/datalist.json --out vw --classes 50 --neighbours 200 \\
        --val-neighbours 30 --patch-size 64 64 32 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dira3d.data.datalist import check_datalist_file, split_option
from dira3d.utils.atomic import check_writable, removed_if_failed_empty
from dira3d.utils.cli_help import DefaultsHelpFormatter
from dira3d.utils.folder_lock import FolderInUseError
from dira3d.utils.interrupts import interrupt_exit_code, interrupted_word, loading_stopped, sigterm_as_interrupt
from dira3d.utils.overrides import format_overrides, shell_word
from dira3d.visual_words.coordinates import CoordinateSamplingError
from dira3d.visual_words.filter_settings import LUNG_FILTER_CHOICES
from dira3d.visual_words.writer import DATALIST_NAME, MANIFEST_NAME, out_folder_lock, read_manifest

# torch and MONAI (dira3d.visual_words.discover, .extractor, .embedding_chunks) are imported where they are needed, so
# that a missing --datalist is refused at once (docs/benchmarks.md)

__all__ = ["build_parser", "interrupted_message", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dira3d visual-words``."""
    p = argparse.ArgumentParser(prog="dira3d visual-words", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--datalist", required=True, help="pretraining datalist JSON (training / validation entries)")
    p.add_argument("--out", required=True, help="output folder: shards/, manifest.json, visual_words.json")
    p.add_argument("--classes", type=int, default=50, help="number of visual words C, 2 or more")
    p.add_argument("--neighbours", type=int, default=200, help="training instances per class K, 2 or more (pretraining pairs two of a word)")
    p.add_argument("--val-neighbours", type=int, default=30, help="validation instances per class: 0 (none) or 2 or more")
    p.add_argument("--patch-size", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"), help="visual-word patch size (voxels)")
    p.add_argument("--border", type=int, nargs=3, default=(100, 100, 30), metavar=("X", "Y", "Z"), help="voxels kept free at the volume faces")
    p.add_argument("--min-distance", type=float, default=5.0, help="min distance (voxels) between class centres")
    p.add_argument("--hu-window", type=float, nargs=2, default=(-1000.0, 1000.0), metavar=("LO", "HI"), help="the volumes' HU window")
    p.add_argument("--dense-hu", type=float, default=-150.0, help="lung filter: HU counted as dense tissue")
    p.add_argument("--max-dense-fraction", type=float, default=0.15, help="lung filter: max fraction of dense voxels")
    p.add_argument("--lung-filter", choices=LUNG_FILTER_CHOICES, default="auto",
                   help="TransVW's lung filter (a CT rule): auto = off for a datalist prepared as MR (meta.modality mr), on otherwise")
    p.add_argument("--body-filter", choices=LUNG_FILTER_CHOICES, default="auto",
                   help="refuse patches more than --max-outside-fraction outside the body (air around the patient passes the "
                        "lung filter): auto = on for a datalist prepared as CT by `dira3d prepare generic` (meta.modality ct)")
    p.add_argument("--max-outside-fraction", type=float, default=0.5, help="body filter: max fraction of a patch outside the body")
    p.add_argument("--max-tries", type=int, default=200, help="centres tried per reference before the next reference")
    p.add_argument("--metric", choices=("l2", "cosine"), default="l2", help="embedding distance for the nearest neighbours")
    p.add_argument("--multi-resolution", action="store_true", help="two extra rescaled crops per instance")
    p.add_argument("--extractor", choices=("autoencoder", "checkpoint"), default="autoencoder",
                   help="autoencoder: train one on the volumes (kept per epoch in --out/extractor.pt); checkpoint: a pretraining checkpoint's encoder")
    p.add_argument("--checkpoint", help="dira3d pretraining checkpoint (with --extractor checkpoint)")
    p.add_argument("--extractor-size", type=int, nargs=3, default=(128, 128, 64), metavar=("X", "Y", "Z"), help="volumes are resized to this for the extractor (each divisible by 8)")
    p.add_argument("--extractor-epochs", type=int, default=10, help="autoencoder training epochs")
    p.add_argument("--extractor-width", type=float, default=1.0, help="autoencoder channel multiplier")
    p.add_argument("--raw-hu", action="store_true", help="images are raw HU: window them with --hu-window on loading")
    p.add_argument("--no-orient", action="store_true", help="do not reorient to RAS on loading")
    p.add_argument("--class-block", type=int, default=10, help="classes extracted per pass over the volumes")
    p.add_argument("--workers", type=int, default=0, help="processes prefetching volumes")
    p.add_argument("--seed", type=int, default=0, help="seeds references, centres and the extractor")
    p.add_argument("--device", default="cpu", help="where the extractor trains and embeds, e.g. cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (default: resume it)")
    return p


def interrupted_message(out: Path, word: str = "interrupted") -> str:
    """The one line printed when ``dira3d visual-words`` is stopped with Ctrl-C or SIGTERM (``word``: "interrupted"
    or "stopped by SIGTERM"): what is kept in ``out`` and how to go on."""
    from dira3d.visual_words.embedding_chunks import PARTIAL_NAME, kept_rows
    from dira3d.visual_words.extractor import EXTRACTOR_NAME, extractor_progress

    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError):
        progress, rows = extractor_progress(out / EXTRACTOR_NAME), kept_rows(out)
        if rows:
            trained = f" (and the trained extractor in {out / EXTRACTOR_NAME})" if progress else ""
            return (f"{word} while embedding the volumes; the embeddings of the first {rows} are kept in "
                    f"{out / PARTIAL_NAME}{trained}: rerun the same command to continue after them")
        if progress is None:
            return (f"{word} before the classes were planned (no {out / MANIFEST_NAME}); nothing is kept: "
                    "rerunning the same command starts afresh")
        done, planned = progress
        return (f"{word} before the classes were planned; the extractor is kept after epoch {done} of {planned} "
                f"in {out / EXTRACTOR_NAME}: rerun the same command to continue from there")
    done = sum(c["status"] == "done" for c in manifest["classes"])
    return (f"{word}; {done} of {len(manifest['classes'])} visual words are complete in {out}; "
            "rerun the same command to resume")


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and args.extractor != "checkpoint":  # it would be ignored: an autoencoder is trained instead
        parser.error(f"--checkpoint {args.checkpoint} is used only with --extractor checkpoint; add --extractor checkpoint "
                     "to embed with its encoder, or drop --checkpoint to train the autoencoder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.val_neighbours == 0:  # said before the extractor trains (minutes to hours), and again at the end
        logging.getLogger(__name__).warning(no_validation_words(args.datalist))
    loaded = False
    try:  # SIGTERM (scancel, a SLURM time limit) as Ctrl-C: the rows embedded are kept
        with sigterm_as_interrupt(), removed_if_failed_empty(args.out):  # a run refused at its start leaves no --out
            # the run's own first checks, in its order (the --out folder, its lock, the datalist), here before torch
            # and MONAI load: a typo is refused at once
            check_writable(args.out)
            out_folder_lock(args.out).check_free()
            check_datalist_file(args.datalist)
            from dira3d.visual_words import discover

            loaded = True
            manifest = discover.discover_visual_words(
                args.datalist, args.out, classes=args.classes, neighbours=args.neighbours, val_neighbours=args.val_neighbours,
                patch_size=args.patch_size, border=args.border, min_distance=args.min_distance, hu_window=tuple(args.hu_window),
                dense_hu=args.dense_hu, max_dense_fraction=args.max_dense_fraction, max_tries=args.max_tries, metric=args.metric,
                multi_resolution=args.multi_resolution, extractor=args.extractor, checkpoint=args.checkpoint,
                extractor_size=args.extractor_size, extractor_epochs=args.extractor_epochs, extractor_width=args.extractor_width,
                orient=not args.no_orient, raw_hu=args.raw_hu, class_block=args.class_block, workers=args.workers,
                seed=args.seed, overwrite=args.overwrite, device=args.device, lung_filter=args.lung_filter,
                body_filter=args.body_filter, max_outside_fraction=args.max_outside_fraction,
            )  # fmt: skip
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line on how to go on, not a traceback; 130 / 143
        message = interrupted_message(Path(args.out), interrupted_word(err)) if loaded else None
        print(f"dira3d visual-words: {message}" if message else loading_stopped("visual-words", err), file=sys.stderr)
        return interrupt_exit_code(err)
    except (ValueError, OSError, CoordinateSamplingError, FolderInUseError) as err:  # OSError: e.g. a full disk
        kept = ""
        if isinstance(err, CoordinateSamplingError):  # torch is loaded then: a missing datalist stays quick
            from dira3d.visual_words.extractor import EXTRACTOR_NAME, extractor_progress

            if extractor_progress(Path(args.out) / EXTRACTOR_NAME):
                kept = f"; a rerun with other planning rules reuses the trained extractor ({Path(args.out) / EXTRACTOR_NAME})"
        print(f"dira3d visual-words: error: {err}{kept}", file=sys.stderr)
        return 1
    print(f"{len(manifest['classes'])} visual words written to {args.out} ({DATALIST_NAME}, {MANIFEST_NAME}, shards/)")
    print(next_step(Path(args.out), args.patch_size, validation_words=args.val_neighbours > 0,
                    channels=int(manifest.get("channels", 1)), datalist=args.datalist))
    return 0


DEFAULT_PATCH_SIZE = (64, 64, 32)  # the pretraining bundle's patch_size (bundles/dira_pretrain/configs/train.json)


NO_VALIDATION_WORDS = (
    "--val-neighbours 0: no validation visual words, so pretraining on this output (--config visual_words.json) runs "
    "without validation: no val_* losses and no best.pt (fine-tune from last.pt, the last epoch), and "
    "early_stop_patience is refused; for a validation set, prepare the scans with 2 or more validation volumes "
    "({option}) and pass --val-neighbours 2 or more"
)


def no_validation_words(datalist: str | os.PathLike | None = None) -> str:
    """:data:`NO_VALIDATION_WORDS` naming the option of the datalist's own dataset that fills its 'validation' list
    (``--val-subsets`` for LUNA16; it named ``generic``'s ``--val-fraction`` for every dataset)."""
    return NO_VALIDATION_WORDS.format(option=split_option(datalist, "validation"))


def next_step(out: Path, patch_size: Sequence[int], validation_words: bool = True, channels: int = 1,
              datalist: str | os.PathLike | None = None) -> str:
    """The pretraining command that reads this output (with the patch size, when not the bundle's default, and the
    image channels, when not 1: a multi-sequence MR datalist); without validation words (``--val-neighbours 0``) also a
    note on what pretraining without validation means."""
    size = [int(v) for v in patch_size]
    override = "" if tuple(size) == DEFAULT_PATCH_SIZE else f" {format_overrides({'patch_size': size})}"
    override += f" --override in_channels={channels}" if channels != 1 else ""
    command = (f"next:     dira3d pretrain --datalist {shell_word(str((out / DATALIST_NAME).resolve()))} --config visual_words.json"
               f"{override} --output runs/dira_pretrain (docs/visual_words.md)")
    return command if validation_words else f"{command}\nnote:     {no_validation_words(datalist)}"


if __name__ == "__main__":
    sys.exit(main())
