"""What a TorchScript export embeds describes the model exported, and runs without the training run (2026-11-28).

- ``--override '_meta_#version=0.2.0'`` (a metadata override, as ``python -m monai.bundle`` takes it) was refused as
  "no setting '_meta_#version' in inference.json": it now sets that field of the embedded ``metadata.json``; a
  misspelt field is refused with the closest one (MONAI would add it without a word), and so is one given to an ONNX
  export, which holds no metadata.
- ``roi_size`` overridden (a ``--tiny`` model: 16x16x8) left ``network_data_format``'s ``spatial_shape`` at the
  bundle's 64x64x32; an overridden ``out_channels`` / ``class_names`` left the bundle's outputs.
- The embedded ``inference.json`` kept ``$dira3d.evaluation.trained_spacing(@ckpt_dir)`` and
  ``trained_preprocessing(@ckpt_dir, ...)``: copied away from the training run (no ``preprocessing.json`` beside
  it), it ran at the scan's own voxels with the HU window [-1000, 1000] instead of the model's 2x2x5 mm and
  [-900, 900], without a word (a mask of a synthetic CT differed in 73,572 voxels). They are resolved at export, from
  the ``preprocessing.json`` beside the weights exported (``--checkpoint``), which is also where a ``brats_tumor_seg``
  model's ``modalities`` (its channels) are now read.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dira3d.deploy.command import main as export_main
from test_deploy_export import _bundle_copy
from test_export_embedded_config import _embedded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--override", "width=0.125", "--override", "roi_size=[16,16,8]"]


def _run_folder(bundle, tmp_path, preprocessing: dict):
    """The bundle's weights moved to a training run's ``models/`` with the ``preprocessing.json`` fine-tuning writes."""
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    shutil.move(str(bundle / "models" / "model.pt"), models / "model.pt")
    (models / "preprocessing.json").write_text(json.dumps(preprocessing), encoding="utf-8")
    return models / "model.pt"


def test_a_meta_override_sets_that_field_of_the_embedded_metadata(repo_root, tmp_path, capsys):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    meta = bundle / "configs" / "metadata.json"
    before = meta.read_bytes()
    out = tmp_path / "lidc.ts"
    code = export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), *TINY,
                        "--override", "_meta_#version=0.2.0",
                        "--override", "_meta_#network_data_format#inputs#image#spatial_shape=[32,32,16]"])
    assert code == 0, capsys.readouterr().err
    embedded = _embedded(out)
    assert embedded["metadata.json"]["version"] == "0.2.0"
    # the user's value wins over the one the export derives from roi_size
    assert embedded["metadata.json"]["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 16]
    assert not any(key.startswith("_meta_") for key in embedded["inference.json"])  # not a setting of the config
    assert meta.read_bytes() == before


@pytest.mark.parametrize("override, expected", [
    ("_meta_#verison=0.2.0", "no field 'verison' (did you mean 'version'?)"),
    ("_meta_#network_data_format#inputs#imag#modality=MR",
     "no field 'network_data_format#inputs#imag' (did you mean 'network_data_format#inputs#image'?)"),
    ("_meta_=0.2.0", "set one field at a time, e.g. _meta_#version=0.2.0"),
    ("_meta_#=0.2.0", "set one field at a time, e.g. _meta_#version=0.2.0"),  # no field named: not "no field ''"
    # an item past the end of a list (spatial_shape holds 3): refused, not an IndexError
    ("_meta_#network_data_format#inputs#image#spatial_shape#3=16",
     "no field 'network_data_format#inputs#image#spatial_shape#3'")])
def test_a_meta_override_naming_no_field_is_refused_with_the_closest(override, expected, repo_root, tmp_path, capsys):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    out = tmp_path / "lidc.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), *TINY, "--override", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "metadata.json" in err, err
    assert not out.exists()


def test_an_onnx_export_refuses_a_meta_override_saying_why(repo_root, tmp_path, capsys):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    out = tmp_path / "lidc.onnx"
    assert export_main(["onnx", "--bundle", str(bundle), "--out", str(out), *TINY,
                        "--override", "_meta_#version=0.2.0"]) == 2
    err = capsys.readouterr().err
    assert "ONNX export holds no metadata.json" in err and "dira3d export torchscript" in err, err
    assert not out.exists()


def test_the_embedded_metadata_gives_the_roi_size_the_model_was_exported_with(repo_root, tmp_path, capsys):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    out = tmp_path / "lidc.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), *TINY]) == 0, capsys.readouterr().err
    described = _embedded(out)["metadata.json"]["network_data_format"]
    assert described["inputs"]["image"]["spatial_shape"] == [16, 16, 8]
    assert described["outputs"]["pred"]["spatial_shape"] == [16, 16, 8]
    assert described["post_processed_outputs"]["pred"]["spatial_shape"] == ["*", "*", "*"]  # the input's grid


def test_a_classifier_keeps_its_spatial_shape_and_describes_its_outputs(repo_root, tmp_path, capsys):
    """luna16_nodule_fpr (a classifier: outputs spatial_shape []) exported with 2 outputs and their names."""
    bundle = _bundle_copy(repo_root, "luna16_nodule_fpr", tmp_path)
    _two_output_weights(bundle, tmp_path / "two.pt")
    out = tmp_path / "two.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), "--checkpoint", str(tmp_path / "two.pt"),
                        *TINY, "--override", "out_channels=2", "--override", "class_names=['nodule','vessel']"]) == 0, \
        capsys.readouterr().err
    described = _embedded(out)["metadata.json"]["network_data_format"]
    assert described["inputs"]["image"]["spatial_shape"] == [16, 16, 8]
    for section in ("outputs", "post_processed_outputs"):
        pred = described[section]["pred"]
        assert pred["spatial_shape"] == [] and pred["num_channels"] == 2, pred
        assert pred["channel_def"] == {"0": "nodule", "1": "vessel"}, pred



def test_outputs_the_overrides_do_not_change_keep_the_bundles_words_and_unnamed_outputs_are_numbered(repo_root, tmp_path,
                                                                                                   capsys):
    """The outputs are described again only when out_channels / class_names are overridden: a plain export keeps the
    bundle's own channel_def; 2 outputs without class_names are "output 0", "output 1" (the bundle's one name does
    not fit them)."""
    bundle = _bundle_copy(repo_root, "luna16_nodule_fpr", tmp_path)
    meta = bundle / "configs" / "metadata.json"
    content = json.loads(meta.read_text(encoding="utf-8"))
    content["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "nodule candidate"}
    meta.write_text(json.dumps(content, indent=4), encoding="ascii")
    out = tmp_path / "plain.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), *TINY]) == 0, capsys.readouterr().err
    pred = _embedded(out)["metadata.json"]["network_data_format"]["outputs"]["pred"]
    assert (pred["num_channels"], pred["channel_def"]) == (1, {"0": "nodule candidate"})
    _two_output_weights(bundle, tmp_path / "two.pt")
    out = tmp_path / "two.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), "--checkpoint", str(tmp_path / "two.pt"),
                        *TINY, "--override", "out_channels=2"]) == 0, capsys.readouterr().err
    described = _embedded(out)["metadata.json"]["network_data_format"]
    for section in ("outputs", "post_processed_outputs"):
        pred = described[section]["pred"]
        assert (pred["num_channels"], pred["channel_def"]) == (2, {"0": "output 0", "1": "output 1"}), pred

def test_the_embedded_inference_config_preprocesses_as_trained_without_the_run(repo_root, tmp_path, capsys):
    from monai.bundle import ConfigParser

    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    checkpoint = _run_folder(bundle, tmp_path, {"modality": "ct", "window": [-900.0, 900.0], "spacing": [2.0, 2.0, 5.0]})
    out = tmp_path / "liver.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), "--checkpoint", str(checkpoint),
                        *TINY, "--override", "percentiles=[1,99]"]) == 0, capsys.readouterr().err
    config = _embedded(out)["inference.json"]
    assert config["pixdim"] == [2.0, 2.0, 5.0] and config["hu_window"] == [-900.0, 900.0] and config["modality"] == "ct"
    assert config["percentiles"] == [1, 99]  # an override keeps its value
    assert not [k for k, v in config.items() if isinstance(v, str) and "trained_" in v], config
    assert config["ckpt_dir"] == "$@bundle_root + '/models'"  # where the weights are looked for stays relative
    # the export copied elsewhere, the training run gone: the config still says the model's preprocessing
    shutil.rmtree(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "configs").mkdir(parents=True)
    (elsewhere / "configs" / "inference.json").write_text(json.dumps(config), encoding="ascii")
    parser = ConfigParser()
    parser.read_config(str(elsewhere / "configs" / "inference.json"))
    parser["bundle_root"] = str(elsewhere)
    assert list(parser.get_parsed_content("pixdim")) == [2.0, 2.0, 5.0]
    assert list(parser.get_parsed_content("hu_window")) == [-900.0, 900.0]


@pytest.mark.parametrize("what", ["torchscript", "onnx"])
def test_a_brats_model_exports_with_the_sequences_recorded_beside_its_weights(what, repo_root, tmp_path, capsys):
    """A 4-sequence model given by --checkpoint: its modalities came from the bundle's own models/ (none: flair, one
    channel), so the weights did not fit without --override modalities=all (and ONNX's example input had 1 channel)."""
    from monai.bundle import ConfigParser

    from dira3d.utils import atomic_save

    source = repo_root / "bundles" / "brats_tumor_seg"
    bundle = tmp_path / "brats_tumor_seg"
    shutil.copytree(source / "configs", bundle / "configs")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["width"], parser["modalities"] = 0.125, "all"
    (bundle / "models").mkdir()
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), bundle / "models" / "model.pt")
    checkpoint = _run_folder(bundle, tmp_path, {"modality": "mr", "modalities": ["t1", "t1ce", "t2", "flair"]})
    out = tmp_path / f"brats.{'ts' if what == 'torchscript' else 'onnx'}"
    assert export_main([what, "--bundle", str(bundle), "--out", str(out), "--checkpoint", str(checkpoint),
                        *TINY]) == 0, capsys.readouterr().err
    assert '"output_shape": [\n    1,\n    1,\n    16,' in capsys.readouterr().out
    if what == "onnx":
        import onnx

        graph = onnx.load(str(out)).graph
        assert graph.input[0].type.tensor_type.shape.dim[1].dim_value == 4  # the four sequences
        return
    embedded = _embedded(out)
    assert embedded["inference.json"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    image = embedded["metadata.json"]["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 4 and image["channel_def"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}


def test_the_torchscript_file_computes_what_the_pytorch_network_computes(repo_root, tmp_path, capsys):
    """The file `dira3d export torchscript` writes, loaded with torch.jit.load, against the network built and loaded
    in PyTorch (non-trivial BatchNorm statistics), on an input of another size than the one it was traced with."""
    from dira3d.deploy import load_bundle_network

    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    out = tmp_path / "lidc.ts"
    assert export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), *TINY]) == 0, capsys.readouterr().err
    network = load_bundle_network(bundle, overrides={"width": 0.125})
    x = torch.rand(2, 1, 32, 24, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        traced, eager = torch.jit.load(str(out))(x), network(x)
    assert traced.shape == eager.shape == (2, 1, 32, 24, 16)
    assert float(eager.abs().max()) > 0.1  # not a trivial output
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def _two_output_weights(bundle, path):
    """Weights of the bundle's network at the tiny width with 2 outputs, saved to ``path``."""
    from monai.bundle import ConfigParser

    from dira3d.utils import atomic_save

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["width"], parser["out_channels"] = 0.125, 2
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), path)
