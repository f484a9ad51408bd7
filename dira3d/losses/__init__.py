"""dira3d.losses: the discriminative, restorative and adversarial terms of DiRA and their sum.

One family per module (see docs/architecture.md): visual words (TransVW cross-entropy),
InfoNCE + MoCo queue, Barlow Twins, SimSiam, restoration, adversarial, the λ-weighted DiRA sum,
and the distributed gather helpers.
"""

from dira3d.losses.adversarial import ADVERSARIAL_KINDS, AdversarialLoss
from dira3d.losses.barlow_twins import BarlowTwinsLoss
from dira3d.losses.dira import DEFAULT_WEIGHTS, TERM_NAMES, DiRALoss, parse_weights
from dira3d.losses.distributed import concat_all_gather, gather_with_grad, is_distributed
from dira3d.losses.infonce import InfoNCELoss, MoCoQueue
from dira3d.losses.restorative import RESTORATION_KINDS, RestorationLoss
from dira3d.losses.simsiam import SimSiamLoss
from dira3d.losses.visual_words import VisualWordLoss

__all__ = [
    "ADVERSARIAL_KINDS",
    "AdversarialLoss",
    "BarlowTwinsLoss",
    "DEFAULT_WEIGHTS",
    "TERM_NAMES",
    "DiRALoss",
    "parse_weights",
    "concat_all_gather",
    "gather_with_grad",
    "is_distributed",
    "InfoNCELoss",
    "MoCoQueue",
    "RESTORATION_KINDS",
    "RestorationLoss",
    "SimSiamLoss",
    "VisualWordLoss",
]
