"""Mutation audit of :mod:`dira3d.deploy.bundle_network` (session 23c): the bundle a folder resolves to, the
``bundle_root`` its configs see, and the hint given when fine-tuned weights are of another kind of network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dira3d.deploy import load_bundle_network
from dira3d.deploy.bundle_network import bundle_parser, bundle_paths
from dira3d.utils import atomic_save


def _copy(repo_root: Path, dest: Path, name: str = "lits_liver_seg") -> Path:
    source = repo_root / "bundles" / name
    if not (source / "configs" / "inference.json").is_file():
        pytest.skip(f"bundle {name} is not in this checkout")
    bundle = dest / name
    shutil.copytree(source / "configs", bundle / "configs")
    return bundle


def test_a_folder_without_metadata_is_not_taken_for_a_bundle(repo_root, tmp_path):
    bundle = _copy(repo_root, tmp_path)
    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata.json does not exist: is .*lits_liver_seg a dira3d bundle"):
        bundle_paths(bundle, "inference.json")


def test_the_configs_see_the_bundle_folder_as_bundle_root(repo_root, tmp_path):
    bundle = _copy(repo_root, tmp_path)
    parser = bundle_parser(bundle, "inference.json", {"width": 0.125})
    assert parser.get_parsed_content("ckpt_dir") == f"{bundle}/models"


def _state(bundle: Path) -> dict[str, torch.Tensor]:
    parser = bundle_parser(bundle, "inference.json", {"width": 0.125})
    return parser.get_parsed_content("network_def", instantiate=True).state_dict()


def test_weights_of_a_2d_network_are_named_so(repo_root, tmp_path):
    bundle = _copy(repo_root, tmp_path)
    state = {k: v for k, v in _state(bundle).items() if not k.startswith("decoder.")}
    weight = state["encoder.levels.0.conv1.conv.weight"]
    state["encoder.levels.0.conv1.conv.weight"] = weight[..., 0]  # a 2D kernel
    atomic_save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="the weights are of a 2D network and lits_liver_seg builds a 3D one"):
        load_bundle_network(bundle, tmp_path / "model.pt", overrides={"width": 0.125})


def test_weights_of_a_classifier_given_to_a_segmentation_bundle_are_named_so(repo_root, tmp_path):
    bundle = _copy(repo_root, tmp_path)
    state = {k: v for k, v in _state(bundle).items() if not k.startswith("decoder.")}
    atomic_save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="the weights are of a classification network and lits_liver_seg builds a "
                                         "segmentation one"):
        load_bundle_network(bundle, tmp_path / "model.pt", overrides={"width": 0.125})


def test_weights_that_fit_no_other_setting_get_no_tiny_settings_offered(repo_root, tmp_path):
    """Weights at the width given but with a key too many: no setting makes them fit, so the error asks for the
    settings they were trained with; it does not offer tiny.json's roi_size as if they came from --tiny."""
    bundle = _copy(repo_root, tmp_path)
    atomic_save({**_state(bundle), "extra.weight": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError) as caught:
        load_bundle_network(bundle, tmp_path / "model.pt", overrides={"width": 0.125})
    message = str(caught.value)
    assert "pass the settings the weights were trained with (width / roi_size;" in message, message
    assert "tiny.json" not in message and "fit other settings" not in message, message


def test_a_tiny_setting_already_given_is_not_offered_again(repo_root, tmp_path):
    """A --tiny model loaded with tiny.json's roi_size already overridden: only the width is missing."""
    bundle = _copy(repo_root, tmp_path)
    atomic_save(_state(bundle), tmp_path / "model.pt")
    with pytest.raises(ValueError) as caught:
        load_bundle_network(bundle, tmp_path / "model.pt", overrides={"roi_size": [16, 16, 8]})
    assert str(caught.value).endswith("pass --override width=0.125 (overrides={'width': 0.125})"), caught.value


def test_the_hint_writes_settings_the_way_the_caller_takes_them(repo_root, tmp_path):
    bundle = _copy(repo_root, tmp_path)
    state = _state(bundle)

    def option(settings):
        return f"bundle_overrides {sorted(settings)}"

    atomic_save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError) as caught:
        load_bundle_network(bundle, tmp_path / "model.pt", overrides={"roi_size": [16, 16, 8]}, hint_option=option)
    assert str(caught.value).endswith("pass bundle_overrides ['width']"), caught.value
    atomic_save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"e\.g\. bundle_overrides \['width'\] for a model fine-tuned with --tiny"):
        load_bundle_network(bundle, tmp_path / "model.pt", overrides={"width": 0.125}, hint_option=option)
