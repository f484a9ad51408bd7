"""Settings a researcher passes on the command line: booleans and Python literals through
``dira3d pretrain --override``, learning rates, Barlow Twins validation with a last batch of one,
and the message for 2D images given to the 3D bundle."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from dira3d.engines import DiRACheckpoint, DiRAEvaluator, RandPatchPaird
from dira3d.engines.command import parse_override
from dira3d.engines.inputs import check_volume
from dira3d.engines.performance import build_adam

from tests.test_engine import PATCH2, PATCH3, make_trainer, smooth_volumes


def test_override_reads_python_literals_as_the_readme_writes_them():
    # README: --stages "[{'name':'res','losses':['res']}]"; reference/bundle: --resume False
    assert parse_override("resume=False") == ("resume", False)
    assert parse_override("clip_grad_norm=None") == ("clip_grad_norm", None)
    assert parse_override("stages=[{'name':'res','losses':['res']}]") == ("stages", [{"name": "res", "losses": ["res"]}])
    assert parse_override("distortion_args={'elastic_prob': 0.5}") == ("distortion_args", {"elastic_prob": 0.5})
    # JSON and plain text as before
    assert parse_override("resume=false") == ("resume", False)
    assert parse_override("dis_mode=moco") == ("dis_mode", "moco")
    assert parse_override("amp=none") == ("amp", "none")
    assert parse_override("views=$dira3d.transforms.ViewAugment(3)") == ("views", "$dira3d.transforms.ViewAugment(3)")


def test_resume_false_as_text_does_not_resume(tmp_path):
    assert DiRACheckpoint(tmp_path, resume="False").resume is False
    assert DiRACheckpoint(tmp_path, resume="true").resume is True
    assert DiRACheckpoint(tmp_path, resume=False).resume is False
    with pytest.raises(ValueError, match="resume='maybe'.*true or false"):
        DiRACheckpoint(tmp_path, resume="maybe")


def test_negative_learning_rate_names_the_setting():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"lr_g=-0.001: the learning rate must be"):
        build_adam([net], lr=-0.001, device="cpu", name="lr_g")
    with pytest.raises(ValueError, match=r"lr_d='fast'"):
        build_adam([net], lr="fast", device="cpu", name="lr_d")
    build_adam([net], lr=0.0, device="cpu", name="lr_g")


def test_barlow_validation_with_a_last_batch_of_one(tmp_path):
    """3 validation volumes, batch 2: the last batch has one sample, which Barlow Twins cannot
    standardise. It is left out; the run does not die after its first training epoch."""
    val_loader = DataLoader(Dataset(smooth_volumes(3, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    evaluator = DiRAEvaluator("cpu", val_loader, seed=7)
    trainer = make_trainer("barlow", 3, stages=[{"name": "dis_res", "losses": ["dis", "res"]}], max_epochs=1,
                           volumes=2, batch=2, handlers=[evaluator])
    trainer.run()
    assert np.isfinite(trainer.state.metrics["val_loss_dis"])
    # a validation split of a single volume has no Barlow loss at all: say so, naming the split
    one = DiRAEvaluator("cpu", DataLoader(Dataset(smooth_volumes(1, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2))
    trainer = make_trainer("barlow", 3, stages=[{"name": "dis", "losses": ["dis"]}], max_epochs=1, volumes=2, batch=2,
                           handlers=[one])
    with pytest.raises(ValueError, match="validation split"):
        trainer.run()


def test_each_validation_counts_its_own_short_batches(caplog):
    """5 validation volumes, batch 2: batches of 2, 2 and 1 (the 1 left out by Barlow Twins). The count of short
    batches, which decides "every validation batch was too small", added up over the validations; it is now that of
    each validation, with the same val_loss each time, and the warning is still given once."""
    val_loader = DataLoader(Dataset(smooth_volumes(5, seed=1), RandPatchPaird("image", PATCH3)), batch_size=2)
    evaluator = DiRAEvaluator("cpu", val_loader, seed=7)
    trainer = make_trainer("barlow", 3, stages=[{"name": "dis_res", "losses": ["dis", "res"]}], max_epochs=1,
                           volumes=2, batch=2, handlers=[evaluator])
    with caplog.at_level("WARNING"):
        trainer.run()
        first = trainer.state.metrics["val_loss"]
        assert evaluator._short_batches == 1
        evaluator._validate(trainer)
    assert evaluator._short_batches == 1  # this validation's, not 2
    assert trainer.state.metrics["val_loss"] == first
    assert sum("is left out" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("dims, items, dataset, option", [
    (3, "volumes", None, "generic ... --val-fraction"),  # no datalist meta: generic's option
    (3, "volumes", "luna16", "luna16 ... --val-subsets"),  # it named --val-fraction, which LUNA16's prepare lacks
    (2, "images", "radiographs", "radiographs ... --val-fraction"),
])
def test_barlow_validation_of_one_image_names_the_datalist(tmp_path, dims, items, dataset, option):
    """The message named no datalist and said "volumes" for 2D images too; it advised a larger --val-fraction for
    every dataset, LUNA16's too (split by subset: --val-subsets)."""
    datalist = tmp_path / "pretrain_datalist.json"
    if dataset is not None:
        datalist.write_text(json.dumps({"meta": {"dataset": dataset}, "training": [], "validation": []}))
    patch, shape = (PATCH3, (24, 24, 12)) if dims == 3 else (PATCH2, (24, 24))
    one = DiRAEvaluator("cpu", DataLoader(Dataset(smooth_volumes(1, shape, seed=1),
                                                  RandPatchPaird("image", patch, spatial_dims=dims)), batch_size=2),
                        datalist=datalist)
    trainer = make_trainer("barlow", dims, stages=[{"name": "dis", "losses": ["dis"]}], max_epochs=1, volumes=2,
                           batch=2, handlers=[one])
    with pytest.raises(ValueError, match=rf"put at least 2 {items} in the validation split of "
                                         rf"{re.escape(str(datalist))} \(and keep"
                                         rf".*run it again with more validation {items} \(`dira3d prepare {option}`"):
        trainer.run()
    # found by a 2D walkthrough (a folder of 5 X-rays, 10 % for validation: 1 image): refused before training, not
    # at the end of the first epoch
    assert trainer.state.iteration == 0


def test_a_validation_batch_size_of_one_is_refused_before_training_and_moco_takes_it(tmp_path):
    loader = DataLoader(Dataset(smooth_volumes(3, seed=1), RandPatchPaird("image", PATCH3)), batch_size=1)
    trainer = make_trainer("barlow", 3, stages=[{"name": "dis", "losses": ["dis"]}], max_epochs=1, volumes=2, batch=2,
                           handlers=[DiRAEvaluator("cpu", loader)])
    with pytest.raises(ValueError, match=r"put at least 2 volumes .* \(and keep batch_size >= 2\)"):
        trainer.run()
    assert trainer.state.iteration == 0
    trainer = make_trainer("moco", 3, stages=[{"name": "dis", "losses": ["dis"]}], max_epochs=1, volumes=2, batch=2,
                           handlers=[DiRAEvaluator("cpu", loader)])  # MoCo's loss takes a batch of one
    trainer.run()
    assert np.isfinite(trainer.state.metrics["val_loss_dis"])


def test_the_bundle_hands_its_datalist_to_the_evaluator(repo_root):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json")
    assert parser.config["validate"]["evaluator"]["datalist"] == "@datalist"


def test_2d_image_to_the_3d_bundle_says_which_setting_to_use():
    with pytest.raises(ValueError, match=r"img\.png.*2d\.json"):
        check_volume(np.zeros((1, 32, 32), np.float32), "img.png", spatial_dims=3)


def test_a_visual_word_shard_given_as_a_volume_says_which_config_reads_it():
    """`monai.bundle run` of train.json on `dira3d visual-words` output, without configs/visual_words.json, said only
    'loaded as a 5D image ...; 3D pretraining needs 3D volumes'."""
    with pytest.raises(ValueError, match=r"vw/shards/training/class_0000\.npy: loaded as a 5D image.*shard of `dira3d "
                                         r"visual-words`: pretrain on its output with configs/visual_words\.json"):
        check_volume(np.zeros((1, 2, 1, 16, 16, 8), np.float32), "vw/shards/training/class_0000.npy", spatial_dims=3)
    with pytest.raises(ValueError, match=r"a\.npy: loaded as a 2D image") as err:  # not a shard: no such advice
        check_volume(np.zeros((1, 16, 16), np.float32), "a.npy", spatial_dims=3)
    assert "visual-words" not in str(err.value)


def test_a_volume_of_several_sequences_names_the_in_channels_to_set():
    """A 2-sequence volume of `prepare generic --sequences` to the one-channel pretraining network was told to
    'prepare the scans with `dira3d prepare`', which had prepared it."""
    with pytest.raises(ValueError) as err:
        check_volume(np.zeros((2, 16, 16, 8), np.float32), "volumes/sub-01.nii.gz", channels=1)
    assert str(err.value) == ("volumes/sub-01.nii.gz: has 2 channels (loaded shape (2, 16, 16, 8)), not 1; for volumes "
                              "of 2 channels (e.g. the sequences of `dira3d prepare generic --sequences`) set in_channels "
                              "to 2 (`dira3d pretrain --override in_channels=2`), or fix the datalist")
    check_volume(np.zeros((2, 16, 16, 8), np.float32), "volumes/sub-01.nii.gz", channels=2)


def test_unnormalised_volumes_are_named_not_trained_on(repo_root):
    # a raw MRI (0 … 3057) or raw HU would train silently with loss_res ~ 1e5: the bundle checks [0, 1]
    raw_mr = np.linspace(0, 3057, 2 * 16 * 16 * 8, dtype=np.float32).reshape(1, 32, 16, 8)
    with pytest.raises(ValueError, match=r"brain\.nii\.gz: has intensities from 0 to 3057, outside \[0, 1\].*--modality"):
        check_volume(raw_mr, "brain.nii.gz", value_range=(0.0, 1.0))
    check_volume(raw_mr / 3057, "brain.nii.gz", value_range=(0.0, 1.0))  # prepared: fine
    check_volume(raw_mr, "brain.nii.gz")  # not asked for: not checked
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"))
    assert parser.get_parsed_content("intensity_range") == [0.0, 1.0]
    check = next(t for t in parser["preprocessing"]["transforms"] if t["_target_"].endswith("CheckVolumed"))
    assert check["value_range"] == "@intensity_range"


def test_pretrain_wrapper_applies_null_overrides(tmp_path, capsys):
    # monai.bundle.run drops overrides whose value is None: `--override intensity_range=null` (or
    # views=null) must still take effect through `dira3d pretrain`
    import json

    import nibabel as nib

    from dira3d.engines.command import main

    # an unnormalised MRI, of tiny.json's patch size (a smaller one trains on zero padding, with a warning)
    data = np.random.default_rng(0).random((32, 32, 16)).astype(np.float32) * 3000
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    entries = [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": entries, "validation": entries[:1]}))
    common = ["--datalist", str(datalist), "--tiny", "--override", "max_epochs=1", "--override", "batch_size=1",
              "--override", "stages=[{'name':'dis','losses':['dis']}]"]
    assert main([*common, "--output", str(tmp_path / "checked")]) == 2
    assert "outside [0, 1]" in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "unchecked"), "--override", "intensity_range=null"]) == 0
    assert (tmp_path / "unchecked" / "models" / "last.pt").is_file()


def test_ctrl_c_in_pretrain_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C used to print a raw KeyboardInterrupt traceback: now one line, exit code 130."""
    from dira3d.engines.command import main
    from dira3d.utils import overrides

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(overrides, "run_bundle", interrupt)

    def run(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt reached the caller (a raw traceback for the user)")

    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text('{"training": []}')
    output = tmp_path / "run"
    args = ["--datalist", str(datalist), "--output", str(output), "--tiny"]
    assert run(args) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("dira3d pretrain: interrupted before the first checkpoint") and "starts afresh" in err, err
    (output / "models").mkdir(parents=True)
    (output / "models" / "last.pt").write_bytes(b"")
    assert run(args) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert str(output / "models" / "last.pt") in err and "rerun the same command to resume from it" in err, err
    assert run([*args, "--override", "resume=false"]) == 130
    assert "rerun without --override resume=false" in capsys.readouterr().err


def test_check_overrides_refuses_text_for_numbers_but_not_expressions_or_backends(repo_root):
    from dira3d.utils.overrides import check_overrides

    configs = [repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"]
    with pytest.raises(ValueError, match=r"--override: max_epochs='two' is text, but the setting is a number"):
        check_overrides(configs, {"max_epochs": "two"}, where="--override")
    # expressions, references and text for a true/false setting that also takes a backend name pass
    check_overrides(configs, {"max_epochs": "$2 * 3", "lr_g": "@lr_d", "compile": "aot_eager", "width": 0.5})


@pytest.mark.parametrize("key, value, kind", [
    ("channels_last", "maybe", r"true or false \(default false\)"),  # bool('maybe'): switched on without a word
    ("gemm_upconv", "no", r"true or false \(default false\)"),  # bool('no') is True too
    ("validation", "maybe", r"true or false \(default true\)"),
    ("patch_size", "abc", r"a list \(default \[64, 64, 32\]\)"),  # MONAI's traceback
    ("intensity_range", "abc", r"a list \(default \[0.0, 1.0\]\)"),  # "could not convert string to float: 'a'"
    ("betas_d", "abc", r"a list \(default \[0.9, 0.999\]\)"),
])
def test_check_overrides_refuses_text_for_true_false_and_list_settings(repo_root, key, value, kind):
    from dira3d.utils.overrides import check_overrides

    configs = [repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"]
    with pytest.raises(ValueError, match=rf"^--override: {key}='{value}' is text, but the setting is {kind}; fix the value$"):
        check_overrides(configs, {key: value}, where="--override")


def test_check_overrides_keeps_text_where_a_true_false_setting_reads_it(repo_root):
    from dira3d.utils.overrides import check_overrides

    configs = [repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"]
    # as_bool's words for the settings read with it, a backend name for compile, real values and expressions
    check_overrides(configs, {"resume": "no", "validation": "yes", "compile": "aot_eager", "channels_last": True,
                              "patch_size": [32, 32, 16], "intensity_range": None, "betas_d": "$[0.5, 0.999]"})
    task = repo_root / "bundles" / "lits_liver_seg" / "configs"
    check_overrides([task / "train.json", task / "tiny.json"], {"amp": "bf16", "overwrite": "yes"}, where="--set")
    with pytest.raises(ValueError, match=r"overwrite='maybe' is text, but the setting is true or false"):
        check_overrides([task / "train.json"], {"overwrite": "maybe"}, where="--set")


@pytest.mark.parametrize("losses, shown", [("dis", '["dis"]'), ("dis+res", '["dis", "res"]'),
                                           ({"dis": True}, '["dis"]'), (5, '["dis", "res", "adv"]')])
def test_stage_losses_that_are_not_a_list_are_refused_showing_the_list_form(losses, shown):
    """"losses": "dis" (a common slip) was refused without the list form; {"dis": true} was taken as its keys and a
    number failed with Python's bare "'int' object is not iterable"."""
    from dira3d.engines.stages import StageSchedule

    with pytest.raises(ValueError, match=re.escape("stages[1] (warm): 'losses' must be a non-empty list") + ".*"
                       + re.escape(f"got {losses!r}; write it as a list, e.g. \"losses\": {shown}")):
        StageSchedule([{"name": "dis", "until_epoch": 1, "losses": ["dis"]}, {"name": "warm", "losses": losses}])
    assert StageSchedule([{"name": "warm", "losses": ("dis", "res")}]).stages[0].losses == ("dis", "res")


@pytest.mark.parametrize("bad", ["abc", True, -1.0, 0, float("nan")])
def test_a_clip_grad_norm_that_is_not_a_positive_number_is_refused_naming_it(bad):
    """--clip_grad_norm abc failed at the first step with "could not convert string to float: 'abc'" (no setting
    named); true clipped at 1.0 and a negative norm reached torch."""
    with pytest.raises(ValueError, match=r"^clip_grad_norm=.* must be null \(no clipping\) or a number > 0"):
        make_trainer("barlow", 3, clip_grad_norm=bad)
    assert make_trainer("barlow", 3, clip_grad_norm=2).clip_grad_norm == 2.0
    assert make_trainer("barlow", 3, clip_grad_norm=None).clip_grad_norm is None


def test_a_nonfinite_loss_ends_dira3d_pretrain_with_one_error_line(tmp_path, monkeypatch, capsys):
    """A NaN/Inf loss (on_nonfinite='stop', e.g. --override lambda_dis=1e39) ended dira3d pretrain with MONAI's
    traceback of "Failed to evaluate ConfigExpression" around the error (about 40 lines): now its message in one
    line, exit 1."""
    from dira3d.engines.command import main
    from dira3d.engines.faults import NonFiniteLossError
    from dira3d.utils import overrides

    message = ("non-finite loss (NaN/Inf) at iteration 1 (stage 'dis'); training stopped and the last checkpoint "
               "written before it is kept")

    def diverge(*args, **kwargs):
        try:
            raise NonFiniteLossError(message)
        except NonFiniteLossError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err

    monkeypatch.setattr(overrides, "run_bundle", diverge)
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text('{"training": []}')
    assert main(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny"]) == 1
    assert capsys.readouterr().err == f"dira3d pretrain: error: {message}\n"

    def other(*args, **kwargs):  # any other error keeps its traceback
        raise RuntimeError("Failed to evaluate ConfigExpression") from ZeroDivisionError("x")

    monkeypatch.setattr(overrides, "run_bundle", other)
    with pytest.raises(RuntimeError):
        main(["--datalist", str(datalist), "--output", str(tmp_path / "run"), "--tiny"])
