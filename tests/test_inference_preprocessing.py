"""``inference.json`` of ``lits_liver_seg`` scales a raw scan as the model's training volumes were prepared:
``dira3d finetune`` records the datalist's ``modality`` / ``window`` / ``percentiles`` in
``<ckpt_dir>/preprocessing.json`` and the inference defaults are read from there (end to end with a real
fine-tuning run in tests/test_data_generic.py)."""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigParser

from dira3d.evaluation.finetune import bundle_path
from dira3d.evaluation.preprocessing import datalist_preprocessing, trained_preprocessing, write_preprocessing


def _inference(ckpt_dir) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle_path("lits_liver_seg") / "configs" / "inference.json")])
    parser.update({"ckpt_dir": str(ckpt_dir)})
    return parser


def test_a_soft_tissue_window_recorded_by_prepare_reaches_inference(tmp_path):
    datalist = tmp_path / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": [], "meta": {"dataset": "lits", "window": [-100, 400], "spacing": None}}))
    assert datalist_preprocessing(datalist) == {"window": [-100, 400]}  # nulls and other keys left out
    write_preprocessing(tmp_path / "models", datalist_preprocessing(datalist))
    parser = _inference(tmp_path / "models")
    assert parser.get_parsed_content("hu_window") == [-100, 400]
    assert parser.get_parsed_content("modality") == "ct"  # not recorded: the default


def test_without_the_file_the_bundle_defaults_hold(tmp_path):
    parser = _inference(tmp_path / "models")  # a model trained before dira3d recorded it, or by train.json alone
    assert parser.get_parsed_content("hu_window") == [-1000, 1000]
    assert parser.get_parsed_content("modality") == "ct"
    assert parser.get_parsed_content("percentiles") == [0.5, 99.5]
    assert write_preprocessing(tmp_path / "models", {}) is None and not (tmp_path / "models").exists()


@pytest.mark.parametrize("content, message", [("{not json", "cannot be read"), ("[1, 2]", "holds a JSON list")])
def test_a_garbled_file_is_named_with_what_to_do(tmp_path, content, message):
    (tmp_path / "preprocessing.json").write_text(content)
    with pytest.raises(ValueError, match=rf"preprocessing\.json.*{message}") as raised:
        trained_preprocessing(tmp_path, "modality", "ct")
    assert "delete" in str(raised.value)
