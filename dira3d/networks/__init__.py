"""Networks of dira3d (see docs/architecture.md, "dira3d.networks").

- :class:`UNet` — the Models Genesis U-Net (encoder f_θ, decoder g_θ), 2D or 3D.
- Heads: :class:`VisualWordHead`, :class:`ProjectionHead`, :class:`PredictorHead`.
- :class:`Adversary` — PatchGAN discriminator D_φ returning a logit map.
- Task networks for fine-tuning: :class:`Classifier`, :class:`Segmenter`.
- 2D chest X-ray: :class:`ResNetUNet` (ResNet-50 encoder), :class:`ResNetClassifier`, :class:`ResNetSegmenter`.
- :func:`load_pretrained` / :class:`LoadReport` — pretrained weights into a task network.
"""

from dira3d.networks.adversary import Adversary
from dira3d.networks.heads import PredictorHead, ProjectionHead, VisualWordHead
from dira3d.networks.pretrained import LoadReport, load_pretrained
from dira3d.networks.resnet_unet import ResNetClassifier, ResNetSegmenter, ResNetUNet
from dira3d.networks.task import Classifier, Segmenter
from dira3d.networks.unet import UNet, UNetDecoder, UNetEncoder

__all__ = [
    "UNet",
    "UNetEncoder",
    "UNetDecoder",
    "VisualWordHead",
    "ProjectionHead",
    "PredictorHead",
    "Adversary",
    "Classifier",
    "Segmenter",
    "ResNetUNet",
    "ResNetClassifier",
    "ResNetSegmenter",
    "load_pretrained",
    "LoadReport",
]
