"""Grad-CAM overlays show a chest X-ray the way up its PNG is, and localisation.json gives the boxes Grad-CAM found.

Found by a 2D walkthrough: `dira3d localise` drew every overlay with matplotlib's ``origin="lower"``, so a
radiograph (loaded by MONAI as ``(x, y)``, ``y`` counted from the file's top row) came out upside down: a lesion in
the lower right of the PNG, and its green truth box, appeared in the upper right of ``overlays/*.png``. And
``localisation.json`` gave each box's best IoU but not the box Grad-CAM found: it now lists them (``predicted_boxes``,
``[x, y, w, h]`` in the image file's pixels, the frame of the box datalist's ``box``), best first.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dira3d.evaluation.gradcam import save_overlay

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _bright_rows(png) -> tuple[float, float]:
    """Mean red level of the top and the bottom half of an overlay PNG (the margins are the same at both ends)."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(float)[..., 0]
    half = pixels.shape[0] // 2
    return pixels[:half].mean(), pixels[-half:].mean()


def test_a_2d_overlay_shows_the_top_rows_of_the_image_at_the_top(tmp_path):
    image = np.zeros((40, 30), np.float32)  # (x, y) as MONAI loads a 30-row, 40-column PNG
    image[:, :6] = 1.0  # the file's top 6 rows are bright
    top, bottom = _bright_rows(save_overlay(image, np.zeros_like(image), tmp_path / "o.png"))
    assert top > bottom + 30, (top, bottom)


def test_localise_overlay_keeps_the_lesion_where_the_png_has_it(tmp_path):
    from dira3d.evaluation.localise import localise

    rows, cols = 48, 64
    pixels = np.full((rows, cols), 30, np.uint8)
    pixels[30:44, 40:60] = 250  # a lesion in the lower right of the file
    Image.fromarray(pixels).save(tmp_path / "cxr.png")

    class Brightness(torch.nn.Module):  # class 0's score: the sum of the bright pixels, so Grad-CAM finds the lesion
        def __init__(self):
            super().__init__()
            self.feature = torch.nn.Conv2d(1, 1, 1)  # the identity, with weights for Grad-CAM's gradients
            torch.nn.init.ones_(self.feature.weight)
            torch.nn.init.zeros_(self.feature.bias)

        def forward(self, x):
            return torch.relu(self.feature(x) - 0.5).flatten(1).sum(1, keepdim=True)

    entry = {"image": str(tmp_path / "cxr.png"), "label": "Mass", "label_index": 0, "box": [40, 30, 20, 14]}
    result = localise(Brightness(), [entry], tmp_path / "out", target_layer="feature", roi_size=(cols // 2, rows // 2),
                      prepared_size=0)
    assert result["boxes"][0]["best_iou"] == 1.0  # the Grad-CAM box is the truth box: the frames agree
    assert result["boxes"][0]["box"] == [20, 15, 30, 22]  # the truth on the 32 x 24 grid
    assert result["boxes"][0]["predicted_boxes"] == [[40, 30, 20, 14]]  # Grad-CAM's box where the PNG has the lesion
    assert json.loads((tmp_path / "out" / "localisation.json").read_text())["count"] == 1
    (overlay,) = (tmp_path / "out" / "overlays").glob("*.png")
    top, bottom = _bright_rows(overlay)
    assert bottom > top + 30, (top, bottom)  # the lesion and its heat are at the bottom, as in the PNG
