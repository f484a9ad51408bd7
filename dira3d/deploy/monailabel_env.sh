#!/usr/bin/env bash
# Build (or reuse) the separate virtual environment that runs MONAI Label 0.8.5 for dira3d.
#
#   bash dira3d/deploy/monailabel_env.sh            # builds $DIRA3D_MONAILABEL_VENV
#   DIRA3D_MONAILABEL_VENV=/opt/ml-venv bash dira3d/deploy/monailabel_env.sh
#
# Why a separate environment: monailabel 0.8.5 fails at import with pydicom 3 and needs
# numpy < 2, while dira3d's main environment runs numpy 2. Why --no-deps for monailabel: its
# requirements pull sam2 (and through it an unpinned torch, hydra, ...) and every MONAI extra
# (mlflow, openslide, ...). The list below is what the server imports for bundle inference.
# The environment is reused when its stamp matches this list; delete the folder to rebuild.
# dira3d itself is NOT installed into it: start the server with PYTHONPATH=<repo root> so the
# bundles' dira3d.* _target_s always come from the checkout you run.
set -euo pipefail

VENV="${DIRA3D_MONAILABEL_VENV:-$HOME/.cache/dira3d/monailabel-venv}"
PYTHON="${PYTHON:-python3}"

# torch first, pinned: never let a later install pull another (CUDA, multi-GB) torch. pip is used
# for it so that the machine's pip configuration (e.g. a local CPU wheel) applies.
TORCH_REQ="torch==2.13.0"
# torchvision 0.28.0 is the release built for torch 2.13.0 (monailabel's post transforms import it).
TORCHVISION_REQ="torchvision==0.28.0"
REQS=(
  "monai==1.6.1" "pytorch-ignite>=0.5,<0.6"
  "numpy<2" "pydicom<3" "pynetdicom<3" "dicomweb-client[gcp]<0.60"
  "pydicom-seg>=0.4.1" "pynrrd>=1.0.0" "itk>=5.3" "nibabel>=5" "SimpleITK>=2.3"
  "scikit-image" "scipy" "scikit-learn" "shapely>=2.0.4" "pillow" "einops"
  "fastapi>=0.110.2" "uvicorn>=0.29.0" "pydantic>=2.7.0" "pydantic-settings>=2.2.1"
  "python-dotenv>=1.0.1" "python-multipart>=0.0.9" "httpx>=0.27.0" "requests>=2.31.0"
  "requests-toolbelt>=1.0.0" "urllib3>=2.2.1" "schedule>=1.2.1" "timeloop>=1.0.2"
  "expiringdict>=1.2.2" "expiring_dict>=1.1.0" "cachetools>=5.3.3" "watchdog>=4.0.0"
  "girder-client>=3.2.3" "filelock>=3.11.0" "passlib>=1.7.4" "pyjwt>=2.8.0" "bcrypt>=4.1.2"
  "google-auth>=2.29.0" "pyyaml>=6.0.1" "psutil" "tqdm" "fire" "tensorboard" "matplotlib"
  "jsonschema" "ninja"
)
STAMP_TEXT="v2 $TORCH_REQ $TORCHVISION_REQ monailabel==0.8.5 ${REQS[*]}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -x "$VENV/bin/python" && -f "$VENV/.dira3d-stamp" && "$(cat "$VENV/.dira3d-stamp")" == "$STAMP_TEXT" ]]; then
  echo "monailabel venv ready: $VENV"
  exit 0
fi

echo "building monailabel venv in $VENV"
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check "$TORCH_REQ" 2>&1 | grep -v "is ignored" || true
"$VPY" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
"$VPY" -m pip install --quiet --disable-pip-version-check uv 2>&1 | grep -v "is ignored" || true
# uv resolves and downloads in parallel (minutes faster than pip); pip is the fallback.
if [[ -x "$VENV/bin/uv" ]]; then
  INSTALL=("$VENV/bin/uv" pip install --quiet --python "$VPY")
else
  INSTALL=("$VPY" -m pip install --quiet --disable-pip-version-check)
fi
# monailabel without its declared dependencies (sam2 would pull an unpinned torch), then the list;
# naming the installed torch keeps it.
"${INSTALL[@]}" --no-deps "monailabel==0.8.5"
"${INSTALL[@]}" "$TORCH_REQ" "${REQS[@]}"
"${INSTALL[@]}" --no-deps "$TORCHVISION_REQ"
if ! "$VPY" -c "import torchvision.utils" >/dev/null 2>&1; then
  # PyPI's torchvision is a CUDA build: with a CPU torch its import fails. MONAI Label needs only
  # torchvision.utils.make_grid/save_image; install dira3d's minimal implementation instead.
  echo "torchvision wheel unusable with this torch (CPU build?): installing dira3d's torchvision.utils shim"
  if [[ -x "$VENV/bin/uv" ]]; then "$VENV/bin/uv" pip uninstall --quiet --python "$VPY" torchvision
  else "$VPY" -m pip uninstall -y -q torchvision; fi
  SITE="$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  cp -r "$HERE/torchvision_shim/torchvision" "$SITE/"
fi
# smoke test: the server's app machinery and the bundle task import
"$VPY" -c "import monailabel.interfaces.app, monailabel.tasks.infer.bundle, numpy, pydicom; \
assert numpy.__version__ < '2', numpy.__version__; assert pydicom.__version__ < '3', pydicom.__version__"
printf '%s' "$STAMP_TEXT" > "$VENV/.dira3d-stamp"
echo "monailabel venv ready: $VENV"
