"""The optimised training paths compute what the plain path computes, and the step does not sync.

bf16 autocast + channels-last + multi-tensor Adam against fp32 on the same batch and seed (bf16
tolerance); channels-last alone (fp32 tolerance); fused/foreach Adam against the per-tensor loop;
no ``.item()`` / ``float()`` / ``bool()`` on tensors from the engine's own code in a step; the views
T(·) of the instance modes. Tiny networks (width 1/8) on 16×16×8 patches.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from dira3d.engines import DiRATrainer, RandPatchPaird, build_dis_head, build_predictor, with_image_labels
from dira3d.engines.performance import build_adam, compile_modules, count_flops, format_table
from dira3d.networks import Adversary, UNet
from dira3d.transforms import ViewAugment
from dira3d.transforms.compositions import build_distortion

PATCH = (16, 16, 8)
ALL_TERMS = [{"name": "dira", "losses": ["dis", "res", "adv"]}]
ENGINES_DIR = str(Path(__import__("dira3d.engines").engines.__file__).parent)


def volumes(count: int = 4, shape=(24, 24, 12)) -> list[dict]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        v = gaussian_filter(rng.random(shape), 2.0)
        items.append({"image": ((v - v.min()) / (v.max() - v.min()))[None].astype(np.float32)})
    return with_image_labels(items)


def build(mode="visual_words", pair="instances", amp="none", channels_last=False, fused=False, views="auto",
          compile=False, batch=4, stages=ALL_TERMS, max_epochs=1, lr=1e-3, distortion="models_genesis", **options):
    """A tiny trainer whose initial weights depend only on the seed (identical across settings)."""
    torch.manual_seed(0)
    loader = DataLoader(Dataset(volumes(), RandPatchPaird("image", PATCH, pair=pair)), batch_size=batch,
                        shuffle=True, num_workers=0, generator=torch.Generator())
    net = UNet(3, width=1 / 8)
    head = build_dis_head(mode, 3, net.bottleneck_channels, num_classes=4, hidden=16, proj_dim=8)
    predictor = build_predictor(mode, 8)
    adversary = Adversary(3, 1, channels=4, num_layers=3)
    opt_g = build_adam([net, head, predictor], lr, "cpu", fused=fused)
    opt_d = build_adam([adversary], lr, "cpu", fused=fused)
    return DiRATrainer("cpu", max_epochs, loader, net, opt_g, head, adversary, opt_d, dis_mode=mode, predictor=predictor,
                       stages=stages, distortion=distortion if callable(distortion) else build_distortion(distortion),
                       views=views, amp=amp, channels_last=channels_last, compile=compile, queue_size=16, **options)


def fixed_batch(pair="instances", size: int = 4) -> dict:
    torch.manual_seed(1)
    x1, x2 = torch.rand(size, 1, *PATCH), torch.rand(size, 1, *PATCH)
    batch = {"image": x1, "label": torch.arange(size)}
    if pair == "instances":
        batch["image2"] = x2
    return batch


def step(trainer: DiRATrainer, batch: dict, iteration: int) -> dict:
    """One real ``_iteration`` outside ``run()`` (epoch 1, the given iteration)."""
    trainer.state.epoch, trainer.state.iteration = 1, iteration
    return trainer._iteration(trainer, batch)


def losses(output: dict) -> dict[str, float]:
    return {k: float(v) for k, v in output.items() if k.startswith("loss") or k.startswith("d_")}


def test_bf16_channels_last_foreach_path_matches_fp32_losses():
    # a small lr: Adam's first step moves every weight by ~lr whatever the gradient's size, so with
    # 1e-3 bf16 rounding of near-zero gradients (sign flips) would be amplified into the 2nd step
    plain, fast = build(lr=1e-5), build(amp="bf16", channels_last=True, fused=True, lr=1e-5)
    assert fast.optimizer.defaults["foreach"] is True and plain.optimizer.defaults.get("foreach") is None
    batch = fixed_batch(size=2)  # bf16 convolutions are emulated (slow) on CPUs without bf16 units
    for iteration in (1, 2):  # the second step also checks that the optimiser updates agree
        out = step(fast, batch, iteration)
        a, b = losses(step(plain, batch, iteration)), losses(out)
        assert set(a) == set(b) >= {"loss", "loss_dis", "loss_res", "loss_adv", "loss_d", "d_real", "d_fake"}
        for key in a:  # bf16 keeps 8 mantissa bits: ~0.4 % per op, a few % through the network
            assert b[key] == pytest.approx(a[key], rel=4e-2, abs=2e-3), (iteration, key, a[key], b[key])
    assert out["loss_res"].dtype == torch.float32  # reported losses stay fp32 under autocast


def test_channels_last_gives_fp32_identical_outputs_and_losses():
    net, adversary = UNet(3, width=1 / 8).eval(), Adversary(3, 1, channels=4, num_layers=3).eval()
    x = torch.rand(2, 1, *PATCH)
    reference, ref_scores = net(x), adversary(x)
    net.to(memory_format=torch.channels_last_3d), adversary.to(memory_format=torch.channels_last_3d)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    assert next(net.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(net(cl), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adversary(cl), ref_scores, rtol=1e-4, atol=1e-5)

    plain, cl_trainer = build(), build(channels_last=True)
    assert next(cl_trainer.network.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    a, b = losses(step(plain, fixed_batch(), 1)), losses(step(cl_trainer, fixed_batch(), 1))
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_build_adam_choices_compute_the_same_update():
    def one_step(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        opt = build_adam([model, None], lr=0.1, device="cpu", fused=fused)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 5)).pow(2).sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(one_step(False), one_step(True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="no parameters"):
        build_adam([torch.nn.ReLU()], lr=0.1, device="cpu")


def test_step_output_is_tensors_and_engine_code_never_syncs(monkeypatch):
    """Patch the Tensor → Python conversions and record calls made from dira3d/engines/ during steps."""
    trainer = build(max_epochs=1)
    calls: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ENGINES_DIR):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"):
        spy(name)
    seen_before_epoch_end = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen_before_epoch_end.append(len(calls)))
    trainer.run()
    assert len(outputs) == 1 and seen_before_epoch_end == [0], calls  # the step itself: no sync at all
    for key in ("loss", "loss_dis", "loss_res", "loss_adv", "loss_d", "d_real", "d_fake"):
        assert isinstance(outputs[0][key], torch.Tensor) and not outputs[0][key].requires_grad, key
    # the epoch means are the one deliberate conversion (once per epoch, for the metrics)
    assert set(trainer.state.metrics) >= {"train_loss", "train_loss_res"}


def test_views_default_to_view_augment_and_differ():
    assert build("visual_words", views="auto").views is None
    trainer = build("moco", pair="views")
    assert isinstance(trainer.views, ViewAugment) and trainer.views.spatial_dims == 3
    x = fixed_batch("views")["image"]
    v1, v2 = trainer.views(x, trainer.step_generator(7))
    assert v1.shape == v2.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    assert (v1 - v2).abs().mean() > 1e-3 and (v1 - x).abs().mean() > 1e-3
    w1, _ = trainer.views(x, trainer.step_generator(7))  # seeded by (seed, iteration): reproducible
    torch.testing.assert_close(v1, w1)
    w1, _ = trainer.views(x, trainer.step_generator(8))
    assert not torch.allclose(v1, w1)
    with pytest.raises(ValueError, match="views"):
        build("moco", views="random")


@pytest.mark.parametrize("mode", ["moco", "barlow", "simsiam"])
def test_instance_modes_train_with_views_from_one_crop(mode):
    trainer = build(mode, pair="views")  # 4 volumes, batch 4: one step on single crops, views T(·) in the step
    log = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: log.append(losses(e.state.output)))
    trainer.run()
    assert len(log) == 1 and {"loss_dis", "loss_res", "loss_adv", "loss_d"} <= set(log[0])
    assert all(np.isfinite(list(log[0].values())))
    # identical views (views=None) make another discrimination problem: not the same loss
    identity = losses(step(build(mode, pair="views", views=None, stages=[{"name": "d", "losses": ["dis"]}]),
                           fixed_batch("views"), 1))
    viewed = losses(step(build(mode, pair="views", stages=[{"name": "d", "losses": ["dis"]}]), fixed_batch("views"), 1))
    assert identity["loss_dis"] != pytest.approx(viewed["loss_dis"], rel=1e-4)


def test_flop_count_and_table_helpers():
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)
    flops = count_flops(lambda: conv(torch.rand(1, 2, 4, 4, 4)))
    assert flops == 2 * (4 * 4 * 4) * 4 * (2 * 27)  # 2 · outputs · (in · k³) multiply-adds
    table = format_table([{"config": "fp32", "patches/s": 12.345}], ["config", "patches/s", "mfu"])
    assert table.splitlines()[0].split() == ["config", "patches/s", "mfu"] and "12.3" in table and "-" in table
    with pytest.raises(ValueError, match="backend"):
        compile_modules({"x": conv}, backend="tensorrt-please")


COMPILE_OK = torch.cuda.is_available() or os.environ.get("DIRA3D_TEST_COMPILE") == "1"


@pytest.mark.skipif(not COMPILE_OK, reason="torch.compile of the tiny U-Net takes 30-200 s on a 2-core CPU "
                    "(aot_eager / inductor, measured): runs on CUDA or with DIRA3D_TEST_COMPILE=1")
def test_compiled_trainer_matches_eager_losses():
    plain, compiled = build(), build(compile="aot_eager")
    assert compiled.network.encoder._compiled_call_impl is not None and compiled.adversary._compiled_call_impl is not None
    a, b = losses(step(plain, fixed_batch(), 1)), losses(step(compiled, fixed_batch(), 1))
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert set(compiled.network.state_dict()) == set(plain.network.state_dict())  # checkpoint keys unchanged


@pytest.mark.skipif(not COMPILE_OK, reason="an inductor compile of the tiny trainer's networks, forward and backward "
                    "(~1-3 min on a 2-core CPU): runs on CUDA or with DIRA3D_TEST_COMPILE=1")
def test_inductor_with_forced_channels_last_layout_matches_eager_losses():
    plain = build(channels_last=True)
    fast = build(channels_last=True, compile=True, compile_channels_last=True)
    batch = fixed_batch()
    for iteration in (1, 2):  # the second step also checks that the updates agree
        a, b = losses(step(plain, batch, iteration)), losses(step(fast, batch, iteration))
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (iteration, key)


def test_bundle_speed_settings_parse(repo_root):
    from monai.bundle import ConfigParser

    configs = repo_root / "bundles" / "dira_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / n) for n in ("train.json", "tiny.json", "performance.json")])

    def plain_setting(key):
        return ConfigParser.load_config_file(str(configs / "train.json"))[key]
    parser["num_classes"], parser["device"] = 4, "$torch.device('cpu')"
    assert (parser["amp"], parser["channels_last"], parser["compile"]) == ("bf16", True, True)
    # the configuration measured fastest on the lent H100 (2026-11-26, compiled, batch 64, one process):
    # gemm_weight_grad 390 vs 380 patches/s; cuDNN autotuning no faster (eager 302 vs 303/s, per layer 143.8
    # vs 143.5 ms), so off, which also spares its start-up timing
    assert parser["cudnn_benchmark"] is False and parser.config["train"]["trainer"]["cudnn_benchmark"] == "@cudnn_benchmark"
    assert parser["gemm_weight_grad"] is True and parser["pad_channels"] is False
    # split_concat: 387 -> 417 and 418 patches/s (two runs, 2026-11-26 19:35 and 19:42 UTC, the same H100)
    assert parser["split_concat"] is True and plain_setting("split_concat") is False
    assert parser["gemm_upconv"] is False  # slower in eager mode; with split_concat 410 against 417/s, compiled
    # gemm_head 389 vs 387/s and prefetch 387 vs 387/s alone; with split_concat 412 and 419 against 417-418/s:
    # within the run-to-run spread, so off (each adds code to the step for nothing measured)
    assert parser["gemm_head"] is False and parser.config["train"]["trainer"]["gemm_head"] == "@gemm_head"
    assert parser["prefetch"] is False and parser.config["train"]["trainer"]["prefetch"] == "@prefetch"
    trainer = parser.config["train"]["trainer"]
    assert trainer["gemm_weight_grad"] == "@gemm_weight_grad" and trainer["split_concat"] == "@split_concat"
    # in-process DataLoader: on the lent H100 (2026-11-26) crops from the cache ran at 1,626 pairs/s in
    # the main process and ~620/s with 4 or 8 worker processes; ThreadDataLoader gave ~600/s on the CPU
    # (docs/benchmarks.md). The cache is still built with num_workers threads.
    assert parser["train#dataloader#_target_"] == "DataLoader" and parser["train#dataloader#num_workers"] == 0
    assert parser["train#dataloader#pin_memory"] == "@pin_memory"
    assert parser["train#dataset#num_workers"] == "@num_workers"  # cache threads: the global setting
    optimizer = parser.get_parsed_content("optimizer_g")
    assert optimizer.defaults["foreach"] is True  # fused_optimizer on a CPU: multi-tensor Adam
    plain = ConfigParser()
    plain.read_config(str(configs / "train.json"))
    assert plain["views"] == "auto" and plain["compile"] is False and plain["fused_optimizer"] is True
    assert plain["cudnn_benchmark"] is False and plain["compile_mode"] is None
    assert parser["compile_channels_last"] is False  # measured slower: 381 vs 387 patches/s (2026-11-26)
    assert trainer["compile_channels_last"] == "@compile_channels_last"


def test_adversary_scores_real_and_fake_in_one_forward_with_the_same_values():
    trainer = build()
    assert trainer.joint_adversary  # instance norm: no layer mixes samples
    torch.manual_seed(3)
    real, fake = torch.rand(3, 1, *PATCH), torch.rand(3, 1, *PATCH)
    calls = []
    handle = trainer.adversary.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    joint = trainer.adversary_scores(real, fake)
    trainer.joint_adversary = False
    separate = trainer.adversary_scores(real, fake)
    handle.remove()
    assert calls == [6, 3, 3]  # one forward of both halves, then the two separate forwards
    for a, b in zip(joint, separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_batch_norm_adversary_keeps_separate_forwards():
    torch.manual_seed(0)
    trainer = build()
    bn = Adversary(3, 1, channels=4, num_layers=3, norm="batch")
    bn_trainer = DiRATrainer("cpu", 1, trainer.data_loader, trainer.network, trainer.optimizer, trainer.dis_head, bn,
                             build_adam([bn], 1e-3, "cpu"), stages=ALL_TERMS)
    assert not bn_trainer.joint_adversary  # batch statistics of real and fake must stay apart


def test_compile_mode_and_cudnn_benchmark_reach_torch(monkeypatch):
    import dira3d.engines.trainer as trainer_module

    seen = {}
    monkeypatch.setattr(trainer_module, "compile_modules",
                        lambda modules, backend, mode=None, channels_last=False: seen.update(
                            backend=backend, mode=mode, channels_last=channels_last, names=sorted(modules)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    build(compile=True, cudnn_benchmark=True, compile_mode="max-autotune-no-cudagraphs", compile_channels_last=True)
    assert seen["backend"] == "inductor" and seen["mode"] == "max-autotune-no-cudagraphs" and seen["channels_last"]
    assert {"network", "adversary", "dis_head"} <= set(seen["names"])
    assert torch.backends.cudnn.benchmark is True


def test_compile_channels_last_becomes_an_inductor_option(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    assert compile_modules({"network": net}, channels_last=True) == ["network.encoder", "network.decoder"]
    assert calls[0] == {"backend": "inductor", "dynamic": False, "options": {"force_layout_optimization": True}}
    calls.clear()  # torch.compile takes a mode or options, not both: the mode's options are folded in
    compile_modules({"network": net}, mode="max-autotune-no-cudagraphs", channels_last=True)
    assert "mode" not in calls[0] and calls[0]["options"]["force_layout_optimization"] is True
    assert calls[0]["options"]["max_autotune"] is True
    calls.clear()
    compile_modules({"network": net}, mode="max-autotune-no-cudagraphs")
    assert calls[0] == {"backend": "inductor", "dynamic": False, "mode": "max-autotune-no-cudagraphs"}


@pytest.mark.skipif(not COMPILE_OK, reason="an inductor compile of the tiny U-Net, forward and backward (~20-60 s "
                    "on a 2-core CPU): runs on CUDA or with DIRA3D_TEST_COMPILE=1")
@pytest.mark.parametrize("force", [False, True])
def test_inductor_leaves_the_decoder_graphs_out_of_channels_last_unless_forced(monkeypatch, force):
    """Why ``compile_channels_last`` exists: inductor's layout heuristic skips graphs with in >= 2 x out channels."""
    from torch._inductor.graph import GraphLowering

    decide = GraphLowering.decide_layout_opt
    decisions = []

    def spy(gm, *, is_inference):
        convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.convolution.default]
        decisions.append((len(convs), decide(gm, is_inference=is_inference)))
        return decisions[-1][1]

    monkeypatch.setattr(GraphLowering, "decide_layout_opt", staticmethod(spy))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # on CPU mkldnn always takes channels-last
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # a cached graph skips the decision
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    # width 1/4: the encoder reaches 128 channels (inductor skips graphs whose convolutions all have <= 64)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=0.25).to(memory_format=torch.channels_last_3d)
    compile_modules({"network": net}, channels_last=force)
    net(torch.rand(2, 1, *PATCH).to(memory_format=torch.channels_last_3d)).sum().backward()
    torch._dynamo.reset()
    with_convs = [d for n, d in decisions if n]
    assert len(with_convs) == 2  # the encoder's forward graph and the decoder's
    assert with_convs == ([True, True] if force else [True, False])  # the decoder: 192 -> 64, ... convolutions


@pytest.mark.parametrize("mode", ["visual_words", "moco", "barlow", "simsiam"])
def test_training_step_would_not_stall_a_gpu(mode):
    """With the static-shape distortions (the default on a GPU) a whole G + D step, views, EMA and
    queue included, makes no device->host synchronisation (HostSyncDetector watches every ATen call)."""
    from dira3d.transforms.compositions import default_distortion_args
    from dira3d.utils.host_sync import HostSyncDetector

    distortion = build_distortion("transvw", static_shapes=True, **default_distortion_args("transvw", PATCH))
    views = "auto" if mode == "visual_words" else ViewAugment(3, static_shapes=True)
    pair = "instances" if mode == "visual_words" else "views"
    trainer = build(mode, pair=pair, distortion=distortion, views=views)
    batch = fixed_batch(pair)
    step(trainer, batch, 1)  # the first step creates the optimiser state
    with HostSyncDetector() as syncs:
        out = step(trainer, batch, 2)
    assert not syncs.events, syncs.report()
    assert torch.isfinite(out["loss"]) and "loss_d" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (set_sync_debug_mode is CUDA-only)")
@pytest.mark.parametrize("mode", ["visual_words", "moco"])
def test_cuda_step_runs_under_sync_debug_mode_error(mode):
    """On a GPU, the real thing: any device->host synchronisation inside the step raises."""
    from dira3d.transforms.compositions import default_distortion_args

    pair = "instances" if mode == "visual_words" else "views"
    torch.manual_seed(0)
    loader = DataLoader(Dataset(volumes(), RandPatchPaird("image", PATCH, pair=pair)), batch_size=4)
    net = UNet(3, width=1 / 8)
    head = build_dis_head(mode, 3, net.bottleneck_channels, num_classes=4, hidden=16, proj_dim=8)
    adversary = Adversary(3, 1, channels=4, num_layers=3)
    trainer = DiRATrainer("cuda", 1, loader, net, build_adam([net, head], 1e-3, "cuda"), head, adversary,
                          build_adam([adversary], 1e-3, "cuda"), dis_mode=mode, stages=ALL_TERMS, amp="bf16",
                          distortion=build_distortion("transvw", **default_distortion_args("transvw", PATCH)),
                          queue_size=16)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fixed_batch(pair).items()}
    step(trainer, batch, 1)  # optimiser state, cuDNN/cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(trainer, batch, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()


def test_pretraining_cache_is_read_in_place_and_never_written(repo_root):
    """The bundle's CacheDataset hands the cached volume to the crop without a deep copy (a full
    volume copy per patch pair cost ~90 % of the loader's time); crops are copies, so even a
    consumer writing into its patch leaves the cache as it was."""
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / "dira_pretrain" / "configs" / "train.json"))
    assert parser.config["train"]["dataset"]["copy_cache"] is False
    assert parser.config["validate"]["dataset"]["copy_cache"] is False
    data = volumes(2) + volumes(1, shape=PATCH)  # a volume of the patch's size: the crop is the whole volume
    dataset = CacheDataset(data, transform=Compose([RandPatchPaird("image", PATCH)]), copy_cache=False, progress=False)
    before = [torch.as_tensor(item["image"]).clone() for item in dataset._cache]
    for _ in range(3):
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["image"].shape == item["image2"].shape == (1, *PATCH)
            item["image"].add_(1.0), item["image2"].add_(1.0)
    for cached, original in zip(dataset._cache, before):
        assert torch.equal(torch.as_tensor(cached["image"]), original)


def test_gemm_weight_grad_option_trains_like_cudnn_weight_grads():
    # two steps: the second one's losses depend on the first step's update of the image-facing layers
    plain, gemm = build(channels_last=True), build(channels_last=True, gemm_weight_grad=True)
    assert type(gemm.network.encoder.levels[0].conv1.conv).__name__ == "GemmWgradConv3d"
    assert type(plain.network.encoder.levels[0].conv1.conv) is torch.nn.Conv3d
    for iteration in (1, 2):
        a, b = losses(step(plain, fixed_batch(), iteration)), losses(step(gemm, fixed_batch(), iteration))
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (iteration, key)
    first = "encoder.levels.0.conv1.conv.weight"
    torch.testing.assert_close(gemm.network.state_dict()[first], plain.network.state_dict()[first], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{"pad_channels": True}, {"gemm_upconv": True},
                                     {"pad_channels": True, "gemm_upconv": True}, {"split_concat": True},
                                     {"split_concat": True, "gemm_upconv": True, "gemm_weight_grad": True},
                                     {"gemm_head": True}])
def test_layer_options_train_like_the_plain_layers(options):
    # two steps: the second one's losses depend on the first step's update of the changed layers.
    # At width 1/8 most layers are padded; a small lr keeps Adam from amplifying rounding-level
    # gradient differences (its first step moves a weight by ~lr whatever the gradient's size)
    plain, changed = build(channels_last=True, lr=1e-5), build(channels_last=True, lr=1e-5, **options)
    first, up = changed.network.encoder.levels[0].conv1.conv, changed.network.decoder.levels[-1].up
    if options.get("pad_channels"):
        assert type(first).__name__ == "ChannelPaddedConv3d" and first.pad_memory_format == torch.channels_last_3d
        assert type(changed.adversary.net.initial_conv.conv).__name__ == "ChannelPaddedConv3d"
    assert (type(up).__name__ == "GemmConvTranspose3d") == bool(options.get("gemm_upconv"))
    level = type(changed.network.decoder.levels[-1]).__name__
    assert (level == "SplitConcatUpLevel") == bool(options.get("split_concat"))
    assert (type(changed.network.decoder.head).__name__ == "GemmHeadConv3d") == bool(options.get("gemm_head"))
    assert type(plain.network.encoder.levels[0].conv1.conv) is torch.nn.Conv3d
    for iteration in (1, 2):
        a, b = losses(step(plain, fixed_batch(), iteration)), losses(step(changed, fixed_batch(), iteration))
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (iteration, key)
    assert set(changed.network.state_dict()) == set(plain.network.state_dict())  # checkpoints keep their keys
    for name in ("encoder.levels.0.conv1.conv.weight", "decoder.levels.2.up.weight"):
        torch.testing.assert_close(changed.network.state_dict()[name], plain.network.state_dict()[name], rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("option", ["split_concat", "gemm_upconv", "gemm_head"])
def test_a_layer_option_that_changes_nothing_warns(option):
    from dira3d.engines.performance import apply_layer_options
    from dira3d.networks import ResNetUNet

    if option == "gemm_head":  # 8 output channels: a head cuDNN runs on tensor cores, left alone
        other, name = UNet(spatial_dims=3, in_channels=1, out_channels=8, width=0.125), "UNet"
    else:  # no U-Net decoder level
        other, name = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8)), "ResNetUNet"
    with pytest.warns(UserWarning, match=f"{option}=True changes no layer of {name}"):
        assert apply_layer_options(other, **{option: True}) == {option: []}
    unet = UNet(spatial_dims=3, in_channels=1, out_channels=1, width=0.125)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default 3D U-Net has the layers: no warning
        assert apply_layer_options(unet, **{option: True})[option]
    with pytest.raises(ValueError, match="unknown layer option"):
        apply_layer_options(unet, split_concatt=True)


def test_pad_channels_and_gemm_weight_grad_are_refused_together():
    with pytest.raises(ValueError, match="gemm_weight_grad and pad_channels"):
        build(pad_channels=True, gemm_weight_grad=True)
    # pad_channels used to take the output head silently, and gemm_head warned it had "no effect"
    with pytest.raises(ValueError, match="gemm_head and pad_channels both change the 1-channel output head"):
        build(pad_channels=True, gemm_head=True)


@pytest.mark.parametrize("mode,classify_both,kept", [("visual_words", False, False), ("visual_words", True, True),
                                                     ("moco", False, True), ("barlow", False, True)])
def test_the_second_instance_goes_to_the_device_only_when_the_step_reads_it(mode, classify_both, kept):
    trainer = build(mode=mode, classify_both=classify_both)
    prepared = trainer._prepare(fixed_batch())
    assert ("image2" in prepared) == kept and "image" in prepared
    output = step(trainer, fixed_batch(), 1)  # the step runs on what _prepare kept
    assert losses(output) and all(math.isfinite(v) for v in losses(output).values())
