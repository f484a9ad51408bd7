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


def _module_name(path: Path) -> str:
    """``dira3d.evaluation.stats`` of ``dira3d/evaluation/stats.py``; ``dira3d.evaluation`` of its ``__init__.py``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_attributes(source: str, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """``"<line>: <name>._x"`` for each private attribute ``source`` reads of a dira3d module it imported
    (``from dira3d.evaluation import stats`` ... ``stats._by_seed``, ``import dira3d.x as m`` ... ``m._y``): the
    same hidden contract as importing the name itself. ``module``: the dotted name of ``source``'s module, for
    relative imports; ``modules``: the dotted names of dira3d's modules and packages."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> the dira3d module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dira3d":
                    bound[alias.asname or "dira3d"] = alias.name if alias.asname else "dira3d"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        chain = _dotted(node.value)  # "dira3d.x.y" of ``dira3d.x.y._z`` after ``import dira3d.x.y``
        if chain is None or chain.split(".")[0] not in bound:
            continue
        head, _, rest = chain.partition(".")
        target = ".".join([bound[head]] + ([rest] if rest else []))
        if target in modules:
            found.append(f"{node.lineno}: {chain}.{node.attr}")
    return found


def _dotted(node: ast.expr) -> str | None:
    """``"a.b.c"`` of the expression ``a.b.c`` (names and attributes only), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else None


def test_no_module_imports_a_private_name_of_another():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 100  # the whole package was read
    modules = {_module_name(path) for path in files}
    found = [f"{path.relative_to(PACKAGE.parent).as_posix()}:{hit}" for path in files
             for hit in _private_imports(path.read_text(encoding="utf-8"))
             + _private_attributes(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py",
                                   modules)]
    assert not found, ("private names imported across modules (make them public where they belong, or move "
                       "them):\n" + "\n".join(found))


def test_the_check_sees_a_private_import():
    source = "from dira3d.data.guards import _x\nfrom .cases import _y, z\nfrom os import _exit\nfrom ._switch import s\n"
    assert _private_imports(source) == ["1: from dira3d.data.guards import _x", "2: from .cases import _y"]


def test_the_check_sees_a_private_attribute_of_an_imported_module():
    modules = {"dira3d", "dira3d.evaluation", "dira3d.evaluation.stats", "dira3d.evaluation.results"}
    source = ("import os\nfrom dira3d.evaluation import stats\nfrom . import stats as s\nimport dira3d.evaluation.stats as m\n"
              "import dira3d\nos._exit\nstats._by_seed\ns._paired_p\nm._fmt\nstats.aggregate\nstats.__name__\n"
              "dira3d._x\n")
    assert _private_attributes(source, "dira3d.evaluation.results", False, modules) == [
        "7: stats._by_seed", "8: s._paired_p", "9: m._fmt", "12: dira3d._x"]
    # a submodule reached through the package's name after ``import dira3d.x.y`` (which binds ``dira3d``)
    deep = "import dira3d.evaluation.stats\ndira3d.evaluation.stats._fmt\ndira3d.evaluation.stats.aggregate\nos.path._x\n"
    assert _private_attributes(deep, "dira3d.evaluation.results", False, modules) == [
        "2: dira3d.evaluation.stats._fmt"]
    # in a package's __init__.py, "." is the package itself
    assert _private_attributes("from . import stats\nstats._y\n", "dira3d.evaluation", True, modules) == ["2: stats._y"]


MAX_LINES = 450  # the house guideline for a module (README / helper briefs: "< ~450 lines")


def test_no_module_is_longer_than_the_house_limit():
    """export.py (471 lines) and data/cxr.py (486) had grown past it: the bundle network loading and the chest X-ray
    split helpers went to modules of their own (dira3d.deploy.bundle_network, dira3d.data.cxr_splits)."""
    long = {path.relative_to(PACKAGE.parent).as_posix(): n for path in sorted(PACKAGE.rglob("*.py"))
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by what they do): {long}"
