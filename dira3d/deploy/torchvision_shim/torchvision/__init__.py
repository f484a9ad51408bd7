"""Minimal stand-in for ``torchvision`` inside dira3d's MONAI Label environment ONLY.

Why: the torchvision wheels on PyPI are CUDA builds; on a CPU-only torch their import fails
("operator torchvision::nms does not exist"). MONAI Label 0.8.5 imports just
``torchvision.utils.make_grid`` and ``save_image`` (for optional debug image dumps), so
``monailabel_env.sh`` installs this package instead when the real one cannot be imported.
It implements those two functions with torch and Pillow; anything else is absent on purpose.
"""

__version__ = "0.0.0+dira3d.shim"
