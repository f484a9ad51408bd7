"""The method of :class:`~dira3d.engines.DiRATrainer`: one generator step, then the discriminator step(s).

:class:`TrainingStepMixin` holds the trainer's iteration (``_iteration``, the ignite process function) and
what it is made of: the views and distortion of a batch (``step_inputs``), the unweighted loss terms of
one encoder pass (``forward_terms``, also used by :class:`~dira3d.engines.DiRAEvaluator`), the
discrimination term per mode, D's scores on real and restored patches (``adversary_scores``), and the
epoch means of the step's outputs (``train_<key>`` in ``state.metrics``; their running sums travel in a
mid-epoch checkpoint: ``epoch_sums_state`` / ``restore_epoch_sums``). It also defines what passes
between them: :class:`StepInputs`, :class:`Prepared` (a batch prepared ahead by the prefetcher) and
:class:`Forward`. The mixin has no state of its own: it reads the attributes that
:class:`~dira3d.engines.trainer.DiRATrainer`'s constructor sets (networks, losses, optimisers,
scalers, schedule, MoCo key side, guard); :mod:`dira3d.engines.trainer` describes the iteration step by step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from ignite.engine import Engine

from dira3d.engines.cpu_bf16 import onednn_off
from dira3d.engines.distributed import get_rank, get_world_size
from dira3d.engines.faults import step_is_finite
from dira3d.engines.optim import autocast_context, frozen, learning_rate, optimizer_step
from dira3d.engines.stages import Stage
from dira3d.losses.distributed import concat_all_gather
from dira3d.transforms.compositions import Distortion
from dira3d.transforms.views import ViewAugment

__all__ = ["TrainingStepMixin", "StepInputs", "Prepared", "Forward"]


class StepInputs(NamedTuple):
    """What the network sees in one step: the two views, the distorted view and its restoration target;
    with ``second_view`` ``"distorted"`` / ``"restored"`` (while ``dis`` is active) also the distorted second
    view and its restoration target (None otherwise)."""

    view1: torch.Tensor
    view2: torch.Tensor
    distorted: torch.Tensor
    target: torch.Tensor
    distorted2: torch.Tensor | None = None
    target2: torch.Tensor | None = None


class Prepared(NamedTuple):
    """A batch prepared before its step (``prefetch``): on the device, with its draws and inputs."""

    batch: dict[str, Any]
    generator: torch.Generator
    inputs: StepInputs
    iteration: int
    stage: str


class Forward(NamedTuple):
    """What one generator forward produced (unweighted loss terms and the images). With ``second_view="restored"``
    ``distorted``, ``target`` and ``restored`` hold both views' patches along the batch (the first view's first):
    D's step compares 2B restorations with their 2B targets."""

    terms: dict[str, torch.Tensor]
    distorted: torch.Tensor
    target: torch.Tensor
    restored: torch.Tensor | None
    keys: torch.Tensor | None  # MoCo keys of every rank (rank 0's first) to enqueue after the step; training only


class TrainingStepMixin:
    """The step of :class:`~dira3d.engines.DiRATrainer` (see the module docstring); mixed in before
    ``monai.engines.Trainer``, whose ``_iteration`` it provides."""

    def step_inputs(self, batch: Mapping[str, Any], generator: torch.Generator, stage: Stage) -> StepInputs:
        """The views T(x) (instance modes, while ``dis`` is active) and the distorted first view.

        The restoration target (and D's real patch) is the first view's crop before its intensity
        augmentation (jitter, gamma, noise, blur), with the crop's and the distortion's flips: DiRA
        restores x1 from T(x1) (METHOD.md section 3, patent L_res = dist(x1, x1')), it does not
        reproduce the jitter and blur of the view.

        With ``second_view`` ``"distorted"`` or ``"restored"`` (instance modes, while ``dis`` is active) the
        second view is distorted too, its target being its own crop before the intensity steps. That
        distortion is drawn after every draw of the ``"augmented"`` step, so the views and the first view's
        distortion are the same in all three forms.
        """
        x1, x2 = batch["image"], batch.get("image2")
        view1, view2 = x1, x2 if x2 is not None else x1
        clean = clean2 = None
        has_views = "dis" in stage.losses and self.dis_mode != "visual_words"
        second = has_views and self.second_view != "augmented"
        # views and distortions are data preparation: fp32 even under autocast (same draws, same
        # targets as the plain path; autocast casts the network's inputs itself)
        with torch.autocast(x1.device.type, enabled=False):
            if has_views and self.views is not None:
                # a ViewAugment also returns the views without their intensity steps (no extra draws)
                with_clean = isinstance(self.views, ViewAugment) and isinstance(self.distortion, Distortion)
                extra = {"return_clean": True, "return_clean2": second} if with_clean else {}
                b = x1.shape[0]
                if x2 is None:
                    view1, view2, *rest = self.views(x1, generator, **extra)
                else:  # two instances: one view of each, in one batched call
                    a, v, *rest = self.views(torch.cat([x1, x2]), generator, **extra)
                    view1, view2, rest = a[:b], v[b:], [r[:b] if i == 0 else r[b:] for i, r in enumerate(rest)]
                clean, clean2 = (rest + [None, None])[:2]
            distorted, target = self._distort(view1, generator, clean)
            distorted2 = target2 = None
            if second:  # last: the draws above are those of the default step
                distorted2, target2 = self._distort(view2, generator, clean2)
        return StepInputs(view1, view2, distorted, target, distorted2, target2)

    def _distort(self, view: torch.Tensor, generator: torch.Generator,
                 clean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``distorted, target`` of a view: the target is ``clean`` (the view before its intensity steps)
        with the distortion's flips, or the view itself when there is none."""
        if clean is None:
            return self.distortion(view, generator)
        return self.distortion(view, generator, target=clean)

    def forward_terms(self, batch: Mapping[str, Any], generator: torch.Generator, stage: Stage, train: bool = True,
                      inputs: StepInputs | None = None) -> Forward:
        """The unweighted loss terms of ``stage`` for one prepared batch (one encoder pass for dis + res).

        ``train=False`` (validation) leaves the EMA encoder and the queue untouched. ``inputs``:
        :meth:`step_inputs` already drawn with ``generator`` (by the prefetcher), else drawn here.

        ``second_view`` (instance modes, while ``dis`` is active): ``"distorted"`` and ``"restored"`` give the
        distorted second view to the discrimination (MoCo's key encoder; the other Barlow Twins / SimSiam
        branch, whose encoder pass ``"restored"`` also decodes: no extra pass). ``"restored"`` restores it
        too: L_res is the mean of the two views' restoration losses and L_adv scores both restorations. In
        ``moco`` that costs an extra pass of the query encoder on the distorted second view, which only
        restores: its projection does not enter InfoNCE (the keys stay the key encoder's).
        """
        active = set(stage.losses)
        if inputs is None:
            inputs = self.step_inputs(batch, generator, stage)
        distorted, target, distorted2 = inputs.distorted, inputs.target, inputs.distorted2
        bottleneck, skips = self.network.encode(distorted)
        terms: dict[str, torch.Tensor] = {}
        keys = encoded2 = None
        if "dis" in active:
            view2 = inputs.view2 if distorted2 is None else distorted2
            terms["dis"], keys, encoded2 = self._discriminate(bottleneck, view2, batch, generator, train)
        restored = None
        if "res" in active or "adv" in active:
            restored = self.network.decode(bottleneck, skips)
            terms["res"] = self.restoration_loss(restored.float(), target.float())
            if self.second_view == "restored" and distorted2 is not None:
                if encoded2 is None:  # moco: the query encoder's own pass on the distorted second view
                    encoded2 = self.network.encode(distorted2)
                restored2 = self.network.decode(*encoded2)
                res2 = self.restoration_loss(restored2.float(), inputs.target2.float())
                terms["res"] = 0.5 * (terms["res"] + res2)
                distorted, target = torch.cat([distorted, distorted2]), torch.cat([target, inputs.target2])
                restored = torch.cat([restored, restored2])
        if "adv" in active:
            with frozen(self.adversary):
                terms["adv"] = self.adversarial_loss.generator(self.adversary(restored))
        return Forward(terms, distorted, target, restored, keys)

    def _discriminate(self, bottleneck, view2, batch, generator, train) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """``(L_dis, MoCo's keys to enqueue or None, the encoder's (bottleneck, skips) of view2 or None)``."""
        if self.dis_mode == "visual_words":
            loss = self.dis_loss(self.dis_head(bottleneck), batch["label"])
            if self.classify_both and batch.get("image2") is not None:
                distorted2, _ = self.distortion(batch["image2"], generator)
                logits2 = self.dis_head(self.network.encode(distorted2)[0])
                loss = 0.5 * (loss + self.dis_loss(logits2, batch["label"]))
            return loss, None, None
        z1 = self.dis_head(bottleneck)
        if self.dis_mode == "moco":
            with torch.no_grad():
                if train:  # MoCo updates the key encoder before computing the keys
                    self.moco.follow(self.network.encoder, self.dis_head)
                    keys, queued = self.moco.training_keys(view2, self.state.iteration, self.state.device,
                                                           self.memory_format)
                else:  # validation: no queue update, no communication
                    keys, queued = self.moco.encode(view2), None
            return self.dis_loss(z1.float(), keys, self.queue.queue), queued, None
        encoded2 = self.network.encode(view2)
        z2 = self.dis_head(encoded2[0])
        if self.dis_mode == "barlow":
            return self.dis_loss(z1.float(), z2.float()), None, encoded2
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return self.dis_loss(p1.float(), p2.float(), z1.float(), z2.float()), None, encoded2

    def adversary_scores(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's loss and its mean score on real and restored patches (probabilities for vanilla)."""
        if self.joint_adversary:
            both = torch.cat([real, fake.to(real.dtype)])
            if self.memory_format is not None:
                both = both.contiguous(memory_format=self.memory_format)
            real_logits, fake_logits = self.adversary(both).float().split(real.shape[0])
        else:  # batch norm: real and fake batches keep their own statistics
            real_logits, fake_logits = self.adversary(real).float(), self.adversary(fake).float()
        loss = self.adversarial_loss.discriminator(real_logits, fake_logits)
        if getattr(self.adversarial_loss, "kind", "vanilla") == "vanilla":
            real_logits, fake_logits = torch.sigmoid(real_logits), torch.sigmoid(fake_logits)
        return loss, real_logits.mean().detach(), fake_logits.mean().detach()

    def _iteration(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if self.onednn_off:  # bf16 on a CPU whose oneDNN gets 3D weight gradients wrong (dira3d.engines.cpu_bf16)
            with onednn_off():
                return self._train_step(engine, batchdata)
        return self._train_step(engine, batchdata)

    def _train_step(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        stage = self.schedule.stage_at(engine.state.epoch, engine.state.iteration)
        if stage.name != engine.state.stage:
            self.logger.info(f"stage '{stage.name}' from iteration {engine.state.iteration}: losses {list(stage.losses)}")
        engine.state.stage = stage.name
        if isinstance(batchdata, Prepared) and (batchdata.iteration, batchdata.stage) == (engine.state.iteration, stage.name):
            batch, generator, inputs = batchdata.batch, batchdata.generator, batchdata.inputs
        else:  # the loader's batch (or, defensively, one prepared for another iteration: drawn again)
            batch = self._prepare(batchdata.batch if isinstance(batchdata, Prepared) else batchdata)
            generator, inputs = self.step_generator(engine.state.iteration), None
        device = self.state.device

        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.amp_mode, device):
            fwd = self.forward_terms(batch, generator, stage, train=True, inputs=inputs)
            total, weighted = self.loss_function(fwd.terms, stage.losses)
        # on_nonfinite='skip': a NaN/Inf step is dropped on all ranks (costs one host sync per step)
        skip = self.nonfinite_guard.on_nonfinite == "skip" and not step_is_finite(total)
        if skip:
            self.nonfinite_guard.skipped += 1
        else:
            optimizer_step(total, self.optimizer, self.g_params, self.scaler_g, self.clip_grad_norm)
        if fwd.keys is not None and not skip:  # after backward: the loss graph still needed the old queue
            self.queue.enqueue(fwd.keys)

        output: dict[str, Any] = {"loss": total.detach()}
        output.update({f"loss_{k}": v.detach() for k, v in fwd.terms.items()})
        if stage.adversarial and not skip:
            fake = fwd.restored.detach()
            for _ in range(self.d_steps):
                self.optimizer_d.zero_grad(set_to_none=True)
                with autocast_context(self.amp_mode, device):
                    d_loss, d_real, d_fake = self.adversary_scores(fwd.target, fake)
                if self.nonfinite_guard.on_nonfinite == "skip" and not step_is_finite(d_loss):
                    self.nonfinite_guard.skipped += 1
                    break
                optimizer_step(d_loss, self.optimizer_d, self.d_params, self.scaler_d, self.clip_grad_norm)
            output.update({"loss_d": d_loss.detach(), "d_real": d_real, "d_fake": d_fake})
        output.update(
            lr_g=learning_rate(self.optimizer),
            lr_d=learning_rate(self.optimizer_d),
            stage=stage.name,
            stage_index=self.schedule.index(stage),
        )
        # first sample only, kept by reference (no copy) for the image summary handler
        engine.state.images = {
            "original": fwd.target[:1].detach(),
            "distorted": fwd.distorted[:1].detach(),
            "restored": None if fwd.restored is None else fwd.restored[:1].detach(),
        }
        return output

    # ------------------------------------------------------------------ loss bookkeeping
    def _accumulate(self, engine: Engine) -> None:
        for key, value in engine.state.output.items():
            if isinstance(value, torch.Tensor):
                self._epoch_sums[key] = self._epoch_sums.get(key, 0) + value.float()
        self._epoch_count += 1

    def _epoch_means(self, engine: Engine) -> None:
        # one host sync per epoch: the means go to state.metrics for StatsHandler/TensorBoard
        for key, total in self._epoch_sums.items():
            engine.state.metrics[f"train_{key}"] = float(total) / max(self._epoch_count, 1)
        self._epoch_sums, self._epoch_count = {}, 0

    def epoch_sums_state(self) -> dict[str, Any]:
        """The running sums of this epoch's outputs so far, for a checkpoint (tensors and an int only):
        ``{"count": n, "sums": {key: tensor}}``, each sum a 1-D tensor of every rank's sum (rank r's at r).

        The epoch means are per rank (each rank averages its own outputs; rank 0's reach the log and
        TensorBoard) and rank 0 alone writes checkpoints, so the sums of every rank are gathered into it.
        Under DDP a collective (one ``all_gather`` when the epoch has begun): every rank must call it, as
        :class:`~dira3d.engines.DiRACheckpoint` does before each save.
        """
        keys = list(self._epoch_sums)  # the same keys in the same order on every rank (same stages, same outputs)
        if not self._epoch_count or not keys:  # the same count on every rank: all of them skip the gather
            return {"count": 0, "sums": {}}
        local = torch.stack([self._epoch_sums[k].detach().float().reshape(()) for k in keys])
        table = concat_all_gather(local[None])  # (world_size, keys), rank 0's row first
        return {"count": int(self._epoch_count), "sums": {k: table[:, i].clone() for i, k in enumerate(keys)}}

    def restore_epoch_sums(self, saved: Mapping[str, Any] | None, done: int) -> str | None:
        """Put back what :meth:`epoch_sums_state` saved, in a run resumed ``done`` iterations into an epoch.

        Returns None when this epoch's means will cover all its iterations, else why they will cover only
        the iterations after the resume, to follow the checkpoint's name (a checkpoint written before the
        sums were saved, or one written with another number of processes).
        """
        self._epoch_sums, self._epoch_count = {}, 0
        if not done:
            return None
        if not saved or "count" not in saved:
            return "holds no running loss sums (written by an older dira3d)"
        sums, world = dict(saved.get("sums") or {}), get_world_size()
        widths = sorted({int(v.numel()) for v in sums.values()})
        if widths and widths != [world]:
            return f"was written by a run of {widths[0]} processes and this one has {world}"
        self._epoch_sums = {k: v.reshape(-1)[get_rank()].float().to(self.state.device) for k, v in sums.items()}
        self._epoch_count = int(saved["count"])
        if self._epoch_count != done:  # a run resumed from an older checkpoint, then saved again mid-epoch
            return f"holds sums of only the last {self._epoch_count} of the {done} iterations before it"
        return None
