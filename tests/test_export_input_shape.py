"""`dira3d export torchscript|onnx --input-shape` is checked against the bundle's network before torch loads.

Only the count of numbers was checked: a 2D bundle given 3 channels failed in a convolution ("expected input[1, 3, 64,
64] to have 1 channels"), a size that is not a multiple of 32 in the decoder ("Sizes of tensors must match except in
dimension 1"), batch 0 in the agreement check ("max(): Expected reduction dim to be specified"), a negative number in
``torch.rand`` -- each after torch and MONAI had loaded and the network was built. The divisor is the one the bundle's
``initialize`` checks ``roi_size`` with (``dira3d.utils.check_sizes(..., multiple=...)``). The command's refusals
before torch loads: tests/test_quick_refusals_localise_export_experiment.py.
"""

from __future__ import annotations

import json

import pytest

from dira3d.deploy.export_checks import check_input_shape, network_divisor

TASK_BUNDLES = ["brats_tumor_seg", "chestxray14_cls", "chexpert_cls", "lidc_nodule_seg", "lits_liver_seg",
                "luna16_nodule_fpr", "montgomery_lung_seg", "pecad_embolism_fpr", "siim_pneumothorax_seg"]
GIVEN = "--input-shape (input_shape)"


@pytest.mark.parametrize("bundle", TASK_BUNDLES)
def test_network_divisor_is_the_networks_own(repo_root, bundle):
    """What the export checks sizes against is what the built network checks its input against (its ``divisor``)."""
    from monai.bundle import ConfigParser

    path = repo_root / "bundles" / bundle / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(path))
    for key, value in json.loads((path.parent / "tiny.json").read_text()).items():  # a small network, the same divisor
        if key in parser:
            parser[key] = value
    assert network_divisor(json.loads(path.read_text())) == parser.get_parsed_content("network_def").divisor


def test_network_divisor_reads_the_pretraining_id_and_nothing_else():
    assert network_divisor({"network_divisor": 32}) == 32
    assert network_divisor({"network_divisor": "@d", "d": 8}) is None  # only the task bundles' initialize is resolved
    assert network_divisor({"initialize": ["$dira3d.utils.check_sizes(2, multiple=@m, roi_size=@roi_size)"],
                            "m": 32}) == 32
    assert network_divisor({"initialize": ["$dira3d.utils.check_seed(@seed)"]}) is None
    assert network_divisor({}) is None


@pytest.mark.parametrize("shape, expected", [
    ([1, 1, 64, 64, 32], f"{GIVEN} 1 1 64 64 32 has 5 numbers; the bundle's network is 2D: give B C and 2 sizes, "
                         "e.g. 1 1 224 224"),
    ([1, 3, 224, 224], f"{GIVEN} 1 3 224 224: 3 channels, but the bundle's network takes 1 (in_channels); give e.g. "
                       "1 1 224 224"),
    ([1, 1, 200, 224], f"{GIVEN} 1 1 200 224: size 200 is not a multiple of 32 (the network's downsampling); give e.g. "
                       "1 1 192 224 or 1 1 224 224 (the nearest sizes that fit)"),
    ([1, 1, 16, 16], f"{GIVEN} 1 1 16 16: size 16 is not a multiple of 32 (the network's downsampling); give e.g. "
                     "1 1 32 32 (the nearest sizes that fit)"),
    ([0, 1, 224, 224], f"{GIVEN} 0 1 224 224: batch 0 is not a batch size >= 1; give e.g. 1 1 224 224"),
    ([-2, 1, 224, 224], f"{GIVEN} -2 1 224 224: batch -2 is not a batch size >= 1; give e.g. 1 1 224 224"),
    ([1, 1, -224, 224], f"{GIVEN} 1 1 -224 224: size -224 is not a size >= 1; give e.g. 1 1 224 224"),
    ([1], f"{GIVEN} 1 has 1 number; the bundle's network is 2D: give B C and 2 sizes, e.g. 1 1 224 224"),
])
def test_check_input_shape_names_the_number_and_a_shape_that_fits(shape, expected):
    with pytest.raises(ValueError) as err:
        check_input_shape(shape, [224, 224], 1, 32)
    assert str(err.value) == expected


def test_check_input_shape_takes_what_fits_and_skips_what_it_does_not_know():
    assert check_input_shape([2, 1, 256, 192], [224, 224], 1, 32) == [2, 1, 256, 192]
    assert check_input_shape([1, 4, 64, 64, 32], [128, 128, 64], None, 8) == [1, 4, 64, 64, 32]  # channels unknown
    assert check_input_shape([1, 1, 60, 60, 30], [64, 64, 32], 1, None) == [1, 1, 60, 60, 30]  # no divisor
    with pytest.raises(ValueError, match="batch 0 is not a batch size >= 1"):
        check_input_shape([0, 1, 8, 8, 8], None)  # a bundle without roi_size: still a batch >= 1


def test_export_torchscript_checks_the_channels_of_a_bundle_whose_in_channels_is_an_expression(repo_root, tmp_path):
    """brats_tumor_seg's in_channels is one per modality (an expression): the fast check cannot read it, the export
    checks it once the config is parsed, before it traces."""
    from monai.bundle import ConfigParser

    from dira3d.deploy.export import export_torchscript
    from dira3d.utils import atomic_save

    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / "brats_tumor_seg" / "configs" / "inference.json"))
    parser["width"], parser["modalities"] = 0.125, "all"  # 4 channels (the default, flair, is 1)
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"1 1 32 32 16: 1 channels, but the bundle's network takes 4 \(in_channels\); "
                                         r"give e.g. 1 4 64 64 32$"):
        export_torchscript("brats_tumor_seg", tmp_path / "m.ts", tmp_path / "model.pt", input_shape=[1, 1, 32, 32, 16],
                           overrides={"width": 0.125, "modalities": "all"})
    assert not (tmp_path / "m.ts").exists()
