"""Exports: TorchScript / ONNX agree with PyTorch on a real CT patch; pretrained weights round-trip
through state_dict and safetensors; loading into a mismatched network reports keys and shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dira3d.deploy import (
    DEFAULT_TOLERANCE,
    AgreementError,
    AgreementReport,
    check_agreement,
    export_onnx,
    export_pretrained,
    export_torchscript,
    find_bundles,
    load_bundle_network,
    load_into,
    read_weights,
    scan_patch,
)
from dira3d.deploy.command import main as export_main
from dira3d.deploy.monailabel import bundle_kind
from dira3d.networks import Classifier, Segmenter, UNet
from dira3d.utils import atomic_save

pytest.importorskip("onnxruntime", reason="ONNX checks need the [deploy] extra (onnx, onnxruntime)")
pytest.importorskip("safetensors", reason="safetensors export needs the [deploy] extra")

TINY = {"width": 0.125}


def _bundle_copy(repo_root: Path, name: str, dest: Path, seed: int = 0) -> Path:
    """A copy of bundles/<name> (configs only) with tiny random fine-tuned weights in models/model.pt."""
    source = repo_root / "bundles" / name
    if not (source / "configs" / "inference.json").is_file():
        pytest.skip(f"bundle {name} is not in this checkout")
    bundle = dest / name
    shutil.copytree(source / "configs", bundle / "configs")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in TINY.items():
        parser[key] = value
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def", instantiate=True)
    # non-trivial BatchNorm statistics, so that eval-mode export errors would show
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    atomic_save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


@pytest.mark.parametrize("name", ["lits_liver_seg", "luna16_nodule_fpr"])
def test_torchscript_and_onnx_agree_with_pytorch_on_real_ct(name, real_data, repo_root, tmp_path):
    bundle = _bundle_copy(repo_root, name, tmp_path)
    network = load_bundle_network(bundle, overrides=TINY)
    patch = scan_patch(real_data / "lung1_image.nrrd", (64, 64, 32))
    assert patch.shape == (1, 1, 64, 64, 32) and 0.0 <= float(patch.min()) < float(patch.max()) <= 1.0

    # traced on a smaller input: the graph must still be right on the 64x64x32 real patch
    ts = export_torchscript(bundle, overrides=TINY, input_shape=[1, 1, 32, 32, 16])
    assert ts == bundle / "models" / "model.ts"
    onnx_file = export_onnx(network, patch, tmp_path / f"{name}.onnx")
    report = check_agreement(network, patch, torchscript=ts, onnx_path=onnx_file)

    expected_shape = (1, 1, 64, 64, 32) if bundle_kind(bundle) == "segmentation" else (1, 1)
    assert report.output_shape == expected_shape
    assert set(report.max_abs_diff) == {"torchscript", "onnxruntime"}
    assert report.ok, report.to_json()
    assert report.tolerance == DEFAULT_TOLERANCE == 1e-4

    # dynamic axes: the ONNX graph also runs a batch of two at another size
    import onnxruntime

    other = torch.rand(2, 1, 32, 48, 16)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    result = torch.from_numpy(session.run(None, {"image": other.numpy()})[0])
    with torch.no_grad():
        assert torch.allclose(result, network(other), atol=DEFAULT_TOLERANCE)


def test_agreement_check_catches_a_wrong_graph(tmp_path):
    torch.manual_seed(0)
    network = Segmenter(3, 1, 1, width=0.125).eval()
    example = torch.rand(1, 1, 16, 16, 8)
    onnx_file = export_onnx(network, example, tmp_path / "seg.onnx")
    with torch.no_grad():
        network.decoder.levels[-1].convs.conv2.conv.bias.add_(0.5)  # the PyTorch side changes after export
    report = check_agreement(network, example, onnx_path=onnx_file)
    assert not report.ok and report.max_abs_diff["onnxruntime"] > 1e-3
    assert "onnxruntime: max |logit difference|" in report.failures()
    with pytest.raises(ValueError, match="torchscript= and/or onnx_path="):
        check_agreement(network, example)


def test_load_bundle_network_names_the_width_when_weights_do_not_fit(repo_root, tmp_path):
    bundle = _bundle_copy(repo_root, "lidc_nodule_seg", tmp_path)
    with pytest.raises(ValueError, match="width"):
        load_bundle_network(bundle, overrides={"width": 0.25})
    with pytest.raises(FileNotFoundError, match="absent.pt do not exist"):
        load_bundle_network(bundle, checkpoint=tmp_path / "absent.pt", overrides=TINY)
    # TorchScript export checks the fit first: one message naming the width, not MONAI's ~90 size-mismatch lines
    with pytest.raises(ValueError, match="width") as err:
        export_torchscript(bundle, overrides={"width": 0.25}, out=tmp_path / "never.ts")
    assert str(err.value).count("size mismatch") == 0 and not (tmp_path / "never.ts").exists()


def _pretraining_checkpoint(width: float = 0.125) -> dict:
    torch.manual_seed(1)
    unet = UNet(3, 1, 1, width=width)
    return {"encoder": unet.encoder.state_dict(), "decoder": unet.decoder.state_dict(), "dis_head": {},
            "meta": {"spatial_dims": 3, "in_channels": 1, "width": width}}


def test_export_pretrained_keeps_an_earlier_export_unless_told(tmp_path, capsys):
    first, second = _pretraining_checkpoint(), _pretraining_checkpoint(width=0.25)
    written = export_pretrained(first, tmp_path / "out")
    before = {name: path.read_bytes() for name, path in written.items()}
    with pytest.raises(FileExistsError, match=r"already holds encoder\.pt, encoder\.safetensors, .*key_map\.json"):
        export_pretrained(second, tmp_path / "out")
    assert {name: path.read_bytes() for name, path in written.items()} == before
    export_pretrained(second, tmp_path / "out", overwrite=True)
    assert read_weights(written["encoder.safetensors"]).keys() == second["encoder"].keys()
    assert read_weights(written["encoder.safetensors"])["levels.0.conv1.conv.weight"].shape[0] == 8  # width 0.25
    assert not list((tmp_path / "out").glob(".*"))  # written through temporary files, none left
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; give a folder"):
        export_pretrained(first, tmp_path / "a_file")
    atomic_save(first, tmp_path / "pretrain.pt")
    assert export_main(["pretrained", "--checkpoint", str(tmp_path / "pretrain.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_export_pretrained_writes_identical_pt_and_safetensors_with_key_map(tmp_path):
    checkpoint = _pretraining_checkpoint()
    atomic_save(checkpoint, tmp_path / "pretrain.pt")
    written = export_pretrained(tmp_path / "pretrain.pt", tmp_path / "out")
    assert set(written) == {"encoder.pt", "encoder.safetensors", "decoder.pt", "decoder.safetensors", "key_map.json"}
    for part in ("encoder", "decoder"):
        from_pt = read_weights(written[f"{part}.pt"])
        from_st = read_weights(written[f"{part}.safetensors"])
        assert from_pt.keys() == from_st.keys() == checkpoint[part].keys()
        for key, value in checkpoint[part].items():
            assert torch.equal(from_pt[key], value) and torch.equal(from_st[key], value)
    key_map = json.loads(written["key_map.json"].read_text())
    entry = key_map["parts"]["encoder"]["levels.0.conv1.conv.weight"]
    assert entry["shape"] == [4, 1, 3, 3, 3]  # 32 x width 0.125 filters on 1 input channel
    assert entry["meaning"].startswith("encoder level 0")
    assert key_map["parts"]["decoder"]["levels.0.up.weight"]["meaning"].startswith("decoder level 0, 2x2x2 transposed")
    assert key_map["meta"]["width"] == 0.125
    with pytest.raises(ValueError, match="no 'adversary' part"):
        export_pretrained(checkpoint, tmp_path / "bad", parts=("adversary",))


def test_load_into_copies_matching_keys_into_a_users_network(tmp_path):
    written = export_pretrained(_pretraining_checkpoint(), tmp_path)
    classifier = Classifier(3, 1, 2, width=0.125)
    # the user's network nests our encoder under "encoder.": a prefix mapping adds it
    report = load_into(classifier, written["encoder.safetensors"], mapping={"": "encoder."})
    encoder = read_weights(written["encoder.pt"])
    assert sorted(report.loaded) == sorted(f"encoder.{k}" for k in encoder)
    assert report.missing == ["fc.weight", "fc.bias"] and not report.unexpected and not report.mismatched
    for key, value in encoder.items():
        assert torch.equal(classifier.state_dict()[f"encoder.{key}"], value)


def test_load_into_a_mismatched_network_reports_exact_keys_and_shapes(tmp_path):
    written = export_pretrained(_pretraining_checkpoint(width=0.125), tmp_path)
    wider = UNet(3, 1, 1, width=0.25).encoder  # twice the channels everywhere
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.warns(UserWarning, match="no weight tensor of .*encoder.pt fits UNetEncoder"):
        report = load_into(wider, written["encoder.pt"])
    assert report.mismatched["levels.0.conv1.conv.weight"] == ((4, 1, 3, 3, 3), (8, 1, 3, 3, 3))
    assert report.mismatched["levels.3.conv2.conv.weight"] == ((64, 32, 3, 3, 3), (128, 64, 3, 3, 3))
    # every tensor with channels mismatches; only the shape-free BN counters fit
    assert sorted(report.loaded) == sorted(k for k in before if k.endswith("num_batches_tracked"))
    assert not report.missing and not report.unexpected
    assert all(torch.equal(wider.state_dict()[k], v) for k, v in before.items() if k in report.mismatched)
    # renamed keys that the network lacks are "unexpected"; its own keys then are "missing"
    with pytest.warns(UserWarning, match="pass mapping="):
        renamed = load_into(UNet(3, 1, 1, width=0.125).encoder, written["encoder.pt"], mapping={"levels.": "stages."})
    assert "stages.0.conv1.conv.weight" in renamed.unexpected and "levels.0.conv1.conv.weight" in renamed.missing
    with pytest.warns(UserWarning, match="no weight tensor"), \
            pytest.raises(ValueError, match=r"levels\.0\.conv1\.conv\.weight: file \(4, 1, 3, 3, 3\) vs network \(8, 1, 3, 3, 3\)"):
        load_into(UNet(3, 1, 1, width=0.25).encoder, written["encoder.pt"], strict=True)



def test_load_report_summary_names_the_tensors_of_another_shape(tmp_path):
    # docs/deployment.md: `print(report.summary())` after load_into; a width mismatch leaves almost
    # every tensor unloaded, so the summary must not read "0 missing, 0 unexpected" and nothing else
    written = export_pretrained(_pretraining_checkpoint(width=0.125), tmp_path)
    with pytest.warns(UserWarning, match="no weight tensor"):
        report = load_into(UNet(3, 1, 1, width=0.25).encoder, written["encoder.safetensors"])
    summary = report.summary()
    assert f"{len(report.mismatched)} of another shape (not loaded)" in summary
    assert "levels.0.conv1.conv.weight (4, 1, 3, 3, 3) vs network (8, 1, 3, 3, 3)" in summary
    fitting = load_into(UNet(3, 1, 1, width=0.125).encoder, written["encoder.pt"])
    assert "another shape" not in fitting.summary()


def test_load_report_summary_of_a_users_network_says_what_went_where(tmp_path):
    # it read "pretrained weights from .../encoder.pt into encoder: 42 tensors loaded, 16 missing, 0 unexpected":
    # "encoder" was the file's part, not where the weights went, and the counts did not say of what
    written = export_pretrained(_pretraining_checkpoint(width=0.125), tmp_path)
    encoder = list(UNet(3, 1, 1, width=0.125).encoder.state_dict())
    file_keys, level3 = len(encoder), [k for k in encoder if k.startswith("levels.3.")]

    class MyNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = UNet(3, 1, 1, width=0.125).encoder
            self.head = torch.nn.Linear(4, 2)

    net = MyNet()
    report = load_into(net, written["encoder.pt"], mapping={"": "backbone.", "levels.3.": None})
    loaded, in_net = file_keys - len(level3), len(net.state_dict())
    assert len(report.loaded) == loaded and level3
    lines = report.summary().split("\n")
    assert lines[0] == (
        f"encoder weights from {written['encoder.pt']} into MyNet: {loaded} tensors loaded, of the file's {file_keys} "
        f"and of MyNet's {in_net}; {in_net - loaded} of MyNet's not in the file (kept their initial values), 0 of the "
        f"file's not in MyNet (ignored), {len(level3)} of the file's dropped by the mapping")
    assert lines[1].startswith("  in MyNet, not in the file (kept their initial values): backbone.levels.3.")
    assert "into encoder" not in report.summary()
    assert sorted(report.dropped) == sorted(level3)


def test_load_into_refuses_a_file_of_other_spatial_dims_and_warns_when_nothing_fits(tmp_path, recwarn):
    # a 3D export in a 2D encoder: every kernel mismatches but the biases and BN statistics would
    # load, leaving a half-initialised network behind a summary that reads "48 tensors loaded"
    written = export_pretrained(_pretraining_checkpoint(width=0.125), tmp_path)
    flat = UNet(2, 1, 1, width=0.125).encoder
    before = {k: v.clone() for k, v in flat.state_dict().items()}
    with pytest.raises(ValueError, match=r"are 3D and UNetEncoder is 2D .*levels\.0\.conv1\.conv\.weight"):
        load_into(flat, written["encoder.pt"])
    assert all(torch.equal(flat.state_dict()[k], v) for k, v in before.items())  # nothing copied
    # keys of another naming scheme (a MONAI network without a mapping): nothing loads, and it says so
    from monai.networks.nets import BasicUNet

    with pytest.warns(UserWarning, match="no weight tensor of .* fits BasicUNet .*pass mapping="):
        report = load_into(BasicUNet(3, 1, 1, features=(4, 4, 8, 16, 32, 4)), written["encoder.safetensors"])
    assert not report.loaded
    recwarn.clear()
    load_into(UNet(3, 1, 1, width=0.125).encoder, written["encoder.pt"])  # a fitting load stays silent
    assert not [w for w in recwarn if issubclass(w.category, UserWarning) and "load_into" in str(w.message)]

def test_find_bundles_and_kinds(repo_root, tmp_path):
    seg = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    cls = _bundle_copy(repo_root, "pecad_embolism_fpr", tmp_path)
    shutil.copytree(repo_root / "bundles" / "lidc_nodule_seg" / "configs", tmp_path / "lidc_nodule_seg" / "configs")
    found = find_bundles(str(tmp_path))
    assert found == {"lits_liver_seg": seg.resolve(), "pecad_embolism_fpr": cls.resolve()}  # lidc has no weights
    assert bundle_kind(seg) == "segmentation" and bundle_kind(cls) == "classification"
    with pytest.raises(FileNotFoundError, match="lidc_nodule_seg"):
        find_bundles(tmp_path, names=["lidc_nodule_seg"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_bundles(tmp_path / "nowhere")


def test_find_bundles_names_the_conf_option_and_why_a_model_is_not_served(repo_root, tmp_path, capsys):
    """The app's `--conf models` naming a bundle it would not serve was "bundles ['lidc_nodule_seg'] not found (with
    models/model.pt or model.ts) under [...]", naming no option and not telling a bundle without weights from a
    misspelt name; a missing `--conf bundles` / `--bundles` path was a "bundle path" without the option."""
    _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    shutil.copytree(repo_root / "bundles" / "lidc_nodule_seg" / "configs", tmp_path / "lidc_nodule_seg" / "configs")
    with pytest.raises(FileNotFoundError) as err:
        find_bundles(str(tmp_path), names=["lits_liver_seg", "lidc_nodule_seg", "lits"])
    assert str(err.value) == (
        "--conf models lits_liver_seg,lidc_nodule_seg,lits: lidc_nodule_seg has no weights yet (models/model.pt or "
        f"model.ts: fine-tune it first); lits is no bundle there; the bundles with weights under {tmp_path} are: "
        "lits_liver_seg (leave --conf models out to serve them all)")
    with pytest.raises(FileNotFoundError, match=r"^--conf bundles \S*nowhere does not exist; pass a bundle folder"):
        find_bundles(tmp_path / "nowhere", given_by="--conf bundles")
    assert export_main(["monailabel-app", "--out", str(tmp_path / "app"), "--bundles", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"dira3d export: error: --bundles {tmp_path / 'nowhere'} does not exist")


def test_export_command_pretrained_and_onnx(repo_root, real_data, tmp_path, capsys):
    atomic_save(_pretraining_checkpoint(), tmp_path / "pretrain.pt")
    assert export_main(["pretrained", "--checkpoint", str(tmp_path / "pretrain.pt"), "--out", str(tmp_path / "w"),
                        "--parts", "encoder"]) == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["encoder.pt", "encoder.safetensors", "key_map.json"]
    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    code = export_main(["onnx", "--bundle", str(bundle), "--out", str(tmp_path / "m.onnx"), "--override", "width=0.125",
                        "--input-shape", "1", "1", "32", "32", "16", "--check-scan", str(real_data / "lung1_image.nrrd")])
    assert code == 0 and '"ok": true' in capsys.readouterr().out
    assert export_main(["torchscript", "--bundle", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_torchscript_command_checks_the_graph_against_pytorch(repo_root, real_data, tmp_path, capsys):
    """`dira3d export torchscript` ran no agreement check (`dira3d export onnx` did): it now runs the traced graph and
    the PyTorch network on the example input (or a --check-scan crop) and prints the report, as onnx does."""
    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    out = tmp_path / "liver.ts"
    code = export_main(["torchscript", "--bundle", str(bundle), "--out", str(out), "--override", "width=0.125",
                        "--input-shape", "1", "1", "32", "32", "16", "--check-scan", str(real_data / "lung1_image.nrrd")])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith(f"TorchScript written to {out}\n"), printed
    report = json.loads(printed.split("\n", 1)[1])
    assert report["ok"] is True and set(report["max_abs_diff"]) == {"torchscript"}
    assert report["output_shape"] == [1, 1, 32, 32, 16] and report["tolerance"] == DEFAULT_TOLERANCE
    assert torch.jit.load(str(out)) is not None


def test_export_torchscript_that_disagrees_writes_nothing_and_keeps_the_earlier_file(repo_root, tmp_path, capsys,
                                                                                      monkeypatch):
    """A traced graph that does not compute what the PyTorch network computes (forced here: the reference network's
    last bias moves after loading) exits 1 with the report and a line naming the runtime; --out is not written, and
    an earlier export there stays byte for byte."""
    import dira3d.deploy.export as export

    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    real_load = export.load_bundle_network

    def shifted(*args, **kwargs):
        network = real_load(*args, **kwargs)
        with torch.no_grad():
            network.decoder.levels[-1].convs.conv2.conv.bias.add_(0.5)
        return network

    monkeypatch.setattr(export, "load_bundle_network", shifted)
    out = tmp_path / "exports" / "liver.ts"
    out.parent.mkdir()
    out.write_bytes(b"the user's earlier export")
    args = ["torchscript", "--bundle", str(bundle), "--out", str(out), "--override", "width=0.125",
            "--input-shape", "1", "1", "32", "32", "16", "--overwrite"]
    assert export_main(args) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is False
    assert "dira3d export: error: torchscript: max |logit difference|" in captured.err
    assert f"{out} was not written (the earlier export there is kept)" in captured.err
    assert out.read_bytes() == b"the user's earlier export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["liver.ts"]  # no temporary file left
    fresh = tmp_path / "fresh.ts"
    with pytest.raises(AgreementError, match="torchscript: max") as err:
        export_torchscript(bundle, fresh, overrides=TINY, input_shape=[1, 1, 32, 32, 16])
    assert not err.value.report.ok and not fresh.exists()


def test_export_torchscript_logs_the_final_path_once_it_is_written(repo_root, tmp_path, monkeypatch):
    """MONAI's ckpt_export logged the temporary file's name (its input summary's filepath, and "exported to file:
    .liver.ts.abc123.ts."), a file that never exists once the export ends; the lines now name --out, and "exported to
    file" comes only once --out is in place, never for an export that fails its agreement check."""
    import logging

    import dira3d.deploy.export as export

    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    out = tmp_path / "liver.ts"
    lines: list[tuple[str, bool]] = []

    class Seen(logging.Handler):
        def emit(self, record):
            lines.append((record.getMessage(), out.exists()))

    logger, handler = logging.getLogger("monai.bundle.scripts"), Seen()
    logger.addHandler(handler)
    try:
        export_torchscript(bundle, out, overrides=TINY, input_shape=[1, 1, 32, 32, 16])
        written = list(lines)
        lines.clear()
        real_load = export.load_bundle_network

        def shifted(*args, **kwargs):  # the PyTorch network no longer computes what the traced graph computes
            network = real_load(*args, **kwargs)
            with torch.no_grad():
                network.decoder.levels[-1].convs.conv2.conv.bias.add_(0.5)
            return network

        monkeypatch.setattr(export, "load_bundle_network", shifted)
        with pytest.raises(AgreementError):
            export_torchscript(bundle, tmp_path / "other.ts", overrides=TINY, input_shape=[1, 1, 32, 32, 16])
    finally:
        logger.removeHandler(handler)
    assert (f"> filepath: '{out}'", False) in written
    assert written[-1] == (f"exported to file: {out}.", True)
    assert not any(f".{out.name}." in message for message, _ in written), written  # no temporary name
    assert f"> filepath: '{tmp_path / 'other.ts'}'" in [message for message, _ in lines]
    assert not any(message.startswith("exported to file") for message, _ in lines), lines


class _OffInOnnx(torch.nn.Module):
    """A network whose ONNX graph does not compute what it computes: +0.5 on every logit while being exported."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        return y + 0.5 if torch.onnx.is_in_onnx_export() else y


def test_export_onnx_that_disagrees_writes_nothing_and_keeps_the_earlier_file(repo_root, tmp_path, capsys, monkeypatch):
    """`dira3d export onnx` wrote the graph to --out and checked it after: a disagreeing graph was left at --out (exit
    1), and with --overwrite the user's earlier export was already replaced. It is now checked under a temporary name
    and renamed only when it agrees, as `dira3d export torchscript` is."""
    import dira3d.deploy.bundle_network as bundle_network

    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    real_load = bundle_network.load_bundle_network
    monkeypatch.setattr(bundle_network, "load_bundle_network", lambda *a, **k: _OffInOnnx(real_load(*a, **k)))
    out = tmp_path / "exports" / "liver.onnx"
    out.parent.mkdir()
    out.write_bytes(b"the user's earlier export")
    args = ["onnx", "--bundle", str(bundle), "--out", str(out), "--override", "width=0.125",
            "--input-shape", "1", "1", "32", "32", "16", "--overwrite"]
    assert export_main(args) == 1
    assert out.read_bytes() == b"the user's earlier export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["liver.onnx"]  # no temporary file left
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False and report["max_abs_diff"]["onnxruntime"] == pytest.approx(0.5, abs=1e-3)
    assert "dira3d export: error: onnxruntime: max |logit difference|" in captured.err
    assert f"{out} was not written (the earlier export there is kept)" in captured.err
    # the library: AgreementError with the report, nothing at a new path, nothing left beside it
    torch.manual_seed(0)
    fresh = tmp_path / "fresh" / "seg.onnx"
    with pytest.raises(AgreementError, match="onnxruntime: max") as err:
        export_onnx(_OffInOnnx(Segmenter(3, 1, 1, width=0.125)), torch.rand(1, 1, 16, 16, 8), fresh)
    assert not err.value.report.ok and err.value.out == fresh and not list(fresh.parent.iterdir())
    # a graph that agrees: written, and its report returned by export_onnx_with_report
    from dira3d.deploy.export import export_onnx_with_report

    written, good = export_onnx_with_report(Segmenter(3, 1, 1, width=0.125), torch.rand(1, 1, 16, 16, 8), fresh)
    assert written == fresh and good.ok and set(good.max_abs_diff) == {"onnxruntime"}
    assert [p.name for p in fresh.parent.iterdir()] == ["seg.onnx"]


@pytest.mark.parametrize("what", ["torchscript", "onnx"])
def test_export_refuses_before_it_reads_the_check_scan(what, repo_root, tmp_path, capsys, monkeypatch):
    """`dira3d export torchscript --check-scan` read the scan (a whole CT) before refusing an --out that exists, or a
    missing checkpoint; and a --check-scan that does not exist was named only after the network was built (onnx).
    Every refusal now comes first; the scan is read last."""
    import dira3d.deploy.bundle_network as bundle_network
    import dira3d.deploy.export as export

    bundle = _bundle_copy(repo_root, "lits_liver_seg", tmp_path)
    scan = tmp_path / "ct.nrrd"
    scan.write_bytes(b"a large scan")
    reads, builds = [], []

    def no_read(*args, **kwargs):
        reads.append(args[0])
        raise AssertionError("the scan was read")

    def counted(load):
        def load_counted(*args, **kwargs):
            builds.append(args[0])
            return load(*args, **kwargs)
        return load_counted

    monkeypatch.setattr(export, "scan_patch", no_read)
    monkeypatch.setattr(export, "load_bundle_network", counted(export.load_bundle_network))
    monkeypatch.setattr(bundle_network, "load_bundle_network", counted(bundle_network.load_bundle_network))
    out = tmp_path / f"model.{'ts' if what == 'torchscript' else 'onnx'}"
    base = [what, "--bundle", str(bundle), "--override", "width=0.125", "--input-shape", "1", "1", "32", "32", "16"]
    out.write_bytes(b"earlier")
    assert export_main(base + ["--out", str(out), "--check-scan", str(scan)]) == 2
    assert "already exists (an earlier export)" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier" and not reads and not builds
    fresh = tmp_path / f"fresh_{out.name}"
    assert export_main(base + ["--out", str(fresh), "--check-scan", str(scan), "--checkpoint", str(tmp_path / "no.pt")]) == 2
    assert "no.pt" in capsys.readouterr().err and not reads and not fresh.exists()
    builds.clear()  # onnx: load_bundle_network is what refuses the missing checkpoint
    assert export_main(base + ["--out", str(fresh), "--check-scan", str(tmp_path / "missing.nrrd")]) == 2
    assert f"--check-scan {tmp_path / 'missing.nrrd'} does not exist" in capsys.readouterr().err
    assert not builds and not reads and not fresh.exists()
    with pytest.raises(AssertionError, match="the scan was read"):  # a run that goes ahead reads it, last
        export_main(base + ["--out", str(fresh), "--check-scan", str(scan)])
    assert reads == [str(scan)] and len(builds) == 1 and not fresh.exists()
    if what == "torchscript":  # the library: the check's input is example= or check_scan=, not both
        with pytest.raises(ValueError, match="example= or check_scan="):
            export_torchscript(bundle, fresh, overrides=TINY, example=torch.rand(1, 1, 32, 32, 16), check_scan=scan)


def test_an_interrupted_model_export_says_what_is_at_out(tmp_path):
    from dira3d.deploy.command import interrupted_message

    out = tmp_path / "m.onnx"
    # renamed into place only after the check: a file there is whole and checked (it was "not checked" for onnx)
    for what in ("torchscript", "onnx"):
        assert interrupted_message(what, out, [out]) == f"{out} was written (whole, and checked against PyTorch) before it stopped"
        assert interrupted_message(what, out, []) == f"nothing was written to {out}"


def test_export_onnx_of_a_2d_bundle_uses_its_roi_size(repo_root, tmp_path, capsys):
    # without --input-shape the example input is (1, in_channels, *roi_size), as for torchscript; it was a
    # fixed 3D (1, C, 64, 64, 32) that no 2D bundle accepts
    from monai.bundle import ConfigParser

    source = repo_root / "bundles" / "montgomery_lung_seg"
    bundle = tmp_path / "montgomery_lung_seg"
    shutil.copytree(source / "configs", bundle / "configs")
    tiny = ["backbone=resnet10", "decoder_channels=[16,16,8,8,8]", "roi_size=[64,64]"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for item in tiny:
        key, value = item.split("=", 1)
        parser[key] = json.loads(value) if value.startswith("[") else value
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), bundle / "models" / "model.pt")
    args = ["onnx", "--bundle", str(bundle), "--out", str(tmp_path / "m.onnx")]
    for item in tiny:
        args += ["--override", item]
    assert export_main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert '"ok": true' in out and '"output_shape": [\n    1,\n    1,\n    64,\n    64\n  ]' in out


def test_agreement_tolerance_grows_with_the_logits():
    # a fine-tuned LiTS network on a real CT: logits near -1,589, ONNX 7e-4 from PyTorch (float32 rounding)
    trained = AgreementReport(max_abs_diff={"onnxruntime": 7e-4}, scale=1589.0)
    assert trained.ok and trained.allowed == pytest.approx(0.1589) and trained.failures() == ""
    small = AgreementReport(max_abs_diff={"onnxruntime": 7e-4}, scale=0.5)  # logits below 1: the absolute 1e-4
    assert not small.ok and small.allowed == DEFAULT_TOLERANCE
    assert "0.0007 > 0.0001" in small.failures()
    assert json.loads(trained.to_json())["allowed"] == pytest.approx(0.1589)


def test_export_pretrained_of_a_checkpoint_without_the_part_leaves_no_folder(tmp_path):
    """The folder was created before the parts were read: a refused checkpoint left an empty --out."""
    checkpoint = {k: v for k, v in _pretraining_checkpoint().items() if k != "decoder"}
    with pytest.raises(ValueError, match="has no 'decoder' part"):
        export_pretrained(checkpoint, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()
    assert set(export_pretrained(checkpoint, tmp_path / "weights", parts=("encoder",))) == {
        "encoder.pt", "encoder.safetensors", "key_map.json"}
