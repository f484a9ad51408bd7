"""DiRATrainer: one generator step (λ-weighted active losses), then the discriminator step(s).

One iteration on a batch ``{"image": x1, ["image2": x2], ["label": y]}`` (patches in [0, 1]):

1. views ``v1, v2 = T(x1), T(x2 or x1)`` (identity in ``visual_words`` mode), drawn on the
   batch's device from a generator seeded by (seed, iteration) — a resumed run draws the same;
2. ``distorted, target = distortion(v1)``, the target being v1's crop before its intensity steps
   (jitter, gamma, noise, blur) with the same flips; ONE encoder pass ``bottleneck, skips = encode(distorted)``;
3. ``dis`` from the bottleneck (visual-word CE; MoCo InfoNCE against the EMA key encoder's view2,
   with shuffle BN under DDP, and a queue; Barlow Twins / SimSiam on both views),
   ``res = dist(decode(bottleneck, skips), target)``, ``adv = AdversarialLoss.generator(D(restored))``;
4. G step on ``Σ λ·term`` over the stage's active terms; MoCo then enqueues the keys;
5. when ``adv`` is active: ``d_steps`` D steps on ``D(target)`` (real) vs ``D(restored.detach())``.

``second_view`` ``"distorted"`` / ``"restored"`` also distort view2 (after the draws above) for the
discrimination, and ``"restored"`` restores it as well (both restorations in ``res``, ``adv`` and D's step).

Loss values stay tensors (no ``.item()`` in the step); handlers convert them at log time.

``engine.state.output`` is ONE dict per iteration (not decollated into a list per sample, as
MONAI's ``SupervisedTrainer`` output is): ``loss`` (the weighted total), ``loss_<term>`` for the
stage's unweighted terms (``loss_dis``, ``loss_res``, ``loss_adv``), while ``adv`` is active
``loss_d``, ``d_real``, ``d_fake``, then ``lr_g``, ``lr_d`` (floats), ``stage`` (its name) and
``stage_index``. Give MONAI's stats handlers ``output_transform=dira3d.engines.scalar_output``
(their default ``lambda x: x[0]`` raises ``KeyError: 0`` on a dict, and
``from_engine(["loss"], first=True)`` returns a tuple that ``TensorBoardStatsHandler`` skips).
Epoch means land in ``engine.state.metrics`` as ``train_<key>``; :class:`DiRAEvaluator` adds
``val_loss``, ``val_selection_loss`` and ``val_loss_<term>`` at the epochs it validates. ``state.metrics`` holds the
epoch's own values only (emptied as each epoch starts): an epoch without a validation (``val_interval`` > 1)
logs no ``val_*``.

The trainer does not check intensities (that would cost a host sync per step): batches must be
patches in [0, 1]. With your own loader, check the volumes once when loading, e.g. with
:class:`dira3d.engines.CheckVolumed` (``value_range=(0, 1)``), as the bundle does.

Driven from Python (the bundle ``bundles/dira_pretrain/configs/train.json`` wires the same)::

    net = UNet(spatial_dims=3, width=1.0)
    head = build_dis_head("visual_words", 3, net.bottleneck_channels, num_classes=C)
    adversary = Adversary(3)
    evaluator = DiRAEvaluator(device, val_loader)          # its own handler: not ValidationHandler
    trainer = DiRATrainer(device, max_epochs, train_loader, net,
                          torch.optim.Adam([*net.parameters(), *head.parameters()], 1e-3), head,
                          adversary, torch.optim.Adam(adversary.parameters(), 1e-3),
                          stages=[{"name": "dis", "until_epoch": 20, "losses": ["dis"]},
                                  {"name": "dira", "losses": ["dis", "res", "adv"]}],
                          train_handlers=[evaluator, DiRACheckpoint(ckpt_dir),
                                          EpochStatsHandler(output_transform=scalar_output)])
    trainer.run()

with batches ``{"image": (B, C, *patch), "label": (B,)}`` (``visual_words``; ``"image2"``: a
second instance) from any ``DataLoader``.

This module holds the class with its constructor (building and wiring the parts from the options), ``run``
and the modules it owns. The iteration itself is :class:`~dira3d.engines.step.TrainingStepMixin`
(:mod:`dira3d.engines.step`, with :class:`StepInputs`, :class:`Prepared` and :class:`Forward`), the batches,
draws, epoch seeding and resume skipping are :class:`~dira3d.engines.batches.BatchFeedMixin`
(:mod:`dira3d.engines.batches`), and the checks across options are in :mod:`dira3d.engines.trainer_checks`;
all of these names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from torch import nn

from dira3d.data.errors import DataError
from dira3d.engines.batches import STREAM_DATA, STREAM_STEP, BatchFeedMixin
from dira3d.engines.components import build_dis_loss, check_dis_mode, resolve_views
from dira3d.engines.cpu_bf16 import onednn_bf16_conv3d_grad_is_wrong
from dira3d.engines.epoch_end import run_pending_epoch_end
from dira3d.engines.faults import NonFiniteGuard
from dira3d.engines.handlers import rank_zero_handlers
from dira3d.engines.moco import STREAM_SHUFFLE, MoCoKeyEncoder
from dira3d.engines.optim import autocast_context, make_grad_scaler, unique_parameters
from dira3d.engines.performance import apply_layer_options, check_compile_mode, compile_modules
from dira3d.engines.prefetch import side_stream
from dira3d.engines.shuffle_bn import check_shuffle_bn
from dira3d.engines.stages import Stage, StageSchedule
from dira3d.engines.step import Forward, Prepared, StepInputs, TrainingStepMixin
from dira3d.engines.stopping import SignalStop
from dira3d.engines.trainer_checks import (check_clip_grad_norm, check_modules_for_stages, check_second_view,
                                           check_yields_batches)
from dira3d.losses import AdversarialLoss, DiRALoss, MoCoQueue, RestorationLoss
from dira3d.utils.interrupts import QuietInterruptMixin

# Forward, StepInputs, Prepared (dira3d.engines.step) and the seed streams (dira3d.engines.batches,
# dira3d.engines.moco) are also importable from here, where they were defined before the split
__all__ = ["DiRATrainer", "Forward", "StepInputs", "Prepared", "STREAM_DATA", "STREAM_STEP", "STREAM_SHUFFLE"]


class DiRATrainer(TrainingStepMixin, BatchFeedMixin, QuietInterruptMixin, Trainer):
    """Trainer for DiRA pretraining (a :class:`monai.engines.Trainer`).

    Args:
        device: where to train.
        max_epochs: number of epochs.
        train_data_loader: yields dict batches (see the module docstring).
        network: a :class:`~dira3d.networks.UNet` (``encode`` / ``decode``).
        optimizer: optimiser of the generator side (network, dis_head, predictor).
        dis_head: visual-word head or projector on the bottleneck (see ``components``).
        adversary: the discriminator D_φ (``forward(x) -> logits``).
        optimizer_d: optimiser of ``adversary``; it only steps while ``adv`` is active.
        dis_mode: ``visual_words`` | ``moco`` | ``barlow`` | ``simsiam``.
        predictor: SimSiam predictor (None otherwise).
        dis_loss / restoration_loss / adversarial_loss: the loss modules (defaults by mode, MSE, vanilla).
        loss_weights: λ per term (``{"dis": 1, "res": 100, "adv": 1}`` by default).
        stages: list of stage dicts or a :class:`StageSchedule` (default: all terms from the start).
        distortion: ``distorted, target = distortion(x, generator)`` (see ``dira3d.transforms``).
        views: ``v1, v2 = views(x, generator)`` for the instance modes, computed in the step on
            the batch's device; ``"auto"`` (default): :class:`dira3d.transforms.ViewAugment` for
            ``moco`` / ``barlow`` / ``simsiam``, none for ``visual_words``; None: identity views,
            i.e. the two patches of the batch are the two views.
        seed: base seed of the per-epoch data order and the per-iteration draws.
        d_steps: D steps per G step while ``adv`` is active (the D:G ratio).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (two gradient scalers, G and D).
        clip_grad_norm: max gradient norm for G and D (None: no clipping).
        channels_last: channels-last memory format (helps convolutions on recent GPUs).
        compile: ``torch.compile`` the encoder, decoder, heads and adversary in place: False, True
            (inductor) or a backend name (see :func:`dira3d.engines.performance.compile_modules`).
        compile_mode: inductor mode when compiling, e.g. ``"max-autotune-no-cudagraphs"`` (None:
            PyTorch's default); one that is not ``torch.compile``'s is refused, compiling or not.
        compile_channels_last: with inductor, force its channels-last layout optimisation in every
            compiled graph; inductor leaves it off for the U-Net decoder's graphs (each level's first
            convolution has at least twice as many input as output channels). Off: measured slower
            on an H100 (381 against 387 patches/s, token ``forcecl``).
        cudnn_benchmark: let cuDNN time its convolution algorithms for the (fixed) patch shape
            and keep the fastest (``torch.backends.cudnn.benchmark``, a process-wide switch; set
            only when True).
        gemm_weight_grad: compute the weight gradient of the 1-channel, image-facing convolutions
            (U-Net and adversary) as one matrix product instead of cuDNN's kernel, which is
            slow for those layers in channels-last bf16 (:mod:`dira3d.networks.gemm_wgrad`; same
            values, tested). Off by default; on in the bundle's ``performance.json`` (an H100 step
            went from 380 to 390 patches/s).
        pad_channels: run the convolutions whose channel counts are not multiples of 8 (the
            1-channel, image-facing ones: U-Net input and output, adversary input and output) on
            zero-padded channels, so that cuDNN can use its tensor-core kernels
            (:mod:`dira3d.networks.channel_pad`; same values, tested). Excludes ``gemm_weight_grad``.
        gemm_upconv: run the U-Net's up-sampling (transposed convolutions with stride equal to the
            kernel) as one matrix product and a rearrangement instead of cuDNN's transposed
            convolution (:mod:`dira3d.networks.gemm_upconv`; same values, tested).
        split_concat: run each U-Net decoder level's first convolution on the up-sampled map and
            the skip separately and sum, instead of on their concatenation
            (:mod:`dira3d.networks.split_concat`; same values, tested). Off by default; on in the
            bundle's ``performance.json`` (an H100 step went from 387 to 417 patches/s).
        gemm_head: run the U-Net's 1×1 output convolution (one output channel, for which cuDNN
            has no tensor-core kernel) as one matrix product over channels-last rows
            (:mod:`dira3d.networks.gemm_head`; same values, tested). Off: no faster in the whole
            step on an H100 (within the run-to-run spread).
            Each of these five options warns when it changes no layer of the networks given
            (``dira3d.engines.performance.apply_layer_options``), e.g. ``split_concat`` on the
            2D ``ResNetUNet``, which has no U-Net decoder level.
        prefetch: prepare the next batch (host-to-device copy, views, distortion) while the current
            step runs, on a side CUDA stream (:mod:`dira3d.engines.prefetch`); the same batches,
            draws and losses as without it (tested). ``engine.state.batch`` is then a
            :class:`Prepared` instead of the loader's dict. Off: no faster in the whole step on an
            H100 (token ``prefetch``; within the run-to-run spread).
        queue_size / momentum: MoCo queue length and EMA momentum of the key encoder.
        shuffle_bn: MoCo under DDP: gather the key views of all ranks, permute them (a permutation
            drawn alike on every rank from (seed, iteration), so a resumed run shuffles the same),
            encode each rank's share with the key encoder and restore the order, so that its
            BatchNorm statistics do not pair a query with its key (:mod:`dira3d.engines.shuffle_bn`;
            two ``all_gather`` per step, the second one also feeds the queue). None (default): on in
            ``moco`` mode; True outside ``moco`` is refused. With one process it changes nothing.
        classify_both: visual_words mode: also classify the distorted second instance.
        second_view: what the instance modes do with their second view (MoCo's key, the other Barlow Twins /
            SimSiam branch; docs/method.md): ``"augmented"`` (default: the view T(x2) alone, the patent's
            equation 2), ``"distorted"`` (also distorted, with its own draw, not restored: the official 2D
            code), ``"restored"`` (distorted and restored: the patent's claims; L_res is the mean over the two
            views, D sees both restorations; in ``moco`` one more query-encoder pass, which only restores).
            Only while ``dis`` is active; another value than ``"augmented"`` is refused in ``visual_words``.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        train_handlers: handlers attached after the trainer's own bookkeeping; None entries (a handler a bundle
            config disabled with ``_disabled_``, e.g. ``validate#evaluator`` with ``validation`` false) are left out,
            and so are, on the ranks other than 0 of a distributed run, the console summary and TensorBoard handlers
            (:func:`~dira3d.engines.handlers.rank_zero_handlers`, by class: any order of the list).
        non_blocking: non-blocking host→device copies (None: on for CUDA; pair with a loader's
            ``pin_memory=True``).
        on_nonfinite: ``"stop"`` (raise :class:`~dira3d.engines.faults.NonFiniteLossError` naming the
            term and iteration; checkpoints are never written with NaN weights) or ``"skip"`` (drop
            steps whose loss is NaN/Inf, one host sync per step).
        check_every: iterations between the host-side non-finite checks (also before every save). Under
            DDP the ranks also agree there to stop on SIGTERM / Ctrl-C: such a stop comes up to
            ``check_every`` iterations after the signal (one process: after the step in progress).

    SIGTERM and Ctrl-C (SIGINT) while :meth:`run` lasts end the run after the step in progress (under DDP
    at an iteration all ranks agree on): ``COMPLETED`` fires, so :class:`~dira3d.engines.DiRACheckpoint`
    writes ``last.pt`` at that iteration, and ``run`` returns with ``state.stopped_by`` set to
    ``"SIGTERM"`` / ``"SIGINT"`` (None after a full run); :func:`dira3d.engines.exit_if_stopped` then exits
    with 143 / 130 (:mod:`dira3d.engines.stopping`). The previous signal handlers are put back after the run.
    Early stopping (``DiRACheckpoint(early_stop_patience=N)``) ends the run after an epoch instead, with
    ``state.early_stopped`` saying why (None otherwise), which ``run`` logs as its last line.

    Raises:
        ValueError: a bad mode, AMP value, ``d_steps``, ``shuffle_bn`` outside ``moco``, ``second_view``, missing
            predictor for SimSiam, or stages using ``dis`` / ``adv`` without the modules they need.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        dis_head: nn.Module | None,
        adversary: nn.Module | None,
        optimizer_d: torch.optim.Optimizer | None,
        dis_mode: str = "visual_words",
        predictor: nn.Module | None = None,
        dis_loss: nn.Module | None = None,
        restoration_loss: nn.Module | None = None,
        adversarial_loss: AdversarialLoss | None = None,
        loss_weights: Mapping[str, float] | None = None,
        stages: Sequence[Mapping] | StageSchedule | None = None,
        distortion: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
        views: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | str | None = "auto",
        seed: int = 0,
        d_steps: int = 1,
        amp: str = "none",
        clip_grad_norm: float | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        compile_mode: str | None = None,
        compile_channels_last: bool = False,
        cudnn_benchmark: bool = False,
        gemm_weight_grad: bool = False,
        pad_channels: bool = False,
        gemm_upconv: bool = False,
        split_concat: bool = False,
        gemm_head: bool = False,
        prefetch: bool = False,
        queue_size: int = 65536,
        momentum: float = 0.999,
        shuffle_bn: bool | None = None,
        classify_both: bool = False,
        second_view: str = "augmented",
        epoch_length: int | None = None,
        train_handlers: Sequence | None = None,
        non_blocking: bool | None = None,
        on_nonfinite: str = "stop",
        check_every: int = 10,
    ) -> None:
        compile_mode = check_compile_mode(compile_mode)  # refused whether or not compile is on
        self.dis_mode = check_dis_mode(dis_mode)
        self.shuffle_bn = check_shuffle_bn(shuffle_bn, self.dis_mode)
        self.second_view = check_second_view(second_view, self.dis_mode)
        self.schedule = stages if isinstance(stages, StageSchedule) else StageSchedule(stages)
        if int(d_steps) != d_steps or d_steps < 1:
            raise DataError(None, f"d_steps={d_steps!r} must be a positive integer (discriminator steps per generator step)")
        check_modules_for_stages(self.schedule, stages is None, self.dis_mode, dis_head, predictor, adversary,
                                 optimizer_d)
        loss_weights = DiRALoss(loss_weights)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=torch.device(device).type == "cuda" if non_blocking is None else bool(non_blocking),
            amp=False,  # AMP is handled here (bf16/fp16, two scalers), not by MONAI's single scaler
            decollate=False,
        )
        self.network, self.optimizer, self.loss_function = network, optimizer, loss_weights
        device = self.state.device
        self.dis_head, self.predictor, self.adversary, self.optimizer_d = dis_head, predictor, adversary, optimizer_d
        self.dis_loss = dis_loss if dis_loss is not None else build_dis_loss(self.dis_mode)
        self.restoration_loss = restoration_loss if restoration_loss is not None else RestorationLoss("mse")
        self.adversarial_loss = adversarial_loss if adversarial_loss is not None else AdversarialLoss("vanilla")
        if distortion is None:
            from dira3d.transforms.compositions import build_distortion

            distortion = build_distortion("transvw" if getattr(network, "spatial_dims", 3) == 3 else "dira2d")
        self.distortion, self.views = distortion, resolve_views(views, self.dis_mode, getattr(network, "spatial_dims", 3))
        self.seed, self.d_steps, self.amp_mode = int(seed), int(d_steps), amp
        self.clip_grad_norm, self.classify_both = check_clip_grad_norm(clip_grad_norm), bool(classify_both)
        self.momentum = float(momentum)
        self.prefetch = bool(prefetch)
        self._side_stream = side_stream(self.state.device) if self.prefetch else None
        autocast_context(amp, device)  # validates the value early
        self.onednn_off = (torch.device(device).type == "cpu" and amp == "bf16"
                           and getattr(network, "spatial_dims", 3) == 3 and onednn_bf16_conv3d_grad_is_wrong())
        if self.onednn_off:
            self.logger.warning(
                "amp='bf16' on the CPU: this PyTorch's oneDNN computes wrong bf16 weight gradients of 3D convolutions "
                "on this CPU (checked at start-up; dira3d.engines.cpu_bf16), so the training steps run with oneDNN "
                "off: right, and slower. bf16 is meant for GPUs; amp='none' is the CPU setting.")
        self.scaler_g, self.scaler_d = make_grad_scaler(amp, device), make_grad_scaler(amp, device)
        check_yields_batches(train_data_loader)

        # MoCo's key side (EMA key encoder and projector, queue, shuffle BN); None in the other modes
        self.moco = (MoCoKeyEncoder(network.encoder, dis_head, queue_size, self.momentum, self.seed, self.shuffle_bn)
                     if self.dis_mode == "moco" and dis_head is not None else None)
        self.memory_format = None
        if channels_last:
            dims = getattr(network, "spatial_dims", 3)
            self.memory_format = torch.channels_last_3d if dims == 3 else torch.channels_last
        for module in self.modules().values():
            module.to(device)
            if self.memory_format is not None:
                module.to(memory_format=self.memory_format)
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        apply_layer_options(network, adversary, self.memory_format, gemm_weight_grad=gemm_weight_grad,
                            pad_channels=pad_channels, gemm_upconv=gemm_upconv, split_concat=split_concat,
                            gemm_head=gemm_head)
        if compile:  # after .to(): the compiled graphs see the final device and memory format
            compile_modules(self.modules(), backend="inductor" if compile is True else str(compile), mode=compile_mode,
                            channels_last=compile_channels_last)
        # D scores real and restored patches in ONE forward when no layer mixes samples (instance
        # norm or none): half the kernel launches, a twice larger batch per kernel, same values
        self.joint_adversary = adversary is not None and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in adversary.modules())
        self.g_params = unique_parameters([network, dis_head, predictor])
        self.d_params = unique_parameters([adversary])

        self.state.stage = self.schedule.stage_at(1, 1).name
        self.state.images = {}
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_count = 0
        self.add_event_handler(Events.STARTED, self._warn_unreached_stages)
        self.add_event_handler(Events.STARTED, self._forget_epoch_start)  # before a checkpoint handler resumes
        self.add_event_handler(Events.EPOCH_STARTED, self._mark_epoch_start)
        self.add_event_handler(Events.EPOCH_STARTED, self._forget_epoch_values)
        self.add_event_handler(Events.EPOCH_STARTED, self._seed_epoch)
        # ignite exhausts the previous epoch's iterator inside the new epoch, and torch's
        # RandomSampler draws once more on exhaustion: seed again just before the new iterator
        self.add_event_handler(Events.DATALOADER_STOP_ITERATION, self._seed_epoch)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_means)
        self.nonfinite_guard = NonFiniteGuard(on_nonfinite, check_every)
        self.nonfinite_guard.attach(self)
        # SIGTERM / Ctrl-C: the handler only records the signal; one process looks at it after each step,
        # under DDP the guard's periodic check agrees on it over the ranks (dira3d.engines.stopping)
        # a stop on an epoch's last step first lets that epoch end (validation, best.pt): a resume starts the next one
        self.signal_stop = SignalStop(finish_epoch=True)
        self.add_event_handler(Events.ITERATION_COMPLETED, self.signal_stop.poll)
        self.evaluator = None  # the DiRAEvaluator, once one attaches itself (early stopping needs one)
        if train_handlers is not None:  # None: a handler the bundle config disabled (validate#evaluator without validation)
            # on ranks other than 0, without the handlers that only report (by their class, whatever the list's order)
            self._register_handlers(rank_zero_handlers(h for h in train_handlers if h is not None))
        # after every handler's STARTED (the checkpoint handler's resume): a last.pt written at an epoch's last
        # iteration before its end (a kill during its validation) has that end run first (dira3d.engines.epoch_end)
        self.add_event_handler(Events.STARTED, run_pending_epoch_end)
        self._signal_stop_last()

    def _signal_stop_last(self) -> None:
        """Make :meth:`SignalStop.after_epoch_end` the last ``EPOCH_COMPLETED`` handler, also of those attached after
        the trainer was built: a signal during an epoch's end (its validation) ends the run right after that end."""
        after = self.signal_stop.after_epoch_end
        if self.has_event_handler(after, Events.EPOCH_COMPLETED):
            self.remove_event_handler(after, Events.EPOCH_COMPLETED)
        self.add_event_handler(Events.EPOCH_COMPLETED, after)

    def run(self) -> None:
        """Train (``monai.engines.Trainer.run``) with SIGTERM / SIGINT caught while it lasts (see the class)."""
        self._signal_stop_last()
        self.state.stop_saved = None  # what the checkpoint handler wrote when a signal stopped the run
        self.state.early_stopped = None  # why early stopping ended the run (dira3d.engines.stopping.FinalStageEarlyStop)
        self.state.epoch_end_pending = False  # set by a resume from a last.pt written before its epoch's end
        with self.signal_stop.installed(self):
            super().run()
        if self.state.stopped_by:
            saved = self.state.stop_saved or "no checkpoint handler saved the run"
            self.logger.info(f"stopped by {self.state.stopped_by} at iteration {self.state.iteration}; {saved}")
        elif self.state.early_stopped:
            self.logger.info(f"training ended by early stopping: {self.state.early_stopped}")

    @staticmethod
    def _forget_epoch_values(engine: Engine) -> None:
        # EPOCH_STARTED: the last epoch's values are not this one's. ignite keeps state.metrics, so an epoch without a
        # validation (val_interval > 1) logged the last validation's val_* and early_stop_wait again (console and
        # TensorBoard, at its own epoch), and a loss the stage no longer has kept its last train_* mean
        engine.state.metrics.clear()

    def _warn_unreached_stages(self, engine: Engine) -> None:
        """Say so when ``max_epochs`` ends the run before a stage starts (``max_epochs`` 10 with train.json's stages,
        dis to epoch 20: no restoration, no adversary), which trained without a word."""
        unreached = self.schedule.unreached(int(engine.state.max_epochs), engine.state.epoch_length)
        if unreached:
            self.logger.warning(f"{self.schedule.unreached_text(unreached, int(engine.state.max_epochs))}: this run "
                                "trains without them; raise max_epochs or lower the stages' until_epoch / until_iteration "
                                "(a rerun with a higher max_epochs resumes from last.pt and trains them)")

    # ------------------------------------------------------------------ bookkeeping
    @property
    def momentum_encoder(self) -> nn.Module | None:
        """MoCo's EMA key encoder (checkpoint key ``momentum_encoder``); None outside ``moco``."""
        return None if self.moco is None else self.moco.encoder

    @property
    def momentum_head(self) -> nn.Module | None:
        """MoCo's EMA key projector (checkpoint key ``momentum_head``); None outside ``moco``."""
        return None if self.moco is None else self.moco.head

    @property
    def queue(self) -> MoCoQueue | None:
        """MoCo's queue of keys (checkpoint key ``queue``); None outside ``moco``."""
        return None if self.moco is None else self.moco.queue

    def modules(self) -> dict[str, nn.Module]:
        """Every module the trainer owns, by checkpoint key (absent ones left out)."""
        named = {
            "network": self.network,
            "dis_head": self.dis_head,
            "predictor": self.predictor,
            "adversary": self.adversary,
            "momentum_encoder": self.momentum_encoder,
            "momentum_head": self.momentum_head,
            "queue": self.queue,
        }
        return {k: v for k, v in named.items() if v is not None}

    def current_stage(self) -> Stage:
        """The stage of the current (or, between epochs, the last) iteration."""
        return self.schedule.stage_at(max(self.state.epoch, 1), max(self.state.iteration, 1))
