"""dira3d.deploy against independent references (a mutation audit of the deploy package).

- the agreement check: its number is max |y_runtime - y_torch| over every logit, computed here by hand from
  a TorchScript file made in the test (one wrong voxel, of either sign), judged against
  ``tolerance * max(1, max |y_torch|)`` (negative logits included), with the PyTorch side in eval mode;
- ``tolerance=`` reaches the check of ``export_onnx`` and of ``dira3d export torchscript --tolerance`` (0 included:
  it was read as "not given"; a negative one is a usage error);
- ``load_into``: a hand-made state_dict, a prefix mapping (longest prefix first, ``None`` drops), and
  exactly which keys are loaded / missing / mismatched, strict on a missing key alone;
- ``load_bundle_network``: weights under ``"model"`` / ``"state_dict"``, a key the network lacks;
- the MONAI Label checks: bundle overrides precedence, a shared override another bundle defines, the first
  of two bundles of one name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dira3d.deploy import (
    AgreementError,
    AgreementReport,
    check_agreement,
    export_onnx,
    load_bundle_network,
    load_into,
    read_weights,
)
from dira3d.deploy.command import main as export_main
from dira3d.deploy.monailabel import check_served_bundle, find_bundles, parse_overrides
from dira3d.utils import atomic_save

pytest.importorskip("onnxruntime", reason="ONNX checks need the [deploy] extra (onnx, onnxruntime)")


class _Net(nn.Module):
    """A tiny 3D network with BatchNorm (non-trivial running statistics) and a logit offset."""

    def __init__(self, offset: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.norm = nn.BatchNorm3d(2)
        self.head = nn.Conv3d(2, 1, 1)
        with torch.no_grad():
            self.norm.running_mean.copy_(torch.tensor([0.3, -0.2]))
            self.norm.running_var.copy_(torch.tensor([0.5, 2.0]))
            self.head.bias.add_(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))


class _OneVoxelOff(nn.Module):
    """``network`` with ``delta`` added at one voxel: a graph wrong in one place only."""

    def __init__(self, network: nn.Module, delta: float, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.network = network
        mask = torch.zeros(shape)
        mask[0, 0, 3, 2, 1] = delta
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) + self.mask


def _scripted(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(module.eval(), example), str(path))
    return path


def _hand_diff(path: Path, network: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max |ts - torch|, max |torch|) computed here, with both in eval mode."""
    with torch.no_grad():
        ts = torch.jit.load(str(path))(x)
        ref = network.eval()(x)
    return float((ts - ref).abs().max()), float(ref.abs().max())


@pytest.mark.parametrize("delta", [0.01, -0.01])
def test_one_wrong_voxel_of_either_sign_is_the_max_abs_difference(delta, tmp_path):
    network, x = _Net(), torch.rand(1, 1, 8, 8, 4, generator=torch.Generator().manual_seed(1))
    path = _scripted(_OneVoxelOff(_Net(), delta, (1, 1, 8, 8, 4)), x, tmp_path / "off.ts")
    expected, scale = _hand_diff(path, network, x)
    assert expected == pytest.approx(abs(delta), rel=1e-3) and scale < 10
    report = check_agreement(network, x, torchscript=path)
    # the max over voxels (a mean would be 0.01 / 256), of the absolute value (a signed max of -0.01 is 0)
    assert report.max_abs_diff["torchscript"] == pytest.approx(expected, rel=1e-6)
    assert report.scale == pytest.approx(scale, rel=1e-6) and not report.ok


def test_scale_is_the_largest_logit_magnitude_when_logits_are_negative(tmp_path):
    """A trained segmenter's background logits are large and negative: the scale is max |y|, not max y."""
    network, x = _Net(offset=-1000.0), torch.rand(1, 1, 8, 8, 4, generator=torch.Generator().manual_seed(2))
    path = _scripted(_OneVoxelOff(_Net(offset=-1000.0), 0.05, (1, 1, 8, 8, 4)), x, tmp_path / "neg.ts")
    diff, scale = _hand_diff(path, network, x)
    assert 990 < scale < 1010 and diff == pytest.approx(0.05, rel=1e-2)
    report = check_agreement(network, x, torchscript=path)
    assert report.scale == pytest.approx(scale, rel=1e-6)
    assert report.allowed == pytest.approx(1e-4 * scale, rel=1e-6) and report.ok  # 0.05 <= ~0.1


def test_a_difference_equal_to_the_allowed_one_agrees():
    """The documented rule is max |diff| <= tolerance * max(1, scale)."""
    assert AgreementReport(max_abs_diff={"onnxruntime": 1.0}, tolerance=0.5, scale=2.0).ok
    assert not AgreementReport(max_abs_diff={"onnxruntime": 1.0 + 1e-6}, tolerance=0.5, scale=2.0).ok
    mixed = AgreementReport(max_abs_diff={"torchscript": 0.0, "onnxruntime": 1.0}, tolerance=1e-4, scale=0.0)
    assert not mixed.ok and mixed.failures().startswith("onnxruntime:")  # every runtime must agree


def test_the_reference_runs_in_eval_mode_with_the_running_statistics(tmp_path):
    x = torch.rand(1, 1, 8, 8, 4, generator=torch.Generator().manual_seed(3))
    path = _scripted(_Net(), x, tmp_path / "net.ts")  # traced in eval mode
    with torch.no_grad():  # in train mode the batch statistics give other logits: the check must not use them
        assert float((_Net().train()(x) - torch.jit.load(str(path))(x)).abs().max()) > 1e-2
    network = _Net().train()  # as a user may pass it
    report = check_agreement(network, x, torchscript=path)
    assert report.ok and report.max_abs_diff["torchscript"] < 1e-5 and not network.training


def test_an_exported_graph_of_another_shape_is_refused(tmp_path):
    class Cropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = _Net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x)[..., :-1]

    x = torch.rand(1, 1, 8, 8, 4)
    path = _scripted(Cropped(), x, tmp_path / "crop.ts")
    with pytest.raises(ValueError, match=r"torchscript output shape \(1, 1, 8, 8, 3\) differs from PyTorch \(1, 1, 8, 8, 4\)"):
        check_agreement(_Net(), x, torchscript=path)


class _PlusInOnnx(nn.Module):
    def __init__(self, network: nn.Module, delta: float) -> None:
        super().__init__()
        self.network, self.delta = network, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network(x)
        return y + self.delta if torch.onnx.is_in_onnx_export() else y


def test_export_onnx_judges_with_the_tolerance_it_is_given(tmp_path):
    x = torch.rand(1, 1, 8, 8, 4)
    with pytest.raises(AgreementError):
        export_onnx(_PlusInOnnx(_Net(), 0.5), x, tmp_path / "strict.onnx")
    out = export_onnx(_PlusInOnnx(_Net(), 0.5), x, tmp_path / "loose.onnx", tolerance=1.0)  # 0.5 <= 1.0 * max(1, s)
    assert out.is_file()


def _bundle(repo_root: Path, dest: Path, state_of=lambda sd: sd) -> tuple[Path, nn.Module]:
    """bundles/lits_liver_seg's configs with tiny weights saved as ``state_of(state_dict)``."""
    source = repo_root / "bundles" / "lits_liver_seg"
    if not (source / "configs" / "inference.json").is_file():
        pytest.skip("bundle lits_liver_seg is not in this checkout")
    bundle = dest / "lits_liver_seg"
    shutil.copytree(source / "configs", bundle / "configs")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["width"] = 0.125
    torch.manual_seed(5)
    network = parser.get_parsed_content("network_def", instantiate=True)
    atomic_save(state_of(network.state_dict()), bundle / "models" / "model.pt")
    return bundle, network


def test_export_torchscript_command_judges_with_its_tolerance_zero_included(repo_root, tmp_path, capsys, monkeypatch):
    """``--tolerance`` reaches the check (a graph 0.5 away is written with ``--tolerance 1``), and ``--tolerance 0``
    (the graph must match exactly) is taken as given: it was read as "not given" (``args.tolerance or 1e-4``), so a
    graph 1e-5 away passed under the default. A negative tolerance is a usage error."""
    import dira3d.deploy.export as export

    bundle, _ = _bundle(repo_root, tmp_path)
    real_load = export.load_bundle_network
    shift = {"delta": 0.5}

    class Plus(nn.Module):  # the reference side moves by exactly ``delta`` everywhere
        def __init__(self, network: nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x) + shift["delta"]

    monkeypatch.setattr(export, "load_bundle_network", lambda *a, **k: Plus(real_load(*a, **k)))
    args = ["torchscript", "--bundle", str(bundle), "--override", "width=0.125", "--input-shape", "1", "1", "16", "16", "8"]
    assert export_main([*args, "--out", str(tmp_path / "loose.ts"), "--tolerance", "1.0"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["tolerance"] == 1.0 and report["max_abs_diff"]["torchscript"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "loose.ts").is_file()
    shift["delta"] = 1e-5
    out = tmp_path / "exact.ts"
    assert export_main([*args, "--out", str(out), "--tolerance", "0"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["tolerance"] == 0.0 and report["ok"] is False and not out.exists()
    with pytest.raises(SystemExit):  # a negative tolerance would refuse every graph: refused as a usage error
        export_main([*args, "--out", str(out), "--tolerance=-0.001"])
    err = capsys.readouterr().err
    assert "argument --tolerance" in err and "is not a number >= 0" in err, err


def _weights(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


class _Users(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.ModuleList([nn.Linear(3, 2)])
        self.second = nn.Linear(2, 4)
        self.third = nn.Linear(2, 2)


def test_load_into_maps_longest_prefix_first_and_reports_exact_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"enc.0.weight": torch.rand(2, 3, generator=g), "enc.0.bias": torch.rand(2, generator=g),
             "enc.1.weight": torch.rand(4, 2, generator=g), "drop.weight": torch.rand(5, generator=g),
             "third.weight": torch.rand(3, 3, generator=g)}
    path = _weights(tmp_path / "part.pt", state)
    network = _Users()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_into(network, path, mapping={"enc.": "first.", "enc.1.": "second.", "drop.": None})
    assert sorted(report.loaded) == ["first.0.bias", "first.0.weight", "second.weight"]
    assert report.unexpected == []  # "drop." dropped, not reported as None or under its own name
    assert report.mismatched == {"third.weight": ((3, 3), (2, 2))}
    assert sorted(report.missing) == ["second.bias", "third.bias"]  # a mismatched key is not also "missing"
    after = network.state_dict()
    assert torch.equal(after["first.0.weight"], state["enc.0.weight"]) and torch.equal(after["second.weight"], state["enc.1.weight"])
    assert torch.equal(after["third.weight"], before["third.weight"]) and torch.equal(after["second.bias"], before["second.bias"])


def test_load_into_strict_refuses_a_missing_key_alone(tmp_path):
    path = _weights(tmp_path / "part.pt", {"second.weight": torch.ones(4, 2)})
    network = _Users()
    with pytest.raises(ValueError, match=r"missing \['first.0.weight'"):
        load_into(network, path, strict=True)
    assert not torch.equal(network.second.weight, torch.ones(4, 2))  # nothing copied when refused
    report = load_into(network, path)  # non-strict: the one key that fits is copied
    assert report.loaded == ["second.weight"] and torch.equal(network.second.weight, torch.ones(4, 2))


def test_load_into_refuses_a_mapping_that_sends_two_keys_to_one_and_copies_nothing(tmp_path):
    """{"a.": "second.", "b.": "second."} put both files' tensors into second.weight: both were reported loaded and
    the last one won without a word."""
    path = _weights(tmp_path / "part.pt", {"a.weight": torch.ones(4, 2), "b.weight": torch.zeros(4, 2)})
    network = _Users()
    before = network.second.weight.detach().clone()
    with pytest.raises(ValueError, match=r"renames both 'a.weight' and 'b.weight' .* to 'second.weight'"):
        load_into(network, path, mapping={"a.": "second.", "b.": "second."})
    assert torch.equal(network.second.weight, before)


@pytest.mark.parametrize("wrapper", ["model", "network", "state_dict"])
def test_load_bundle_network_reads_weights_under_a_wrapper_key(wrapper, repo_root, tmp_path):
    bundle, reference = _bundle(repo_root, tmp_path, lambda sd: {wrapper: sd, "epoch": 3})
    network = load_bundle_network(bundle, overrides={"width": 0.125})
    assert not network.training
    for key, value in reference.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


def test_load_bundle_network_refuses_a_key_the_network_lacks(repo_root, tmp_path):
    bundle, _ = _bundle(repo_root, tmp_path, lambda sd: {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit the network"):
        load_bundle_network(bundle, overrides={"width": 0.125})


def test_bundle_overrides_of_one_bundle_win_over_shared_ones():
    conf = {"bundle_overrides": json.dumps({"width": 0.25, "roi_size": [64, 64, 32], "lits_liver_seg": {"width": 0.125}})}
    assert parse_overrides(conf, "lits_liver_seg") == {"width": 0.125, "roi_size": [64, 64, 32]}
    assert parse_overrides(conf, "luna16_nodule_fpr") == {"width": 0.25, "roi_size": [64, 64, 32]}


def test_a_shared_override_another_bundle_defines_is_not_applied_to_this_one(repo_root, tmp_path):
    """``{"backbone": ...}`` is for the 2D bundles: a 3D bundle served beside them ignores it, and is still checked."""
    bundle, _ = _bundle(repo_root, tmp_path)
    conf = {"bundle_overrides": json.dumps({"width": 0.125, "backbone": "resnet10"})}
    check_served_bundle("lits_liver_seg", bundle, parse_overrides(conf, "lits_liver_seg"), conf)
    with pytest.raises(ValueError, match="lits_liver_seg"):
        check_served_bundle("lits_liver_seg", bundle, {"backbone": "resnet10"}, {})  # default width: does not fit


def test_find_bundles_keeps_the_first_of_two_bundles_of_one_name(repo_root, tmp_path):
    first, _ = _bundle(repo_root, tmp_path / "a")
    second, _ = _bundle(repo_root, tmp_path / "b")
    assert find_bundles([tmp_path / "a", tmp_path / "b"]) == {"lits_liver_seg": first.resolve()}
    assert find_bundles(f"{tmp_path / 'b'},{tmp_path / 'a'}") == {"lits_liver_seg": second.resolve()}


def test_onnx_output_axes_are_dynamic_too(tmp_path):
    """The graph's declared output shape: batch and spatial axes named (a consumer reads them from the graph)."""
    import onnxruntime

    x = torch.rand(1, 1, 8, 8, 4)
    out = export_onnx(_Net(), x, tmp_path / "net.onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 1, "dim0", "dim1", "dim2"]
    assert session.get_outputs()[0].shape == ["batch", 1, "dim0", "dim1", "dim2"]
    other = torch.rand(2, 1, 16, 8, 8)
    with torch.no_grad():
        expected = _Net().eval()(other)
    result = torch.from_numpy(session.run(None, {"image": other.numpy()})[0])
    assert result.shape == (2, 1, 16, 8, 8) and torch.allclose(result, expected, atol=1e-5)


def test_read_weights_refuses_a_checkpoint_that_is_not_a_flat_state_dict(tmp_path):
    path = _weights(tmp_path / "nested.pt", {"levels.0.conv1.conv.weight": torch.zeros(1), "meta": {"width": 0.125}})
    with pytest.raises(ValueError, match=r"nested.pt is not a flat state_dict \(entries \['meta'\]"):
        read_weights(path)


def test_key_map_entries_of_a_hand_made_checkpoint(tmp_path):
    from dira3d.deploy import export_pretrained

    weight = torch.arange(8 * 1 * 27, dtype=torch.float32).reshape(8, 1, 3, 3, 3)
    checkpoint = {"encoder": {"levels.0.conv1.conv.weight": weight, "levels.0.conv1.adn.N.running_mean": torch.zeros(8)},
                  "meta": {"spatial_dims": 3, "width": 0.25, "note": object()}}
    written = export_pretrained(checkpoint, tmp_path / "w", parts=("encoder",))
    key_map = json.loads(written["key_map.json"].read_text())
    entry = key_map["parts"]["encoder"]["levels.0.conv1.conv.weight"]
    assert entry == {"shape": [8, 1, 3, 3, 3], "dtype": "float32", "full_name": "encoder.levels.0.conv1.conv.weight",
                     "meaning": "encoder level 0 (resolution 1/2^0), convolution 1 (3x3x3): weight"}
    assert key_map["meta"] == {"spatial_dims": 3, "width": 0.25}  # what JSON cannot hold is left out
    assert torch.equal(read_weights(written["encoder.pt"])["levels.0.conv1.conv.weight"], weight)
    assert torch.equal(read_weights(written["encoder.safetensors"])["levels.0.conv1.conv.weight"], weight)


def test_example_shape_is_batch_one_in_channels_then_roi_size(repo_root, tmp_path):
    from dira3d.deploy.export import bundle_example_shape

    bundle, _ = _bundle(repo_root, tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert bundle_example_shape(bundle) == [1, config["in_channels"], *config["roi_size"]]
    assert bundle_example_shape(bundle, overrides={"in_channels": 3, "roi_size": [32, 16, 8]}) == [1, 3, 32, 16, 8]
    assert bundle_example_shape(bundle, input_shape=[2, 3, 8, 8, 8], overrides={"in_channels": 3}) == [2, 3, 8, 8, 8]
    # a given shape must fit the network too: its channels, sizes that are multiples of its downsampling (8)
    with pytest.raises(ValueError, match=r"2 1 8 8 8: 1 channels, but the bundle's network takes 3 \(in_channels\)"):
        bundle_example_shape(bundle, input_shape=[2, 1, 8, 8, 8], overrides={"in_channels": 3})
    with pytest.raises(ValueError, match="size 12 is not a multiple of 8"):
        bundle_example_shape(bundle, input_shape=[1, 1, 8, 12, 8])


def test_scan_patch_is_the_ras_window_of_the_scan(tmp_path):
    """An LPS scan (SimpleITK's identity direction): the patch is the volume with x and y reversed, windowed."""
    import numpy as np
    import SimpleITK as sitk

    from dira3d.deploy import scan_patch

    zyx = np.arange(4 * 6 * 8, dtype=np.int16).reshape(4, 6, 8) * 10 - 1100  # -1100 .. 810 HU
    sitk.WriteImage(sitk.GetImageFromArray(zyx), str(tmp_path / "scan.nrrd"))
    xyz = np.transpose(zyx, (2, 1, 0)).astype(np.float32)[::-1, ::-1, :]  # LPS -> RAS: x and y reversed
    expected = (np.clip(xyz, -1000, 1000) + 1000) / 2000
    patch = scan_patch(tmp_path / "scan.nrrd", (8, 6, 4))
    assert patch.shape == (1, 1, 8, 6, 4) and np.allclose(patch[0, 0].numpy(), expected)
    centre = scan_patch(tmp_path / "scan.nrrd", (4, 2, 2))  # the central crop: starts at size // 2 - crop // 2
    assert np.allclose(centre[0, 0].numpy(), expected[2:6, 2:4, 1:3])
