"""The task bundles' ``amp`` follows the device the run uses, not whether the machine has a GPU."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D


def _amp_ids(config: object, prefix: str = "") -> list[str]:
    """Ids of the components whose value is ``@amp`` (the trainer's and evaluators' ``amp``)."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return []
    found = []
    for key, value in items:
        here = f"{prefix}#{key}" if prefix else str(key)
        found += [here] if value == "@amp" else _amp_ids(value, here)
    return found


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
@pytest.mark.parametrize("name", BUNDLES + BUNDLES_2D)
def test_amp_follows_the_device_the_run_uses(name, config, repo_root, monkeypatch):
    """amp was ``$torch.cuda.is_available()``: ``--device cpu`` on a machine with a GPU ran the CPU training and
    inference with MONAI's amp on (CUDA autocast and a CUDA GradScaler around CPU tensors). It is now on exactly when
    ``device`` is a CUDA device; the default device (a GPU when there is one) keeps it on there."""
    path = repo_root / "bundles" / name / "configs" / config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, as far as the configs see
    for device, expected in (("cpu", False), (torch.device("cpu"), False), ("cuda:0", True), (None, True)):
        parser = ConfigParser()
        parser.read_config(str(path))
        if device is not None:
            parser["device"] = device
        ids = _amp_ids(parser.get())
        assert ids, f"{path}: no component takes @amp"
        assert [parser.get_parsed_content(i) for i in ["amp", *ids]] == [expected] * (1 + len(ids)), (device, ids)
