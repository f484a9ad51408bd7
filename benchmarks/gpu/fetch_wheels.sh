#!/usr/bin/env bash
# Download the pure-Python packages that the lent GPU machines lack (monai, pytorch-ignite, nibabel) into
# .whl/ (git-ignored). Run here, where PyPI is reachable; the GPU machine reaches nothing.
# Everything else the benchmarks import (torch, numpy, scipy, yaml, tensorboard) is in that image;
# dira3d imports SimpleITK only for data preparation, which the benchmarks do not use; nibabel also for
# `dira3d pretrain` (dira3d.visual_words imports it), which benchmarks/gpu/bundle_run.py runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2
ls -l .whl
