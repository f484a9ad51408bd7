"""Pretraining without a validation set (``validation: false``, or a visual-words output without validation words):
no evaluator, no best.pt (last.pt is the result, what fine-tuning and `dira3d export pretrained` take), early stopping
refused naming both settings. It used to crash: a disabled ``validate#evaluator`` left None in ``train#handlers``
('NoneType' object has no attribute 'attach'), and an output of `dira3d visual-words --val-neighbours 0` was refused."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from monai.data import DataLoader, Dataset

from dira3d.engines import DiRACheckpoint, DiRATrainer, RandPatchPaird, check_early_stop_patience
from dira3d.networks import UNet
from dira3d.transforms.compositions import build_distortion
from dira3d.utils import load_checkpoint
from test_bundle_pretrain import CONFIGS, scalars, write_volumes
from test_engine import PATCH3, smooth_volumes

NO_VALIDATION_LINE = "no validation: best.pt is not written"


def volumes_without_validation(folder):
    """The 6 tiny volumes of test_bundle_pretrain, all in 'training', and an empty 'validation' list."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_volumes(folder)
    content = json.loads(path.read_text())
    content["training"] += content.pop("validation")
    content["validation"] = []
    path.write_text(json.dumps(content))
    return path


def test_a_disabled_evaluator_is_left_out_of_the_handlers(tmp_path, caplog):
    """``validate#evaluator#_disabled_ true`` puts None where the evaluator was in ``train#handlers``."""
    torch.manual_seed(0)
    data = DataLoader(Dataset(smooth_volumes(2), RandPatchPaird("image", PATCH3)), batch_size=2)
    net = UNet(3, width=1 / 8, norm="instance")
    trainer = DiRATrainer("cpu", 2, data, net, torch.optim.Adam(net.parameters(), 1e-3), None, None, None,
                          stages=[{"name": "res", "losses": ["res"]}], distortion=build_distortion("none"),
                          train_handlers=[None, DiRACheckpoint(tmp_path, metric_name="val_selection_loss")])
    assert trainer.evaluator is None
    with caplog.at_level(logging.INFO):
        trainer.run()
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"] == 2
    assert not (tmp_path / "best.pt").exists()
    assert NO_VALIDATION_LINE in caplog.text and "last.pt" in caplog.text
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["validation"] is False


def test_a_best_pt_of_an_earlier_validated_run_is_not_taken_after_a_run_without_validation(tmp_path):
    """A validated run resumed with validation=false leaves its old best.pt: last.pt (trainer validation False) says
    the result is last.pt; a last.pt that validated (or of dira3d before the key) keeps best.pt the result."""
    from dira3d.engines import pretrained_checkpoint

    assert pretrained_checkpoint(tmp_path) == tmp_path / "last.pt"  # nothing yet: last.pt is where it will be
    torch.save({"trainer": {"validation": False}}, tmp_path / "last.pt")
    assert pretrained_checkpoint(tmp_path) == tmp_path / "last.pt"
    torch.save({"trainer": {"best_epoch": 3}}, tmp_path / "best.pt")
    assert pretrained_checkpoint(tmp_path) == tmp_path / "last.pt"
    torch.save({"trainer": {"validation": True}}, tmp_path / "last.pt")
    assert pretrained_checkpoint(tmp_path) == tmp_path / "best.pt"
    torch.save({"trainer": {"epoch": 4}}, tmp_path / "last.pt")  # written before the key existed
    assert pretrained_checkpoint(tmp_path) == tmp_path / "best.pt"
    (tmp_path / "last.pt").unlink()
    assert pretrained_checkpoint(tmp_path) == tmp_path / "best.pt"


def test_early_stopping_without_validation_is_refused_naming_both_settings():
    with pytest.raises(ValueError, match=r"early_stop_patience=3 stops on the validation loss, but validation is false"
                                         r".*set early_stop_patience to null.*or validation to true"):
        check_early_stop_patience(3, validation=False)
    assert check_early_stop_patience(None, validation=False) is None
    assert check_early_stop_patience(3, validation=True) == 3
    with pytest.raises(ValueError, match="validation='maybe' is not a boolean"):
        check_early_stop_patience(None, validation="maybe")


def test_the_pretrain_command_refuses_early_stopping_without_validation_before_loading_data(tmp_path, capsys):
    from dira3d.engines.command import main as pretrain_main

    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "missing.nii.gz"}] * 2, "meta": {}}))
    code = pretrain_main(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny",
                          "--override", "validation=false", "--override", "early_stop_patience=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: early_stop_patience=2 stops on the validation loss, but validation is false" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_bundle_pretrains_without_validation(tmp_path, repo_root):
    """`python -m monai.bundle run ... --validation false`, MoCo (which validates on the 'validation' list, empty
    here): no validation list is read, no val_* is logged, last.pt is written, best.pt is not."""
    volumes_without_validation(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json']",
           "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
           "--dataset_dir", str(tmp_path / "data"), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
           "--patch_size", "[16,16,8]", "--max_epochs", "2", "--dis_mode", "moco", "--validation", "false"]
    proc = subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert NO_VALIDATION_LINE in log, log[-3000:]
    last = load_checkpoint(out / "models" / "last.pt")
    assert last["trainer"]["epoch"] == 2 and last["trainer"]["best_epoch"] == -1
    assert not (out / "models" / "best.pt").exists()
    values, _ = scalars(out / "eval")
    assert "loss" in values and not [tag for tag in values if tag.startswith("val_")], sorted(values)


def test_the_pretrain_command_without_validation_points_fine_tuning_at_last_pt(tmp_path, capsys):
    """`dira3d pretrain --override validation=false`: ends naming last.pt as the checkpoint to fine-tune from, not a
    best.pt that does not exist; `dira3d export pretrained` takes it."""
    from dira3d.deploy.weights import export_pretrained
    from dira3d.engines.command import main as pretrain_main

    datalist = volumes_without_validation(tmp_path / "data")
    out = tmp_path / "run"
    code = pretrain_main(["--datalist", str(datalist), "--output", str(out), "--tiny", "--override", "validation=false",
                          "--override", "max_epochs=1", "--override", "patch_size=[16,16,8]"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    last = out / "models" / "last.pt"
    assert not (out / "models" / "best.pt").exists()
    assert f"checkpoint: {last.resolve()} (no validation ran, so there is no best.pt: the last epoch's weights)" in captured.out
    assert f"--pretrained {last.resolve()} --set width=0.125" in captured.out
    written = export_pretrained(last, tmp_path / "weights", parts=("encoder",), formats=("pt",))
    assert (tmp_path / "weights" / "encoder.pt").is_file() and "encoder.pt" in written


def _visual_words_without_validation(tmp_path):
    from dira3d.visual_words import VolumeAutoencoder, discover_visual_words
    from dira3d.visual_words.synthetic import write_template_datalist

    datalist = write_template_datalist(tmp_path / "volumes", templates=2, per_template=3, shape=(48, 48, 24))
    torch.manual_seed(0)
    vw = tmp_path / "vw"
    discover_visual_words(datalist, vw, extractor=VolumeAutoencoder(width=0.125).eval(), classes=2, neighbours=3,
                          val_neighbours=0, patch_size=(16, 16, 8), border=(4, 4, 2), extractor_size=(32, 32, 16),
                          seed=0, lung_filter="off")
    return vw / "visual_words.json"


def test_visual_words_without_validation_words_pretrain_without_validation_with_a_warning(tmp_path, capsys):
    """The output of `dira3d visual-words --val-neighbours 0` was refused ('lists no validation visual words'):
    visual_words.json now turns validation off for it, with a warning saying what that means."""
    from dira3d.engines.command import main as pretrain_main

    datalist = _visual_words_without_validation(tmp_path)
    out = tmp_path / "run"
    args = ["--datalist", str(datalist), "--tiny", "--config", "visual_words.json", "--override", "max_epochs=1",
            "--override", "patch_size=[16,16,8]"]
    code = pretrain_main(args + ["--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    log = captured.out + captured.err
    assert "lists no 'validation' visual words: pretraining without validation" in log, log[-3000:]
    assert "early_stop_patience" in log and "last.pt" in log
    assert (out / "models" / "last.pt").is_file() and not (out / "models" / "best.pt").exists()
    # asked for explicitly, validation on such an output is refused, saying how to go without it
    code = pretrain_main(args + ["--output", str(tmp_path / "again"), "--override", "validation=true"])
    err = capsys.readouterr().err
    assert code == 2 and "lists no 'validation' visual words" in err and "validation=false" in err, err[-3000:]


def test_an_experiment_fine_tunes_from_last_pt_when_its_pretraining_had_no_validation(tmp_path, monkeypatch):
    """`dira3d experiment` handed the methods' fine-tuning models/best.pt, which a run without validation lacks."""
    from dira3d.evaluation.experiment_pretrain import pretrain_method

    (tmp_path / "vw").mkdir()
    out = tmp_path / "out" / "pretrain" / "dira" / "models"

    def fake_bundle(configs, **kwargs):
        out.mkdir(parents=True, exist_ok=True)
        (out / "last.pt").write_bytes(b"")

    monkeypatch.setattr("dira3d.utils.overrides.run_bundle", fake_bundle)
    config = {"output_dir": str(tmp_path / "out"),
              "pretrain": {"dataset_dir": str(tmp_path / "vw"), "overrides": {"validation": False}}}
    assert pretrain_method("dira", {"pretrain": {}}, config, log=lambda _: None) == str(out / "last.pt")
    (out / "best.pt").write_bytes(b"")  # a run that validated: its best epoch
    assert pretrain_method("dira", {"pretrain": {}}, config, log=lambda _: None) == str(out / "best.pt")


def test_the_end_message_names_last_pt_and_an_earlier_runs_best_pt_as_not_updated(tmp_path):
    """`dira3d pretrain`'s closing lines after a validated run was resumed with validation=false: the fine-tuning
    command takes last.pt, and the old best.pt is named as an earlier run's (it said 'checkpoints: best.pt ...')."""
    from dira3d.engines.command import finished_message

    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    torch.save({"trainer": {"best_epoch": 3}}, models / "best.pt")
    torch.save({"trainer": {"epoch": 6, "validation": False}}, models / "last.pt")
    lines = finished_message(tmp_path / "run", [f"{CONFIGS}/train.json", f"{CONFIGS}/tiny.json"], {}).splitlines()
    assert lines[0] == (f"checkpoint: {models / 'last.pt'} (no validation ran: the last epoch's weights; "
                        f"{models / 'best.pt'} is an earlier run's, not updated)")
    assert f"--pretrained {models / 'last.pt'} --set width=0.125" in lines[-1]
    torch.save({"trainer": {"epoch": 6, "validation": True}}, models / "last.pt")
    lines = finished_message(tmp_path / "run", [f"{CONFIGS}/train.json", f"{CONFIGS}/tiny.json"], {}).splitlines()
    assert lines[0].startswith(f"checkpoints: {models / 'best.pt'} (lowest validation loss")
    assert f"--pretrained {models / 'best.pt'} --set width=0.125" in lines[-1]


@pytest.mark.parametrize("interval", [0, -1, 1.5, True, "often", None])
def test_a_validation_interval_that_is_not_a_whole_number_of_epochs_is_refused(interval):
    """val_interval 0 or negative ran as 1 without a word; text and fractions failed with int()'s message or ran."""
    from dira3d.engines import DiRAEvaluator

    with pytest.raises(ValueError, match=r"val_interval=.*whole number N >= 1.*set validation to false"):
        DiRAEvaluator("cpu", [], interval=interval)
    assert DiRAEvaluator("cpu", [], interval=2.0).interval == 2


def test_an_override_of_the_whole_validation_dataset_keeps_its_switch(tmp_path, repo_root):
    """With validation false, validate#dataset is off only by its own _disabled_ (MONAI builds every item a disabled
    one refers to: validate#dataloader and validate#evaluator are disabled, yet the dataset was built). An override of
    the whole dataset (`--override 'validate#dataset={...}'`, dira3d experiment's pretrain overrides) replaced that
    switch too, so the dataset was built, reading the validation data (visual words without validation words: the run
    stopped). dira3d's runs (run_bundle) now keep the switch unless the override sets its own."""
    from monai.bundle import ConfigParser

    from dira3d.utils.overrides import keep_disabled_switches, run_bundle

    configs = [str(repo_root / CONFIGS / "train.json"), str(repo_root / CONFIGS / "visual_words.json")]
    built = tmp_path / "built"
    dataset = {"_target_": "builtins.open", "file": str(built), "mode": "a"}  # leaves a file when built
    for overrides, is_built in (({"validate#dataset": dataset}, False),
                                ({"validate#dataset": {**dataset, "_disabled_": False}}, True)):
        parser = ConfigParser()
        parser.read_config(configs)
        parser.update({"validation": False, **keep_disabled_switches(configs, overrides)})
        assert parser.get_parsed_content("validate#evaluator") is None
        assert built.exists() is is_built
        built.unlink(missing_ok=True)
    # through run_bundle: a small bundle of the same shape, its dataset off with validation false
    (tmp_path / "c.json").write_text(json.dumps({
        "validation": False, "seen": [],
        "dataset": {"_target_": "builtins.dict", "_disabled_": "$not @validation"},
        "loader": {"_target_": "builtins.list", "_disabled_": "$not @validation", "_args_": ["@dataset"]},
        "run": ["$@seen.append(@loader)"], "initialize": [], "finalize": []}))
    run_bundle([tmp_path / "c.json"], repo_root / CONFIGS / "metadata.json", dataset=dataset)
    assert not built.exists()


def test_a_whole_validation_dataset_override_on_visual_words_without_validation_words_pretrains(tmp_path, capsys):
    """`--override 'validate#dataset={...}'` (here: another validation seed) on a `--val-neighbours 0` output: the
    replacement lost the switch, was built with validation false and stopped the run with 'lists no validation
    visual words ... or pretrain without one: validation=false', which it already was."""
    from dira3d.engines.command import main as pretrain_main

    datalist = _visual_words_without_validation(tmp_path)
    dataset = ("validate#dataset={'_target_': 'dira3d.visual_words.VisualWordPairDataset', 'datalist_or_manifest': "
               "'@visual_words_dir', 'split': 'validation', 'seed': 5, 'patch_size': '@patch_size'}")
    code = pretrain_main(["--datalist", str(datalist), "--tiny", "--config", "visual_words.json", "--override",
                          "max_epochs=1", "--override", "patch_size=[16,16,8]", "--override", dataset,
                          "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "models" / "last.pt").is_file() and not (tmp_path / "run" / "models" / "best.pt").exists()
