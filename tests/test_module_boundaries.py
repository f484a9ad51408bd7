"""No module of dira3d imports a ``_``-private name of another module.

A helper that several modules need is public (no underscore, with a docstring) in the module where it
belongs; one that only one module needs lives there. A private name imported across modules is a
contract nobody sees: renaming it in its own module breaks another one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dira3d"


def _private_imports(source: str) -> list[str]:
    """``"<line>: from <module> import <name>"`` for each private name ``source`` imports from dira3d."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        ours = node.level > 0 or (node.module or "").split(".")[0] == "dira3d"
        for alias in node.names if ours else ():
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


def test_no_module_imports_a_private_name_of_another():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 100  # the whole package was read
    found = [f"{path.relative_to(PACKAGE.parent).as_posix()}:{hit}" for path in files
             for hit in _private_imports(path.read_text(encoding="utf-8"))]
    assert not found, ("private names imported across modules (make them public where they belong, or move "
                       "them):\n" + "\n".join(found))


def test_the_check_sees_a_private_import():
    source = "from dira3d.data.guards import _x\nfrom .cases import _y, z\nfrom os import _exit\nfrom ._switch import s\n"
    assert _private_imports(source) == ["1: from dira3d.data.guards import _x", "2: from .cases import _y"]
