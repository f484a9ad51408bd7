"""What a user sees at the end of a command: where its outputs are and what to run next.

`dira3d prepare <dataset>` ended with "8 written" alone, `dira3d finetune` with its test metrics alone (not where
metrics.json, the model and the TensorBoard logs are, nor how to run the model), and a refused `dira3d pretrain`
left the empty `eval/` and `models/` folders it had created.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from dira3d.cli import main as cli_main


def test_prepare_ends_naming_its_datalists_the_report_and_the_next_step(tmp_path, capsys):
    from dira3d.data.synthetic import write_luna16_phantoms

    src, dst = tmp_path / "raw", tmp_path / "prepared"
    write_luna16_phantoms(src, count=2, size=(48, 48, 24), spacing=(6.5, 6.5, 13.0))
    assert cli_main(["prepare", "luna16", "--src", str(src), "--dst", str(dst)]) == 0
    lines = capsys.readouterr().out.splitlines()
    pretrain, ncc = dst.resolve() / "pretrain_datalist.json", dst.resolve() / "ncc_datalist.json"
    assert lines[0] == f"2 written (report: {dst.resolve() / 'report.json'})"
    assert lines[1:] == [f"datalist: {pretrain}",
                         f"next:     dira3d visual-words --datalist {pretrain} --out runs/visual_words (then dira3d "
                         "pretrain; docs/visual_words.md)",
                         f"or:       dira3d pretrain --datalist {pretrain} --output runs/dira_pretrain (every volume its "
                         "own class, no visual words: quicker, for a small dataset or a first run; "
                         "bundles/dira_pretrain/docs/README.md)",
                         f"datalist: {ncc}",
                         f"next:     dira3d finetune --bundle luna16_nodule_fpr --datalist {ncc} --pretrained "
                         "runs/dira_pretrain/models/best.pt --output-dir runs/ft_luna16_nodule_fpr (docs/finetuning.md)"]
    # a plan writes nothing: no datalist or report to name
    assert cli_main(["prepare", "luna16", "--src", str(src), "--dst", str(tmp_path / "plan"), "--dry-run"]) == 0
    assert "datalist:" not in capsys.readouterr().out


def test_synthetic_ends_naming_the_prepare_command_that_takes_its_tree(tmp_path, capsys):
    # the README's "each command ends by naming what it wrote and the next command": `dira3d synthetic` ended with
    # "wrote N phantoms ..." alone, and the LUNA16 tree it writes is the --src of `dira3d prepare luna16`
    from test_docs_match_code import _command_main, _parser_of

    out = tmp_path / "my data" / "luna16"
    assert cli_main(["synthetic", "--out", str(out), "--count", "1", "--size", "48", "48", "24"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wrote 1 phantoms in the LUNA16 layout to {out}"
    assert lines[1].startswith("next:     dira3d prepare luna16 ")
    words = shlex.split(lines[1].split(None, 1)[1].rsplit(" (", 1)[0])
    label, main, rest = _command_main(words)
    args = _parser_of(main).parse_args(rest)  # SystemExit (2) on an option the parser does not take
    assert label == "dira3d prepare luna16" and Path(args.src) == out and Path(args.dst) == Path("prepared/luna16")


def test_the_next_step_of_every_datalist_is_a_command_its_parser_takes(tmp_path):
    # the hints must stay runnable: every option one names exists (the parsers are built, nothing runs)
    from test_docs_match_code import _command_main, _parser_of

    from dira3d.data.runner import NEXT_STEPS, next_steps
    from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D

    path = tmp_path / "my data" / "x_datalist.json"
    for name, labelled in [(name, True) for name in NEXT_STEPS] + [("pretrain_datalist.json", False)]:
        lines = next_steps(path.with_name(name), labelled=labelled)
        commands = [line.split(None, 1)[1] for line in lines[1:]]
        for command in commands:
            words = shlex.split(command.rsplit(" (", 1)[0])
            label, main, rest = _command_main(words)
            _parser_of(main).parse_args(rest)  # SystemExit (2) on an unknown option
            assert rest[rest.index("--datalist" if "--datalist" in rest else "--bbox-datalist") + 1] == str(
                path.with_name(name))
            if "--bundle" in rest:
                assert rest[rest.index("--bundle") + 1] in BUNDLES + BUNDLES_2D
    # a pretraining datalist with labels (generic --label-suffix) can also be fine-tuned on
    assert [line.split()[0] for line in next_steps(path.with_name("pretrain_datalist.json"), labelled=True)] == [
        "datalist:", "next:", "or:"]
    # one without labels can be pretrained on straight away (every volume a class), without visual words
    unlabelled = next_steps(path.with_name("pretrain_datalist.json"))
    assert [line.split()[:3] for line in unlabelled[1:]] == [["next:", "dira3d", "visual-words"],
                                                              ["or:", "dira3d", "pretrain"]]
    assert len(next_steps(path.with_name("ncc_datalist.json"), labelled=True)) == 2


def test_a_multi_sequence_datalist_is_sent_to_the_bundle_and_the_channels_it_needs(tmp_path):
    """`prepare generic --sequences` (4D volumes, meta.channels) ended with `or: dira3d finetune --bundle lits_liver_seg`
    (a one-channel bundle) when labelled, and `or: dira3d pretrain` (a one-channel network: 'has 2 channels ..., not
    1') when not; docs/data.md fine-tunes it with brats_tumor_seg and --set modalities. The commands are parsed."""
    from test_docs_match_code import _command_main, _parser_of

    from dira3d.data.runner import next_steps

    path = tmp_path / "pretrain_datalist.json"
    path.write_text(json.dumps({"training": [], "meta": {"dataset": "generic", "channels": ["t1", "flair"]}}))
    labelled, unlabelled = (next_steps(path, labelled=flag)[2] for flag in (True, False))
    assert labelled.startswith(f"or:       dira3d finetune --bundle brats_tumor_seg --datalist {path} ")
    assert " --set modalities=t1,flair " in labelled
    assert unlabelled.startswith(f"or:       dira3d pretrain --datalist {path} --override in_channels=2 --output ")
    for line in (labelled, unlabelled):
        _, main, rest = _command_main(shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0]))
        _parser_of(main).parse_args(rest)
    path.write_text(json.dumps({"training": [], "meta": {"dataset": "generic", "channels": None}}))  # one image each
    assert "--bundle lits_liver_seg" in next_steps(path, labelled=True)[2]
    assert "in_channels" not in next_steps(path)[2]


@pytest.mark.parametrize("channels", [["t1", "t1ce", "t2", "flair"], ["flair"]])
def test_a_brats_datalist_names_pretraining_on_it_and_the_random_baseline_after_the_papers_default(tmp_path, channels):
    """`dira3d prepare brats` ended with one `next:` line, fine-tuning from runs/dira_pretrain/models/best.pt, which only
    a CT pretraining the user ran before writes. After it, the paper's default (FLAIR from a CT pretraining), come
    pretraining on these volumes (docs/data.md: `--override in_channels=4` for the four sequences, none for FLAIR
    alone), into a folder of its own, and fine-tuning from random initial weights (the baseline); each parsed."""
    from test_docs_match_code import _command_main, _parser_of

    from dira3d.data.runner import next_steps

    path = tmp_path / "my data" / "brats_datalist.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"training": [], "meta": {"dataset": "brats2018", "channels": channels}}))
    lines = next_steps(path)
    assert [line.split()[:3] for line in lines[1:]] == [["next:", "dira3d", "finetune"], ["or:", "dira3d", "pretrain"],
                                                        ["or:", "dira3d", "finetune"]], lines
    parsed = []
    for line in lines[1:]:
        label, main, rest = _command_main(shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0]))
        parsed.append(_parser_of(main).parse_args(rest))  # SystemExit (2) on an option the parser does not take
        assert Path(parsed[-1].datalist) == path
    paper, pretrain, scratch = parsed
    assert paper.pretrained == "runs/dira_pretrain/models/best.pt" and "the paper's: FLAIR" in lines[1]
    assert pretrain.override == ([f"in_channels={len(channels)}"] if len(channels) > 1 else [])
    assert pretrain.output != "runs/dira_pretrain"  # a CT pretraining there would be resumed, with 1 channel
    assert scratch.pretrained is None and scratch.output_dir not in (paper.output_dir, None)
    assert "random initial weights" in lines[3]


def test_finetune_ends_naming_its_outputs_and_the_inference_command(tmp_path, monkeypatch, capsys):
    from dira3d.evaluation import finetune
    from dira3d.utils.overrides import check_overrides, parse_value

    monkeypatch.setattr(finetune, "run_finetune", lambda *args, **kwargs: {"metrics": {"auc": 0.75}})
    out = tmp_path / "ft"
    assert finetune.main(["--bundle", "luna16_nodule_fpr", "--tiny", "--output-dir", str(out), "--set", "width=0.25",
                          "--set", "max_epochs=1", "--set", "roi_size=[32,32,16]"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[:printed.index("}") + 1]) == {"auc": 0.75}  # the metrics first, as before
    lines = printed[printed.index("}") + 2:].splitlines()
    assert lines[:3] == [f"metrics:     {out / 'metrics.json'}", f"model:       {out / 'models' / 'model.pt'}",
                         f"TensorBoard: tensorboard --logdir {out}"]
    assert lines[3].startswith("inference:   python -m monai.bundle run --config_file ")
    words = shlex.split(lines[3].split(None, 1)[1].rsplit(" (", 1)[0])
    given = dict(zip(words[4::2], words[5::2]))
    root = finetune.bundle_path("luna16_nodule_fpr").resolve()
    # the model is read from the run's models/, the network built as it was trained: tiny.json and the --set
    # settings inference.json defines (max_epochs is training's alone)
    assert given["--config_file"] == f"['{root / 'configs' / 'inference.json'}','{root / 'configs' / 'tiny.json'}']"
    assert given["--ckpt_dir"] == str(out / "models") and given["--bundle_root"] == str(root)
    assert given["--width"] == "0.25" and given["--roi_size"] == "[32, 32, 16]" and "--max_epochs" not in given
    check_overrides([root / "configs" / "inference.json"],  # ids it defines, values of the types it takes
                    {k[2:]: parse_value(v) for k, v in given.items() if k not in ("--config_file", "--image")})


def test_finetune_inference_command_resamples_as_the_datalist_was_prepared(tmp_path, monkeypatch, capsys):
    # `dira3d prepare generic --spacing 2 2 5`: the printed inference command kept the scan's own spacing (pixdim 0),
    # so the model saw a 0.57 mm CT it was trained on at 2 x 2 x 5 mm, without a word (and took minutes on a CPU)
    from dira3d.evaluation import finetune

    def given_words(meta):
        datalist = tmp_path / "pretrain_datalist.json"
        datalist.write_text(json.dumps({"training": [], "meta": meta}))
        monkeypatch.setattr(finetune, "run_finetune", lambda *args, **kwargs: {
            "metrics": {"dice": 0.5}, "settings": {"datalist": str(datalist)}})
        out = tmp_path / f"ft{len(meta)}"
        assert finetune.main(["--bundle", "lits_liver_seg", "--tiny", "--output-dir", str(out)]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("inference:")][0]
        words = shlex.split(line.split(None, 1)[1].rsplit(" (", 1)[0])
        return dict(zip(words[4::2], words[5::2]))

    assert given_words({"spacing": [2, 2, 5], "modality": "ct"})["--pixdim"] == "[2.0, 2.0, 5.0]"
    assert "--pixdim" not in given_words({"spacing": None})  # the scans kept their own spacing


def test_a_refused_pretrain_leaves_no_empty_folder_it_created(tmp_path, capsys):
    import nibabel as nib

    data = np.random.default_rng(0).random((24, 24, 12)).astype(np.float32)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]}))
    common = ["pretrain", "--datalist", str(datalist), "--tiny", "--override", "batch_size=0"]  # refused in the run
    fresh = tmp_path / "fresh"
    assert cli_main([*common, "--output", str(fresh)]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not fresh.exists()  # it left fresh/eval and fresh/models, empty
    mine = tmp_path / "mine"  # a folder of the user's: kept, with what it holds; only the run's own folders go
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "plan.txt").write_text("mine")
    (mine / "eval").mkdir()
    assert cli_main([*common, "--output", str(mine)]) == 2
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["eval", "notes", "notes/plan.txt"]


@pytest.mark.parametrize("what", ["nothing", "checkpoint"])
def test_pretrain_stopped_before_training_keeps_what_it_had(tmp_path, monkeypatch, capsys, what):
    # Ctrl-C while the data are cached: the empty folders of a fresh run go, a checkpoint to resume from stays
    import dira3d.utils.overrides as overrides

    def interrupted(configs, ckpt_dir, output_dir, **kwargs):
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(overrides, "run_bundle", interrupted)
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text('{"training": []}')
    out = tmp_path / "run"
    if what == "checkpoint":
        (out / "models").mkdir(parents=True)
        (out / "models" / "last.pt").write_bytes(b"x")
    assert cli_main(["pretrain", "--datalist", str(datalist), "--output", str(out)]) == 130
    err = capsys.readouterr().err
    if what == "nothing":
        assert not out.exists() and "rerunning the same command starts afresh" in err
    else:
        assert sorted(p.name for p in out.rglob("*")) == ["last.pt", "models"] and "resume" in err


def test_a_prepared_cross_validation_datalist_is_sent_to_every_fold(tmp_path, capsys):
    """Walk of 2026-11-28: `dira3d prepare pecad` ended with `next: dira3d finetune ... --output-dir
    runs/ft_pecad_embolism_fpr`, no fold: that run tests fold 0 alone (a third of the patients) and prints its AUC as
    the result, and nothing said that the datalist is a cross-validation of several folds."""
    import csv

    import SimpleITK as sitk

    from dira3d.data import pecad

    src = tmp_path / "PE-CAD"
    (src / "volumes").mkdir(parents=True)
    rows = [("patient_id", "x", "y", "z", "coords", "label")]
    for n in range(3):
        sitk.WriteImage(sitk.Image(12, 10, 8, sitk.sitkInt16), str(src / "volumes" / f"PE{n}.nii.gz"))
        rows += [(f"PE{n}", 5, 5, 4, "voxel", 1), (f"PE{n}", 2, 2, 2, "voxel", 0)]
    with open(src / "candidates.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    assert pecad.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--cube-size", "8", "8", "8"]) == 0
    datalist = json.loads((tmp_path / "out" / "pecad_datalist.json").read_text())
    assert "test" not in datalist and {e["fold"] for e in datalist["training"]} == {0, 1, 2}
    step = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next:"))
    words = shlex.split(step.split(None, 1)[1].rsplit(" (", 1)[0])
    assert words[words.index("--fold") + 1] == "0" and words[words.index("--output-dir") + 1].endswith("_fold0")
    assert "--fold 1" in step and "folds" in step and "dira3d experiment" in step and "Cross-validation" in step
