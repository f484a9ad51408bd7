"""Reference checks closing the gaps of the third mutation audit of dira3d/engines/ (continuing
tests/test_engine_reference.py and tests/test_engine_reference_more.py): the scalars and images the
handlers log, the mode-dependent heads and losses of components.py, early stopping on rank 0's
validation under two gloo ranks, and the per-rank seeds, batch layout and epoch seeding of batches.py,
each against a value worked out by hand."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from conftest import leaving_the_group, run_two_gloo_ranks

from dira3d.engines import build_dis_head, build_dis_loss, build_predictor, scalar_output, side_by_side
from dira3d.engines.batches import STREAM_DATA, STREAM_STEP, BatchFeedMixin
from dira3d.engines.components import resolve_views
from dira3d.utils.seeding import stream_seed

# ---------------------------------------------------------------- handlers.py


def test_scalar_output_keeps_numbers_as_floats_and_drops_flags_text_and_images():
    output = {"loss": torch.tensor(2.5), "stage_index": 1, "lr_g": 0.25, "stopped": True, "stage": "dis",
              "images": torch.zeros(2, 2)}
    scalars = scalar_output(output)
    assert scalars == {"loss": 2.5, "stage_index": 1.0, "lr_g": 0.25}  # a bool is a flag, not a number to plot
    assert all(type(v) is float for v in scalars.values())


def test_side_by_side_shows_the_middle_z_slice_transposed_and_clipped_to_0_1():
    x, y = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")
    in_range = 0.1 * x + 0.01 * y  # (x, y) slice with values in [0, 1]
    volume = torch.stack([in_range + 5, in_range, in_range + 5], dim=-1)[None, None]  # z = 1 is the middle of 3
    image = side_by_side({"original": volume, "distorted": -volume, "restored": volume + 2})
    # x runs left-right: the slice is shown as (y, x); every panel 2 wide, the three panels side by side
    expected = torch.cat([in_range.T, torch.zeros(3, 2), torch.ones(3, 2)], dim=1)[None]
    assert image.shape == (1, 3, 6)
    torch.testing.assert_close(image, expected)
    # a 2D image is its own slice; a missing panel is left out
    flat = side_by_side({"original": in_range[None, None], "distorted": None, "restored": in_range[None, None]})
    torch.testing.assert_close(flat, torch.cat([in_range.T, in_range.T], dim=1)[None])


# ---------------------------------------------------------------- components.py


@pytest.mark.parametrize("num_classes", [-2, 0.5])
def test_visual_words_needs_a_positive_class_count(num_classes):
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer in dis_mode='visual_words'"):
        build_dis_head("visual_words", 3, 8, num_classes=num_classes, hidden=4)


def test_one_visual_word_class_warns_and_two_do_not():
    with pytest.warns(UserWarning, match="num_classes is 1 in dis_mode='visual_words'"):
        build_dis_head("visual_words", 3, 8, num_classes=1, hidden=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = build_dis_head("visual_words", 3, 8, num_classes=2, hidden=4)
    assert head.fc.out_features == 2


def _layers(head: nn.Module) -> list[str]:
    return [type(m).__name__ for m in head.mlp]


def test_projectors_have_batchnorm_as_each_method_prescribes():
    moco = build_dis_head("moco", 3, 8, hidden=6, proj_dim=4)  # MoCo-v2: Linear, ReLU, Linear
    assert _layers(moco) == ["Linear", "ReLU", "Linear"] and moco.mlp[0].bias is not None
    barlow = build_dis_head("barlow", 3, 8, hidden=6, proj_dim=4)  # BN after each hidden layer, none at the end
    assert _layers(barlow) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    simsiam = build_dis_head("simsiam", 3, 8, hidden=6, proj_dim=4)  # and a BN without affine at the end
    assert _layers(simsiam)[-2:] == ["Linear", "BatchNorm1d"] and not simsiam.mlp[-1].affine
    assert len(simsiam.mlp) == 8


def test_the_simsiam_predictor_bottleneck_is_a_quarter_of_the_projection():
    assert build_predictor("simsiam", 128).mlp[0].out_features == 32
    assert build_predictor("simsiam", 2).mlp[0].out_features == 1  # never below one feature
    assert build_predictor("simsiam", 128, hidden=7).mlp[0].out_features == 7
    assert build_predictor("moco", 128) is None


def test_the_moco_loss_uses_the_given_temperature():
    # q = k, one negative orthogonal to q: logits (1/t, 0), loss = log(1 + exp(-1/t))
    q = torch.tensor([[1.0, 0.0]])
    loss = build_dis_loss("moco", temperature=0.5)(q, q, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(loss, torch.log1p(torch.exp(torch.tensor(-2.0))))


def _anticorrelated():
    # both columns have mean 0-ish and biased variance 1; column 2 is minus column 1 after standardising
    return torch.tensor([[1.0, 0.0], [-1.0, 2.0]])


def test_the_barlow_loss_uses_the_given_off_diagonal_weight():
    z = _anticorrelated()
    # C = [[1, -1], [-1, 1]] / (1 + eps): on-diagonal ~0, off-diagonal sum of squares 2 -> loss = 2 * lambda
    loss = build_dis_loss("barlow", lambda_offdiag=0.25)(z, z)
    torch.testing.assert_close(loss, torch.tensor(0.5), rtol=1e-4, atol=1e-6)


def test_views_auto_are_none_for_visual_words_and_view_augment_for_instance_modes():
    from dira3d.transforms.views import ViewAugment

    assert resolve_views("auto", "visual_words", 3) is None
    assert isinstance(resolve_views("auto", "moco", 3), ViewAugment)
    views = lambda x, generator: (x, x)  # noqa: E731
    assert resolve_views(views, "visual_words", 3) is views


def _early_stop_engine(patience):
    """A bare engine with a warm-up stage (epochs 1-2) and a final stage, early stopping on the selection loss."""
    from ignite.engine import Engine

    from dira3d.engines.stages import StageSchedule
    from dira3d.engines.stopping import FinalStageEarlyStop

    engine = Engine(lambda e, b: None)
    engine.evaluator = object()
    engine.schedule = StageSchedule([{"name": "warm", "until_epoch": 2, "losses": ["res"]},
                                     {"name": "final", "losses": ["res", "dis"]}])
    engine.current_stage = lambda: engine.schedule.stage_at(engine.state.epoch, engine.state.iteration)
    engine.state.device = "cpu"
    stop = FinalStageEarlyStop(patience, "val_selection_loss")
    stop.attach(engine)
    return engine, stop


def _gloo_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with leaving_the_group():
        result = {}
        # Barlow Twins with one sample per rank: the loss needs the gathered batch of two
        z = _anticorrelated()[rank:rank + 1]
        try:
            result["barlow"] = float(build_dis_loss("barlow", lambda_offdiag=0.25, gather_distributed=True)(z, z))
        except ValueError as err:
            result["barlow"] = str(err)
        # early stopping, patience 1, with validation losses that differ per rank in the final stage's 2nd epoch:
        # rank 0 got worse (5 -> 6: stop), rank 1 better (5 -> 4: go on); every rank must follow rank 0
        engine, stop = _early_stop_engine(1)
        last = [6.0, 4.0][rank]
        for epoch, value in enumerate([9.0, 1.0, 5.0, last], start=1):
            engine.state.epoch = engine.state.iteration = engine.state.val_epoch = epoch
            engine.state.metrics = {"val_selection_loss": value}
            stop(engine)
        result["stop"] = (bool(engine.should_terminate), stop.stopped_epoch, stop.best_epoch,
                          engine.state.metrics["early_stop_wait"])
        torch.save(result, f"{out}.{rank}")


def test_two_gloo_ranks_gather_the_barlow_batch_and_stop_early_on_rank_0s_validation(tmp_path):
    for result in run_two_gloo_ranks(_gloo_worker, tmp_path):
        assert isinstance(result["barlow"], float), result["barlow"]
        assert result["barlow"] == pytest.approx(0.5, rel=1e-4)  # as one process with both samples
        assert result["stop"] == (True, 4, 3, 1.0)  # stopped after epoch 4, the best at epoch 3, one wait


# ---------------------------------------------------------------- batches.py


def test_a_2d_batch_takes_the_channels_last_layout_of_the_networks():
    from tests.test_engine import make_trainer

    trainer = make_trainer("visual_words", 2, channels_last=True)
    image = torch.rand(2, 3, 4, 4)  # 3 channels: channels-last and contiguous layouts differ
    batch = trainer._prepare({"image": image, "label": torch.tensor([0, 1])})
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert not batch["image"].is_contiguous() and torch.equal(batch["image"], image)
    assert batch["label"].is_contiguous()  # integer entries keep their layout


class _SeedRecorder:
    """A stand-in random transform: records the seeds MONAI's ``set_rnd`` gives it."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def set_random_state(self, seed=None, state=None):
        self.seeds.append(seed)
        return self


def _epoch_seeds(monkeypatch, rank: int, num_workers: int = 0, seed: int = 7, epoch: int = 3):
    import dira3d.engines.batches as batches

    monkeypatch.setattr(batches, "get_rank", lambda: rank)
    generator, transform = torch.Generator(), _SeedRecorder()
    loader = SimpleNamespace(generator=generator, num_workers=num_workers,
                             dataset=SimpleNamespace(transform=transform))
    BatchFeedMixin._seed_epoch(SimpleNamespace(seed=seed, data_loader=loader),
                               SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
    return generator.initial_seed(), transform.seeds


def test_each_epoch_seeds_the_loader_order_and_crops_per_rank(monkeypatch):
    order, crops = _epoch_seeds(monkeypatch, rank=0)
    # rank 0 draws what one process draws: the data stream of (seed, epoch)
    assert order == stream_seed(7, STREAM_DATA, 3) and crops == [order % 2**32]
    order1, crops1 = _epoch_seeds(monkeypatch, rank=1)
    assert order1 != order and crops1 == [order1 % 2**32]  # another rank: other order and crops
    # with loader workers MONAI seeds each worker's transforms from the loader generator: not from here
    order_w, crops_w = _epoch_seeds(monkeypatch, rank=0, num_workers=2)
    assert order_w == order and crops_w == []


def test_step_generators_draw_per_rank_and_rank_0_draws_as_one_process(monkeypatch):
    import dira3d.engines.batches as batches

    trainer = SimpleNamespace(seed=7, state=SimpleNamespace(device="cpu"))
    rank_0 = BatchFeedMixin.step_generator(trainer, 5).initial_seed()
    assert rank_0 == stream_seed(7, STREAM_STEP, 5)  # no process group: rank 0, the step stream of (seed, 5)
    monkeypatch.setattr(batches, "get_rank", lambda: 1)
    rank_1 = BatchFeedMixin.step_generator(trainer, 5).initial_seed()
    assert rank_1 != rank_0  # rank 1 draws other views and distortions at the same iteration
    assert BatchFeedMixin.step_generator(trainer, 6).initial_seed() != rank_1  # and others at the next one
