"""Factories for the mode-dependent parts of DiRA: discrimination head, predictor and loss.

The discrimination branch differs per mode (docs/method.md):

==============  ========================  ==============  ==============================
mode            head on the bottleneck    predictor       loss
==============  ========================  ==============  ==============================
visual_words    VisualWordHead → logits   —               VisualWordLoss (cross-entropy)
moco            ProjectionHead (2 layers) —               InfoNCELoss + MoCoQueue (EMA key)
barlow          ProjectionHead (3 layers) —               BarlowTwinsLoss
simsiam         ProjectionHead (3 layers) PredictorHead   SimSiamLoss
==============  ========================  ==============  ==============================

MoCo's projector has no BatchNorm (Linear, ReLU, Linear: MoCo-v2); Barlow Twins' and SimSiam's have
one after each hidden layer. They are plain functions so a bundle config can call them with ``_target_``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

from torch import nn

from dira3d.data.errors import DataError
from dira3d.losses import BarlowTwinsLoss, InfoNCELoss, SimSiamLoss, VisualWordLoss
from dira3d.networks.heads import PredictorHead, ProjectionHead, VisualWordHead
from dira3d.utils.warning_format import Dira3dWarning

__all__ = ["DIS_MODES", "check_dis_mode", "build_dis_head", "build_predictor", "build_dis_loss", "resolve_views"]

DIS_MODES = ("visual_words", "moco", "barlow", "simsiam")


def check_dis_mode(dis_mode: str) -> str:
    """Return ``dis_mode`` or raise a ``ValueError`` listing the valid modes."""
    if dis_mode not in DIS_MODES:
        raise DataError(None, f"dis_mode={dis_mode!r} is not supported; choose one of {', '.join(DIS_MODES)}")
    return dis_mode


def build_dis_head(
    dis_mode: str,
    spatial_dims: int,
    in_channels: int,
    num_classes: int | None = None,
    hidden: int = 1024,
    proj_dim: int = 128,
) -> nn.Module:
    """The head on the encoder bottleneck for ``dis_mode``.

    Args:
        dis_mode: one of :data:`DIS_MODES`.
        spatial_dims: 2 or 3.
        in_channels: bottleneck channels (``UNet.bottleneck_channels``).
        num_classes: number of visual words (``visual_words`` only).
        hidden: hidden width (1024 in TransVW; 2048 in MoCo-v2 / SimSiam / Barlow Twins).
        proj_dim: projection dimension for the instance-discrimination modes.

    Returns:
        The head module (logits for ``visual_words``, projections otherwise).

    Raises:
        DataError: (a ``ValueError``) an unknown mode; a ``num_classes`` in ``visual_words`` mode, a ``hidden`` (the
            bundles' ``dis_hidden``) or, in the instance modes, a ``proj_dim`` that is missing or not a whole number >= 1.
    """
    check_dis_mode(dis_mode)
    # the bundles' names: hidden=0 failed in the head, in MONAI's traceback, naming the head's argument
    sizes = {"dis_hidden": hidden} if dis_mode == "visual_words" else {"dis_hidden": hidden, "proj_dim": proj_dim}
    for name, value in sizes.items():
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer()
                or value < 1):
            raise DataError(None, f"{name}={value!r}: the width of a layer of the {dis_mode} head must be a whole number "
                            f">= 1; give a whole number, e.g. {name}={1024 if name == 'dis_hidden' else 128}")
    if dis_mode == "visual_words":
        # DataError: one `error:` line under python -m monai.bundle run too; text ('abc') failed in `<` inside
        # MONAI's traceback, 2.5 ran as 2 classes without a word
        if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Real)
                or not float(num_classes).is_integer() or num_classes < 1):
            raise DataError(None,
                f"num_classes={num_classes!r}: num_classes must be a positive integer in dis_mode='visual_words' "
                "(the number of visual words, or of training volumes with one class per image); give a whole number "
                ">= 1, or leave num_classes to its default")
        if int(num_classes) == 1:  # cross-entropy over one class is 0 whatever the network does
            warnings.warn(
                "num_classes is 1 in dis_mode='visual_words': the discrimination loss is always 0 and trains nothing "
                "(with one class per training volume, the datalist has a single training volume); add training "
                "volumes, pretrain on `dira3d visual-words` output (configs/visual_words.json), or choose an "
                "instance mode (dis_mode moco, barlow or simsiam)", Dira3dWarning, stacklevel=2)
        return VisualWordHead(spatial_dims, in_channels, int(num_classes), hidden=hidden)
    if dis_mode == "moco":
        return ProjectionHead(in_channels, hidden, proj_dim, num_layers=2, batch_norm=False)  # MoCo-v2: no BN
    # SimSiam ends its projector with a BatchNorm (no affine); Barlow Twins standardises in the loss
    return ProjectionHead(in_channels, hidden, proj_dim, num_layers=3, last_batch_norm=dis_mode == "simsiam")


def build_predictor(dis_mode: str, proj_dim: int = 128, hidden: int | None = None) -> nn.Module | None:
    """The SimSiam predictor (``proj_dim → hidden → proj_dim``; hidden defaults to proj_dim/4), else None."""
    if check_dis_mode(dis_mode) != "simsiam":
        return None
    return PredictorHead(proj_dim, hidden or max(1, proj_dim // 4))


def build_dis_loss(
    dis_mode: str, temperature: float = 0.2, lambda_offdiag: float = 5e-3, gather_distributed: bool = False
) -> nn.Module:
    """The discriminative loss for ``dis_mode`` (see the table in the module docstring)."""
    check_dis_mode(dis_mode)
    if dis_mode == "visual_words":
        return VisualWordLoss()
    if dis_mode == "moco":
        return InfoNCELoss(temperature=temperature)
    if dis_mode == "barlow":
        return BarlowTwinsLoss(lambda_offdiag=lambda_offdiag, gather_distributed=gather_distributed)
    return SimSiamLoss()


def resolve_views(views: Callable | str | None, dis_mode: str, spatial_dims: int) -> Callable | None:
    """The views T(·) the trainer uses: ``"auto"`` → ``ViewAugment(spatial_dims)`` for the instance
    modes and None (no views) for ``visual_words``; a callable or None is returned as given.

    Raises:
        ValueError: a string other than ``"auto"``.
    """
    if isinstance(views, str):
        if views != "auto":
            raise DataError(None, f"views={views!r} is not supported; pass 'auto', None (identity views) or a callable "
                             "v1, v2 = views(x, generator) such as dira3d.transforms.ViewAugment(3)")
        if check_dis_mode(dis_mode) == "visual_words":
            return None
        from dira3d.transforms.views import ViewAugment

        return ViewAugment(spatial_dims)
    return views
