"""MONAI Label app serving dira3d's fine-tuned bundles from a local folder (no model-zoo download).

Start (see docs/deployment.md; ``dira3d export monailabel-app`` prints this command):

    PYTHONPATH=<dira3d repo> <venv>/bin/python -m monailabel.main start_server --app <copy of this folder> \
        --studies <images folder> --conf bundles <repo>/bundles --host 127.0.0.1 --port 8000

(``python -m monailabel.main`` is what the ``<venv>/bin/monailabel`` script runs; the script itself
needs an activated environment and splits ``--conf`` values containing spaces.)

Conf: ``bundles`` (bundle folder(s), ``,``-separated), ``models`` (names to serve),
``bundle_overrides`` (JSON config overrides, e.g. ``{"width": 0.125}``).
"""

from __future__ import annotations

import logging
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask

from dira3d.deploy.monailabel import unknown_image
from dira3d.deploy.monailabel_tasks import infer_tasks

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    """dira3d bundles: segmentation (LIDC nodules, LiTS liver, BraTS tumour) and classification
    (LUNA16 nodule and PE-CAD embolism false-positive reduction)."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="dira3d",
                         description="DiRA-pretrained (TransVW) 3D models fine-tuned with dira3d", version="0.1.0")

    def init_infers(self) -> Dict[str, InferTask]:
        return infer_tasks(self.conf)

    def infer(self, request, datastore=None):
        """An ``image=`` id the studies folder lacks is answered HTTP 404 naming it (it was an HTTP 500 whose log
        said ``: does not exist``: MONAI Label had replaced the id by an empty path)."""
        message = unknown_image(request, datastore or self.datastore(), self.studies)
        if message:
            from fastapi import HTTPException

            logger.error(f"dira3d: {message}")
            raise HTTPException(status_code=404, detail=message)
        return super().infer(request, datastore)
