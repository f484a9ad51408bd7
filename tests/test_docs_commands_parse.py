"""The commands of the docs' code blocks, parsed as a reader would run them, and the keys the docs name of a file a
command writes ("docs that match the code", continued from test_docs_match_code.py).

A flag that exists (test_docs_match_code.py) can still be given the wrong number of values, a value of the wrong type
or choice, or a required option can be missing: argparse stops such a copied command before any work. Parsers are
built and given the documented words, never run.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
from test_docs_match_code import DOCS, ROOT, _command_main, _doc_id, _parser_of, _text


def _code_block_command_lines():
    """Each whole ``dira3d`` / ``data_prep`` / ``benchmarks`` command of a fenced code block, as the shell splits it:
    its comment cut off, and the words after a shell separator or a prose note in parentheses (the "next:" lines the
    commands print) left out; a line with ``[optional]`` words, ``<placeholders>`` or ``…`` is left out too, and so is
    a command quoted inside a parenthesis of a message's prose (``...; dira3d finetune --set cache_dir=FOLDER)``)."""
    for doc in DOCS:
        for block in re.findall(r"^\s*```[\w-]*\n(.*?)^\s*```", _text(doc), flags=re.S | re.M):
            for line in block.splitlines():
                code = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
                match = re.search(r"(?:^|(?<=\s))(?:dira3d (?=\S)|python3? (?:data_prep|benchmarks)/)", code)
                if not match or any(mark in code for mark in ("…", "...", "<", " [")):
                    continue
                if code[match.start():].count(")") > code[match.start():].count("("):
                    continue  # the command closes a parenthesis opened before it: quoted in a message's prose
                try:
                    words = shlex.split(code[match.start():])
                except ValueError:
                    continue  # an unbalanced quote: not a command as written
                for i, word in enumerate(words):
                    if word in {"|", "&&", ";", ")", "||"} or word.startswith("("):
                        words = words[:i]
                        break
                yield pytest.param(doc, words, id=f"{_doc_id(doc)}:{' '.join(words)[:60]}")


def test_docs_have_code_block_commands_to_check():
    labels = {" ".join(words[:2]) for _, words in (p.values for p in _code_block_command_lines())}
    assert {"dira3d prepare", "dira3d visual-words", "dira3d pretrain", "dira3d finetune", "dira3d export",
            "dira3d localise", "dira3d synthetic", "dira3d experiment"} <= labels, labels
    assert len(list(_code_block_command_lines())) > 40


@pytest.mark.parametrize("doc, words", list(_code_block_command_lines()))
def test_documented_commands_parse(doc, words, capsys):
    """A command a reader copies from a code block is accepted by its parser as written: every required option is
    there, and each value has the number of words, the type and the choice the option takes (`--spacing 2 2` for
    three numbers, `--lung-filter of`, a missing `--dst` would each stop it before any work)."""
    resolved = _command_main(words)
    if resolved is None:
        return
    label, main, rest = resolved
    parser = _parser_of(main)
    if label == "dira3d export":
        subs = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert rest and rest[0] in subs, f"{_doc_id(doc)}: `{' '.join(words)}`: no such export; they are {sorted(subs)}"
        parser, rest = subs[rest[0]], rest[1:]
    try:
        parser.parse_args(rest)
    except SystemExit:
        pytest.fail(f"{_doc_id(doc)}: `{' '.join(words)}`: {capsys.readouterr().err.strip().splitlines()[-1]}")


def test_summary_json_keys_in_results_md_are_the_cells_fields():
    """docs/results.md names the keys of each cell of `dira3d experiment`'s summary.json (it said "p" for `p_value`
    and left out `method`, `label_fraction`, `n` and `pairs`): they are the fields of the cells it is written from."""
    import dataclasses

    from dira3d.evaluation.stats import CellSummary

    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    found = re.search(r"`summary\.json` \(each cell's (.*?);", text, flags=re.S)
    assert found, "docs/results.md no longer lists the keys of summary.json"
    assert re.findall(r"`(\w+)`", found.group(1)) == [f.name for f in dataclasses.fields(CellSummary)]
