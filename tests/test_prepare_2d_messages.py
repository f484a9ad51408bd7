"""What the 2D ``dira3d prepare`` commands (chestxray14, chexpert, siim, montgomery, radiographs) say when they end.

- A 'validation' list of one image (the default ``--val-fraction`` 0.1 of a few patients) was written without a word,
  and 2D pretraining with Barlow Twins then refused it; ``dira3d prepare generic`` warned about its one-volume list.
  Each now warns with the same function (:func:`dira3d.data.runner.warn_one_validation`).
- The "next:" lines of the four datasets named only fine-tuning, from ``runs/dira_pretrain/models/best.pt``, which
  nothing they named writes; ChestX-ray14 and CheXpert now name the 2D pretraining command of docs/2d.md first (parsed
  here as tests/test_end_messages.py parses the others). SIIM-ACR and Montgomery then named pretraining on their own
  images, which docs/2d.md does not advise (it pretrains once on ChestX-ray14 and fine-tunes the small sets from it):
  they now name fine-tuning from the checkpoint `dira3d prepare chestxray14`'s pretraining line writes, and from
  random weights without one. CheXpert still named pretraining on its own images first, while the paper (and
  docs/2d.md) fine-tunes it from the ChestX-ray14 pretraining too: it now names that first, and pretraining on its own
  images, into a folder of their own, as the alternative.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from test_data_cxr_seg import _montgomery_layout, _siim_layout
from test_docs_match_code import _command_main, _parser_of
from test_walk2d_prepared import write_chexpert_raw
from test_walk_discrimination import write_chestxray14_raw

from dira3d.cli import main as cli_main

ONE_IMAGE = "its 'validation' list holds 1 image; Barlow Twins pretraining on it"


def _raw(dataset: str, root: Path) -> Path:
    if dataset == "chestxray14":
        return write_chestxray14_raw(root)
    if dataset == "chexpert":
        return write_chexpert_raw(root)
    if dataset == "siim":
        root.mkdir(parents=True)
        _siim_layout(root)
        return root
    return _montgomery_layout(root)[0]


@pytest.mark.parametrize("dataset", ["chestxray14", "chexpert", "siim", "montgomery"])
def test_a_one_image_validation_list_is_warned_about(dataset, tmp_path, capsys):
    raw, dst = _raw(dataset, tmp_path / "raw"), tmp_path / "prepared"
    assert cli_main(["prepare", dataset, "--src", str(raw), "--dst", str(dst), "--size", "32"]) == 0
    datalist = dst / f"{dataset}_datalist.json"
    assert len(json.loads(datalist.read_text())["validation"]) == 1  # the default --val-fraction of a few patients
    err = capsys.readouterr().err
    assert f"WARNING {datalist.name}: {ONE_IMAGE}" in err and "rerun with a larger --val-fraction" in err, err
    # two validation images: no warning (Montgomery's 3 patients: none left for its default --test-fraction)
    test = ["--test-fraction", "0"] if dataset == "montgomery" else []
    assert cli_main(["prepare", dataset, "--src", str(raw), "--dst", str(tmp_path / "two"), "--size", "32",
                     "--val-fraction", "0.6", *test]) == 0
    assert len(json.loads((tmp_path / "two" / datalist.name).read_text())["validation"]) >= 2
    assert "'validation' list holds 1" not in capsys.readouterr().err


def _prepared(dataset: str, tmp_path: Path, capsys) -> tuple[Path, list[str], int]:
    """``dira3d prepare <dataset>`` on a small raw set: the datalist, the lines printed and where the datalist's is."""
    raw, dst = _raw(dataset, tmp_path / "raw"), tmp_path / "prepared"
    assert cli_main(["prepare", dataset, "--src", str(raw), "--dst", str(dst), "--size", "32"]) == 0
    datalist = (dst / f"{dataset}_datalist.json").resolve()
    lines = capsys.readouterr().out.splitlines()
    return datalist, lines, lines.index(f"datalist: {datalist}")


def test_the_next_step_pretrains_on_the_datalist_then_fine_tunes_from_that_checkpoint(tmp_path, capsys):
    datalist, lines, at = _prepared("chestxray14", tmp_path, capsys)
    assert [line.split()[0] for line in lines[at:at + 3]] == ["datalist:", "next:", "then:"], lines
    pretrain, finetune = (shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0]) for line in lines[at + 1:at + 3])
    label, main, rest = _command_main(pretrain)
    args = _parser_of(main).parse_args(rest)  # SystemExit (2) on an option the parser does not take
    assert label == "dira3d pretrain" and Path(args.datalist) == datalist
    assert args.config == ["2d.json", "2d_moco.json"]  # docs/2d.md's command; MoCo validates on one image
    label, main, rest = _command_main(finetune)
    args = _parser_of(main).parse_args(rest)
    assert label == "dira3d finetune" and Path(args.datalist) == datalist
    assert Path(args.pretrained) == Path(pretrain[pretrain.index("--output") + 1]) / "models" / "best.pt"


@pytest.mark.parametrize("dataset, bundle", [("siim", "siim_pneumothorax_seg"), ("montgomery", "montgomery_lung_seg")])
def test_a_small_set_is_fine_tuned_from_the_chestxray14_pretraining_or_from_random_weights(dataset, bundle, tmp_path,
                                                                                            capsys):
    datalist, lines, at = _prepared(dataset, tmp_path, capsys)
    assert [line.split()[0] for line in lines[at:at + 3]] == ["datalist:", "next:", "or:"], lines
    assert "2D pretraining on ChestX-ray14" in lines[at + 1] and "preparing ChestX-ray14 ends with" in lines[at + 1]
    assert not any(line.split()[1:3] == ["dira3d", "pretrain"] for line in lines[at + 1:]), lines  # not on its own images
    runs = []
    for line in lines[at + 1:at + 3]:
        label, main, rest = _command_main(shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0]))
        runs.append(_parser_of(main).parse_args(rest))  # SystemExit (2) on an option the parser does not take
        assert label == "dira3d finetune" and Path(runs[-1].datalist) == datalist and runs[-1].bundle == bundle
    pretrained, scratch = runs
    assert scratch.pretrained is None and scratch.output_dir != pretrained.output_dir
    # --pretrained is what the pretraining line of `dira3d prepare chestxray14` writes
    assert Path(pretrained.pretrained) == _cxr14_pretraining_output(tmp_path, capsys) / "models" / "best.pt"


def _cxr14_pretraining_output(tmp_path: Path, capsys) -> Path:
    """The ``--output`` of the pretraining line ``dira3d prepare chestxray14`` ends with (its next: line)."""
    raw = write_chestxray14_raw(tmp_path / "cxr14")
    assert cli_main(["prepare", "chestxray14", "--src", str(raw), "--dst", str(tmp_path / "cxr14_prepared"),
                     "--size", "32"]) == 0
    cxr14 = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next:     dira3d pretrain ")]
    pretrain = shlex.split(cxr14[0].split(None, 1)[1].rsplit(" (", 1)[0])
    return Path(pretrain[pretrain.index("--output") + 1])


def test_chexpert_is_fine_tuned_from_the_chestxray14_pretraining_or_pretrained_on_in_a_folder_of_its_own(tmp_path,
                                                                                                        capsys):
    # the paper pretrains on ChestX-ray14 for every 2D target, CheXpert included (docs/2d.md, "Which checkpoint");
    # `dira3d prepare chexpert` named pretraining on its own images first, into the runs/dira_pretrain that the
    # ChestX-ray14 pretraining writes
    datalist, lines, at = _prepared("chexpert", tmp_path, capsys)
    assert [line.split()[0] for line in lines[at:at + 3]] == ["datalist:", "next:", "or:"], lines
    assert "2D pretraining on ChestX-ray14" in lines[at + 1] and "not the paper's" in lines[at + 2]
    finetune, pretrain = (shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0]) for line in lines[at + 1:at + 3])
    label, main, rest = _command_main(finetune)
    tuned = _parser_of(main).parse_args(rest)  # SystemExit (2) on an option the parser does not take
    assert label == "dira3d finetune" and Path(tuned.datalist) == datalist and tuned.bundle == "chexpert_cls"
    label, main, rest = _command_main(pretrain)
    own = _parser_of(main).parse_args(rest)
    assert label == "dira3d pretrain" and Path(own.datalist) == datalist and own.config == ["2d.json", "2d_moco.json"]
    cxr14 = _cxr14_pretraining_output(tmp_path, capsys)
    assert Path(tuned.pretrained) == cxr14 / "models" / "best.pt"  # what the ChestX-ray14 pretraining line writes
    assert Path(own.output) != cxr14


def test_radiographs_warns_about_a_one_image_validation_list(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "xrays"
    src.mkdir()
    for i in range(4):
        Image.new("L", (40, 48), 30 + 40 * i).save(src / f"x{i}.png")
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(tmp_path / "one"), "--size", "32",
                     "--val-fraction", "0.25"]) == 0
    assert f"WARNING radiographs_datalist.json: {ONE_IMAGE}" in capsys.readouterr().err
    assert cli_main(["prepare", "radiographs", "--src", str(src), "--dst", str(tmp_path / "two"), "--size", "32",
                     "--val-fraction", "0.5"]) == 0
    assert "'validation' list holds 1" not in capsys.readouterr().err
