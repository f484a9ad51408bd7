"""dira3d's warnings to the user printed as Python formats any warning: ``/…/dira3d/evaluation/inputs.py:194:
DataWarning: left out: …`` and then the line of code that raised it. They are now one ``WARNING: <message>`` line
(dira3d.utils.warning_format); other packages' warnings keep Python's format."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dira3d
from dira3d.utils.warning_format import is_dira3d_warning

SCRIPT = textwrap.dedent(
    """
    import warnings, dira3d
    from dira3d.data.errors import DataWarning
    warnings.warn("a scan was left out", DataWarning)
    warnings.warn_explicit("a split has no foreground", UserWarning, {package!r}, 12)
    from dira3d.utils.warning_format import Dira3dWarning
    warnings.warn_explicit("a holdout without foreground", Dira3dWarning, "<string>", 9)
    warnings.warn("a script's own warning")
    warnings.warn("going away", DeprecationWarning)
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONWARNINGS": "always"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_dira3d_warnings_print_as_one_line_and_others_as_python_prints_them():
    target = str(Path(dira3d.__file__).parent / "evaluation" / "inputs.py")
    proc = _run(SCRIPT.format(package=target))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[:3] == ["WARNING: a scan was left out", "WARNING: a split has no foreground",
                         "WARNING: a holdout without foreground"], proc.stderr  # the category decides, not the frame
    assert "inputs.py:12" not in proc.stderr and "DataWarning:" not in proc.stderr
    assert "<string>:8: UserWarning: a script's own warning" in proc.stderr  # not dira3d's: as Python prints it
    assert "<string>:9: DeprecationWarning: going away" in proc.stderr


def test_which_warnings_are_dira3d_s():
    from dira3d.data.errors import DataWarning

    inside = str(Path(dira3d.__file__).parent / "data" / "io.py")
    assert is_dira3d_warning(DataWarning, "/elsewhere/script.py")  # its category says so, wherever it was raised
    assert is_dira3d_warning(UserWarning, inside)
    from dira3d.utils.warning_format import Dira3dWarning

    assert is_dira3d_warning(Dira3dWarning, "<string>") and issubclass(DataWarning, Dira3dWarning)
    assert not is_dira3d_warning(UserWarning, "/elsewhere/monai/bundle/scripts.py")
    assert not is_dira3d_warning(DeprecationWarning, inside)  # a deprecation keeps its file and line
    assert not is_dira3d_warning(UserWarning, "")
    assert not is_dira3d_warning(UserWarning, str(Path(dira3d.__file__).parent.parent / "dira3d_extra" / "x.py"))
