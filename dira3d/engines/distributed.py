"""Distributed data-parallel helpers for DiRA training (``torchrun``; NCCL on GPU, gloo on CPU).

What each rank does under DDP (``bundles/dira_pretrain/configs/multi_gpu_train.json``):

- every rank holds a full copy of the networks; gradients are averaged over ranks after each
  backward (:func:`dira3d.engines.optim.optimizer_step`), so all ranks keep identical weights;
- the data are split by a ``DistributedSampler`` (shuffled per epoch: MONAI's ``Trainer`` calls
  ``set_epoch`` at every epoch start); each rank sees ``batch_size`` samples per step, the global
  batch is ``world_size × batch_size``;
- MoCo keys are gathered from all ranks before they are enqueued (every queue stays identical);
  with shuffle BN the key encoder encodes a share of the permuted global batch
  (:mod:`dira3d.engines.shuffle_bn`);
  Barlow Twins' cross-correlation is computed over the global batch (``gather_distributed``);
- per-iteration draws (views, distortions) and per-epoch random crops are seeded by
  (seed, rank, iteration / epoch): ranks draw different augmentations, a resumed run draws the same;
- only rank 0 writes checkpoints, TensorBoard events and console logs (:func:`is_main_process`; the trainer
  leaves the reporting handlers out on the other ranks by their class,
  :func:`dira3d.engines.handlers.rank_zero_handlers`).

BatchNorm statistics are per rank unless :func:`maybe_sync_batchnorm` converts the networks to
``SyncBatchNorm`` — which PyTorch implements for GPU tensors only, so it is a no-op on CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "get_rank",
    "launcher_rank",
    "get_world_size",
    "is_main_process",
    "init_distributed",
    "restart_store",
    "cleanup_distributed",
    "maybe_sync_batchnorm",
    "per_rank_batchnorm",
    "default_backend",
    "local_device",
    "all_ranks_true",
    "all_ranks_min",
    "main_process_value",
    "validation_sampler",
    "quiet_other_ranks",
    "brief_errors_on_other_ranks",
]


def get_rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launcher_rank() -> int:
    """This process's rank in its process group, else ``torchrun``'s ``RANK`` (a process that has not joined its group
    yet: a bundle's configs resolved before ``init_process_group``, ``inference.json`` before its batch joins the
    ranks), else 0. For a line that rank 0 alone should print or log."""
    return get_rank() or int(os.environ.get("RANK", "0") or 0)


def get_world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in single-process runs): the one process that writes files and logs."""
    return get_rank() == 0


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else CPU (``LOCAL_RANK`` is set by torchrun)."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout: Any = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (idempotent).

    Args:
        backend: ``"nccl"``, ``"gloo"`` or None (:func:`default_backend`).
        timeout: how long a collective waits for the other ranks (a ``datetime.timedelta``); None: PyTorch's default.

    Returns:
        True when a process group is (now) initialised, False in a plain single-process run
        (no ``WORLD_SIZE`` / ``MASTER_ADDR`` in the environment).

    Raises:
        ValueError: ``backend="nccl"`` without CUDA (use ``gloo`` on CPU).
    """
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    backend = backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA GPUs; use backend='gloo' for CPU training")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    store = restart_store()
    waits = {} if timeout is None else {"timeout": timeout}
    if store is None:
        dist.init_process_group(backend=backend, **waits)
    else:
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), **waits)
    return True


def restart_store() -> Any:
    """The rendezvous store of a single-node ``torchrun --max_restarts N`` worker: torchrun's own store (the agent's, at
    ``MASTER_ADDR:MASTER_PORT``) under a prefix of this restart (``TORCHELASTIC_RESTART_COUNT``); None elsewhere
    (``init_process_group``'s ``env://`` then).

    torchrun keeps one store for all the restarts of a run, and the process group's keys (each rank's address) are
    the same in every attempt: a restarted rank that read another's key before that rank had written it again got
    the address of the process that had failed, and the restart died in ``init_process_group`` with ``Gloo
    connectFullMesh failed ... Connection refused`` (NCCL: ``socketPollConnect ... Connection refused``; PyTorch
    issue 167288). Only with one node (``GROUP_WORLD_SIZE`` 1): the agents of several nodes may count restarts
    differently (a node restarts its workers without counting when another node's failed), and a prefix the
    ranks disagree on would leave them waiting for each other.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"dira3d/restart_{int(env.get('TORCHELASTIC_RESTART_COUNT', '0'))}", store)


def cleanup_distributed() -> None:
    """Leave the process group if one is initialised, once every rank has got here.

    Without the barrier a fast rank can tear gloo down while another is still finishing its last
    collective, and that rank then aborts at exit ("terminate called without an active exception").
    After a ``DistributedDataParallel`` model on gloo the group's worker threads outlive the destroy, and one that
    dropped the last collective while the interpreter was finalising aborted the process the same way: it waits for
    them to be idle (:func:`dira3d.engines.gloo_exit.wait_for_gloo_workers`, at most 5 s).
    """
    if dist.is_available() and dist.is_initialized():
        from dira3d.engines.gloo_exit import wait_for_gloo_workers

        dist.barrier()
        dist.destroy_process_group()
        wait_for_gloo_workers()


def maybe_sync_batchnorm(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Convert BatchNorm layers to ``SyncBatchNorm`` for multi-process GPU training.

    Statistics are then computed over the global batch (important with small per-GPU batches).
    PyTorch's ``SyncBatchNorm`` only runs on GPU tensors, so on CPU (gloo) or with one process
    the module is returned unchanged and BatchNorm statistics stay per rank.
    """
    if not enabled or get_world_size() < 2 or not torch.cuda.is_available():
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class PerRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the rank's own batch, for inputs of any dimensionality (what
    :func:`per_rank_batchnorm` puts in place of a ``SyncBatchNorm``; same parameters and buffers)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"expected a (B, C, ...) input, got {input.dim()}D")


def per_rank_batchnorm(module: nn.Module) -> nn.Module:
    """Turn ``SyncBatchNorm`` layers back into BatchNorm over each rank's own batch, in place.

    For MoCo's key encoder under shuffle BN (:mod:`dira3d.engines.shuffle_bn`): synchronised
    statistics cover the whole global batch whatever its order, so the shuffle would change no key.
    State-dict keys and values are unchanged. A module without ``SyncBatchNorm`` is returned as is.
    """
    if isinstance(module, nn.SyncBatchNorm):
        plain = PerRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        plain.load_state_dict(module.state_dict())
        plain.train(module.training)
        plain.requires_grad_(any(p.requires_grad for p in module.parameters()))
        return plain.to(next(iter(module.state_dict().values())).device) if module.state_dict() else plain
    for name, child in module.named_children():
        setattr(module, name, per_rank_batchnorm(child))
    return module


def all_ranks_true(flag: bool | torch.Tensor, device: Any = "cpu") -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce; the flag itself without DDP).

    Ranks that disagree on skipping a step would deadlock in the gradient all-reduce or drift
    apart: decisions like that must be taken jointly.
    """
    value = torch.as_tensor(flag, dtype=torch.int32, device=device).reshape(())
    if get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def all_ranks_min(values: list[int], device: Any = "cpu") -> list[int]:
    """The minimum of each of ``values`` over all ranks, in ONE all-reduce (``values`` themselves with one
    process, without a tensor or a host sync). The maximum of a value is minus the minimum of its negation.

    ``device``: where the all-reduce runs; the training device (NCCL reduces CUDA tensors only).
    """
    if get_world_size() < 2:
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return [int(v) for v in tensor.tolist()]


def main_process_value(value: float, device: Any = "cpu") -> float:
    """Rank 0's ``value`` on every rank, in ONE broadcast (``value`` itself with one process).

    For decisions every rank must take alike from a number that may differ between ranks, e.g. a
    validation loss with per-rank BatchNorm statistics (early stopping: a rank that stopped alone would
    leave the others waiting in an all-reduce). ``device``: the training device (NCCL moves CUDA tensors only).
    """
    if get_world_size() < 2:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def validation_sampler(dataset: Any) -> Any:
    """The sampler of a task bundle's validation split under DDP (``validate#sampler`` of its ``multi_gpu_train.json``).

    Each rank scores its share: MONAI's ``DistributedSampler`` with ``even_divisible=False`` (rank r of W the cases
    r, r + W, ...; no case twice), whose metrics MONAI gathers over the ranks. A split of fewer cases than ranks (the
    holdout of a small ``label_fraction``: 0.1 of 48 BraTS patients is 5 cases, on 8 GPUs) is scored whole by every
    rank instead: MONAI's sampler refuses it (``the dataset length is less than the number of participating ranks``,
    after the caches were filled) and a rank with no case would stop ignite (``Input data has zero size``). The
    gathered metrics then hold each case W times, which leaves their mean (Dice, IoU) and the AUC unchanged."""
    from monai.data import DistributedSampler

    world = get_world_size()
    if len(dataset) < world:
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
    return DistributedSampler(dataset, even_divisible=False, shuffle=False, num_replicas=world, rank=get_rank())


def quiet_other_ranks(names: tuple[str, ...] = ("DiRATrainer", "DiRAEvaluator", "ignite", "monai", "dira3d")) -> None:
    """Raise the log level on ranks other than 0 to WARNING (rank 0 alone reports progress; warnings and errors are
    still every rank's). ``dira3d`` is among the defaults: the cache lines of :mod:`dira3d.engines.cache` (logged by
    each process) were repeated by every rank of ``dira_pretrain``'s ``multi_gpu_train.json``."""
    if is_main_process():
        return
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


_MONAI_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")  # how MONAI wraps an error


def brief_errors_on_other_ranks() -> None:
    """On ranks other than 0, an error that ends the process is one line, ``[rank1]: ValueError: <message>`` (the
    error inside MONAI's ``Failed to evaluate ConfigExpression``, ``Failed to instantiate component`` (a bad setting of a
    component) or ``applying transform``), not its traceback.

    Every rank of a run that fails for a common reason (a checkpoint of other settings, a bad setting) printed the
    same tracebacks, interleaved, screens of them; rank 0 prints its own in full, and the one line of a rank that
    failed alone names its error. ``DIRA3D_ALL_TRACEBACKS=1`` in the environment keeps every rank's traceback. The
    engines' error logs of such a rank are left out too (the ``ignite`` loggers log nothing below CRITICAL there,
    rank 0 logs the same; ``StatsHandler``'s through :class:`dira3d.utils.interrupts.QuietInterruptMixin`). For a
    bundle's ``initialize``, after the process group is formed. MONAI's ``--- input summary of
    monai.bundle.scripts.run ---`` block, which every rank logged after ``initialize``, is left to rank 0 too.

    Without a process group (a task bundle's ``inference.json`` calls it first in its ``initialize``, before its
    ``InferenceBatch`` joins the ranks) the rank is the one ``torchrun`` gives in ``RANK``."""
    rank = launcher_rank()
    if rank == 0:
        return
    logging.getLogger("monai.bundle.scripts").setLevel(logging.WARNING)  # its input summary: rank 0 logs the same
    if os.environ.get("DIRA3D_ALL_TRACEBACKS") == "1":
        return
    from dira3d.utils.interrupts import quiet_engine_errors

    quiet_engine_errors()
    logging.getLogger("ignite").setLevel(logging.CRITICAL)  # the engines' "terminating due to exception" lines

    def one_line(kind: type, error: BaseException, tb: Any) -> None:
        root = error  # the error inside MONAI's wrappers (a config expression, a component, a transform), not its cause
        while root.__cause__ is not None and str(root).startswith(_MONAI_WRAPPERS):
            root = root.__cause__
        first = (str(root).strip().splitlines() or [""])[0]
        # a process group formed after this hook (inference.json joins its ranks later) wraps it in torch's hook,
        # which prefixes every line with [rankN]: itself
        prefix = f"[rank{rank}]: " if sys.excepthook is one_line else ""
        print(f"{prefix}{type(root).__name__}: {first} (this rank's traceback is left out; "
              "DIRA3D_ALL_TRACEBACKS=1 prints it)", file=sys.stderr, flush=True)

    sys.excepthook = one_line
