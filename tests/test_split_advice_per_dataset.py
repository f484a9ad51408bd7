"""The split advice of a prepared datalist names its own `dira3d prepare` command and only options that command has.

`split_option` / `more_training_advice` (dira3d.data.datalist) fell back to "`dira3d prepare generic ... --test-fraction`"
for CheXpert, ChestX-ray14 and PE-CAD, whose prepare commands have no --test-fraction (their test lists are the
official valid.csv / test_list.txt) and, for PE-CAD, no --val-fraction either (cross-validation folds, all under
'training').

The warning `dira3d prepare` prints about an empty list (write_datalist's split_advice) named LUNA16's --train-subsets
/ --val-subsets / --test-subsets for siim, montgomery, chexpert, chestxray14 and pecad: every prepare's advice is now
checked against its real parser.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import re
import textwrap

import pytest

from dira3d.data import command, datalist_writer
from dira3d.data.datalist import more_training_advice, split_option
from dira3d.data.errors import DataError
from dira3d.evaluation.datalists import load_split

# meta.dataset as each prepare command writes it -> that command
PREPARE = {"luna16": "luna16", "lits": "lits", "lidc-idri": "lidc", "brats2018": "brats", "siim-acr": "siim",
           "montgomery": "montgomery", "radiographs": "radiographs", "chexpert": "chexpert",
           "chestxray14": "chestxray14", "pecad": "pecad", "generic": "generic"}


def _help(name: str) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        command.main([name, "--help"])
    return text.getvalue()


def _advice(tmp_path, dataset: str) -> list[str]:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"meta": {"dataset": dataset}, "training": []}))
    return [split_option(path, "validation"), split_option(path, "test"), more_training_advice(path)]


@pytest.mark.parametrize("dataset", sorted(PREPARE))
def test_the_advice_names_only_options_of_the_datasets_own_prepare(tmp_path, dataset):
    options = set(re.findall(r"--[a-z][a-z-]*", _help(PREPARE[dataset])))
    for advice in _advice(tmp_path, dataset):
        commands = re.findall(r"`dira3d prepare (\S+)([^`]*)`", advice)
        assert commands, advice  # each piece of advice names the command to run
        for name, rest in commands:
            assert name == PREPARE[dataset], advice
            named = set(re.findall(r"--[a-z][a-z-]*", rest))
            assert named <= options, (advice, sorted(named - options))


@pytest.mark.parametrize("dataset, validation, test, training", [
    ("chexpert", "`dira3d prepare chexpert ... --val-fraction`",
     "`dira3d prepare chexpert` writes CheXpert's official valid.csv as the 'test' list",
     "a smaller --val-fraction (`dira3d prepare chexpert ... --val-fraction 0`"),
    ("chestxray14", "`dira3d prepare chestxray14 ... --val-fraction`",
     "`dira3d prepare chestxray14` writes the official test_list.txt as the 'test' list",
     "a smaller --val-fraction (`dira3d prepare chestxray14 ... --val-fraction 0`"),
    ("pecad", "`dira3d prepare pecad` writes no 'validation' list: its patients are all in 'training', in folds, and "
              "fine-tuning holds out a share of the training folds' patients (holdout)",
     "`dira3d prepare pecad ... --folds K` writes cross-validation folds instead of a 'test' list: set fold to test on "
     "one (`dira3d finetune --fold K`)",
     "rerun `dira3d prepare pecad` with more volumes and candidates.csv rows"),
])
def test_each_datasets_advice(tmp_path, dataset, validation, test, training):
    said = _advice(tmp_path, dataset)
    assert said[:2] == [validation, test] and training in said[2], said
    assert not any("generic" in s or "--test-fraction" in s for s in said), said


def test_a_pecad_datalist_without_a_fold_is_told_to_set_one(tmp_path):
    """A PE-CAD datalist tested without a fold (fold=-1): the hint said to add a 'test' list with
    `dira3d prepare generic ... --test-fraction`."""
    entries = [{"image": f"c{i}.nii.gz", "label": i % 2, "case_id": f"PE{i // 2}", "fold": i // 2 % 3} for i in range(12)]
    path = tmp_path / "pecad_datalist.json"
    path.write_text(json.dumps({"meta": {"dataset": "pecad"}, "training": entries}))
    with pytest.raises(DataError) as refused:
        load_split(path, "test", fold=-1)
    assert str(refused.value).endswith(
        "is empty (label_fraction=1.0, holdout=0.1, fold=-1); it has no 'test' list; `dira3d prepare pecad ... --folds K` "
        "writes cross-validation folds instead of a 'test' list: set fold to test on one (`dira3d finetune --fold K`)"), \
        str(refused.value)


class _Parsed(Exception):
    """Raised in place of parsing, carrying the parser a prepare command built."""


def prepare_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The real argparse parser of `dira3d prepare <name>`: its main() is run up to its parse_args."""
    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(_Parsed) as parsed:
            importlib.import_module(command.DATASETS[name][0]).main([])
    return parsed.value.args[0]


def _strings(node: ast.AST, assigned: dict[str, list[ast.AST]]) -> list[str]:
    """The string pieces of an expression (f-strings' literal parts too), a name's assigned values followed."""
    found = []
    docstrings = {id(sub.value) for sub in ast.walk(node) if isinstance(sub, ast.Expr)}
    for sub in ast.walk(node):
        if id(sub) in docstrings:
            continue
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            found.append(sub.value)
        elif isinstance(sub, ast.Name) and sub.id in assigned:
            found += [s for value in assigned.pop(sub.id) for s in _strings(value, assigned)]
    return found


def empty_split_advice(name: str) -> list[str]:
    """What each write_datalist call of `dira3d prepare <name>` warns with about an empty list: the text of its
    split_advice (read from the module's source), or write_datalist's default when it passes none. A call of a shared
    writer from another module that calls write_datalist itself (cxr_splits.write_fraction_datalist) is followed."""
    module = importlib.import_module(command.DATASETS[name][0])
    advice = _write_datalist_advice(module, module)
    assert advice, f"{module.__name__} writes no datalist"
    return advice


def _write_datalist_advice(source, module, followed: frozenset = frozenset()) -> list[str]:
    """The split advice of the write_datalist calls in ``source`` (a module or a function of ``module``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(source)))
    assigned: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    advice = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = getattr(node.func, "id", getattr(node.func, "attr", None))
        if called == "write_datalist":
            given = [k.value for k in node.keywords if k.arg == "split_advice"]
            advice.append(" ".join(_strings(given[0], dict(assigned))) if given else datalist_writer.SPLIT_ADVICE)
            if given and isinstance(given[0], ast.Call):  # a helper's text: its source's strings
                helper = getattr(module, getattr(given[0].func, "id", ""), None)
                assert helper is not None, ast.dump(given[0])
                advice[-1] += " " + " ".join(_strings(ast.parse(inspect.getsource(helper)), {}))
            continue
        writer = getattr(module, called, None) if isinstance(node.func, ast.Name) else None
        if (inspect.isfunction(writer) and writer.__module__ not in (module.__name__, datalist_writer.__name__)
                and writer.__module__.startswith("dira3d.") and called not in followed
                and "write_datalist(" in inspect.getsource(writer)):  # a shared writer: its own calls
            advice += _write_datalist_advice(writer, inspect.getmodule(writer), followed | {called})
    return advice


@pytest.mark.parametrize("name", sorted(command.DATASETS))
def test_each_prepares_empty_split_advice_names_only_its_own_options(name, monkeypatch):
    """montgomery and siim warned with write_datalist's default advice, "check the split options (e.g.
    --train-subsets / --val-subsets / --test-subsets, --val-fraction, --test-fraction)": LUNA16's subsets, which
    their parsers do not have."""
    options = set(prepare_parser(name, monkeypatch)._option_string_actions)
    assert "--dst" in options  # the real parser, not an empty one
    for advice in empty_split_advice(name):
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", advice))
        assert named <= options, (name, advice, sorted(named - options))
