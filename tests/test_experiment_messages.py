"""``dira3d experiment``'s errors and plots speak the experiment's language (found by a user walkthrough, 2026-11-27):
a run's error names the config setting to change (``overrides: {width: ...}``, ``label_fractions``), not
``dira3d finetune``'s option; a checkpoint of another width is refused once, before any run; the plots label
their x ticks with the grid's own label fractions as percentages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dira3d.evaluation import build_task_network, load_split
from dira3d.evaluation.experiment import load_config, run_experiment
from dira3d.evaluation.metrics import mean_auc
from dira3d.evaluation.result_figures import ablation_figure, metric_figure
from dira3d.evaluation.stats import CellSummary
from dira3d.networks import ResNetUNet, UNet
from dira3d.utils import atomic_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _config(tmp_path: Path, **extra) -> Path:
    (tmp_path / "dl.json").write_text('{"training": [], "test": []}')
    config = {"bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out",
              "seeds": [0], "label_fractions": [0.1, 1.0], "methods": {"random": None}, **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _checkpoint_3d(path: Path, width: float = 0.125) -> Path:
    """What `dira3d pretrain --tiny` writes: encoder, decoder and meta with the width."""
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=width)
    return atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                        "meta": {"spatial_dims": 3, "in_channels": 1, "width": width}}, path)


def _failures(tmp_path: Path) -> list[str]:
    return [f["error"] for f in json.loads((tmp_path / "out" / "failures.json").read_text())]


def test_a_checkpoint_of_another_width_is_refused_before_any_run_naming_the_config_setting(tmp_path):
    """A `dira3d pretrain --tiny` checkpoint (width 0.125) in a grid at the bundle's width 1 failed every run of the
    method, one after the other, each saying `dira3d finetune --set width=0.125`, an option the experiment has not."""
    _checkpoint_3d(tmp_path / "tiny.pt")
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, methods={"random": None, "dira": "tiny.pt"}))
    message = str(err.value)
    assert "method 'dira' in" in message and "pretrained at width 0.125, but the task network is built at width 1" in message
    assert "`overrides: {width: 0.125}` in the experiment config" in message and "--set" not in message
    load_config(_config(tmp_path, methods={"random": None, "dira": "tiny.pt"}, overrides={"width": 0.125}))
    load_config(_config(tmp_path, methods={"random": None, "dira": "tiny.pt"}, overrides={"tiny": True}))  # tiny.json: 0.125
    _checkpoint_3d(tmp_path / "wide.pt", width=0.25)  # and the other way round: tiny.json's 0.125 against 0.25
    with pytest.raises(ValueError, match=r"method 'wide' .* built at width 0\.125; .*`overrides: \{width: 0\.25\}`"):
        load_config(_config(tmp_path, methods={"wide": "wide.pt"}, overrides={"tiny": True}))


def test_a_2d_checkpoint_of_another_backbone_is_refused_before_any_run(tmp_path):
    net = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=[16, 16, 8, 8, 8])
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict(), "meta": {"spatial_dims": 2}},
                tmp_path / "r10.pt")
    methods = {"random": None, "dira2d": "r10.pt"}
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, bundle="siim_pneumothorax_seg", metric="dice", methods=methods))
    message = str(err.value)
    assert "method 'dira2d' in" in message and "fit backbone resnet10, decoder_channels [16, 16, 8, 8, 8]" in message
    assert "`overrides: {backbone: resnet10, decoder_channels: [16, 16, 8, 8, 8]}` in the experiment config" in message
    assert "`tiny: true` in the experiment config's overrides" in message and "dira3d finetune" not in message
    load_config(_config(tmp_path, bundle="siim_pneumothorax_seg", metric="dice", methods=methods, overrides={"tiny": True}))


def test_a_run_refused_for_its_checkpoint_width_names_the_experiment_setting(tmp_path):
    """The runs' own refusal (a checkpoint the config check cannot read ahead, e.g. one written after it) names the
    experiment's overrides; outside an experiment it still names `dira3d finetune --set`."""
    ckpt = _checkpoint_3d(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"`dira3d finetune --set width=0\.125`, `--width 0\.125` for monai\.bundle run"):
        build_task_network("classification", 3, 1, 1, 1.0, str(ckpt))
    config = load_config(_config(tmp_path, label_fractions=[1.0]))

    def runner(bundle, overrides):
        build_task_network("classification", 3, 1, 1, 1.0, str(ckpt))

    with pytest.raises(RuntimeError, match="1 of 1 runs failed"):
        run_experiment(config, runner=runner, log=lambda _: None)
    (error,) = _failures(tmp_path)
    assert "set the bundle's width to 0.125 (`overrides: {width: 0.125}` in the experiment config)" in error, error
    assert "--set" not in error and "--width" not in error


def _pecad(n_patients: int = 12) -> list[dict]:
    """Candidates of 12 patients, one embolus and one false positive each, in 3 folds."""
    return [{"image": f"PE{p:02d}_{k}.nii.gz", "label": int(k == 0), "case_id": f"PE{p:02d}", "fold": p % 3}
            for p in range(n_patients) for k in range(2)]


@pytest.mark.parametrize("where", ["split check", "holdout metric"])
def test_an_undefined_holdout_auc_names_label_fractions_in_an_experiment(tmp_path, where):
    """At a small label fraction the holdout held one class; the error told experiment users to change
    --label-fraction, which the experiment sets from its config's label_fractions."""
    datalist = tmp_path / "pecad.json"
    for entry in _pecad():
        (tmp_path / entry["image"]).write_bytes(b"")
    datalist.write_text(json.dumps({"training": _pecad(), "meta": {}}))

    def runner(bundle, overrides):
        if where == "split check":
            load_split(datalist, "holdout", label_fraction=overrides["label_fraction"], seed=overrides["seed"], fold=0)
        else:  # the bundles' validation metric on a holdout of one class
            mean_auc(np.array([0.2, 0.7]), np.array([0, 0]), split="holdout")
        return {"auc": 0.7}

    config = load_config(_config(tmp_path, label_fractions=[0.1]))
    with pytest.raises(RuntimeError, match="1 of 1 runs failed"):
        run_experiment(config, runner=runner, log=lambda _: None)
    (error,) = _failures(tmp_path)
    assert "undefined on the early-stopping holdout" in error, error
    assert "larger label fraction (label_fractions in the experiment config)" in error and "--label-fraction" not in error
    with pytest.raises(ValueError, match=r"larger label fraction \(--label-fraction\)"):  # dira3d finetune's own
        runner("luna16_nodule_fpr", {"label_fraction": 0.1, "seed": 0})


def _cells(fractions: list[float]) -> list[CellSummary]:
    return [CellSummary(method, f, 3, 0.7 + 0.1 * f, 0.01, (0.7,)) for method in ("random", "dira") for f in fractions]


@pytest.mark.parametrize("fractions", [[0.5, 1.0], [0.01, 0.1, 0.5, 1.0], [0.25]])
def test_the_plots_label_the_grids_label_fractions_as_percentages(fractions):
    """auc_vs_label_fraction.png's log axis read 5×10¹ … 10² on a grid of 50 % and 100 % (matplotlib's log ticks)."""
    shown = [f"{100 * f:g} %" for f in fractions]
    figure = metric_figure(_cells(fractions), "auc", ["random", "dira"])
    figure.canvas.draw()
    (axis,) = figure.axes
    assert [t.get_text() for t in axis.get_xticklabels()] == shown
    assert list(axis.get_xticks()) == pytest.approx([100 * f for f in fractions])
    assert [t.get_text() for t in axis.get_xticklabels(minor=True) if t.get_text()] == []
    figure = ablation_figure(_cells(fractions), "auc", ["random", "dira"])
    figure.canvas.draw()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == shown


@pytest.mark.parametrize("pretrain, method, finetune, match", [
    # tiny.json pretrains at width 0.125; the bundle fine-tunes at its width 1: every run refused the checkpoint
    ({"configs": ["train.json", "tiny.json"]}, {}, {},
     r"method 'dira' pretrains its network with width 0\.125 from the pretrain configs \(train\.json, tiny\.json\), but "
     r"bundle 'luna16_nodule_fpr' fine-tunes it with width 1\.0, .*`pretrain: \{width: 1\.0\}` in method 'dira'.*"
     r"`overrides: \{width: 0\.125\}` in the experiment config"),
    # the method's own pretrain setting, against the tiny fine-tuning (tiny.json: width 0.125)
    ({"configs": ["train.json", "tiny.json"]}, {"width": 0.25}, {"tiny": True},
     r"method 'dira' pretrains its network with width 0\.25 from its pretrain: \{width: \.\.\.\}, but .* width 0\.125"),
    ({"configs": ["train.json"], "overrides": {"width": 0.5}}, {}, {},
     r"width 0\.5 from the pretrain section's overrides"),
])
def test_a_methods_own_pretraining_at_another_width_is_refused_before_any_run(tmp_path, pretrain, method, finetune, match):
    """A method with its own `pretrain:` at another width than the fine-tuning bundle pretrained in full, then failed
    every one of its runs in turn on the checkpoint; now load_config refuses it, naming the method and the settings."""
    (tmp_path / "vw").mkdir()
    methods = {"random": None, "dira": {"pretrain": method}}
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, methods=methods, pretrain={"dataset_dir": "vw", **pretrain}, overrides=finetune))
    # the same widths on both sides pass
    load_config(_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}}},
                        pretrain={"dataset_dir": "vw", "configs": ["train.json", "tiny.json"]}, overrides={"tiny": True}))
    load_config(_config(tmp_path, methods={"random": None, "dira": {"pretrain": {"width": 0.5}}},
                        pretrain={"dataset_dir": "vw"}, overrides={"width": 0.5}))


def test_a_methods_own_2d_pretraining_of_another_backbone_is_refused_before_any_run(tmp_path):
    (tmp_path / "vw").mkdir()
    pretrain = {"dataset_dir": "vw", "configs": ["train.json", "2d.json", "2d_tiny.json"]}
    methods = {"random": None, "dira2d": {"pretrain": {"backbone": "resnet18"}}}
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, bundle="siim_pneumothorax_seg", metric="dice", methods=methods, pretrain=pretrain,
                            overrides={"tiny": True}))
    message = str(err.value)
    assert "method 'dira2d' pretrains its network with backbone resnet18 from its pretrain: {backbone: ...}" in message
    assert "fine-tunes it with backbone resnet10" in message and "`pretrain: {backbone: resnet10}` in method 'dira2d'" in message
    # a classifier loads the encoder only: another decoder is no mismatch; a segmenter's is
    methods = {"random": None, "dira2d": {"pretrain": {"decoder_channels": [8, 8, 8, 8, 8]}}}
    load_config(_config(tmp_path, bundle="chestxray14_cls", methods=methods, pretrain=pretrain, overrides={"tiny": True}))
    with pytest.raises(ValueError, match=r"decoder_channels \[8, 8, 8, 8, 8\] from its pretrain"):
        load_config(_config(tmp_path, bundle="siim_pneumothorax_seg", metric="dice", methods=methods, pretrain=pretrain,
                            overrides={"tiny": True}))


@pytest.mark.parametrize("bundle, metric, pretrain, match", [
    ("luna16_nodule_fpr", "auc", {"configs": ["train.json", "2d.json"]},
     r"method 'dira' pretrains a 2D network \(spatial_dims 2 from the pretrain configs \(train\.json, 2d\.json\)\), but "
     r"bundle 'luna16_nodule_fpr' fine-tunes a 3D one, .*`configs: \[train\.json\]` in the pretrain section"),
    ("luna16_nodule_fpr", "auc", {"configs": ["train.json"], "overrides": {"spatial_dims": 2}},
     r"pretrains a 2D network \(spatial_dims 2 from the pretrain section's overrides\), .* fine-tunes a 3D one"),
    ("siim_pneumothorax_seg", "dice", {"configs": ["train.json"]},
     r"pretrains a 3D network .* bundle 'siim_pneumothorax_seg' fine-tunes a 2D one, .*`configs: \[train\.json, 2d\.json\]`"),
])
def test_a_methods_own_pretraining_in_other_dimensions_is_refused_before_any_run(tmp_path, bundle, metric, pretrain, match):
    """A 2D pretraining for a 3D bundle (or the reverse) was not compared (only width, backbone, decoder_channels): the
    method pretrained in full, then each of its runs refused the checkpoint."""
    (tmp_path / "vw").mkdir()
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, bundle=bundle, metric=metric, methods={"random": None, "dira": {"pretrain": {}}},
                            pretrain={"dataset_dir": "vw", **pretrain}))


def test_a_checkpoint_in_other_dimensions_is_refused_before_any_run_and_named_by_the_bundle(tmp_path):
    """A 2D checkpoint for a 3D bundle passed the experiment's check (its meta width fit) and failed every run; and
    when its width differed too, the bundle said to change the width, after which it refused the checkpoint as 2D."""
    for width, name in ((1.0, "u2.pt"), (0.125, "u2_tiny.pt")):
        unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, width=width)
        atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                     "meta": {"spatial_dims": 2, "in_channels": 1, "width": width}}, tmp_path / name)
    with pytest.raises(ValueError, match=r"method 'dira' in .*u2\.pt were pretrained in 2D \(checkpoint meta spatial_dims "
                                         r"2\), but the task network is 3D: .*configs/train\.json without 2d\.json"):
        load_config(_config(tmp_path, methods={"random": None, "dira": "u2.pt"}))
    _checkpoint_3d(tmp_path / "u3.pt")
    with pytest.raises(ValueError, match=r"u3\.pt were pretrained in 3D .* task network is 2D: .*configs/2d\.json"):
        load_config(_config(tmp_path, bundle="siim_pneumothorax_seg", metric="dice", methods={"dira": "u3.pt"}))
    with pytest.raises(ValueError) as err:
        build_task_network("classification", 3, width=1.0, pretrained=str(tmp_path / "u2_tiny.pt"))
    assert "u2_tiny.pt were pretrained in 2D" in str(err.value) and "task network is 3D" in str(err.value)
    assert "width" not in str(err.value)


def test_a_2d_unet_checkpoint_is_refused_for_a_resnet_bundle_before_any_run_naming_the_pretraining(tmp_path):
    """A U-Net pretrained in 2D (train.json with spatial_dims 2) passed the experiment's check for a 2D ResNet bundle
    (its dimensions fit, and backbone / decoder_channels could not be read from a U-Net) and every run refused it at
    the load, with hundreds of missing and unexpected keys."""
    from dira3d.evaluation import build_resnet_task_network
    from dira3d.evaluation.pretrained import checkpoint_mismatch

    unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, width=0.125)
    atomic_save({"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(),
                 "meta": {"spatial_dims": 2, "in_channels": 1, "width": 0.125}}, tmp_path / "unet2d.pt")
    for bundle, metric in (("chestxray14_cls", "auc"), ("siim_pneumothorax_seg", "dice")):
        with pytest.raises(ValueError) as err:
            load_config(_config(tmp_path, bundle=bundle, metric=metric, methods={"random": None, "dira": "unet2d.pt"}))
        message = str(err.value)
        assert f"pretrained weights from {tmp_path / 'unet2d.pt'} are a Models Genesis U-Net's" in message, message
        assert f"runs of bundle {bundle!r} would refuse it" in message
        assert "takes a ResNet U-Net's weights: it needs a checkpoint pretrained with bundles/dira_pretrain " \
               "configs/2d.json (train.json + 2d.json, see docs/2d.md)" in message
    # the run's own refusal says the same, not the key lists
    with pytest.raises(ValueError, match=r"^pretrained weights from .*unet2d\.pt are a Models Genesis U-Net's .*"
                                         r"configs/2d\.json") as err:
        build_resnet_task_network("classification", pretrained=str(tmp_path / "unet2d.pt"))
    assert "missing keys" not in str(err.value)
    # and the reverse: a 2D ResNet U-Net (2d.json) for a bundle built on the U-Net in 2D
    net = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=[16, 16, 8, 8, 8])
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict(),
                 "meta": {"spatial_dims": 2, "network": "ResNetUNet"}}, tmp_path / "r10.pt")
    message = checkpoint_mismatch({"_target_": "dira3d.evaluation.build_task_network", "spatial_dims": 2,
                                   "width": 0.125}, tmp_path / "r10.pt")
    assert "r10.pt are a ResNet U-Net's" in message and "takes a Models Genesis U-Net's weights" in message
    assert "configs/train.json without 2d.json" in message
    with pytest.raises(ValueError, match=r"r10\.pt are a ResNet U-Net's"):
        build_task_network("segmentation", 2, width=0.125, pretrained=str(tmp_path / "r10.pt"))
    # the same networks still pass
    assert checkpoint_mismatch({"_target_": "dira3d.evaluation.build_resnet_task_network", "kind": "classification",
                                "backbone": "resnet10"}, tmp_path / "r10.pt") == ""
    assert checkpoint_mismatch({"_target_": "dira3d.evaluation.build_task_network", "spatial_dims": 2,
                                "width": 0.125}, tmp_path / "unet2d.pt") == ""


@pytest.mark.parametrize("bundle, metric", [("chestxray14_cls", "auc"), ("chexpert_cls", "auc"),
                                            ("montgomery_lung_seg", "dice")])
def test_a_methods_own_2d_unet_pretraining_is_refused_for_a_resnet_bundle_before_any_run(tmp_path, bundle, metric):
    """train.json with spatial_dims 2 pretrains a 2D U-Net: it passed the dimension check of a 2D ResNet bundle and
    the settings check (a U-Net has no backbone), pretrained in full, then each run refused its checkpoint."""
    (tmp_path / "vw").mkdir()
    pretrain = {"dataset_dir": "vw", "configs": ["train.json"], "overrides": {"spatial_dims": 2}}
    with pytest.raises(ValueError) as err:
        load_config(_config(tmp_path, bundle=bundle, metric=metric, methods={"random": None, "dira": {"pretrain": {}}},
                            pretrain=pretrain))
    message = str(err.value)
    assert "method 'dira' pretrains a Models Genesis U-Net (network_def from the pretrain configs (train.json))" \
        in message
    assert f"bundle {bundle!r} fine-tunes the weights of a ResNet U-Net" in message, message
    assert "`configs: [train.json, 2d.json]` in the pretrain section" in message
    load_config(_config(tmp_path, bundle=bundle, metric=metric, methods={"random": None, "dira": {"pretrain": {}}},
                        pretrain={"dataset_dir": "vw", "configs": ["train.json", "2d.json", "2d_tiny.json"]},
                        overrides={"tiny": True}))  # the ResNet U-Net of 2d.json passes


def test_a_config_folder_is_named_as_a_folder_with_its_configs(tmp_path, capsys):
    """`dira3d experiment --config docs/experiments` (the folder): one line naming the YAML files in it, not
    'does not exist' (what it said before)."""
    from dira3d.evaluation.experiment import main as experiment_main

    (tmp_path / "a.yaml").write_text("bundle: x\n")
    (tmp_path / "b.yml").write_text("bundle: x\n")
    with pytest.raises(FileNotFoundError, match="is a folder, not a YAML/JSON file; pass a config in it: "):
        load_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        experiment_main(["--config", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d experiment: error:")]
    assert len(lines) == 1 and f"{tmp_path / 'a.yaml'}, {tmp_path / 'b.yml'}" in lines[0], lines
    assert "does not exist" not in lines[0]
