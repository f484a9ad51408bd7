"""`dira3d pretrain` on the datalists `dira3d prepare` writes from raw data in the official layouts (a walk of
2026-11-28): pretraining on the LIDC-IDRI datalist failed in MONAI's collate (``reader_nodule_ids``, one id per reader,
of varying length), and on the BraTS volumes with ``--override in_channels=4`` (as the refusal without it says) in the
restoration loss (a 1-channel decoder restoring 4 channels); the 4-channel checkpoint is then fine-tuned with
``brats_tumor_seg --set modalities=all``."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_data_lidc import make_patient

from dira3d.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE_STAGE = ["--override", "max_epochs=1", "--override", "stages=[{'name': 'dira', 'losses': ['dis', 'res', 'adv']}]"]


def test_pretrain_on_a_prepared_lidc_datalist(tmp_path: Path, capsys) -> None:
    src = tmp_path / "LIDC-IDRI"
    for number in range(1, 4):
        make_patient(src, number)  # two nodules each: outlined by 3 readers and by 1
    dst = tmp_path / "lidc"
    assert cli_main(["prepare", "lidc", "--src", str(src), "--dst", str(dst)]) == 0
    training = json.loads((dst / "lidc_datalist.json").read_text())["training"]
    assert sorted(len(e["reader_nodule_ids"]) for e in training) == [1, 3]  # one batch of both
    capsys.readouterr()
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--datalist", str(dst / "lidc_datalist.json"), "--output", str(out), "--tiny",
                     *ONE_STAGE]) == 0, capsys.readouterr().err[-2000:]
    assert (out / "models" / "best.pt").is_file()


def write_brats(root: Path, count: int = 3, shape: tuple[int, int, int] = (32, 32, 16)) -> None:
    """BraTS 2018 patients (HGG/<id>/<id>_<sequence>.nii.gz), large enough for the tiny 32 x 32 x 16 patches."""
    rng = np.random.default_rng(0)
    for i in range(count):
        pid = f"Brats18_2013_{i}_1"
        folder = root / "HGG" / pid
        folder.mkdir(parents=True)
        brain = np.zeros(shape, bool)
        brain[2:-2, 2:-2, 1:-1] = True
        seg = np.zeros(shape, np.uint8)
        seg[10:18, 10:18, 5:10] = 2
        for m, kind in enumerate(("t1", "t1ce", "t2", "flair")):
            array = np.where(brain, 100.0 * (m + 1) + rng.normal(0, 10, shape) + 40 * (seg > 0), 0.0)
            nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), folder / f"{pid}_{kind}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"{pid}_seg.nii.gz")


def test_pretrain_on_prepared_brats_volumes_of_four_sequences_and_fine_tune_from_it(tmp_path: Path, capsys,
                                                                                   monkeypatch) -> None:
    write_brats(tmp_path / "BraTS")
    dst = tmp_path / "brats"
    assert cli_main(["prepare", "brats", "--src", str(tmp_path / "BraTS"), "--dst", str(dst)]) == 0
    # the pretraining is the one `dira3d prepare brats` ends with (its first `or:` line), run as printed (the tiny
    # settings added): its `next:` line assumed a CT pretraining at runs/dira_pretrain, and named no other
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("or:       dira3d pretrain ")]
    assert len(printed) == 1, printed
    words = shlex.split(printed[0].split(None, 1)[1].rsplit(" (", 1)[0])
    assert words[:2] == ["dira3d", "pretrain"] and "in_channels=4" in words, words
    monkeypatch.chdir(tmp_path)  # its --output is relative
    assert cli_main([*words[1:], "--tiny", *ONE_STAGE]) == 0, capsys.readouterr().err[-2000:]
    out = tmp_path / words[words.index("--output") + 1]
    # its last line says to fine-tune on the four sequences (the run's datalist reaches the end message)
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        "fine-tune on them, in this order, with --bundle brats_tumor_seg --set modalities=all (the bundle's default, "
        "flair alone, averages the first convolution over them; docs/data.md)")
    best = torch.load(out / "models" / "best.pt", weights_only=True)
    assert best["meta"]["in_channels"] == 4
    assert best["decoder"]["head.weight"].shape[:2] == (4, 8)  # all four sequences restored

    from dira3d.evaluation import build_task_network

    # a 1-channel segmentation of 4 sequences: encoder and decoder loaded, the restoration head left as initialised
    network = build_task_network("segmentation", in_channels=4, out=1, width=0.125, pretrained=out / "models" / "best.pt")
    report = capsys.readouterr().out
    assert "other shape (kept their initial values): decoder.head.weight (4, 8, 1, 1, 1) vs network (1, 8, 1, 1, 1)" in report
    assert torch.equal(network.encoder.state_dict()["levels.0.conv1.conv.weight"],
                       best["encoder"]["levels.0.conv1.conv.weight"])


def test_pretrain_refuses_brats_volumes_without_in_channels_with_advice_for_brats(tmp_path: Path, capsys) -> None:
    """The refusal of 4-sequence BraTS volumes for a 1-channel network said to prepare with `dira3d prepare generic
    --sequences`, an option of another command; it names the datalist's sequences, the in_channels override and
    `dira3d prepare brats ... --modalities` (one sequence), as split_option names each dataset's own split options."""
    write_brats(tmp_path / "BraTS", count=2)
    dst = tmp_path / "brats"
    assert cli_main(["prepare", "brats", "--src", str(tmp_path / "BraTS"), "--dst", str(dst)]) == 0
    capsys.readouterr()
    assert cli_main(["pretrain", "--datalist", str(dst / "brats_datalist.json"), "--output", str(tmp_path / "run"),
                     "--tiny", *ONE_STAGE]) == 2
    err = capsys.readouterr().err
    assert ("has 4 channels (loaded shape (4, 32, 32, 16)), not 1; for the 4 sequences (t1, t1ce, t2, flair) of this "
            "BraTS datalist set in_channels to 4 (`dira3d pretrain --override in_channels=4`), or prepare 1 of them "
            "(`dira3d prepare brats ... --modalities t1`)") in err, err[-2000:]
    assert "prepare generic" not in err, err[-2000:]


def test_channels_advice_fits_the_datalist(tmp_path: Path) -> None:
    """generic --sequences datalists name generic's option; a datalist without meta keeps the general advice."""
    from dira3d.data.datalist import channels_advice

    generic = tmp_path / "generic.json"
    generic.write_text(json.dumps({"training": [], "meta": {"dataset": "generic", "channels": ["t1", "flair"]}}))
    assert channels_advice(generic, 2, 1) == (
        "for the 2 sequences (t1, flair) of this datalist set in_channels to 2 (`dira3d pretrain --override "
        "in_channels=2`), or prepare 1 of them (`dira3d prepare generic ... --sequences` with 1 NAME=PATTERN)")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"training": []}))
    assert channels_advice(plain, 3, 1) == channels_advice(None, 3, 1) == (
        "for volumes of 3 channels (e.g. the sequences of `dira3d prepare generic --sequences`) set in_channels to 3 "
        "(`dira3d pretrain --override in_channels=3`), or fix the datalist")


def test_split_advice_on_a_prepared_luna16_datalist_names_luna16_subsets(tmp_path: Path, capsys) -> None:
    """A LUNA16 datalist with one validation scan and no test scan was told to rerun `dira3d prepare generic ...
    --val-fraction` (visual words) and `--test-fraction` (fine-tuning), options `prepare luna16` does not have."""
    from dira3d.data.errors import DataError
    from dira3d.evaluation import load_split

    raw, dst = tmp_path / "LUNA16", tmp_path / "luna16"
    assert cli_main(["synthetic", "--out", str(raw), "--count", "2", "--size", "48", "48", "24"]) == 0
    assert cli_main(["prepare", "luna16", "--src", str(raw), "--dst", str(dst), "--train-subsets", "0",
                     "--val-subsets", "1", "--test-subsets", "7"]) == 0
    capsys.readouterr()
    assert cli_main(["visual-words", "--datalist", str(dst / "pretrain_datalist.json"), "--out", str(tmp_path / "vw"),
                     "--classes", "2", "--neighbours", "2", "--val-neighbours", "2"]) == 1
    err = capsys.readouterr().err
    assert "2 or more validation volumes (`dira3d prepare luna16 ... --val-subsets`; pretrain_datalist.json has 1)" in err, err
    with pytest.raises(DataError, match=r"its 'test' list has no entries \(`dira3d prepare luna16 \.\.\. --test-subsets` "
                                        r"writes one\), or set fold"):
        load_split(dst / "ncc_datalist.json", "test")


@pytest.mark.parametrize("channels, modalities", [(["t1", "t1ce", "t2", "flair"], "all"),
                                                  (["flair", "t2"], "flair,t2"), (["flair"], None)])
def test_the_end_of_a_pretraining_on_mr_sequences_says_to_fine_tune_on_them(tmp_path: Path, channels, modalities) -> None:
    """A walk of 2026-11-28: `dira3d pretrain --override in_channels=4` on a BraTS datalist ended with the generic
    `fine-tune: dira3d finetune --bundle BUNDLE ...` line; followed with brats_tumor_seg, the fine-tuning took FLAIR
    alone, the checkpoint's first convolution averaged over the four sequences. The line after it names the
    sequences and `--set modalities=` in the datalist's channel order (`all` is t1, t1ce, t2, flair in that order)."""
    from test_bundle_pretrain import CONFIGS

    from dira3d.engines.command import finished_message

    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    torch.save({"trainer": {"best_epoch": 1}}, models / "best.pt")
    torch.save({"trainer": {"epoch": 1, "validation": True}}, models / "last.pt")
    datalist = tmp_path / "brats_datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"dataset": "brats2018", "channels": channels}}))
    configs = [f"{CONFIGS}/train.json", f"{CONFIGS}/tiny.json"]
    lines = finished_message(tmp_path / "run", configs, {"datalist": str(datalist), "in_channels": len(channels)})
    lines = lines.splitlines()
    if modalities is None:  # one channel: the bundles' default fits
        assert lines[-1].startswith("fine-tune:   dira3d finetune --bundle BUNDLE") and "modalities" not in "\n".join(lines)
    else:
        assert lines[-2].startswith("fine-tune:   dira3d finetune --bundle BUNDLE"), lines
        assert lines[-1].strip().startswith(f"its {len(channels)} input channels are the sequences {', '.join(channels)}")
        assert f"--bundle brats_tumor_seg --set modalities={modalities} " in lines[-1], lines[-1]
