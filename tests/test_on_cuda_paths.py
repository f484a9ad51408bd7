"""Paths whose behaviour differs when tensors live on a GPU, which a CPU-only machine cannot exercise: the metrics on a
model's outputs left on the device, and the export's agreement check of a network on it. Every test here needs CUDA
(skipped without it); the next GPU lease runs them (``benchmarks/gpu/run.sh verify``). Imports are torch, pytest and
dira3d only: the GPU machines have no scikit-learn, onnx or onnxruntime."""

from __future__ import annotations

import pytest
import torch

from dira3d.deploy.agreement import check_agreement
from dira3d.evaluation.metrics import foreground_dice, foreground_iou, mean_auc, per_class_auc, roc_auc
from dira3d.networks import Segmenter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_metrics_on_cuda_tensors_equal_the_host_values():
    """roc_auc read its inputs with np.asarray, which refuses a CUDA tensor (TypeError: can't convert cuda:0 device
    type tensor to numpy): every metric must take a model's outputs where they are and give the host's value."""
    gen = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(40, 3, generator=gen), (torch.rand(40, 3, generator=gen) > 0.5).float()
    pred, truth = ((torch.rand(2, 1, 8, 8, 4, generator=gen) > 0.5).float() for _ in range(2))
    on_gpu = [t.cuda() for t in (scores, labels, pred, truth)]
    assert roc_auc(on_gpu[0][:, 0], on_gpu[1][:, 0]) == roc_auc(scores[:, 0].numpy(), labels[:, 0].numpy())
    assert per_class_auc(on_gpu[0], on_gpu[1]) == per_class_auc(scores, labels)
    assert mean_auc(on_gpu[0], on_gpu[1]) == mean_auc(scores, labels)
    assert foreground_dice(on_gpu[2], on_gpu[3]) == pytest.approx(foreground_dice(pred, truth))
    assert foreground_iou(on_gpu[2], on_gpu[3]) == pytest.approx(foreground_iou(pred, truth))


def test_agreement_check_of_a_network_on_cuda_runs_on_the_host(tmp_path):
    """check_agreement ran the reference where the network was and fed the host's TorchScript graph the same input: a
    network on a GPU failed (a CPU graph fed a CUDA input; its ONNX check: a CUDA tensor to numpy, a TypeError), and its
    TF32 convolutions may be off the host's sums by more than the tolerance. The reference is now computed from a host
    copy: the check passes, and a graph that differs is still caught."""
    torch.manual_seed(0)
    network = Segmenter(3, 1, 1, width=0.125).eval()
    example = torch.rand(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(network, example), str(tmp_path / "seg.ts"))
    network.cuda()
    report = check_agreement(network, example.cuda(), torchscript=tmp_path / "seg.ts")
    assert report.ok and report.max_abs_diff["torchscript"] <= 1e-5, report.to_json()
    assert next(network.parameters()).is_cuda  # the caller's network stays where it was
    with torch.no_grad():
        network.decoder.levels[-1].convs.conv2.conv.bias.add_(0.5)  # the PyTorch side changes after the export
    assert not check_agreement(network, example.cuda(), torchscript=tmp_path / "seg.ts").ok
