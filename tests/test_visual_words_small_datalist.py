"""`dira3d visual-words` on a user's small datalist (a handful of own scans): every count that does not fit is named
at once, a hint never suggests a refused value, a run without validation words ends with the pretraining command
and a note on pretraining without validation, and a rerun with relaxed planning rules keeps the trained extractor."""

from __future__ import annotations

import json
import logging

import pytest

from dira3d.cli import main as cli_main
from dira3d.visual_words import discover_visual_words
from dira3d.visual_words import discover as discover_module
from dira3d.visual_words import extractor as extractor_module
from dira3d.visual_words.coordinates import CoordinateSamplingError
from dira3d.visual_words.extractor import EXTRACTOR_NAME, extractor_progress, train_extractor
from dira3d.visual_words.synthetic import write_template_datalist

SMALL = ["--patch-size", "16", "16", "8", "--border", "8", "8", "4", "--extractor-size", "32", "32", "16",
         "--extractor-width", "0.125", "--extractor-epochs", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    """3 training volumes, 1 validation volume, as `dira3d prepare generic --val-fraction 0.25` makes of 4 scans."""
    path = write_template_datalist(tmp_path_factory.mktemp("vw_small"), templates=1, per_template=4, shape=(48, 48, 24))
    data = json.loads(path.read_text())
    data["validation"] = data["training"][3:]
    data["training"] = data["training"][:3]
    path.write_text(json.dumps(data))
    return path


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the feature extractor was trained before the settings were checked")

    monkeypatch.setattr(discover_module, "train_extractor", refuse)


def test_every_count_that_does_not_fit_is_named_in_one_error(datalist, tmp_path, monkeypatch, capsys):
    """The defaults (50 classes, 200 neighbours, 30 validation neighbours) on 3 + 1 volumes took three runs, one
    refusal each; the last one said 'choose val_neighbours between 0 and 1', and 1 is then refused too."""
    _no_training(monkeypatch)
    assert cli_main(["visual-words", "--datalist", str(datalist), "--out", str(tmp_path / "vw")]) == 1
    err = capsys.readouterr().err
    assert "classes=50 is not possible" in err and "choose classes (--classes) between 2 and 3" in err, err
    assert "neighbours=200 is not possible" in err and "choose neighbours (--neighbours) between 2 and 3" in err
    assert "val_neighbours=30 is not possible" in err and "between 0 and 1" not in err
    assert "2 or more validation volumes" in err and "--val-fraction" in err and "datalist.json has 1" in err
    with pytest.raises(ValueError, match=r"val_neighbours=1 .*2 or more validation volumes") as refused:
        discover_visual_words(datalist, tmp_path / "one", classes=2, neighbours=3, val_neighbours=1)
    assert "between 2 and 2" not in str(refused.value)


def test_one_training_volume_names_the_split_not_an_impossible_range(tmp_path):
    """Two scans prepared with --val-fraction 0.5 (the README's recipe) leave 1 training volume: the error said
    'choose classes (--classes) between 2 and 1', a range with no value in it."""
    from dira3d.visual_words.checks import check_counts

    with pytest.raises(ValueError) as refused:
        check_counts(tmp_path / "pretrain_datalist.json", 1, 1, classes=2, neighbours=2, val_neighbours=0)
    message = str(refused.value)
    assert "between 2 and 1" not in message, message
    assert "2 or more training volumes" in message and "--val-fraction" in message and "1 training" in message


@pytest.mark.parametrize("dataset, option", [
    ("luna16", "`dira3d prepare luna16 ... --train-subsets`"),  # it said --val-fraction, which LUNA16's prepare lacks
    ("lits", "`dira3d prepare lits ... --train-range`"),
    ("brats2018", "`dira3d prepare brats ... --split`"),
    ("generic", "a smaller --val-fraction (`dira3d prepare generic ... --val-fraction 0`"),
])
def test_one_training_volume_names_the_option_of_the_datalists_own_prepare(tmp_path, dataset, option):
    """LUNA16 is split by subset: `dira3d visual-words` on a LUNA16 datalist of one training volume advised a smaller
    --val-fraction, an option `dira3d prepare luna16` does not have."""
    from dira3d.visual_words.checks import check_counts

    path = tmp_path / "pretrain_datalist.json"
    path.write_text(json.dumps({"meta": {"dataset": dataset}, "training": [], "validation": []}))
    with pytest.raises(ValueError) as refused:
        check_counts(path, 1, 1, classes=2, neighbours=2, val_neighbours=0)
    message = str(refused.value)
    assert option in message and "2 or more training volumes" in message, message
    assert dataset == "generic" or "--val-fraction" not in message, message


def test_no_validation_words_is_said_at_the_start_and_the_end_with_the_pretraining_command(
        datalist, tmp_path, capsys, caplog):
    """--val-neighbours 0 (what the count error allowed): the pretraining bundle refused such an output ('lists no
    validation visual words'), so the run ended with a note instead of the command; it now pretrains without
    validation (configs/visual_words.json turns validation off for it), and the note says what that means."""
    out = tmp_path / "vw"
    args = ["visual-words", "--datalist", str(datalist), "--out", str(out), "--classes", "2", "--neighbours", "3",
            "--val-neighbours", "0", "--lung-filter", "off", *SMALL]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert cli_main(args) == 0
    stdout = capsys.readouterr().out
    assert f"next:     dira3d pretrain --datalist {(out / 'visual_words.json').resolve()} --config visual_words.json " \
           '--override "patch_size=[16,16,8]"' in stdout, stdout
    assert "note:     --val-neighbours 0: no validation visual words, so pretraining on this output" in stdout
    assert "no best.pt (fine-tune from last.pt" in stdout and "refuses" not in stdout
    assert "--val-neighbours 0: no validation visual words" in caplog.text  # before the extractor trained

    from dira3d.visual_words import VisualWordPairDataset, has_validation_words

    assert has_validation_words(out) is False  # what visual_words.json's validation setting becomes for it
    with pytest.raises(ValueError, match="lists no 'validation' visual words.*validation=false"):  # asked for anyway
        VisualWordPairDataset(out / "visual_words.json", split="validation")


def test_a_rerun_with_relaxed_planning_rules_keeps_the_trained_extractor(datalist, tmp_path, monkeypatch):
    """A plan that found no valid centre ('relax the coordinate rules') left a finished extractor.pt; the rerun with
    a relaxed rule refused it ('trained with other settings (the visual-word settings)'), and --overwrite trained the
    extractor again: hours at the default size on a CPU."""
    out = tmp_path / "vw"
    settings = dict(classes=2, neighbours=3, val_neighbours=0, patch_size=(16, 16, 8), border=(8, 8, 4),
                    extractor_size=(32, 32, 16), extractor_width=0.125, extractor_epochs=2, lung_filter="off")  # fmt: skip

    def no_centre(*args, **kwargs):
        raise CoordinateSamplingError("class 0: all 3 training volumes have been used as references")

    with monkeypatch.context() as patch:
        patch.setattr(discover_module, "_plan", no_centre)
        with pytest.raises(CoordinateSamplingError):
            discover_visual_words(datalist, out, **settings)
    assert extractor_progress(out / EXTRACTOR_NAME) == (2, 2)

    epochs = []
    original = extractor_module._Progress
    monkeypatch.setattr(extractor_module, "_Progress", lambda what, total: epochs.append(what) or original(what, total))
    manifest = discover_visual_words(datalist, out, **{**settings, "max_dense_fraction": 0.5, "min_distance": 3.0})
    assert manifest["status"] == "complete"
    assert [w for w in epochs if w.startswith("extractor")] == []  # reused, not trained again


def test_extractor_settings_are_compared_on_the_keys_this_run_records(datalist, tmp_path):
    """A checkpoint of an earlier version recorded every visual-word setting; only those this run records count."""
    entries = [{"image": str(datalist.parent / e["image"])} for e in json.loads(datalist.read_text())["training"]]
    size = dict(size=(32, 32, 16), width=0.125, epochs=1)
    path = tmp_path / "extractor.pt"
    train_extractor(entries, checkpoint_path=path, settings={"extractor_size": [32, 32, 16], "classes": 50}, **size)
    train_extractor(entries, checkpoint_path=path, settings={"extractor_size": [32, 32, 16]}, **size)  # accepted
    with pytest.raises(ValueError, match=r"extractor_size: \[32, 32, 16\] → \[64, 64, 32\]"):
        train_extractor(entries, checkpoint_path=path, settings={"extractor_size": [64, 64, 32]}, **size)


def test_the_progress_says_what_is_left_of_the_epoch_and_of_the_run(datalist, monkeypatch, caplog):
    """'about 42 s to go' inside epoch 1 of 10 read as the whole run's time; an epoch ended with its loss alone."""
    entries = [{"image": str(datalist.parent / e["image"])} for e in json.loads(datalist.read_text())["training"]]
    monkeypatch.setattr(extractor_module, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.extractor"):
        train_extractor(entries, size=(32, 32, 16), width=0.125, epochs=2, batch_size=1)
    assert "extractor epoch 1/2: 1/3 volumes" in caplog.text and "s to go in this epoch" in caplog.text, caplog.text
    assert "for the 1 epoch(s) left)" in caplog.text
    last = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extractor epoch 2/2: mse")]
    assert last and "left" not in last[0]


def test_extraction_says_how_far_it_is_inside_a_block(datalist, tmp_path, monkeypatch, caplog):
    """A block of --class-block classes reads every volume its classes list (up to all of them: about 3 s each for a
    chest CT prepared at 1x1x2 mm, so tens of minutes for hundreds of CTs) and logged only when it ended. It now logs
    the volumes done and the time to go at most every minute (every volume here: PROGRESS_SECONDS 0)."""
    import dira3d.utils.progress as progress_module

    monkeypatch.setattr(progress_module, "PROGRESS_SECONDS", 0.0)
    settings = dict(classes=2, neighbours=3, val_neighbours=0, patch_size=(16, 16, 8), border=(8, 8, 4),
                    extractor_size=(32, 32, 16), extractor_width=0.125, extractor_epochs=1, max_dense_fraction=0.5,
                    min_distance=3.0)
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.discover"):
        manifest = discover_visual_words(datalist, tmp_path / "vw", **settings)
    assert manifest["status"] == "complete"
    lines = [r.getMessage() for r in caplog.records if ", training volumes: " in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == ["classes 0-1, training volumes: 1/3 volumes",
                                                      "classes 0-1, training volumes: 2/3 volumes"], caplog.text
    assert all("to go)" in line for line in lines)


def test_an_empty_training_list_of_luna16_names_its_train_subsets(tmp_path):
    """`dira3d visual-words` and `dira3d pretrain` on a LUNA16 datalist with no training volume (subsets left out of
    --train-subsets) said what to do with no option, or only 'check the paths'; they name `--train-subsets` now."""
    from dira3d.engines import load_datalist
    from dira3d.visual_words.loading import read_datalist

    (tmp_path / "a.nii.gz").write_bytes(b"")
    path = tmp_path / "pretrain_datalist.json"
    path.write_text(json.dumps({"meta": {"dataset": "luna16"}, "training": [],
                                "validation": [{"image": "a.nii.gz", "case_id": "a"}]}))
    for read in (read_datalist, lambda p: load_datalist(p, "training")):
        with pytest.raises(ValueError, match=r"empty 'training' list.*`dira3d prepare luna16 \.\.\. --train-subsets`"):
            read(path)
