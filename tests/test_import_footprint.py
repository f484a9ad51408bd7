"""Training and the engine benchmarks import without the data-preparation libraries.

The lent GPU machines (and slim training images) have torch, numpy, scipy and PyYAML but not
SimpleITK, nibabel, scikit-learn or matplotlib; only data preparation, evaluation and plotting need
those. A subprocess blocks them (``sys.modules[name] = None`` makes ``import name`` fail) and then
imports what pretraining and ``benchmarks/gpu/run.sh`` use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BLOCKED = ("SimpleITK", "nibabel", "sklearn", "matplotlib", "jsonschema", "fire")

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
sys.path.insert(0, "benchmarks")
import dira3d.engines, dira3d.networks, dira3d.transforms, dira3d.losses, dira3d.data
[getattr(dira3d.engines, name) for name in dira3d.engines.__all__]  # it re-exports lazily: import each
from dira3d.data import DataError
import pretrain_throughput, loader_throughput, sliding_window
assert DataError.__module__ == "dira3d.data.errors"
# the LiTS bundle's network_def (``$import dira3d.evaluation``) builds without SimpleITK/scikit-learn
network, settings = sliding_window.bundle_settings(sliding_window.BUNDLE, 0.125)
assert settings["roi_size"] == (64, 64, 32), settings
print("imported")
"""


def test_engine_and_benchmarks_import_without_imaging_io_libraries(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=repo_root, timeout=300)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]


def test_data_package_still_exports_its_readers_lazily() -> None:
    import dira3d.data as data
    import dira3d.data.io as io

    assert data.read_image is io.read_image and data.DataError is io.DataError
    import dira3d.evaluation as evaluation
    from dira3d.evaluation.readers import SimpleITKReader

    assert evaluation.SimpleITKReader is SimpleITKReader and "build_task_network" in dir(evaluation)
    assert evaluation.transforms.NormalizeMRd is evaluation.NormalizeMRd  # submodules as attributes, as configs use them
    with pytest.raises(AttributeError, match="no_such_thing"):
        evaluation.no_such_thing  # noqa: B018
    assert "window_hu" in dir(data)
    try:
        data.no_such_reader  # noqa: B018
    except AttributeError as err:
        assert "no_such_reader" in str(err)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_lazy_exports_resolve_once_and_name_what_is_missing() -> None:
    from dira3d.utils.lazy import lazy_exports

    namespace: dict = {}
    getattr_, dir_ = lazy_exports("dira3d.utils", namespace, {"dira3d.utils.atomic": ("atomic_write_text",)},
                                  submodules=True)
    from dira3d.utils.atomic import atomic_write_text

    assert getattr_("atomic_write_text") is atomic_write_text and namespace["atomic_write_text"] is atomic_write_text
    assert getattr_("host_sync").__name__ == "dira3d.utils.host_sync"  # a submodule, imported on demand
    assert "atomic_write_text" in dir_()
    with pytest.raises(AttributeError, match="'dira3d.utils' has no attribute 'nothing_here'"):
        getattr_("nothing_here")


def test_data_package_imports_without_torch(repo_root: Path) -> None:
    # data preparation workers should not pay for torch: dira3d.data and dira3d.utils re-export lazily
    code = "import sys, dira3d.data, dira3d.utils; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-2000:]
