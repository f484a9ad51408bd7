"""More of dira3d.networks against independent references (gaps found by the second mutation audit).

Each test pins one behaviour that a mutation of the package left unnoticed by the other tests:

- the GEMM switches leave alone a non-pointwise kernel without padding, and a frozen weight takes torch's
  convolution (values against ``torch.nn.functional`` in float64);
- :func:`load_pretrained`: which wrapper is unwrapped, empty or non-tensor parts, the ``repeat`` policy only for
  a convolution with the same kernel, refused policies and empty parts, the summary and ``preview_keys`` text
  (hand-written expected strings);
- ``weights_fit``: same-size tensors of another shape, lists of another length, the one-line summary;
- the task networks: no dropout by default, no TracerWarning under ``torch.jit.trace``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dira3d.networks import Classifier, Segmenter, load_pretrained
from dira3d.networks.gemm_head import use_gemm_head
from dira3d.networks.gemm_wgrad import use_gemm_weight_grad
from dira3d.networks.pretrained import preview_keys
from dira3d.networks.weights_fit import mismatch_summary, same_value, settings_that_fit, state_dict_mismatch


# ---------------------------------------------------------------- layer switches


def test_gemm_head_leaves_alone_a_wider_kernel_even_without_padding():
    """Only 1x1 kernels are a matrix product over channels: a 3x3x3 (or 1x3) kernel with padding 0 and a few
    output channels stays the plain convolution and still equals ``F.conv*``."""
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Conv3d(4, 2, 3).double(), nn.Conv2d(4, 1, (1, 3)).double(), nn.Conv3d(4, 2, 1).double()])
    assert use_gemm_head(layers) == ["0.2"]
    x3, x2 = torch.rand(2, 4, 5, 4, 6, dtype=torch.float64), torch.rand(2, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layers[0](x3), F.conv3d(x3, layers[0].weight, layers[0].bias), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layers[1](x2), F.conv2d(x2, layers[1].weight, layers[1].bias), rtol=1e-12, atol=1e-12)


def test_a_frozen_gemm_weight_grad_layer_takes_the_plain_convolution_with_an_input_that_needs_grad():
    """A frozen first layer (fine-tuning with a frozen encoder, the input needing a gradient for saliency maps) takes
    torch's convolution: no weight gradient is ever computed, so the GEMM path has nothing to add."""
    torch.manual_seed(1)
    conv = nn.Conv3d(1, 3, 3, padding=1).double()
    use_gemm_weight_grad(conv)
    conv.weight.requires_grad_(False)
    x = torch.rand(2, 1, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    assert "Convolution" in type(out.grad_fn).__name__, type(out.grad_fn).__name__
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * upstream).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    (F.conv3d(ref_x, conv.weight, conv.bias, padding=1) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    assert conv.weight.grad is None


# ---------------------------------------------------------------- load_pretrained


def test_preview_keys_says_how_many_more_only_when_some_are_left_out():
    assert preview_keys(["a", "b"], limit=2) == "a, b"
    assert preview_keys(["a", "b", "c"], limit=2) == "a, b … and 1 more"
    twelve = [f"k{i}" for i in range(12)]
    assert preview_keys(twelve) == ", ".join(twelve)  # the default limit shows twelve
    assert preview_keys([*twelve, "k12"]) == ", ".join(twelve) + " … and 1 more"


def test_the_repeat_policy_never_adapts_a_linear_layer():
    """``in_channels_policy="repeat"`` adapts a *convolution* kernel ``(out, in, *kernel)``; a linear layer's
    ``(out, in)`` weight with other input features is a shape mismatch (and no "only the input channels" hint)."""
    classifier = Classifier(width=1 / 8)  # fc: 64 features -> 1 class
    before = classifier.fc.weight.detach().clone()
    ckpt = {"fc": {"weight": torch.ones(1, 32), "bias": torch.zeros(1)}}
    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \(1, 32\) vs network \(1, 64\)\n") as err:
        load_pretrained(classifier, ckpt, parts=("fc",), in_channels_policy="repeat")
    assert "only the input channels differ" not in str(err.value).split("\n")[1]
    assert torch.equal(classifier.fc.weight, before)


def test_top_level_parts_win_over_a_wrapper_that_holds_parts_too():
    """A checkpoint holding ``encoder`` itself is read as it is: a ``network`` / ``model`` / ``state_dict`` entry
    (a trainer's flat state_dict kept beside the parts) is unwrapped only when the parts are not at the top."""
    ones = {k: torch.ones_like(v) for k, v in Classifier(width=1 / 8).encoder.state_dict().items()}
    twos = {f"encoder.{k}": torch.full_like(v, 2.0) for k, v in ones.items()}
    for wrapper in ("network", "state_dict", "model"):
        classifier = Classifier(width=1 / 8)
        report = load_pretrained(classifier, {"encoder": ones, wrapper: twos})
        assert len(report.loaded) == len(ones) and report.unexpected == []
        assert all(torch.equal(v, torch.ones_like(v)) for v in classifier.encoder.state_dict().values())
        load_pretrained(classifier, {wrapper: twos})  # the wrapper alone is unwrapped
        assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in classifier.encoder.state_dict().values())


def test_the_wrapper_that_holds_the_parts_is_the_one_unwrapped():
    """``network`` comes first among the wrappers, but one without the parts (another model's weights) is passed
    over for the ``state_dict`` that holds them."""
    encoder = Classifier(width=1 / 8).encoder.state_dict()
    ckpt = {"network": {"adversary.conv.weight": torch.zeros(1, 1, 3, 3, 3)},
            "state_dict": {f"encoder.{k}": torch.full_like(v, 2.0) for k, v in encoder.items()}}
    classifier = Classifier(width=1 / 8)
    report = load_pretrained(classifier, ckpt)
    assert len(report.loaded) == len(encoder) and report.unexpected == []
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in classifier.encoder.state_dict().values())


def test_an_unknown_policy_and_no_parts_are_refused_before_anything_is_read(tmp_path):
    ckpt = {"encoder": Classifier(width=1 / 8).encoder.state_dict()}
    with pytest.raises(ValueError, match=r"in_channels_policy='average' is not supported; use one of \('error', 'repeat'\)"):
        load_pretrained(Classifier(width=1 / 8), ckpt, in_channels_policy="average")
    with pytest.raises(ValueError, match=r"parts is empty"):
        load_pretrained(Classifier(width=1 / 8), ckpt, parts=())
    with pytest.raises(ValueError, match=r"parts is empty"):  # checked before the (absent) file is opened
        load_pretrained(Classifier(width=1 / 8), tmp_path / "absent.pt", parts=[])


def test_the_summary_of_an_adapted_load_counts_nothing_as_not_loaded():
    """Hand-written expected summary: the adapted first convolution is loaded, not "of another shape"."""
    ckpt = {"encoder": Classifier(width=1 / 8).encoder.state_dict()}
    report = load_pretrained(Classifier(in_channels=3, width=1 / 8), ckpt, in_channels_policy="repeat")
    assert report.summary().split("\n") == [
        f"pretrained weights from <dict> into encoder: {len(ckpt['encoder'])} tensors loaded, 0 missing, 0 unexpected",
        "  adapted encoder.levels.0.conv1.conv.weight: input channels 1 -> 3 (kernel averaged over channels and repeated)",
    ]


def test_an_empty_part_is_not_offered_as_available():
    encoder = Classifier(width=1 / 8).encoder.state_dict()
    with pytest.raises(ValueError, match=r"no \(or an empty\) 'decoder' part; parts available: \['encoder'\]\."):
        load_pretrained(Segmenter(width=1 / 8), {"encoder": encoder, "decoder": {}}, parts=("encoder", "decoder"))


def test_a_part_with_entries_that_are_not_tensors_is_refused_by_name():
    encoder = dict(Classifier(width=1 / 8).encoder.state_dict())
    classifier = Classifier(width=1 / 8)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    with pytest.raises(ValueError, match=r"'encoder' is not a state_dict \(entries epoch are not tensors\)"):
        load_pretrained(classifier, {"encoder": {**encoder, "epoch": 3}})
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in before.items())


def test_the_repeat_policy_refuses_a_first_kernel_of_another_size_and_copies_nothing():
    """Same output channels, other input channels *and* another kernel size: not an input-channel difference."""
    ckpt = dict(Classifier(width=1 / 8).encoder.state_dict())
    ckpt["levels.0.conv1.conv.weight"] = torch.ones(4, 1, 5, 5, 5)
    classifier = Classifier(in_channels=2, width=1 / 8)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    with pytest.raises(ValueError, match=r"conv1\.conv\.weight: checkpoint \(4, 1, 5, 5, 5\) vs network \(4, 2, 3, 3, 3\)\n"):
        load_pretrained(classifier, {"encoder": ckpt}, in_channels_policy="repeat")
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in before.items())


# ---------------------------------------------------------------- weights_fit


def test_mismatch_summary_names_all_three_kinds_of_difference_with_their_counts():
    line = mismatch_summary(["a.weight", "a.bias"], ["extra"], {"fc.weight": ((1, 64), (2, 64))}, shown=1)
    assert line == ("2 missing key(s) (a.weight … and 1 more); 1 unexpected key(s) (extra); "
                    "1 shape mismatch(es) (fc.weight: (1, 64) vs network (2, 64))")
    assert mismatch_summary([], [], {}) == "no differences"


def test_a_tensor_of_the_same_size_in_another_shape_is_a_mismatch():
    state = dict(Classifier(width=1 / 8).state_dict())
    first = "encoder.levels.0.conv1.conv.weight"
    state[first] = state[first].reshape(2, 2, 3, 3, 3)  # 4 x 1 x 27 values either way
    missing, unexpected, mismatched = state_dict_mismatch(state, Classifier(width=1 / 8))
    assert missing == [] and unexpected == [] and mismatched == {first: ((2, 2, 3, 3, 3), (4, 1, 3, 3, 3))}


def test_lists_of_another_length_are_other_settings():
    assert not same_value([16, 8], [16, 8, 8]) and not same_value((16, 8, 8), [16, 8])
    assert same_value([16, 8.0], (16, 8))
    resnet = {"encoder.conv1.weight": torch.zeros(64, 1, 7, 7),
              **{f"decoder.blocks.{i}.convs.conv_1.conv.weight": torch.zeros(c, c, 3, 3) for i, c in enumerate((16, 8))}}
    assert settings_that_fit(resnet, {"decoder_channels": [16, 8, 8]}) == {"decoder_channels": [16, 8]}


# ---------------------------------------------------------------- task networks


def test_the_default_classifier_drops_nothing_in_training():
    """Default ``dropout=0.0``: in training mode two passes over one batch give the same logits, the linear layer
    applied to the average-pooled bottleneck (float64)."""
    torch.manual_seed(4)
    classifier = Classifier(width=1 / 8).double().train()
    x = torch.rand(2, 1, 16, 16, 16, dtype=torch.float64)
    first, second = classifier(x), classifier(x)
    bottleneck, _ = classifier.encoder(x)
    reference = F.linear(bottleneck.mean(dim=(2, 3, 4)), classifier.fc.weight, classifier.fc.bias)
    torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=1e-12)


def test_tracing_the_task_networks_gives_no_tracer_warning():
    """The shape checks are skipped under ``torch.jit.trace`` (they would be baked in as constants, with a
    TracerWarning per check); the traced network still equals the eager one."""
    x = torch.rand(1, 1, 16, 16, 16)
    for network in (Classifier(width=1 / 8).eval(), Segmenter(width=1 / 8).eval()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = torch.jit.trace(network, x)
        assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], \
            [str(w.message) for w in caught]
        with torch.no_grad():
            torch.testing.assert_close(traced(x), network(x), rtol=1e-4, atol=1e-4)
