"""dira3d: MONAI-native DiRA (discriminative, restorative, adversarial) self-supervised pretraining."""

__version__ = "0.1.0"
