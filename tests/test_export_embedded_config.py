"""``dira3d export torchscript --override ...`` embeds the config the network was exported with (found 2026-11-28).

``monai.bundle.ckpt_export`` embeds the config *file* it is given (under ``inference.json``), not its parser with the
overrides applied: a ``--tiny`` export (width 0.125, roi_size [16, 16, 8]) held the unmodified ``inference.json``
(width 1.0, roi_size [64, 64, 32]), and docs/deployment.md says the configs are embedded. The export now hands it a
copy with the overrides applied, under the same name; the bundle's own file is left as it was.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dira3d.deploy.command import main as export_main
from test_deploy_export import _bundle_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _embedded(path) -> dict[str, dict]:
    extra = {"inference.json": "", "metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)  # filled in place with the bytes stored under each name
    return {name: json.loads(data) for name, data in extra.items()}


def test_torchscript_export_embeds_the_config_with_its_overrides(repo_root, tmp_path, capsys):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    config = bundle / "configs" / "inference.json"
    before = config.read_bytes()
    out = tmp_path / "lidc.ts"
    lines: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("monai.bundle.scripts"), Seen()
    logger.addHandler(handler)
    try:
        code = export_main(["torchscript", "--bundle", str(bundle), "--out", str(out),
                            "--override", "width=0.125", "--override", "roi_size=[16,16,8]"])
    finally:
        logger.removeHandler(handler)
    assert code == 0, capsys.readouterr().err
    embedded = _embedded(out)
    assert embedded["inference.json"]["width"] == 0.125
    assert embedded["inference.json"]["roi_size"] == [16, 16, 8]
    # the rest of the config is the bundle's, unresolved, as MONAI embeds it
    original = json.loads(before)
    assert embedded["inference.json"]["network_def"] == original["network_def"]
    assert embedded["inference.json"]["bundle_root"] == original["bundle_root"]
    assert "_meta_" not in embedded["inference.json"]
    assert embedded["metadata.json"]["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert config.read_bytes() == before  # the bundle's file is not touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lidc.ts", "lidc_nodule_seg"]
    # MONAI's input summary names the bundle's config, not the temporary merged copy
    assert f"> config_file: '{config}'" in lines, lines


def test_an_export_without_overrides_embeds_the_bundle_config_as_it_is(repo_root, tmp_path):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    # a bundle whose config was edited to the tiny settings: nothing to override, the file is embedded as it is, but
    # for its pixdim, which reads the training run's preprocessing.json (none here: the bundle's default 1 mm) and is
    # embedded as that value (test_export_meta.py)
    config = bundle / "configs" / "inference.json"
    content = json.loads(config.read_text())
    assert content["pixdim"] == "$dira3d.evaluation.trained_spacing(@ckpt_dir, [1.0, 1.0, 1.0])"
    config.write_text(json.dumps({**content, "width": 0.125}, indent=4))
    out = tmp_path / "lidc.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out),
                        "--input-shape", "1", "1", "16", "16", "8"]) == 0
    assert _embedded(out)["inference.json"] == {**content, "width": 0.125, "pixdim": [1.0, 1.0, 1.0]}


@pytest.mark.parametrize("modalities, channel_def", [
    ("all", {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}), ("t2,flair", {"0": "t2", "1": "flair"}),
    ("flair", {"0": "flair"})])
def test_the_embedded_metadata_describes_the_inputs_of_the_network_exported(repo_root, tmp_path, modalities,
                                                                            channel_def):
    """A TorchScript export of a brats_tumor_seg model of the four sequences embedded the bundle's metadata.json, whose
    network_data_format.inputs.image says one FLAIR channel: the embedded one has the network's in_channels and the
    sequences of its modalities, in channel order; the bundle's own metadata.json is left as it is."""
    from monai.bundle import ConfigParser

    from dira3d.deploy.export import export_torchscript
    from dira3d.utils import atomic_save

    bundle = _bundle_copy(repo_root, "brats_tumor_seg", tmp_path)
    meta = bundle / "configs" / "metadata.json"
    before = meta.read_bytes()
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["width"], parser["modalities"] = 0.125, modalities
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), tmp_path / "model.pt")
    out = export_torchscript(bundle, tmp_path / "m.ts", tmp_path / "model.pt", input_shape=[1, len(channel_def), 16, 16, 8],
                             overrides={"width": 0.125, "modalities": modalities})
    image = _embedded(out)["metadata.json"]["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == len(channel_def) and image["channel_def"] == channel_def, image
    assert image["modality"] == "MR" and image["value_range"] == [0, 1]  # the rest as the bundle says
    assert meta.read_bytes() == before



def test_a_bundle_without_sequence_names_gets_the_channel_count_of_its_network(repo_root, tmp_path):
    """lidc_nodule_seg exported with --override in_channels=2: its metadata's one channel, 'image', became two."""
    from monai.bundle import ConfigParser

    from dira3d.utils import atomic_save

    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["width"], parser["in_channels"] = 0.125, 2
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), tmp_path / "two.pt")
    out = tmp_path / "two.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), "--checkpoint", str(tmp_path / "two.pt"),
                        "--override", "width=0.125", "--override", "in_channels=2",
                        "--input-shape", "1", "2", "16", "16", "8"]) == 0
    image = _embedded(out)["metadata.json"]["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 2 and image["channel_def"] == {"0": "channel 0", "1": "channel 1"}, image
