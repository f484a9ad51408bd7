"""What a ``dira3d prepare`` command prints when it ends.

:func:`finish`: the one-line summary of the cases, each warning and failure, and what to do about a
failure; :func:`next_steps`: where each datalist written is and the command to run next
(:data:`NEXT_STEPS`), for the datalists that :func:`~dira3d.data.datalist_writer.write_datalist` records
(:func:`record_datalist`) while :func:`~dira3d.data.runner.run_prepare` collects them
(:func:`datalists_recorded`). Re-exported by :mod:`dira3d.data.runner`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

from dira3d.data.cases import STATUSES, CaseResult
from dira3d.data.datalist import datalist_meta

__all__ = ["NEXT_STEPS", "LABELLED_NEXT_STEP", "UNLABELLED_OTHER_STEP", "SEQUENCES_NEXT_STEP", "PRETRAIN_2D_STEP",
           "SCRATCH_2D_STEPS", "CHEXPERT_OTHER_STEP", "BRATS_OTHER_STEPS", "next_steps", "finish", "datalists_recorded",
           "record_datalist"]


# inside run_prepare: the datalists written (path, whether its training entries have labels), named at the end
_datalists_written: ContextVar[list[tuple[Path, bool]] | None] = ContextVar("_datalists_written", default=None)


@contextlib.contextmanager
def datalists_recorded() -> Iterator[list[tuple[Path, bool]]]:
    """Collect the datalists :func:`record_datalist` is told of inside this block, as ``(path, whether its
    training entries have labels)``, in the list it yields (still filled after the block)."""
    written: list[tuple[Path, bool]] = []
    token = _datalists_written.set(written)
    try:
        yield written
    finally:
        _datalists_written.reset(token)


def record_datalist(path: Path, labelled: bool) -> None:
    """Note a datalist just written, for the lines :func:`next_steps` prints at the end; outside
    :func:`datalists_recorded` (a ``prepare`` function called from Python) nothing is noted."""
    written = _datalists_written.get()
    if written is not None:
        written.append((path, labelled))


def _finetune_step(bundle: str, doc: str = "docs/finetuning.md", fold: int | None = None, pretrained: bool = True,
                   suffix: str = "") -> str:
    # runs/dira_pretrain: dira3d pretrain's default --output
    option, suffix = ("", suffix) if fold is None else (f" --fold {fold}", f"_fold{fold}{suffix}")
    start = " --pretrained runs/dira_pretrain/models/best.pt" if pretrained else ""
    return (f"dira3d finetune --bundle {bundle} --datalist {{datalist}}{start}{option} --output-dir runs/ft_{bundle}{suffix} "
            f"({doc})")


_FROM_CXR14 = "from a 2D pretraining on ChestX-ray14, the one that preparing ChestX-ray14 ends with; docs/2d.md"
# a datalist's name -> what it is for: the command to run next (``{datalist}``: its path)
NEXT_STEPS: dict[str, str] = {
    "pretrain_datalist.json": "dira3d visual-words --datalist {datalist} --out runs/visual_words (then dira3d pretrain; "
                              "docs/visual_words.md)",
    "ncc_datalist.json": _finetune_step("luna16_nodule_fpr"),
    "lidc_datalist.json": _finetune_step("lidc_nodule_seg"),
    "lits_datalist.json": _finetune_step("lits_liver_seg"),
    # the paper's: FLAIR alone (the bundle's default modalities), from a pretraining on CT (BRATS_OTHER_STEPS: the others)
    "brats_datalist.json": _finetune_step("brats_tumor_seg", "the paper's: FLAIR, from a CT pretraining such as the "
                                          "one LUNA16's pretrain_datalist.json ends with; docs/finetuning.md"),
    # cross-validation: one fine-tuning tests one fold, whose score alone is no result for the datalist
    "pecad_datalist.json": _finetune_step("pecad_embolism_fpr", "fold 0 is its test set: run --fold 1, 2, ... too, or "
                                          "every fold and seed with `folds` in dira3d experiment; docs/finetuning.md, "
                                          "'Cross-validation'", fold=0),
    # the other 2D sets are fine-tuned from a 2D pretraining on ChestX-ray14, the one `dira3d prepare chestxray14`
    # ends by naming (docs/2d.md, "Which checkpoint"; the paper's for every 2D target), not pretrained on themselves
    "siim_datalist.json": _finetune_step("siim_pneumothorax_seg", _FROM_CXR14),
    "montgomery_datalist.json": _finetune_step("montgomery_lung_seg", _FROM_CXR14),
    "chestxray14_datalist.json": _finetune_step("chestxray14_cls", "docs/2d.md"),
    "chexpert_datalist.json": _finetune_step("chexpert_cls", _FROM_CXR14),
    "radiographs_datalist.json": "dira3d pretrain --datalist {datalist} --config 2d.json --config 2d_moco.json "
                                 "--output runs/dira_pretrain (docs/2d.md)",
    "bbox_datalist.json": "dira3d localise --bbox-datalist {datalist} --model runs/ft_chestxray14_cls/models/model.pt "
                          "--output-dir runs/localise (once chestxray14_cls is fine-tuned; docs/2d.md)",
}
# a pretraining datalist whose volumes have labels (dira3d prepare generic --label-suffix) can train a task too
LABELLED_NEXT_STEP = _finetune_step("lits_liver_seg")
# one without: pretraining straight on the volumes, every volume a class ("every image a class"), skips the visual
# words (at their defaults hours on a CPU) for a small dataset or a first run
UNLABELLED_OTHER_STEP = ("dira3d pretrain --datalist {datalist}{channels} --output runs/dira_pretrain (every volume its own "
                         "class, no visual words: quicker, for a small dataset or a first run; "
                         "bundles/dira_pretrain/docs/README.md)")
# ChestX-ray14's datalist (dira3d prepare chestxray14): its images pretrain first (2D DiRA with MoCo-v2, labels unused,
# as for radiographs), the fine-tuning step above then loads that checkpoint, as every other 2D fine-tuning does
PRETRAIN_2D_STEP = NEXT_STEPS["radiographs_datalist.json"]
DATALISTS_2D = ("chestxray14_datalist.json",)
# CheXpert without a ChestX-ray14 pretraining (not the paper's): pretraining on its own images, labels unused, into a
# folder of its own (runs/dira_pretrain is the ChestX-ray14 pretraining's, which a run there would resume from or be
# refused by as a finished run on other data)
CHEXPERT_OTHER_STEP = ("dira3d pretrain --datalist {datalist} --config 2d.json --config 2d_moco.json --output "
                       "runs/dira_pretrain_chexpert (no ChestX-ray14 pretraining: pretrain on these images, labels unused, "
                       "not the paper's; its last lines name the fine-tuning from it; docs/2d.md, 'Which checkpoint')")
# the small ones (dira3d prepare siim, montgomery) are fine-tuned from a ChestX-ray14 pretraining (NEXT_STEPS), or,
# without one yet, from random initial weights (the baseline)
SCRATCH_2D_STEPS = {name: _finetune_step(bundle, "no pretraining yet: random initial weights, the baseline; docs/2d.md",
                                         pretrained=False, suffix="_random")
                    for name, bundle in (("siim_datalist.json", "siim_pneumothorax_seg"),
                                         ("montgomery_datalist.json", "montgomery_lung_seg"))}
# BraTS without a CT pretraining (docs/data.md, "BraTS 2018"): pretraining on these volumes, every prepared sequence an
# input channel, into a folder of its own (a CT pretraining in runs/dira_pretrain would be resumed, of 1 channel), or
# fine-tuning from random initial weights, the paper's baseline ({channels}: the in_channels override, {sequences})
BRATS_OTHER_STEPS = (
    "dira3d pretrain --datalist {datalist}{channels} --output runs/dira_pretrain_brats (no CT pretraining: pretrain on "
    "these volumes, {sequences}; its last lines name the fine-tuning from it; docs/data.md, 'BraTS 2018')",
    _finetune_step("brats_tumor_seg", "no pretraining: random initial weights, the paper's baseline; docs/finetuning.md",
                   pretrained=False, suffix="_random"),
)
# a labelled multi-sequence MR datalist (`prepare generic --sequences`: 4D volumes, meta.channels) is BraTS-like
SEQUENCES_NEXT_STEP = _finetune_step("brats_tumor_seg").replace(" --output-dir", " --set modalities={modalities} --output-dir")


def next_steps(datalist: Path, labelled: bool = False) -> list[str]:
    """The lines ``dira3d prepare`` ends with for a datalist it wrote: where it is, and the command to run next
    (:data:`NEXT_STEPS`; a labelled pretraining datalist can also be fine-tuned on, :data:`LABELLED_NEXT_STEP`, and an
    unlabelled one pretrained on without visual words, :data:`UNLABELLED_OTHER_STEP`; ChestX-ray14's datalist is
    pretrained on first, :data:`PRETRAIN_2D_STEP`, then fine-tuned on; CheXpert's is fine-tuned from
    that ChestX-ray14 pretraining, or pretrained on first without one, :data:`CHEXPERT_OTHER_STEP`; a small one,
    SIIM-ACR or Montgomery, is fine-tuned from it, or from random weights, :data:`SCRATCH_2D_STEPS`; BraTS's is fine-tuned
    on FLAIR from a CT pretraining, as the paper, or pretrained on first, every prepared sequence a channel, or
    fine-tuned from random weights, :data:`BRATS_OTHER_STEPS`)."""
    path = shlex.quote(str(datalist))
    lines = [f"datalist: {datalist}"]
    if datalist.name in DATALISTS_2D:  # pretraining first: the fine-tuning step loads its best.pt
        lines.append(f"next:     {PRETRAIN_2D_STEP.format(datalist=path)}")
        lines.append(f"then:     {NEXT_STEPS[datalist.name].format(datalist=path)}")
    elif datalist.name in NEXT_STEPS:
        lines.append(f"next:     {NEXT_STEPS[datalist.name].format(datalist=path)}")
        if datalist.name in SCRATCH_2D_STEPS:
            lines.append(f"or:       {SCRATCH_2D_STEPS[datalist.name].format(datalist=path)}")
        if datalist.name == "chexpert_datalist.json":
            lines.append(f"or:       {CHEXPERT_OTHER_STEP.format(datalist=path)}")
        if datalist.name == "brats_datalist.json":
            channels = [str(c) for c in datalist_meta(datalist).get("channels") or ["flair"]]
            sequences = (f"its {len(channels)} sequences {', '.join(channels)} as input channels" if len(channels) > 1
                         else f"{channels[0]} alone")
            lines += ["or:       " + step.format(datalist=path, sequences=sequences,
                                                 channels=f" --override in_channels={len(channels)}" if len(channels) > 1 else "")
                      for step in BRATS_OTHER_STEPS]
        if datalist.name == "pretrain_datalist.json":
            # the sequences of `prepare generic --sequences`, in channel order: the network's input channels
            channels = datalist_meta(datalist).get("channels") or []
            other = (SEQUENCES_NEXT_STEP if labelled and channels else LABELLED_NEXT_STEP if labelled
                     else UNLABELLED_OTHER_STEP)
            lines.append("or:       " + other.format(
                datalist=path, modalities=",".join(map(str, channels)),
                channels=f" --override in_channels={len(channels)}" if len(channels) > 1 else ""))
    return lines


def finish(results: Iterable[CaseResult], keep_going: bool = False, dry_run: bool = False,
           report: str | os.PathLike | None = None) -> int:
    """Print a one-line summary plus each failure and warning; return the exit code.

    ``dry_run``: the results of a plan (nothing was written), so the advice speaks of the real run.
    ``report``: the JSON report, named on the summary line when it exists.

    Returns:
        1 when a case failed and ``keep_going`` is false, else 0.
    """
    results = list(results)
    counts = Counter(r.status for r in results)
    where = f" (report: {Path(report).resolve()})" if report is not None and Path(report).is_file() and not dry_run else ""
    print((", ".join(f"{counts[s]} {s}" for s in STATUSES if counts.get(s)) or "no cases") + where)
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        for note in r.warnings:
            print(f"WARNING {r.case_id}: {note}", file=sys.stderr)
    for r in failed:
        print(f"FAILED {r.case_id}: {r.reason}", file=sys.stderr)
    if failed and not keep_going and dry_run:
        print("the real run would stop at the first failure and write no datalist; fix the case, or add --keep-going "
              "to prepare every good case and report the bad ones", file=sys.stderr)
    elif failed and not keep_going:  # no datalist was written, even when the failure came last
        stopped = "stopped at the first failure" if counts.get("cancelled") else "had a failure"
        print(f"the batch {stopped}, so no datalist was written; add --keep-going to prepare every good case and "
              "report the bad ones", file=sys.stderr)
    return 1 if failed and not keep_going else 0
