"""Session 23b mutation audit of dira3d.evaluation.experiment_config (`dira3d experiment`'s config check): the checks
the earlier tests left unpinned, each refused before any run with the setting named."""

from __future__ import annotations

import pytest

from dira3d.evaluation.experiment_config import load_config
from test_experiment_walkthrough import _config  # the walkthrough's experiment.yaml


@pytest.mark.parametrize("extra, match", [
    # YAML reads `yes`/`true` as a bool, which is an int in Python: seed True ran as seed 1, fraction True as 1.0
    ({"seeds": [True, 2]}, r"seeds in .* must be whole numbers, got True"),
    ({"label_fractions": [True]}, r"label_fractions in .* must be numbers in \(0, 1\], got True"),
    # int(0.5) would have run seed 0
    ({"seeds": [0.5, 1]}, r"seeds in .* must be whole numbers, got 0\.5"),
    # a seed listed twice ran twice and counted twice in the mean and the t-test
    ({"seeds": [1, 0, 1]}, r"seeds in .* lists 1 more than once; list each value once"),
    ({"label_fractions": [0.5, 1.0, 0.5]}, r"label_fractions in .* lists 0\.5 more than once"),
])
def test_bools_and_fractional_seeds_are_refused(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, **extra))


def test_a_method_to_pretrain_needs_the_pretrain_section(tmp_path):
    """without the top-level `pretrain` (its dataset_dir) the method was not pretrained: its runs started from
    random weights under the method's name."""
    with pytest.raises(ValueError, match=r"method 'dira' in .*: a mapping needs a 'pretrain' entry and a top-level "
                                         r"'pretrain' section"):
        load_config(_config(tmp_path, methods={"random": None, "dira": {"pretrain": {}}}))


def test_a_blank_checkpoint_path_is_named_as_empty(tmp_path):
    """`dira: "  "` is an empty path as "" is (not a missing file called '  ' in the config's folder)."""
    with pytest.raises(ValueError, match=r"method 'dira' in .* has an empty checkpoint path; give the checkpoint file, or "
                                         r"null for random init"):
        load_config(_config(tmp_path, methods={"random": None, "dira": "  "}))


def test_a_metric_the_bundle_does_not_report_is_refused_naming_those_it_does(tmp_path):
    """else the name was found wrong only after the first fine-tuning, and every run failed on it."""
    with pytest.raises(ValueError, match=r"metric 'dice' in .*: bundle 'luna16_nodule_fpr' reports 'auc' on the test split"):
        load_config(_config(tmp_path, metric="dice"))


@pytest.mark.parametrize("extra, match", [
    ({"baseline": 5}, r"baseline in .* must be text \(a name or a path\), got 5"),
    # welch: "yes" (quoted) is text, which the table read as true
    ({"welch": "yes"}, r"welch in .* must be true or false, got 'yes'"),
    # a ':' in a name is a drive on Windows and an alternate data stream on NTFS: its runs went elsewhere
    ({"methods": {"random": None, "c:x": None}}, r"method 'c:x' in .* must be a plain name"),
    ({"methods": {"random": None, " dira": None}}, r"method ' dira' in .* must be a plain name .*no leading or trailing"),
])
def test_settings_of_the_wrong_kind_or_form_are_refused(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(_config(tmp_path, **extra))


def test_a_metric_of_the_bundles_additional_metrics_is_accepted(tmp_path):
    """the segmentation bundles report iou beside their key metric dice: both are results the grid can compare."""
    for metric in ("dice", "iou"):
        assert load_config(_config(tmp_path, bundle="lits_liver_seg", metric=metric))["metric"] == metric
