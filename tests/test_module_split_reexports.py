"""The names that moved out of modules at the line limit (session 22) stay importable where they were.

Bundles' configs, docs and user code name them by their old dotted path (``dira3d.evaluation.finetune.bundle_path``,
``dira3d.deploy.export.AgreementError``, ...): each must still be the very object its new module defines, listed in
the old module's ``__all__`` where it was listed before.
"""

from __future__ import annotations

import importlib
import logging

import pytest

MOVED = [  # (old module, new module, names, listed in the old module's __all__)
    ("dira3d.evaluation.finetune", "dira3d.evaluation.bundle_lookup",
     ("BUNDLES", "BUNDLES_2D", "bundle_path", "tiny_settings"), True),
    ("dira3d.data.generic", "dira3d.data.scan_search", ("discover",), True),
    ("dira3d.evaluation.localise", "dira3d.evaluation.box_inputs", ("load_box_entries", "scale_box", "load_cxr_image"), True),
    ("dira3d.evaluation.localise", "dira3d.evaluation.box_inputs", ("DEFAULT_SIZE",), False),
    ("dira3d.visual_words.discover", "dira3d.visual_words.filter_settings",
     ("LUNG_FILTER_CHOICES", "datalist_modality", "resolve_lung_filter", "resolve_body_filter"), True),
    ("dira3d.deploy.export", "dira3d.deploy.agreement",
     ("DEFAULT_TOLERANCE", "AgreementError", "AgreementReport", "check_agreement"), True),
    ("dira3d.deploy", "dira3d.deploy.agreement",
     ("DEFAULT_TOLERANCE", "AgreementError", "AgreementReport", "check_agreement"), True),
]


@pytest.mark.parametrize("old, new, names, listed", MOVED, ids=[f"{m[0]}<-{m[1]}:{m[2][0]}" for m in MOVED])
def test_a_moved_name_is_still_importable_from_its_old_module(old, new, names, listed):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), f"{old}.{name} is not {new}.{name}"
        assert name in new_module.__all__
        if listed:
            assert name in old_module.__all__, f"{name} left {old}.__all__"


def test_every_all_name_of_the_split_modules_resolves():
    for module in ("dira3d.evaluation.finetune", "dira3d.data.generic", "dira3d.evaluation.localise",
                   "dira3d.visual_words.discover", "dira3d.evaluation.experiment_config", "dira3d.deploy.export",
                   "dira3d.evaluation.bundle_lookup", "dira3d.evaluation.finetune_scoring", "dira3d.data.scan_search",
                   "dira3d.evaluation.box_inputs", "dira3d.visual_words.filter_settings",
                   "dira3d.visual_words.earlier_run", "dira3d.evaluation.experiment_method_checks",
                   "dira3d.deploy.agreement"):
        loaded = importlib.import_module(module)
        assert loaded.__doc__ and loaded.__doc__.strip(), f"{module} has no module docstring"
        assert not [name for name in loaded.__all__ if not hasattr(loaded, name)], module


def test_the_lung_filter_still_logs_under_the_discovery_logger(tmp_path, caplog):
    """``resolve_lung_filter`` logged under ``dira3d.visual_words.discover`` (users' logging configs and the tests
    filter on it); it moved to filter_settings, its messages did not."""
    from dira3d.visual_words.filter_settings import resolve_lung_filter

    datalist = tmp_path / "dl.json"
    datalist.write_text('{"training": [], "meta": {"modality": "mr"}}', encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.discover"):
        assert resolve_lung_filter("auto", datalist) == "off"
    assert [r.name for r in caplog.records if "prepared as MR" in r.getMessage()] == ["dira3d.visual_words.discover"]
