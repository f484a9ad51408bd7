"""Bundle settings are `--override ID=VALUE` for `dira3d pretrain` / `dira3d export` and `--set ID=VALUE` for
`dira3d finetune`; a user who typed the other command's spelling got a usage error. Each command's real parser takes
both, to the same value, and its help names its own spelling first."""

from __future__ import annotations

import argparse

import pytest

from dira3d.deploy.command import main as export_main
from dira3d.engines.command import main as pretrain_main
from dira3d.evaluation.finetune import main as finetune_main


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _parser_of(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``main`` builds, caught when it first parses (nothing runs)."""

    def catch(self, *args, **kwargs):
        raise _Caught(self)

    with monkeypatch.context() as patched:
        patched.setattr(argparse.ArgumentParser, "parse_args", catch)
        try:
            main([])
        except _Caught as caught:
            return caught.parser
    raise AssertionError(f"{main.__module__}.main built no parser")


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))[name]


# (command, its parser, the required options, its documented spelling, the other one)
CASES = [
    ("pretrain", lambda mp: _parser_of(pretrain_main, mp), ["--datalist", "d.json"], "--override", "--set"),
    ("finetune", lambda mp: _parser_of(finetune_main, mp), ["--bundle", "luna16_nodule_fpr"], "--set", "--override"),
    ("export torchscript", lambda mp: _sub(_parser_of(export_main, mp), "torchscript"), ["--bundle", "b"],
     "--override", "--set"),
    ("export onnx", lambda mp: _sub(_parser_of(export_main, mp), "onnx"), ["--bundle", "b", "--out", "m.onnx"],
     "--override", "--set"),
]


@pytest.mark.parametrize("name, parser_of, required, documented, other", CASES, ids=[c[0] for c in CASES])
def test_both_spellings_parse_to_the_same_settings(name, parser_of, required, documented, other, monkeypatch):
    parser = parser_of(monkeypatch)
    settings = ["width=0.125", "roi_size=[16,16,8]"]
    as_documented = parser.parse_args([*required, documented, settings[0], documented, settings[1]])
    as_other = parser.parse_args([*required, other, settings[0], other, settings[1]])
    mixed = parser.parse_args([*required, other, settings[0], documented, settings[1]])
    assert vars(as_other) == vars(as_documented) == vars(mixed)
    dest = documented.lstrip("-")
    assert getattr(as_other, dest) == settings  # in the attribute the command reads
    action = next(a for a in parser._actions if documented in a.option_strings)
    assert action.option_strings == [documented, other]  # the help and usage name the command's own spelling first
    assert f"[{documented} " in parser.format_usage()
