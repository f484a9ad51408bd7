"""Every Orientationd of the bundles names its axis labels.

MONAI 1.6 warns that ``Orientationd``'s default ``labels`` will become None (labels taken from the image's
``space`` metadata). The bundles were trained and tested with today's default, (("L", "R"), ("P", "A"), ("I", "S")),
which they now state, so a MONAI upgrade cannot reorient their inputs without a word."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def _orientations(node):
    if isinstance(node, dict):
        if node.get("_target_") == "Orientationd":
            yield node
        for value in node.values():
            yield from _orientations(value)
    elif isinstance(node, list):
        for value in node:
            yield from _orientations(value)


CONFIGS = sorted(p for p in BUNDLES.glob("*/configs/*.json") if any(_orientations(json.loads(p.read_text()))))


def test_the_3d_bundles_have_orientations_to_check():
    assert {p.parent.parent.name for p in CONFIGS} >= {"lits_liver_seg", "brats_tumor_seg", "lidc_nodule_seg",
                                                        "luna16_nodule_fpr", "pecad_embolism_fpr"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_orientation_names_its_labels_and_builds_without_the_default_warning(config):
    nodes = list(_orientations(json.loads(config.read_text())))
    assert nodes and all(node.get("labels") == LABELS for node in nodes), config
    parser = ConfigParser(nodes[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        transform = parser.get_parsed_content()
    assert [tuple(pair) for pair in transform.ornt_transform.labels] == [tuple(pair) for pair in LABELS]
