"""Whole-volume feature extractor for visual-word self-discovery.

TransVW embeds every patient with the bottleneck of an autoencoder trained on downsampled
volumes. The reference network has skip connections, which let the decoder bypass the bottleneck
and leave it weak; :class:`VolumeAutoencoder` has none, so the reconstruction must pass through
the latent. Any pretrained dira3d encoder (a pretraining checkpoint) may be used instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from monai.data import Dataset
from monai.transforms import Compose, EnsureTyped, Resized
from torch import nn
from torch.utils.data import DataLoader

from dira3d.utils.checkpoint import atomic_save, load_checkpoint
from dira3d.visual_words.loading import volume_transform

__all__ = ["EXTRACTOR_NAME", "VolumeAutoencoder", "train_extractor", "embed_volumes", "iter_embeddings", "extractor_from_checkpoint",
           "extractor_progress"]

EXTRACTOR_NAME = "extractor.pt"  # the autoencoder's per-epoch checkpoint in a visual-words output folder

logger = logging.getLogger(__name__)

_BASE_CHANNELS = (32, 64, 128, 256, 512)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class VolumeAutoencoder(nn.Module):
    """A 3D convolutional autoencoder **without** skip connections.

    Encoder: 4 levels of conv-BN-ReLU blocks (32→64 | 128 | 256 | 512 channels × ``width``),
    max-pooling between levels (3 poolings, spatial sizes divisible by 8). Decoder: transposed
    convolutions ×2 each followed by a conv block, then a 1×1 conv and a sigmoid.

    Args:
        in_channels: image channels.
        width: channel multiplier (1.0 gives a 512-d embedding, as in the reference).

    Raises:
        ValueError: ``width`` is not positive.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"VolumeAutoencoder width must be > 0, got {width}")
        c = [max(1, int(round(ch * width))) for ch in _BASE_CHANNELS]
        self.in_channels = in_channels
        self.width = width
        self.embedding_dim = c[4]
        self.encoder = nn.Sequential(
            _conv_block(in_channels, c[0]), _conv_block(c[0], c[1]), nn.MaxPool3d(2),
            _conv_block(c[1], c[2]), nn.MaxPool3d(2),
            _conv_block(c[2], c[3]), nn.MaxPool3d(2),
            _conv_block(c[3], c[4]),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.ConvTranspose3d(c[4], c[3], 2, stride=2), _conv_block(c[3], c[3]),
            nn.ConvTranspose3d(c[3], c[2], 2, stride=2), _conv_block(c[2], c[2]),
            nn.ConvTranspose3d(c[2], c[1], 2, stride=2), _conv_block(c[1], c[1]),
            nn.Conv3d(c[1], in_channels, 1), nn.Sigmoid(),
        )  # fmt: skip

    def _check(self, x: torch.Tensor) -> None:
        bad = [s for s in x.shape[2:] if s % 8]
        if x.ndim != 5 or bad:
            raise ValueError(
                f"VolumeAutoencoder needs (B, C, X, Y, Z) input with sizes divisible by 8, got {tuple(x.shape)}; "
                "choose an extractor size such as 128 128 64"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck feature map ``(B, D, X/8, Y/8, Z/8)``."""
        self._check(x)
        return self.encoder(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The global-average-pooled bottleneck, ``(B, D)``."""
        return self.encode(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def _resized_dataset(entries: Sequence[dict], size: Sequence[int], orient: bool, raw_hu_window) -> Dataset:
    transform = Compose([
        volume_transform(orient=orient, raw_hu_window=raw_hu_window),
        Resized(keys="image", spatial_size=tuple(size), mode="area"),
        # plain tensors: MetaTensor's __torch_function__ would slow every op of training several-fold
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ])  # fmt: skip
    return Dataset(data=[{"image": e["image"]} for e in entries], transform=transform)


PROGRESS_SECONDS = 60.0  # a progress line at most this often inside an extractor epoch or the embedding


class _Progress:
    """Logs ``what: done/total volumes, elapsed, ~remaining`` at most every :data:`PROGRESS_SECONDS`: at the
    default size an extractor step takes minutes on a CPU, and an epoch over many volumes hours."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.scope = " in this epoch" if what.startswith("extractor epoch") else ""  # not the whole run's
        self.start = self.last = time.monotonic()

    def step(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS or done >= self.total:
            return
        self.last, elapsed = now, now - self.start
        logger.info("%s: %d/%d volumes, %.0f s, about %.0f s to go%s", self.what, done, self.total, elapsed,
                    elapsed / max(done, 1) * (self.total - done), self.scope)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def train_extractor(
    entries: Sequence[dict],
    size: Sequence[int] = (128, 128, 64),
    epochs: int = 10,
    batch_size: int = 2,
    lr: float = 1e-3,
    width: float = 1.0,
    seed: int = 0,
    orient: bool = True,
    raw_hu_window: tuple[float, float] | None = None,
    workers: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_path: str | os.PathLike | None = None,
    settings: dict | None = None,
) -> VolumeAutoencoder:
    """Train a :class:`VolumeAutoencoder` (MSE, Adam) on whole volumes resized to ``size``.

    With ``checkpoint_path`` the model, the optimiser, the shuffling generator and the epoch are saved
    there (atomically) after every epoch, and a run that finds the file continues after its last epoch:
    an interrupted training loses at most one epoch, and the resumed weights equal an uninterrupted run's
    (on a CPU, bit for bit). ``settings`` (anything JSON-like that shapes the training) is stored with it;
    a file saved with other settings is refused.

    Args:
        entries: datalist entries with absolute ``"image"`` paths.
        size: the resize target (x, y, z), each divisible by 8.
        epochs: passes over the volumes.
        batch_size: volumes per step.
        lr: Adam learning rate.
        width: channel multiplier of the autoencoder.
        seed: seeds initialisation and shuffling (a local generator; global RNGs are restored).
        orient, raw_hu_window: see :func:`dira3d.visual_words.loading.volume_transform`.
        workers: DataLoader workers.
        device: where to train.
        checkpoint_path: the per-epoch checkpoint (see above); None keeps nothing.
        settings: stored with the checkpoint and compared on resume (a dict: on its own keys; None: only the
            training arguments).

    Returns:
        The trained autoencoder in eval mode.

    Raises:
        ValueError: ``size`` is not divisible by 8 or ``epochs`` < 0; the checkpoint is not readable or
            was made with other settings.
    """
    if any(int(s) % 8 for s in size) or len(size) != 3:
        raise ValueError(f"extractor size {tuple(size)} must be three sizes divisible by 8, e.g. 128 128 64")
    if epochs < 0:
        raise ValueError(f"extractor epochs must be >= 0, got {epochs}")
    dataset = _resized_dataset(entries, size, orient, raw_hu_window)
    # the volumes' channels (a multi-sequence MR datalist of `prepare generic --sequences` has 4D volumes): a
    # one-channel autoencoder stopped such a run with a traceback from its first convolution
    channels = int(dataset[0]["image"].shape[0]) if len(entries) else 1
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = VolumeAutoencoder(in_channels=channels, width=width).to(device)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, generator=generator,
                        drop_last=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    recorded = {
        "size": [int(s) for s in size], "epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
        "width": float(width), "seed": int(seed), "orient": bool(orient),
        "raw_hu_window": [float(h) for h in raw_hu_window] if raw_hu_window else None,
        "volumes": [str(e["image"]) for e in entries], "settings": settings,
    }  # fmt: skip
    if channels != 1:  # absent: one channel, as in the checkpoints written before it was recorded
        recorded["in_channels"] = channels
    start = _resume_extractor(checkpoint_path, recorded, model, optimiser, generator) if checkpoint_path else 0
    for epoch in range(start, epochs):
        model.train()
        total, count = 0.0, 0
        progress = _Progress(f"extractor epoch {epoch + 1}/{epochs}", len(entries))
        for batch in loader:
            x = torch.as_tensor(batch["image"]).float().to(device)
            loss = nn.functional.mse_loss(model(x), x)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total, count = total + loss.item() * len(x), count + len(x)
            progress.step(count)
        # the whole run's time to go: the progress lines inside an epoch give that epoch's only
        took, left = progress.elapsed(), epochs - epoch - 1
        logger.info("extractor epoch %d/%d: mse %.5f (%s%s)", epoch + 1, epochs, total / max(count, 1), _minutes(took),
                    f"; about {_minutes(took * left)} for the {left} epoch(s) left" if left else "")
        if checkpoint_path:
            state = {"format": _FORMAT, "epoch": epoch + 1, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                     "generator": generator.get_state(), "recorded": recorded}  # fmt: skip
            atomic_save(state, checkpoint_path)
    return model.eval()


_FORMAT = "dira3d-visual-words-extractor"


def _read_extractor_checkpoint(path: Path) -> dict:
    state = load_checkpoint(path)
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a dira3d visual-words extractor checkpoint (format={state.get('format')!r}); "
                         "move it away, or pass --overwrite to start again")
    return state


def extractor_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """(epochs done, epochs planned) of the extractor checkpoint at ``path``; None when there is none
    or it cannot be read."""
    try:
        state = _read_extractor_checkpoint(Path(path))
    except (FileNotFoundError, ValueError):
        return None
    return int(state["epoch"]), int(state["recorded"]["epochs"])


def _resume_extractor(path: str | os.PathLike, recorded: dict, model: nn.Module, optimiser, generator: torch.Generator) -> int:
    """Load the checkpoint at ``path`` into the training state if it exists; the epoch to start at."""
    path = Path(path)
    if not path.exists():
        return 0
    state = _read_extractor_checkpoint(path)
    before = state["recorded"]
    differences = [f"{k}: {before.get(k)!r} → {recorded[k]!r}" for k in recorded
                   if k not in ("volumes", "settings", "in_channels") and before.get(k) != recorded[k]]
    if before.get("in_channels", 1) != recorded.get("in_channels", 1):
        differences.append(f"image channels: {before.get('in_channels', 1)} → {recorded.get('in_channels', 1)}")
    if before.get("volumes") != recorded["volumes"]:
        differences.append("the training volumes")
    # compared on the keys this run records: a checkpoint of an earlier version stored every visual-word setting,
    # planning rules included, which do not shape the extractor
    settings, earlier = recorded["settings"], before.get("settings")
    if isinstance(settings, dict) and isinstance(earlier, dict):
        differences += [f"{k}: {earlier.get(k)!r} → {settings[k]!r}" for k in settings if earlier.get(k) != settings[k]]
    elif earlier != settings:
        differences.append("the visual-word settings")
    if differences:
        raise ValueError(f"{path} was trained with other settings ({'; '.join(differences)}); rerun with the same settings "
                         "to continue it, or pass --overwrite to start again (or choose another --out)")
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    generator.set_state(state["generator"])
    logger.info("continuing the extractor from %s after epoch %d/%d", path, state["epoch"], recorded["epochs"])
    return int(state["epoch"])


def _feature_vectors(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # VolumeAutoencoder has embed(); dira3d UNet has encode() -> (bottleneck, skips); any other
    # module is called and its feature map pooled.
    if hasattr(model, "embed"):
        out = model.embed(x)
    elif hasattr(model, "encode"):
        out = model.encode(x)
    else:
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.flatten(2).mean(dim=2) if out.ndim > 2 else out


@torch.no_grad()
def embed_volumes(
    encoder: nn.Module,
    entries: Sequence[dict],
    size: Sequence[int] = (128, 128, 64),
    batch_size: int = 2,
    orient: bool = True,
    raw_hu_window: tuple[float, float] | None = None,
    workers: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Embed every volume as one vector (global-average-pooled encoder features).

    Args:
        encoder: a :class:`VolumeAutoencoder`, a dira3d ``UNet`` (its ``encode``), or any module
            returning a feature map or vectors.
        entries: datalist entries with absolute ``"image"`` paths.
        size: volumes are resized to this (x, y, z) first.
        batch_size, orient, raw_hu_window, workers, device: as in :func:`train_extractor`.

    Returns:
        A ``(N, D)`` float32 CPU tensor, rows in the order of ``entries``.
    """
    rows = list(iter_embeddings(encoder, entries, size, batch_size, orient, raw_hu_window, workers, device))
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def iter_embeddings(
    encoder: nn.Module,
    entries: Sequence[dict],
    size: Sequence[int] = (128, 128, 64),
    batch_size: int = 2,
    orient: bool = True,
    raw_hu_window: tuple[float, float] | None = None,
    workers: int = 0,
    device: str | torch.device = "cpu",
    done: int = 0,
) -> Iterator[torch.Tensor]:
    """:func:`embed_volumes` batch by batch: yields ``(b, D)`` float32 CPU tensors, rows in the order of ``entries``
    (``batch_size`` rows each but the last). ``done``: volumes embedded by an earlier run (named in the progress lines)."""
    was_training = encoder.training
    encoder.eval().to(device)
    loader = DataLoader(_resized_dataset(entries, size, orient, raw_hu_window), batch_size=batch_size, shuffle=False, num_workers=workers)
    progress, count = _Progress("embedding" if not done else f"embedding the {len(entries)} volumes left", len(entries)), 0
    try:
        for batch in loader:
            with torch.no_grad():
                rows = _feature_vectors(encoder, torch.as_tensor(batch["image"]).float().to(device)).float().cpu()
            count += len(rows)
            progress.step(count)
            yield rows
    finally:
        encoder.train(was_training)


def extractor_from_checkpoint(checkpoint: str | os.PathLike | dict) -> nn.Module:
    """Build a dira3d ``UNet`` from a pretraining checkpoint and load its encoder.

    Args:
        checkpoint: path or dict in the dira3d checkpoint format (``"encoder"`` + ``"meta"``).

    Returns:
        The network (use its ``encode``) in eval mode.

    Raises:
        FileNotFoundError: the checkpoint file does not exist.
        ValueError: the checkpoint has no encoder weights or they do not fit the network.
    """
    from dira3d.networks import UNet, load_pretrained  # built by the networks module; imported lazily

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    name = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    if not ckpt.get("encoder"):
        raise ValueError(f"{name} has no 'encoder' weights; pass a dira3d pretraining checkpoint or use --extractor autoencoder")
    meta = ckpt.get("meta", {})
    if int(meta.get("spatial_dims", 3)) != 3:
        raise ValueError(f"{name} holds a {meta.get('spatial_dims')}D encoder; visual words need a 3D one")
    net = UNet(spatial_dims=3, in_channels=int(meta.get("in_channels", 1)), out_channels=1, width=float(meta.get("width", 1.0)))
    report = load_pretrained(net, ckpt, parts=("encoder",), strict=False)
    if not getattr(report, "loaded", True):
        raise ValueError(f"{name}: no encoder weights matched the UNet encoder; is it a dira3d checkpoint?")
    return net.eval()

