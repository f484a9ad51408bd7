"""Number settings outside their range end in one ``error:`` line naming the setting, the value and the range, in the
bundle's ``initialize`` before any data are read (session 27, :func:`dira3d.utils.check_ranges`).

Before: ``collapse_gap=2`` (D's real-minus-restored probability gap, never above 1) never warned;
``num_samples_cache=2`` / ``cache_rate=2`` cached every entry and -1 none (MONAI's ``CacheDataset`` clips the count);
``bn_momentum=2`` and ``moco_momentum=2`` averaged away from the running values; ``collapse_patience=0`` ran as 1; all
without a word. ``lambda_adv=-1``, ``temperature=0``, ``d_steps=0``, ``queue_size=0`` and ``learning_rate=-1`` were
refused only when the trainer was built, after the data were cached, naming no setting (``loss weights: λ for 'adv'``,
``InfoNCELoss: temperature``, ``Invalid learning rate``); a sliding-window ``overlap`` of 1 failed in MONAI's traceback
at the first validation, after an epoch of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dira3d.data.errors import DataError
from dira3d.utils import check_ranges

BUNDLES = Path(__file__).parent.parent / "bundles"
TASK_BUNDLES = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/evaluate.json"))
SLIDING_WINDOW = ("brats_tumor_seg", "lits_liver_seg")  # validation with a SlidingWindowInferer


@pytest.mark.parametrize("settings, expected", [
    ({"collapse_gap": (2, "[0, 1)")}, "collapse_gap=2 is outside [0, 1); give a number in [0, 1)"),
    ({"collapse_gap": (1.0, "[0, 1)")}, "collapse_gap=1.0 is outside [0, 1)"),  # an open end is left out
    ({"cache_rate": (-0.5, "[0, 1]")}, "cache_rate=-0.5 is outside [0, 1]; give a number in [0, 1]"),
    ({"temperature": (0, "(0, inf)")}, "temperature=0 is outside (0, inf)"),
    ({"temperature": (float("inf"), "(0, inf)")}, "temperature=inf is outside (0, inf)"),
    ({"cache_rate": (float("nan"), "[0, 1]")}, "cache_rate=nan is outside [0, 1]"),
    ({"bn_momentum": (2, "[0, 1] or null")}, "bn_momentum=2 is outside [0, 1]; give a number in [0, 1] or null"),
    ({"bn_momentum": ("abc", "[0, 1] or null")}, "bn_momentum='abc' is not a number; give a number in [0, 1] or null"),
    ({"cache_rate": (True, "[0, 1]")}, "cache_rate=True is not a number"),
    ({"cache_rate": (None, "[0, 1]")}, "cache_rate=None is not a number"),  # null only where the range says so
    ({"a": (0.5, "[0, 1]"), "b": (3, "[0, 1]")}, "b=3 is outside [0, 1]"),
])
def test_check_ranges_names_the_setting_the_value_and_the_range(settings, expected):
    with pytest.raises(DataError) as err:
        check_ranges(**settings)
    assert str(err.value).startswith(expected), str(err.value)


def test_check_ranges_returns_floats_and_takes_both_ends_where_closed():
    assert check_ranges(a=(0, "[0, 1]"), b=(1, "[0, 1]"), c=(np.float32(0.5), "[0, 1)"), d=(None, "[0, 1] or null"),
                        e=(1e9, "[0, inf)"), f=(-1, "[-1, 1]")) == {"a": 0.0, "b": 1.0, "c": 0.5, "d": None,
                                                                  "e": 1e9, "f": -1.0}
    # MONAI writes an expression's '#' as '::': the id is named (and returned) as the docs and overrides write it
    assert check_ranges(**{"validate::inferer::overlap": (0.25, "[0, 1)")}) == {"validate#inferer#overlap": 0.25}
    with pytest.raises(ValueError, match=r"^check_ranges: x's range '0..1' is not written as"):
        check_ranges(x=(0.5, "0..1"))  # the bundle's mistake: not a DataError


def _parsed(configs, overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    for key, value in overrides.items():
        parser[key] = value
    parser.parse()
    return parser


def _range_step(parser) -> int:
    steps = [i for i, step in enumerate(parser["initialize"]) if "check_ranges(" in str(step)]
    assert len(steps) == 1, parser["initialize"]
    return steps[0]


def _refusal(parser, upto: int) -> str:
    from dira3d.utils.bundle_errors import user_error_in

    with pytest.raises(Exception) as err:
        for step in range(upto + 1):
            parser.get_parsed_content(f"initialize#{step}")
    cause = user_error_in(err.value)
    assert isinstance(cause, DataError), repr(err.value)
    return str(cause)


@pytest.mark.parametrize("config", ["train.json", "multi_gpu_train.json"])
@pytest.mark.parametrize("key, value, expected", [
    ("collapse_gap", 2, "collapse_gap=2 is outside [0, 1)"),  # never warned
    ("collapse_gap", -0.5, "collapse_gap=-0.5 is outside [0, 1)"),  # warned when D lost
    ("num_samples_cache", 2, "num_samples_cache=2 is outside [0, 1]"),  # cached all, as 1 does
    ("num_samples_cache", -1, "num_samples_cache=-1 is outside [0, 1]"),  # cached none, as 0 does
    ("moco_momentum", 2, "moco_momentum=2 is outside [0, 1)"),
    ("temperature", 0, "temperature=0 is outside (0, inf)"),
    ("lambda_adv", -1, "lambda_adv=-1 is outside [0, inf)"),
    ("collapse_patience", 0, "collapse_patience=0 is less than 1"),  # ran as 1
    ("d_steps", 0, "d_steps=0 is less than 1"),
    ("queue_size", 0, "queue_size=0 is less than 1"),
])
def test_the_pretraining_bundle_refuses_a_setting_out_of_range_before_anything_is_read(tmp_path, monkeypatch, config,
                                                                                      key, value, expected):
    folder = BUNDLES / "dira_pretrain" / "configs"
    files = [folder / "train.json"] + ([folder / config] if config != "train.json" else []) + [folder / "tiny.json"]
    monkeypatch.chdir(tmp_path)
    common = {"bundle_root": str(tmp_path), "datalist": str(tmp_path / "missing.json")}  # nothing to read
    step = _range_step(_parsed(files, common))
    good = _parsed(files, common)
    for i in range(step + 1):  # the defaults pass
        good.get_parsed_content(f"initialize#{i}")
    message = _refusal(_parsed(files, {**common, key: value}), step)
    assert message.startswith(expected), message
    assert list(tmp_path.iterdir()) == []


TASK_CASES = [
    ("cache_rate", 2, "cache_rate=2 is outside [0, 1]; give a number in [0, 1]"),  # cached all
    ("cache_rate", -1, "cache_rate=-1 is outside [0, 1]"),  # cached none
    ("bn_momentum", 2, "bn_momentum=2 is outside [0, 1]; give a number in [0, 1] or null"),
    ("learning_rate", -0.001, "learning_rate=-0.001 is outside [0, inf)"),  # torch's "Invalid learning rate", late
]
OVERLAP = ("validate#inferer#overlap", 1, "validate#inferer#overlap=1 is outside [0, 1)")  # failed at the 1st validation


@pytest.mark.parametrize("config", ["train.json", "multi_gpu_train.json"])
@pytest.mark.parametrize("bundle, key, value, expected",
                         [(bundle, *case) for bundle in TASK_BUNDLES for case in TASK_CASES]
                         + [(bundle, *OVERLAP) for bundle in SLIDING_WINDOW])
def test_the_task_bundles_refuse_a_setting_out_of_range_before_anything_is_read(tmp_path, monkeypatch, config, bundle,
                                                                               key, value, expected):
    folder = BUNDLES / bundle / "configs"
    files = [folder / "train.json"] + ([folder / config] if config != "train.json" else []) + [folder / "tiny.json"]
    monkeypatch.chdir(tmp_path)  # the bundle's default output folders are relative
    step = _range_step(_parsed(files, {}))
    good = _parsed(files, {"bn_momentum": 0.1})
    for i in range(step + 1):  # the defaults pass (bn_momentum null in tiny.json, 0.1 in train.json)
        good.get_parsed_content(f"initialize#{i}")
    message = _refusal(_parsed(files, {key: value}), step)
    assert message.startswith(expected), message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bundle, config, key", [
    (bundle, config, key) for bundle in SLIDING_WINDOW + ("lidc_nodule_seg",)
    for config, key in (("evaluate.json", "validate#inferer#overlap"), ("inference.json", "inferer#overlap"))
    if not (bundle == "lidc_nodule_seg" and config == "evaluate.json")])
def test_evaluation_and_inference_refuse_a_sliding_window_overlap_of_1_first(tmp_path, monkeypatch, bundle, config,
                                                                             key):
    folder = BUNDLES / bundle / "configs"
    files = ([folder / "train.json"] if config == "evaluate.json" else []) + [folder / config]
    monkeypatch.chdir(tmp_path)
    step = _range_step(_parsed(files, {}))
    assert step <= 1 and all("check_output_settings" not in str(s) for s in _parsed(files, {})["initialize"][:step])
    message = _refusal(_parsed(files, {key: 1.0}), step)
    assert message.startswith(f"{key}=1.0 is outside [0, 1); give a number in [0, 1)"), message


@pytest.mark.parametrize("override, expected", [
    ("collapse_gap=2", "collapse_gap=2 is outside [0, 1); give a number in [0, 1)"),  # trained without a word
    ("patch_size=[20,20,12]",  # a 172-line traceback at the first training step
     'patch_size=[20, 20, 12] does not fit the 3D network: each size must be a multiple of 8 (its downsampling); give '
     'e.g. --patch_size "[16,16,8]" or "[24,24,16]", the nearest sizes that fit'),
])
def test_dira3d_pretrain_refuses_a_setting_in_one_line(tmp_path, capsys, override, expected):
    import nibabel as nib

    from dira3d.engines.command import main

    data = np.random.default_rng(0).random((32, 32, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": str(tmp_path / "a.nii.gz")}]}))
    argv = ["--datalist", str(datalist), "--tiny", "--output", str(tmp_path / "run"), "--override", "max_epochs=1",
            "--override", "batch_size=1", "--override", override]
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"dira3d pretrain: error: {expected}", err
    assert len(err) < 10, err  # not a traceback
    assert not (tmp_path / "run" / "models" / "last.pt").exists()


@pytest.mark.parametrize("files", [("train.json", "2d.json", "2d_tiny.json"),
                                   ("train.json", "2d.json", "multi_gpu_train.json", "2d_tiny.json"),  # the
                                   # order of `dira3d pretrain --config 2d.json --config multi_gpu_train.json`
                                   ("train.json", "multi_gpu_train.json", "2d.json", "2d_tiny.json")])
@pytest.mark.parametrize("value, expected", [
    (1.5, "momentum_g=1.5 is outside [0, 1); give a number in [0, 1)"),  # SGD's momentum, only 2d.json defines it
    (-0.1, "momentum_g=-0.1 is outside [0, 1)"),  # torch's "Invalid momentum value", after the data were cached
    ("high", "momentum_g='high' is not a number"),
])
def test_2d_pretraining_refuses_a_momentum_g_out_of_range_before_anything_is_read(tmp_path, monkeypatch, files, value,
                                                                                  expected):
    # train.json's initialize cannot name momentum_g: its check_ranges also takes the (value, range) pairs of the
    # setting_ranges id, which train.json leaves empty and 2d.json fills
    folder = BUNDLES / "dira_pretrain" / "configs"
    files = [folder / name for name in files]
    monkeypatch.chdir(tmp_path)
    common = {"bundle_root": str(tmp_path), "datalist": str(tmp_path / "missing.json")}  # nothing to read
    step = _range_step(_parsed(files, common))
    good = _parsed(files, {**common, "momentum_g": 0.0})
    assert good.get_parsed_content(f"initialize#{step}")["momentum_g"] == 0.0  # checked, and 0 (plain SGD) passes
    message = _refusal(_parsed(files, {**common, "momentum_g": value}), step)
    assert message.startswith(expected), message
    assert list(tmp_path.iterdir()) == []
