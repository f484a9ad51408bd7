"""Commands dira3d prints for the user to paste (error hints, "next:" lines) and the docs' commands quote the words a
shell would glob: an unquoted ``patch_size=[16,16,8]`` stops zsh ("no matches found", macOS's default shell) and
becomes a file name in bash when one matches (here a file ``patch_size=1`` in the folder).

Each printed command is split by bash run with ``failglob`` (an unmatched glob is an error, as in zsh) in a folder
holding such a file, and compared with the argv it means; :func:`dira3d.utils.overrides.shell_word` is the one helper.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dira3d.utils.overrides import format_overrides, parse_value, shell_word

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the shell checks run bash")


def _bash_argv(command: str, cwd: Path) -> list[str]:
    """The words bash gives ``command`` (in ``cwd``, which holds files an unquoted ``[...]`` matches), with failglob on."""
    for name in ("patch_size=1", "roi_size=6", "decoder_channels=1", "8"):
        (cwd / name).touch()
    done = subprocess.run(["bash", "-O", "failglob", "-c", f"printf '%s\\0' {command}"], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\0")[:-1]


@pytest.mark.parametrize("word", ["width=0.125", "backbone=resnet10", "patch_size=[16,16,8]", "[16,16,8]",
                                  "['a.json','b.json']", "/data/my scans/vw.json", '{"net": {"width": 0.125}}',
                                  "x=$HOME[1]", "it's [1]", "a\\b*", "!x[1]"])
def test_a_shell_word_is_the_word_itself_after_bash_splits_it(word, tmp_path):
    quoted = shell_word(word)
    assert _bash_argv(quoted, tmp_path) == [word] and shlex.split(quoted) == [word]
    # quoted only when needed, in the docs' double quotes when they keep it whole
    assert quoted == {"width=0.125": word, "backbone=resnet10": word, "patch_size=[16,16,8]": f'"{word}"',
                      "['a.json','b.json']": f'"{word}"'}.get(word, quoted)


def test_format_overrides_quotes_list_values_only():
    assert format_overrides({"width": 0.125, "backbone": "resnet10"}) == "--override width=0.125 --override backbone=resnet10"
    settings = {"backbone": "resnet10", "decoder_channels": [16, 16, 8, 8, 8], "roi_size": [64, 64]}
    printed = format_overrides(settings, "--set")
    assert printed == '--set backbone=resnet10 --set "decoder_channels=[16,16,8,8,8]" --set "roi_size=[64,64]"'
    words = shlex.split(printed)
    assert {k: parse_value(v) for k, v in (w.split("=", 1) for w in words[1::2])} == settings


def test_the_visual_words_next_line_pastes_as_its_command(tmp_path):
    from dira3d.visual_words.command import next_step

    out = tmp_path / "vw out"  # a path with a space: one word too
    line = next_step(out, (16, 16, 8))
    command = re.fullmatch(r"next:     (.*) \(docs/visual_words\.md\)", line).group(1)
    argv = ["dira3d", "pretrain", "--datalist", str((out / "visual_words.json").resolve()), "--config",
            "visual_words.json", "--override", "patch_size=[16,16,8]", "--output", "runs/dira_pretrain"]
    assert _bash_argv(command, tmp_path) == argv and shlex.split(command) == argv
    assert '--override "patch_size=[16,16,8]"' in command
    assert "--override" not in next_step(tmp_path, (64, 64, 32))  # the bundle's default: nothing to pass


def test_the_pretrain_finetune_line_of_a_2d_run_pastes_as_its_command(tmp_path):
    from dira3d.engines.command import BUNDLE_DIR, finished_message

    models = tmp_path / "models"
    models.mkdir()
    torch.save({"trainer": {}}, models / "last.pt")
    configs = [str(BUNDLE_DIR / "configs" / c) for c in ("train.json", "2d.json", "2d_tiny.json")]
    line = finished_message(tmp_path, configs, {"decoder_channels": [32, 16, 8, 8, 8]}).splitlines()[-1]
    command = re.fullmatch(r"fine-tune:   (.*) \(docs/2d\.md\)", line).group(1)
    argv = ["dira3d", "finetune", "--bundle", "BUNDLE", "--datalist", "DATALIST", "--pretrained", str(models / "last.pt"),
            "--set", "backbone=resnet10", "--set", "decoder_channels=[32,16,8,8,8]", "--output-dir", "runs/ft"]
    assert _bash_argv(command, tmp_path) == argv


def test_the_2d_settings_hint_pastes_as_its_commands(tmp_path):
    from dira3d.evaluation.tasks2d import settings_mismatch
    from dira3d.networks import ResNetUNet
    from dira3d.utils import atomic_save

    net = ResNetUNet(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8))
    atomic_save({"encoder": net.encoder.state_dict(), "decoder": net.decoder.state_dict()}, tmp_path / "p.pt")
    message = settings_mismatch(tmp_path / "p.pt", "segmentation", "resnet10", (256, 128, 64, 32, 16))
    finetune, bundle_run = re.search(r"`(dira3d finetune [^`]*)`; `([^`]*)` for monai.bundle run", message).groups()
    assert _bash_argv(finetune, tmp_path) == ["dira3d", "finetune", "--set", "decoder_channels=[16,16,8,8,8]"]
    assert _bash_argv(bundle_run, tmp_path) == ["--decoder_channels", "[16,16,8,8,8]"]


# ---------------------------------------------------------------- export of a 2D classifier: no decoder settings

def _classifier_bundle(repo_root: Path, tmp_path: Path, overrides: dict) -> Path:
    from monai.bundle import ConfigParser

    from dira3d.utils import atomic_save

    bundle = tmp_path / "chestxray14_cls"
    shutil.copytree(repo_root / "bundles" / "chestxray14_cls" / "configs", bundle / "configs")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    atomic_save(parser.get_parsed_content("network_def", instantiate=True).state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_export_of_a_tiny_2d_classifier_names_no_decoder_setting(repo_root, tmp_path, capsys):
    """A classifier has no decoder: the hint listed decoder_channels (tiny.json's) among the overrides to pass."""
    from dira3d.deploy.command import main as export_main

    bundle = _classifier_bundle(repo_root, tmp_path, {"backbone": "resnet10"})
    out = ["torchscript", "--bundle", str(bundle), "--out", str(tmp_path / "c.ts")]
    assert export_main(out) == 2
    err = capsys.readouterr().err
    printed = '--override backbone=resnet10 --override "roi_size=[64,64]"'
    assert f"the weights fit other settings (those of chestxray14_cls's tiny.json: a model fine-tuned with --tiny): " \
           f"pass {printed} (overrides={{'backbone': 'resnet10', 'roi_size': [64, 64]}})" in err, err
    assert "decoder_channels" not in err
    assert export_main([*out, *shlex.split(printed)]) == 0, capsys.readouterr().err


def test_the_settings_sentence_of_a_2d_classifier_names_no_decoder_setting(repo_root, tmp_path):
    from monai.bundle import ConfigParser

    from dira3d.deploy.bundle_network import fit_hint
    from dira3d.networks import ResNetClassifier, ResNetSegmenter

    bundle = _classifier_bundle(repo_root, tmp_path, {"backbone": "resnet10"})
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["backbone"] = "resnet10"
    hint = fit_hint(ResNetClassifier(1, 3, backbone="resnet10").state_dict(), parser, bundle)  # 3 classes, not 14
    # the outputs are what differs (it named backbone / roi_size, the values given already, as a --tiny example)
    assert hint == ("the weights fit other settings (3 outputs, chestxray14_cls has 14): pass --override out_channels=3 "
                    "(overrides={'out_channels': 3}), with class_names, one name per output in the order of the "
                    "training datalist's meta.labels")
    # segmentation weights (decoder.* keys) still name the decoder
    segmenter = ResNetSegmenter(1, 1, backbone="resnet10", decoder_channels=(16, 16, 8, 8, 8)).state_dict()
    assert 'pass --override "decoder_channels=[16,16,8,8,8]" --override "roi_size=[64,64]"' in \
        fit_hint(segmenter, parser, bundle)


# ---------------------------------------------------------------- docs and bundle hints

def _unquoted_globs(command: str) -> list[str]:
    """The words of ``command`` with a ``[...]`` outside quotes that a shell globs: ``key=[..]`` or a list value
    (``[1,2]``, ``['a']``); ``[--optional]`` / ``[N]`` placeholder words are left alone."""
    found, word, quote = [], "", ""
    for char in command + " ":
        if quote:
            quote = "" if char == quote else quote
            word += "Q" if quote else ""  # a quoted part: no glob
        elif char in "'\"":
            quote = char
        elif char.isspace():
            if re.search(r"=\[|^\[(?:[\d'\"{]|-\d)", word):
                found.append(word)
            word = ""
        else:
            word += char
    return found


def test_the_glob_check_finds_unquoted_lists():
    assert _unquoted_globs('dira3d pretrain --override patch_size=[16,16,8] --override "roi_size=[64,64]"') == \
        ["patch_size=[16,16,8]"]
    assert _unquoted_globs("--pixdim [1,1,1] --x '[1]' [--val-fraction F] [N]") == ["[1,1,1]"]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def _documented_commands() -> list[tuple[str, str]]:
    from test_docs_match_code import DOCS, ROOT

    commands = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        blocks = re.findall(r"^\s*```[\w-]*\n(.*?)^\s*```", text, flags=re.S | re.M)
        lines = [line for block in blocks for line in block.splitlines()]
        spans = re.findall(r"`([^`]+)`", re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M))
        # an `error: ...` span quotes a message (its settings and values), not a command to type
        commands += [(doc.relative_to(ROOT).as_posix(), c) for c in lines + spans
                     if "--" in c and not c.lstrip().startswith("error:")]
    for config in sorted((ROOT / "bundles").glob("*/configs/*.json")):  # hints in the configs' strings
        spans = [c for text in _strings(json.loads(config.read_text(encoding="utf-8"))) for c in re.findall(r"`([^`]+)`", text)]
        commands += [(config.relative_to(ROOT).as_posix(), c) for c in spans if "--" in c]
    return commands


def test_documented_commands_and_bundle_hints_quote_their_lists():
    commands = _documented_commands()
    assert len(commands) > 100
    bad = [f"{where}: {word} in `{command.strip()[:90]}`" for where, command in commands
           for word in _unquoted_globs(re.split(r"(?:^|\s)#", command, maxsplit=1)[0])]
    assert not bad, "quote these words (zsh: no matches found):\n" + "\n".join(bad)

