"""Sizes the networks cannot take, and a ``compile_mode`` torch.compile does not know, are refused in ``initialize``
(found 2026-11-28).

A ``patch_size`` of dira_pretrain (``roi_size`` of a task bundle) that is not a multiple of the network's downsampling
(8 for the 3D U-Net, 32 for the 2D ResNets) failed at the first training step, after the data were cached, in a
traceback of some 170 lines (the network's own check, ``dira3d.networks.unet.check_input``, which stays in the
TorchScript subset). ``--compile_mode fast`` ran without a word when ``compile`` was false (exit 0).
"""

from __future__ import annotations

import json

import pytest
import torch

from dira3d.data.errors import DataError
from dira3d.utils import check_sizes
from test_setting_ranges import BUNDLES, TASK_BUNDLES, _parsed, _refusal


@pytest.mark.parametrize("args, settings, expected", [
    ((3, 8), {"patch_size": [60, 60, 30]},
     'patch_size=[60, 60, 30] does not fit the 3D network: each size must be a multiple of 8 (its downsampling); give '
     'e.g. --patch_size "[56,56,24]" or "[64,64,32]", the nearest sizes that fit'),
    ((3, 8), {"patch_size": [4, 64, 32]}, 'give e.g. --patch_size "[8,64,32]", the nearest'),  # never below 8
    ((2, 32), {"roi_size": [200, 224]}, 'roi_size=[200, 224] does not fit the 2D network: each size must be a '
                                        'multiple of 32 (its downsampling); give e.g. --roi_size "[192,224]" or "[224,224]"'),
    ((4, 8), {"patch_size": [8, 8, 8, 8]}, "spatial_dims=4 is not supported; use 2 or 3"),
    ((3, 8), {"roi_size": [16, 16]}, "roi_size=[16, 16] has 2 numbers, but the network is 3D"),  # as before
])
def test_check_sizes_names_the_nearest_sizes_that_fit(args, settings, expected):
    with pytest.raises(DataError) as err:
        check_sizes(*args, **settings)
    assert str(err.value).startswith(expected) or expected in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_check_sizes_takes_multiples_and_any_size_without_one():
    assert check_sizes(3, 8, patch_size=[64, 64, 32.0]) == {"patch_size": [64, 64, 32]}
    assert check_sizes(3, roi_size=[60, 60, 30]) == {"roi_size": [60, 60, 30]}  # multiple=1: what it checked before


def _step(parser, text: str) -> int:
    steps = [i for i, step in enumerate(parser["initialize"]) if text in str(step)]
    assert len(steps) == 1, parser["initialize"]
    return steps[0]


PRETRAIN_FILES = [("train.json", "tiny.json"), ("train.json", "multi_gpu_train.json", "tiny.json"),
                  ("train.json", "2d.json", "2d_tiny.json"), ("train.json", "multi_gpu_train.json", "2d.json", "2d_tiny.json")]


@pytest.mark.parametrize("files", PRETRAIN_FILES, ids=lambda f: "+".join(f))
def test_the_pretraining_bundle_refuses_a_patch_size_the_network_cannot_take_before_anything_is_read(
        tmp_path, monkeypatch, files):
    folder = BUNDLES / "dira_pretrain" / "configs"
    files = [folder / name for name in files]
    two_d = any(f.name == "2d.json" for f in files)
    monkeypatch.chdir(tmp_path)
    common = {"bundle_root": str(tmp_path), "datalist": str(tmp_path / "missing.json")}  # nothing to read
    step = _step(_parsed(files, common), "check_sizes(")
    good = _parsed(files, common)
    for i in range(step + 1):  # the defaults pass
        good.get_parsed_content(f"initialize#{i}")
    bad, expected = (([200, 200], '"[192,192]" or "[224,224]"') if two_d  # ResNet: 32; 200 is a multiple of 8
                     else ([30, 30, 16], '"[24,24,16]" or "[32,32,16]"'))
    message = _refusal(_parsed(files, {**common, "patch_size": bad}), step)
    assert message.startswith(f"patch_size={bad} does not fit the {2 if two_d else 3}D network: each size must be a "
                              f"multiple of {32 if two_d else 8}"), message
    assert f"give e.g. --patch_size {expected}, the nearest sizes that fit" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("files", PRETRAIN_FILES[:2], ids=lambda f: "+".join(f))
def test_the_pretraining_bundle_refuses_an_unknown_compile_mode_with_compile_off(tmp_path, monkeypatch, files):
    folder = BUNDLES / "dira_pretrain" / "configs"
    files = [folder / name for name in files]
    monkeypatch.chdir(tmp_path)
    common = {"bundle_root": str(tmp_path), "datalist": str(tmp_path / "missing.json"), "compile": False}
    step = _step(_parsed(files, common), "check_compile_mode(")
    for mode in (None, "max-autotune-no-cudagraphs"):
        parser = _parsed(files, {**common, "compile_mode": mode})
        for i in range(step + 1):
            parser.get_parsed_content(f"initialize#{i}")
    message = _refusal(_parsed(files, {**common, "compile_mode": "fast"}), step)
    assert message.startswith("compile_mode='fast' is not one of torch.compile's modes; give one of "), message
    assert "max-autotune" in message and "reduce-overhead" in message and message.endswith("or null (the default mode)")
    assert list(tmp_path.iterdir()) == []


def test_check_compile_mode_and_compile_modules_refuse_a_mode_torch_does_not_know():
    from dira3d.engines.performance import check_compile_mode, compile_modules

    assert check_compile_mode(None) is None and check_compile_mode("default") == "default"
    for mode in ("fast", "", 3, True):
        with pytest.raises(DataError, match=r"^compile_mode=.* is not one of torch.compile's modes"):
            check_compile_mode(mode)
    with pytest.raises(DataError, match="compile_mode='fast'"):  # before any module is compiled
        compile_modules({"net": torch.nn.Linear(2, 2)}, backend="eager", mode="fast")


# dira3d pretrain --override patch_size=[20,20,12]: tests/test_setting_ranges.py, with the other one-line refusals


TASK_CONFIGS = [("train.json",), ("train.json", "multi_gpu_train.json"), ("train.json", "evaluate.json"),
                ("inference.json",)]


@pytest.mark.parametrize("bundle", TASK_BUNDLES)
@pytest.mark.parametrize("configs", TASK_CONFIGS, ids=lambda c: "+".join(c))
def test_the_task_bundles_refuse_a_roi_size_the_network_cannot_take(tmp_path, monkeypatch, bundle, configs):
    folder = BUNDLES / bundle / "configs"
    files = [folder / name for name in configs]
    monkeypatch.chdir(tmp_path)  # the bundle's default output folders are relative
    dims = len(json.loads((folder / "inference.json").read_text())["roi_size"])
    good = _parsed(files, {})
    step = _step(good, "check_sizes(")
    good.get_parsed_content(f"initialize#{step}")  # the default passes
    bad = [60, 60, 30] if dims == 3 else [200, 200]  # 200: a multiple of 8, not of the ResNets' 32
    parser = _parsed(files, {"roi_size": bad})
    from dira3d.utils.bundle_errors import user_error_in

    with pytest.raises(Exception) as err:
        parser.get_parsed_content(f"initialize#{step}")
    message = str(user_error_in(err.value))
    assert message.startswith(f"roi_size={bad} does not fit the {dims}D network: each size must be a multiple of "
                              f"{8 if dims == 3 else 32} (its downsampling)"), message
