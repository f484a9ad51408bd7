"""Session-23 mutation audit of the task networks' initialisation (dira3d.evaluation.pretrained): each test pins a
behaviour that a mutation of that module changed without any other test failing. References: the docstrings of
build_task_network / initialise_task_network / checkpoint_mismatch, on width-0.125 networks and hand-made checkpoint
files, with the expected lines written out by hand.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dira3d.evaluation import build_task_network

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_a_random_start_is_reported_unless_trained_weights_are_loaded_next(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="dira3d.evaluation.pretrained"):
        build_task_network("classification", 3, 1, 1, 0.125, "")
    line = "pretrained: none; classification network initialised at random (width=0.125, in_channels=1)"
    assert capsys.readouterr().out == line + "\n"  # printed: a plain `monai.bundle run` console shows it
    assert [r.getMessage() for r in caplog.records] == [line]  # and logged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dira3d.evaluation.pretrained"):
        build_task_network("segmentation", 3, 1, 1, 0.125, None, weights_loaded_later=True)
    assert capsys.readouterr().out == "" and caplog.records == []


def test_a_bundle_network_that_leaves_width_and_dims_at_their_defaults_is_judged_with_them(tmp_path):
    """``checkpoint_mismatch`` reads the settings a ``network_def`` leaves out as build_task_network's defaults (3D,
    width 1.0), so a tiny checkpoint is still refused before any run."""
    from dira3d.evaluation.pretrained import checkpoint_mismatch
    from dira3d.utils import atomic_save

    ckpt = atomic_save({"encoder": {}, "decoder": {}, "meta": {"width": 0.125, "spatial_dims": 3}}, tmp_path / "tiny.pt")
    message = checkpoint_mismatch({"_target_": "dira3d.evaluation.build_task_network", "kind": "segmentation"}, ckpt)
    assert message.startswith(f"pretrained weights from {ckpt} were pretrained at width 0.125, but the task network is "
                              "built at width 1; set the bundle's width to 0.125 (")
    assert checkpoint_mismatch({"_target_": "dira3d.evaluation.build_task_network", "width": 0.125}, ckpt) == ""


@pytest.mark.parametrize("kind", [None, "detection"])
def test_a_2d_network_def_of_an_unknown_kind_is_left_to_the_network_to_refuse(kind, tmp_path):
    """``checkpoint_mismatch`` judges a ResNet bundle's checkpoint only for a kind it knows: another kind is the
    network's own error (naming the kind), not a KeyError of the checkpoint check."""
    from dira3d.evaluation.pretrained import checkpoint_mismatch
    from dira3d.utils import atomic_save

    ckpt = atomic_save({"encoder": {"conv1.weight": torch.zeros(8, 1, 7, 7)}, "meta": {"spatial_dims": 2}}, tmp_path / "r.pt")
    network_def = {"_target_": "dira3d.evaluation.build_resnet_task_network", "backbone": "resnet10"}
    if kind is not None:
        network_def["kind"] = kind
    assert checkpoint_mismatch(network_def, ckpt) == ""


def test_load_pretrained_offers_only_parts_of_weights_for_a_missing_one():
    """load_pretrained's "parts available" named a pretraining checkpoint's meta, trainer and optimizer state beside
    its encoder (any non-empty mapping), as export_pretrained did (mutation audit, session 23)."""
    from dira3d.networks import Classifier, Segmenter, load_pretrained

    checkpoint = {"encoder": Classifier(width=1 / 8).encoder.state_dict(), "meta": {"width": 0.125, "epoch": 3},
                  "trainer": {"epoch": torch.tensor(3)}, "optimizer_g": {"state": {}, "param_groups": [{"lr": 1e-3}]}}
    with pytest.raises(ValueError, match=r"no \(or an empty\) 'decoder' part; parts available: \['encoder'\]\."):
        load_pretrained(Segmenter(width=1 / 8), checkpoint, parts=("encoder", "decoder"))
