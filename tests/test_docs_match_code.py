"""The docs' commands, names and defaults against the code ("docs that match the code").

Each test reads README.md, docs/*.md and bundles/*/docs/README.md and fails on drift a reader would
hit: a ``dira3d <command> --flag`` (or ``python data_prep/<x>.py`` / ``python benchmarks/<x>.py``) the
parser refuses, a ``python -m monai.bundle run --<id>`` no config of that command defines (MONAI would
add it silently and train with the default), an experiment config the config check refuses, a dotted
``dira3d.x.y`` name that does not import, a repository path that does not exist, a default in a docs
table or a bundle README's settings that is not the parser's or the bundle's. Parsers are built, never
run: no data, no training, seconds in all.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from dira3d.cli import COMMANDS
from dira3d.data.command import DATASETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("bundles/*/docs/README.md"))]
# the options of `python -m monai.bundle run` itself (not bundle ids)
MONAI_RUN_ARGS = {"config_file", "meta_file", "logging_file", "args_file", "tracking", "run_id", "init_id",
                  "final_id", "workflow_type"}


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8").replace("\\\n", " ")  # shell line continuations


def _doc_id(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _parser_of(main) -> argparse.ArgumentParser:
    """The argparse parser ``main(argv)`` builds, caught when it parses (nothing runs)."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}

    def catch(self, *args, **kwargs):
        raise _Parser(self)

    for name in originals:
        setattr(argparse.ArgumentParser, name, catch)
    try:
        main([])
    except _Parser as caught:
        return caught.parser
    finally:
        for name, method in originals.items():
            setattr(argparse.ArgumentParser, name, method)
    raise AssertionError(f"{main.__module__}.main built no argparse parser")


def _options(parser: argparse.ArgumentParser, sub: str | None = None) -> dict[str, argparse.Action]:
    if sub is not None:
        choices = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = choices[sub]
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _command_main(words: list[str]):
    """``(label, main, remaining words)`` for ``dira3d <command> ...`` / ``python data_prep/<x>.py ...`` /
    ``python benchmarks/<x>.py ...``;
    None for prose (``dira3d is ...``) and placeholders (``dira3d prepare <dataset>``)."""
    if words[0] == "dira3d":
        if len(words) < 2 or words[1] not in COMMANDS:
            return None
        module, func = COMMANDS[words[1]][0].split(":")
        rest = words[2:]
        if words[1] == "prepare":
            if not rest or not re.match(r"[a-z0-9_]+$", rest[0]):
                return None  # dira3d prepare <dataset> / ... / …
            assert rest[0] in DATASETS, f"`dira3d prepare {rest[0]}`: no such dataset; the datasets are {sorted(DATASETS)}"
            return f"dira3d prepare {rest[0]}", importlib.import_module(DATASETS[rest[0]][0]).main, rest[1:]
        return f"dira3d {words[1]}", getattr(importlib.import_module(module), func), rest
    script = ROOT / words[1]
    if "<" in words[1]:
        return None  # python data_prep/<dataset>.py, python benchmarks/<name>.py
    assert script.is_file(), f"`python {words[1]}`: no such script"
    if words[1].startswith("benchmarks/"):  # a script, not a package: loaded by path, its folder importable
        name = f"_docs_benchmark_{script.stem}"
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        sys.path.insert(0, str(script.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(script.parent))
            del sys.modules[name]
        return f"python {words[1]}", module.main, words[2:]
    found = re.search(r"from (dira3d\.[\w.]+) import main", script.read_text(encoding="utf-8"))
    assert found, f"{words[1]} does not call a dira3d main()"
    return f"python {words[1]}", importlib.import_module(found.group(1)).main, words[2:]


def _commands(text: str, start: str) -> list[list[str]]:
    """Every command line (in a code block or an inline code span) that begins with ``start``,
    cut at a comment or a shell separator, as words."""
    found = []
    for match in re.finditer(rf"(?:^|(?<=[\s`(]))({start}[^\n`]*)", text, flags=re.M):
        words = []
        for word in match.group(1).split():
            if word.startswith("#") or word in {"|", "&&", ";", ")", "||"}:
                break
            words.append(word)
        found.append(words)
    return found


def _cli_commands():
    for doc in DOCS:
        for words in _commands(_text(doc), r"(?:dira3d(?= )|python3? (?:data_prep|benchmarks)/)"):
            if words[0] == "python3":
                words = ["python", *words[1:]]
            yield pytest.param(doc, words, id=f"{_doc_id(doc)}:{' '.join(words)[:60]}")


def test_docs_have_commands_to_check():
    # the extraction itself: a change of the docs' style must not silently leave nothing checked
    labels = {" ".join(words[:3 if words[1:2] == ["prepare"] else 2]) for _, words in (p.values for p in _cli_commands())}
    assert {"dira3d prepare luna16", "dira3d visual-words", "dira3d pretrain", "dira3d finetune", "dira3d export",
            "dira3d localise", "dira3d synthetic", "dira3d experiment", "python data_prep/lidc.py",
            "python benchmarks/pretrain_throughput.py"} <= labels, labels


@pytest.mark.parametrize("doc, words", list(_cli_commands()))
def test_documented_cli_flags_exist(doc, words):
    """Every ``--flag`` of a documented ``dira3d`` / ``data_prep`` / ``benchmarks`` command is an option of that command."""
    resolved = _command_main(words)
    if resolved is None:
        return
    label, main, rest = resolved
    parser = _parser_of(main)
    sub = None
    if label == "dira3d export":
        subs = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if not rest or not re.match(r"[a-z-]+$", rest[0]):
            return  # dira3d export …
        assert rest[0] in subs, f"{_doc_id(doc)}: `dira3d export {rest[0]}`: no such export; they are {sorted(subs)}"
        sub, rest = rest[0], rest[1:]
    options = _options(parser, sub)
    flags = [word.strip("[]`'\"(),").split("=")[0] for word in rest]
    unknown = [flag for flag in flags if flag.startswith("--") and flag not in options]
    assert not unknown, f"{_doc_id(doc)}: `{' '.join(words)}`: {label}{' ' + sub if sub else ''} has no {unknown}"


def _shell_variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z])=(\S+)$", text, flags=re.M))  # P=bundles/dira_pretrain/configs


def _config_files(value: str, variables: dict[str, str]) -> list[Path] | None:
    for name, path in variables.items():
        value = value.replace(f"${name}/", f"{path}/")
    files = re.findall(r"[\w./-]+\.json", value)
    if not files or any(not f.startswith("bundles/") for f in files):
        return None  # a placeholder ('.../train.json') or a path outside the repository
    return [ROOT / f for f in files]


def _bundle_runs():
    for doc in DOCS:
        text = _text(doc)
        variables = _shell_variables(text)
        for words in _commands(text, r"(?:torchrun .*?-m |python -m )monai\.bundle run"):
            line = " ".join(words[words.index("run") + 1:])
            try:
                args = shlex.split(line)
            except ValueError:
                continue  # an inline fragment with an unbalanced quote
            pairs = {a[2:]: args[i + 1] if i + 1 < len(args) else None for i, a in enumerate(args) if a.startswith("--")}
            if "config_file" not in pairs or pairs["config_file"] is None:
                continue
            files = _config_files(pairs["config_file"], variables)
            if files is None:
                continue
            yield pytest.param(doc, files, sorted(set(pairs) - MONAI_RUN_ARGS), id=f"{_doc_id(doc)}:{line[:70]}")


def test_docs_have_bundle_runs_to_check():
    docs = {_doc_id(p.values[0]) for p in _bundle_runs()}
    assert {"README.md", "docs/2d.md", "docs/reliability.md", "docs/visual_words.md", "docs/finetuning.md",
            "bundles/dira_pretrain/docs/README.md", "bundles/lits_liver_seg/docs/README.md"} <= docs, docs


@pytest.mark.parametrize("doc, files, ids", list(_bundle_runs()))
def test_documented_bundle_overrides_exist(doc, files, ids):
    """``python -m monai.bundle run --config_file ... --<id> value``: the config files exist and define every id
    (MONAI adds an unknown id silently, so a misspelt or removed setting would train with its default)."""
    from monai.bundle import ConfigParser

    missing = [f.relative_to(ROOT).as_posix() for f in files if not f.is_file()]
    assert not missing, f"{_doc_id(doc)}: no config {missing}"
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    unknown = [i for i in ids if i not in parser]
    assert not unknown, f"{_doc_id(doc)}: {[f.name for f in files]} define no {unknown}"


def _dotted_names():
    names = {}
    for doc in DOCS:
        # not file names such as ckpt_dir/.dira3d.lock
        for match in re.finditer(r"(?<![\w./])dira3d(?:\.[A-Za-z_]\w*)+", doc.read_text(encoding="utf-8")):
            names.setdefault(match.group(0), _doc_id(doc))
    return sorted(names.items())


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_documented_dotted_names_import():
    names = _dotted_names()
    assert len(names) > 30  # the extraction found the docs' names
    broken = [f"{name} ({doc})" for name, doc in names if not _resolves(name)]
    assert not broken, f"documented names that do not import: {broken}"


def _architecture_files():
    """``foo.py`` named under a ``### `dira3d.<package>` `` heading of docs/architecture.md."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    sections = re.split(r"^### `(dira3d\.\w+)`.*$", text, flags=re.M)
    for package, body in zip(sections[1::2], sections[2::2]):
        for name in re.findall(r"`(\w+\.py)`", body):
            yield ROOT / package.replace(".", "/") / name


def test_architecture_module_files_exist():
    files = list(_architecture_files())
    assert len(files) > 5
    assert not [f.relative_to(ROOT).as_posix() for f in files if not f.is_file()]


# the packages whose section of docs/architecture.md lists every module: all of them
MAPPED_PACKAGES = ("data", "engines", "deploy", "visual_words", "transforms", "networks", "utils", "evaluation",
                   "losses")


def test_architecture_names_every_module_of_the_mapped_packages():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    parts = re.split(r"^### `dira3d\.(\w+)`.*$", text, flags=re.M)
    sections = dict(zip(*[iter(parts[1:])] * 2))
    assert sorted(sections) == sorted(p.name for p in (ROOT / "dira3d").iterdir() if (p / "__init__.py").is_file())
    assert set(sections) == set(MAPPED_PACKAGES)
    # the modules at the top of the package, named before the first package's section
    top = parts[0].split("## Modules and their public interfaces", 1)[1]
    missing = [f"dira3d: {p.name}" for p in sorted((ROOT / "dira3d").glob("*.py")) if f"`{p.name}`" not in top]
    for package in MAPPED_PACKAGES:
        folder = ROOT / "dira3d" / package
        body = sections[package]
        modules = [f"`{p.name}`" for p in sorted(folder.iterdir())
                   if p.suffix in (".py", ".sh") and p.name != "__init__.py"]
        # a sub-package or app folder is named as `folder/` or `folder/file.py`
        modules += [f"`{p.name}/" for p in sorted(folder.iterdir()) if p.is_dir() and p.name != "__pycache__"]
        missing += [f"dira3d/{package}: {name.strip('`')}" for name in modules if name not in body]
    assert not missing, f"modules that docs/architecture.md does not name in their package's section: {missing}"


def _numbers(cell: str) -> list[float] | None:
    """``−1000 1000`` / ``64 64 32`` / ``−150, 0.15`` / ``1e-3`` → numbers; None for prose."""
    cell = cell.replace("−", "-").replace("`", "").strip()
    words = [w for w in re.split(r"[,\s]+", cell) if w]
    try:
        return [float(w) for w in words] if words else None
    except ValueError:
        return None


def _flatten(value) -> list:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def test_visual_words_option_table_matches_the_parser():
    """docs/visual_words.md's option table: every flag exists, and every numeric or on/off default is the parser's."""
    from dira3d.visual_words.command import main

    options = _options(_parser_of(main))
    text = (ROOT / "docs" / "visual_words.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1:3] for line in text.splitlines() if re.match(r"\| `--", line)]
    assert len(rows) > 15
    checked = 0
    for flags_cell, default_cell in rows:
        flags = re.findall(r"`(--[\w-]+)", flags_cell)
        assert flags and all(f in options for f in flags), f"visual_words.md: {flags} not all options of dira3d visual-words"
        defaults = [_flatten(options[f].default) for f in flags]
        if default_cell.strip() == "off":
            assert all(d in ([False], [None]) for d in defaults), (flags, defaults)
            checked += 1
            continue
        numbers = _numbers(default_cell)
        if numbers is None:
            assert len(flags) == 1 and [default_cell.strip()] == defaults[0], (flags, default_cell, defaults)
        else:
            assert numbers == [float(x) for d in defaults for x in d], (flags, default_cell, defaults)
        checked += 1
    assert checked == len(rows)


_PROSE = object()


def _literal(text: str):
    """A table cell's value: JSON (``1e-3``, ``null``, `` `[0.9, 0.999]` ``) or one word in backticks (a string)."""
    text = text.strip()
    word = re.fullmatch(r"`([\w-]+)`", text)
    if word and not re.fullmatch(r"-?[\d.e-]+|true|false|null", word.group(1)):
        return word.group(1)
    try:
        return json.loads(text.strip("`"))
    except json.JSONDecodeError:
        return _PROSE


def test_pretraining_settings_table_matches_train_json():
    """bundles/dira_pretrain/docs/README.md's settings table: each id exists in train.json, and a default
    written as plain values (``1e-3, 1e-3, 8, 200``; ``null, false``; `` `[0.9, 0.999]` ``; `` `vanilla` / `mse` ``)
    is train.json's."""
    readme = (ROOT / "bundles" / "dira_pretrain" / "docs" / "README.md").read_text(encoding="utf-8")
    configs = ROOT / "bundles" / "dira_pretrain" / "configs"
    config = json.loads((configs / "train.json").read_text(encoding="utf-8"))
    # settings of visual_words.json alone (pairs_per_epoch) are documented in the same table
    words_only = set(json.loads((configs / "visual_words.json").read_text(encoding="utf-8"))) - set(config)
    rows = [line.split("|")[1:3] for line in readme.splitlines() if re.match(r"\| `\w+`", line)]
    assert len(rows) > 25
    compared = 0
    for ids_cell, default_cell in rows:
        ids = re.findall(r"`(\w+)`", ids_cell)
        if set(ids) <= words_only:
            assert "visual_words.json" in default_cell, f"pretraining README: {ids} is a visual_words.json setting"
            continue
        assert all(i in config for i in ids), f"pretraining README: {ids} not all ids of train.json"
        cell = default_cell.strip()
        values = [cell] if len(ids) == 1 else re.split(r",\s*| / ", cell)
        parsed = [_literal(v) for v in values]
        if len(parsed) != len(ids) or _PROSE in parsed:
            continue  # prose: "number of training volumes", "`transvw` (3D) / `dira2d` (2D)"
        assert parsed == [config[i] for i in ids], f"pretraining README says {dict(zip(ids, parsed))}, train.json has " \
                                                   f"{ {i: config[i] for i in ids} }"
        compared += 1
    assert compared > 20


def _experiment_configs():
    """docs/experiments/*.yaml, every ```yaml block of the docs that is an experiment config (has ``bundle:``) and
    the example of ``dira3d experiment --help``."""
    for path in sorted((ROOT / "docs" / "experiments").glob("*.yaml")):
        yield pytest.param(path.read_text(encoding="utf-8"), "docs/experiments", id=_doc_id(path))
    from dira3d.evaluation import experiment

    example = experiment.__doc__.split("Config (YAML or JSON)::\n\n", 1)[1].split("\n\n", 1)[0]
    yield pytest.param("\n".join(line[4:] for line in example.splitlines()), "", id="dira3d experiment --help")
    for doc in DOCS:
        for number, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)):
            if re.search(r"^bundle:", block, flags=re.M):
                yield pytest.param(block, "", id=f"{_doc_id(doc)}#yaml{number}")


def test_docs_have_experiment_configs_to_check():
    ids = [p.id for p in _experiment_configs()]
    assert len(ids) >= 5 and any("finetuning.md" in i for i in ids) and any("2d.md" in i for i in ids), ids


@pytest.mark.parametrize("text, folder", list(_experiment_configs()))
def test_documented_experiment_configs_pass_the_config_check(text, folder, tmp_path):
    """`dira3d experiment` checks a config before any run (keys, bundle, metric, override ids of the task bundle and
    of the pretraining bundle, folds against the datalist): the docs' configs pass it, with the files they name made
    up under tmp_path (absolute /data/... paths moved there too)."""
    import yaml

    from dira3d.evaluation.experiment import load_config

    config_dir = tmp_path / folder
    config_dir.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"(?<=[\s:\[{,])/data/", lambda _: f"{tmp_path.as_posix()}/data/", text)
    config = yaml.safe_load(text)

    def place(value: str) -> Path:
        return Path(value) if Path(value).is_absolute() else config_dir / value

    datalist = place(config["datalist"])
    datalist.parent.mkdir(parents=True, exist_ok=True)
    entry = {"image": "x.nii.gz", "label": 0, "case_id": "p"}
    # 400 patients of two classes: enough that the documented label fractions keep different entries (1 % of 200
    # keeps 2 per class, 25 % keeps 50) and an early-stopping holdout of both classes, which the config check asks for
    training = [{**entry, "label": i % 2, "case_id": f"p{i}", "fold": i % 3} for i in range(400)]
    datalist.write_text(json.dumps({"training": training, "test": [entry]}))
    for spec in config["methods"].values():
        if isinstance(spec, str):
            place(spec).parent.mkdir(parents=True, exist_ok=True)
            place(spec).write_bytes(b"")
    if "pretrain" in config:
        place(config["pretrain"]["dataset_dir"]).mkdir(parents=True, exist_ok=True)
    (config_dir / "experiment.yaml").write_text(text, encoding="utf-8")
    load_config(config_dir / "experiment.yaml")  # raises, naming the setting, on any drift


def test_documented_repository_paths_exist():
    """Files and folders of the repository the docs name (``tests/test_x.py::test_y``, ``benchmarks/...``,
    ``dira3d/...``, ``bundles/...``, ``data_prep/...``) exist; patterns (``<name>``, ``*``) and the output folders
    a run creates (``models``, ``eval``) are left out; a bare ``docs/README.md`` is the one of each bundle."""
    pattern = re.compile(r"(?<![\w/.-])((?:tests|benchmarks|dira3d|bundles|docs|data_prep|\.ci)/[\w./-]*\w)(::\w+)?(?![\w*-])")
    missing, checked = [], 0
    for doc in DOCS:
        for match in pattern.finditer(doc.read_text(encoding="utf-8")):
            path, test = match.group(1), match.group(2)
            if any(c in path for c in "<{…") or Path(path).name in {"models", "eval"}:
                continue
            exists = (ROOT / path).exists() or (path == "docs/README.md" and (ROOT / "bundles" / "dira_pretrain" / path).is_file())
            if exists and test:
                exists = f"def {test[2:]}(" in (ROOT / path).read_text(encoding="utf-8")
            checked += 1
            if not exists:
                missing.append(f"{_doc_id(doc)}: {path}{test or ''}")
    assert checked > 100
    assert not missing, missing


@pytest.mark.parametrize("bundle", sorted(p.parents[1].name for p in ROOT.glob("bundles/*/docs/README.md")
                                          if p.parents[1].name != "dira_pretrain"))
def test_task_bundle_readme_settings_match_the_configs(bundle):
    """The "Settings" list of a task bundle's README: every "`id` (value)" / "`id` value", "lr X" and "batch N"
    is the value of train.json (inference.json for inference-only ids); the line of configs/tiny.json is
    compared with tiny.json on top."""
    folder = ROOT / "bundles" / bundle
    base = {}
    for name in ("inference", "train"):
        base.update(json.loads((folder / "configs" / f"{name}.json").read_text(encoding="utf-8")))
    tiny = {**base, **json.loads((folder / "configs" / "tiny.json").read_text(encoding="utf-8"))}
    text = (folder / "docs" / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Settings"):]
    section = section[:section.index("\n## ", 3)]
    checked = []
    for line in section.splitlines():
        config = tiny if line.lstrip("- ").startswith("`configs/tiny.json`") else base
        for key, value in re.findall(r"`(\w+)` \(?(-?\d[\d.e-]*|null|true|false)\b", line):
            assert key in config and config[key] == json.loads(value), f"{bundle} README: `{key}` {value}, config: {config.get(key)!r}"
            checked.append(key)
        for value in re.findall(r"\blr (\d[\d.e-]*)", line):
            assert config["learning_rate"] == float(value), f"{bundle} README: lr {value}, config: {config['learning_rate']}"
            checked.append("learning_rate")
        for value in re.findall(r"\bbatch (\d+)", line):
            assert config["batch_size"] == int(value), f"{bundle} README: batch {value}, config: {config['batch_size']}"
            checked.append("batch_size")
    assert {"label_fraction", "holdout", "patience", "max_epochs", "learning_rate", "batch_size"} <= set(checked), checked
