"""bf16 training on a CPU whose oneDNN gets bf16 3D weight gradients wrong (dira3d.engines.cpu_bf16).

On an AMD EPYC with avx512_bf16 (torch 2.13.0+cpu, oneDNN 3.12.0) the weight gradient of a 3D convolution of an
input 2 voxels deep came from unwritten memory under bf16 autocast. The tiny model's deepest level (16x16x8
patches -> 2x2x1) is such an input: its bf16 losses differed from run to run and went NaN. On a CPU without the
fault the same tests check that bf16 steps are deterministic and close to float32 all the same.
"""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Events

from dira3d.engines import cpu_bf16
from dira3d.engines.cpu_bf16 import onednn_bf16_conv3d_grad_is_wrong, onednn_off
from tests.test_engine import make_trainer


def _losses(amp: str) -> list[float]:
    trainer = make_trainer("visual_words", stages=[{"name": "dir", "losses": ["dis", "res", "adv"]}], max_epochs=2,
                           volumes=8, amp=amp, channels_last=True)
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    return losses


def test_bf16_steps_on_the_cpu_are_deterministic_and_close_to_float32():
    """Two bf16 runs of the same seed give the same losses, finite and within bf16's rounding of float32's
    (with the fault: different runs, NaN or far off from the second step on)."""
    torch.set_num_threads(1)
    first, second, fp32 = _losses("bf16"), _losses("bf16"), _losses("none")
    assert len(first) == len(fp32) >= 4
    assert first == second
    assert all(torch.isfinite(torch.tensor(first)))
    assert first == pytest.approx(fp32, rel=0.03)


def test_the_check_finds_the_fault_where_onednn_has_it():
    """The probe agrees with a direct look at the shapes the tiny model meets (16+ channels, 2 deep), and
    oneDNN off gives bf16's rounding of the float32 gradient wherever the probe ran."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.rand(2, 32, 2, 2, 1, generator=gen), torch.randn(64, 32, 3, 3, 3, generator=gen) * 0.1
    reference = cpu_bf16._weight_grad(x, w, bf16=False)
    scale = float(reference.abs().max())
    with torch.backends.mkldnn.flags(enabled=True, deterministic=None, allow_tf32=None, fp32_precision=None):
        errors = [float((cpu_bf16._weight_grad(x, w, bf16=True) - reference).abs().max()) / scale for _ in range(3)]
    wrong = any(not e < 0.05 for e in errors)  # nan counts as wrong
    if wrong:  # the probe must see it (it may also see it where this shape happened to come out right)
        assert onednn_bf16_conv3d_grad_is_wrong(), errors
    with onednn_off():
        right = cpu_bf16._weight_grad(x, w, bf16=True)
    assert float((right - reference).abs().max()) < 0.02 * scale
    assert torch.backends.mkldnn.enabled  # the context put the switch back


@pytest.mark.parametrize("wrong", [True, False])
def test_the_trainer_turns_onednn_off_only_for_bf16_where_the_check_fails(monkeypatch, caplog, wrong):
    from dira3d.engines import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "onednn_bf16_conv3d_grad_is_wrong", lambda: wrong)
    seen = []
    monkeypatch.setattr(torch.backends.mkldnn, "flags", lambda **kw: (seen.append(kw), _null())[1])
    with caplog.at_level(logging.WARNING):
        bf16 = make_trainer("visual_words", amp="bf16")
    assert bf16.onednn_off is wrong
    assert ("oneDNN off" in caplog.text) is wrong
    bf16.run()
    assert (len(seen) == len(bf16.state.dataloader)) is wrong  # once per iteration, when on
    assert all(kw["enabled"] is False for kw in seen)
    assert make_trainer("visual_words", amp="none").onednn_off is False  # float32: never


def _null():
    import contextlib

    return contextlib.nullcontext()


def test_the_check_says_no_fault_where_onednn_is_not_available(monkeypatch):
    """A PyTorch built without oneDNN cannot have its fault: the trainer keeps its steps as they are."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    onednn_bf16_conv3d_grad_is_wrong.cache_clear()
    try:
        assert onednn_bf16_conv3d_grad_is_wrong() is False
    finally:
        onednn_bf16_conv3d_grad_is_wrong.cache_clear()  # the next caller checks this CPU again
