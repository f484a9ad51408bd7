"""The visual-words extractor keeps a checkpoint after every epoch: an interrupted run continues from it.

At the default size an extractor epoch takes hours on a CPU; a Ctrl-C (or a killed job) used to lose all of it.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dira3d.cli import main as cli_main
from dira3d.visual_words import discover_visual_words
from dira3d.visual_words import extractor as extractor_module
from dira3d.visual_words.extractor import EXTRACTOR_NAME, extractor_progress, train_extractor
from dira3d.visual_words.synthetic import write_template_datalist

SIZE = dict(size=(32, 32, 16), width=0.125, batch_size=2, seed=3)
SETTINGS = dict(classes=3, neighbours=2, val_neighbours=2, patch_size=(16, 16, 8), border=(8, 8, 4),
                extractor_size=(32, 32, 16), extractor_width=0.125, extractor_epochs=2, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_template_datalist(tmp_path_factory.mktemp("vw_resume"), templates=3, per_template=2, val_per_template=1,
                                   shape=(64, 64, 32))  # fmt: skip


def _entries(datalist):
    return [{"image": str(datalist.parent / e["image"])} for e in json.loads(datalist.read_text())["training"]]


class _Stop(Exception):
    pass


def _interrupt_in_epoch(monkeypatch, epoch: int, error=KeyboardInterrupt):
    """Interrupt training at the first progress step of ``epoch`` (1-based), after its first batch."""
    original = extractor_module._Progress

    class Interrupting(original):
        def step(self, done):
            if f"epoch {epoch}/" in self.what:
                raise error
            super().step(done)

    monkeypatch.setattr(extractor_module, "_Progress", Interrupting)


def test_interrupted_training_continues_from_its_last_epoch_bit_exact(datalist, tmp_path, monkeypatch, caplog):
    entries = _entries(datalist)
    whole = train_extractor(entries, epochs=3, checkpoint_path=tmp_path / "whole.pt", **SIZE)
    assert extractor_progress(tmp_path / "whole.pt") == (3, 3)

    path = tmp_path / "split.pt"
    with monkeypatch.context() as patch:
        _interrupt_in_epoch(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train_extractor(entries, epochs=3, checkpoint_path=path, **SIZE)
    assert extractor_progress(path) == (2, 3)  # epochs 1 and 2 are kept, the broken third is not

    epochs_run = []
    original = extractor_module._Progress
    monkeypatch.setattr(extractor_module, "_Progress", lambda what, total: epochs_run.append(what) or original(what, total))
    with caplog.at_level(logging.INFO, logger="dira3d.visual_words.extractor"):
        resumed = train_extractor(entries, epochs=3, checkpoint_path=path, **SIZE)
    assert [w for w in epochs_run if w.startswith("extractor")] == ["extractor epoch 3/3"]  # only the missing epoch
    assert f"continuing the extractor from {path} after epoch 2/3" in caplog.text
    for name, tensor in whole.state_dict().items():  # same weights as the uninterrupted run: same shuffling too
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_a_checkpoint_of_other_settings_is_refused_naming_them(datalist, tmp_path):
    entries = _entries(datalist)
    path = tmp_path / "extractor.pt"
    train_extractor(entries, epochs=1, checkpoint_path=path, **SIZE)
    with pytest.raises(ValueError, match=r"trained with other settings \(lr: 0\.001 → 0\.01\).*--overwrite"):
        train_extractor(entries, epochs=1, checkpoint_path=path, lr=1e-2, **SIZE)
    with pytest.raises(ValueError, match="the training volumes"):
        train_extractor(entries[:-1], epochs=1, checkpoint_path=path, **SIZE)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a dira3d visual-words extractor checkpoint"):
        train_extractor(entries, epochs=1, checkpoint_path=tmp_path / "other.pt", **SIZE)


def test_cli_ctrl_c_in_extractor_training_keeps_the_epochs_done_and_the_rerun_continues(datalist, tmp_path, monkeypatch, capsys):
    out = tmp_path / "vw"
    args = ["visual-words", "--datalist", str(datalist), "--out", str(out), "--classes", "3", "--neighbours", "2",
            "--val-neighbours", "2", "--patch-size", "16", "16", "8", "--border", "8", "8", "4",
            "--extractor-size", "32", "32", "16", "--extractor-width", "0.125", "--extractor-epochs", "2"]  # fmt: skip
    with monkeypatch.context() as patch:
        _interrupt_in_epoch(patch, 2)
        assert cli_main(args) == 130
    err = capsys.readouterr().err
    assert f"the extractor is kept after epoch 1 of 2 in {out / EXTRACTOR_NAME}: rerun the same command" in err, err
    assert cli_main(args) == 0
    assert extractor_progress(out / EXTRACTOR_NAME) == (2, 2)
    # the same run without the interruption gives the same visual words
    whole = discover_visual_words(datalist, tmp_path / "whole", **SETTINGS)
    assert json.loads((out / "manifest.json").read_text())["classes"] == whole["classes"]


def test_overwrite_removes_the_extractor_checkpoint_but_never_a_foreign_file(datalist, tmp_path, monkeypatch):
    out = tmp_path / "vw"
    with monkeypatch.context() as patch:
        _interrupt_in_epoch(patch, 2, error=_Stop)
        with pytest.raises(_Stop):
            discover_visual_words(datalist, out, **SETTINGS)
    assert extractor_progress(out / EXTRACTOR_NAME) == (1, 2)
    with pytest.raises(ValueError, match=r"trained with other settings .*seed: 0 → 1"):  # a resume with other settings
        discover_visual_words(datalist, out, **{**SETTINGS, "seed": 1})
    with pytest.raises(ValueError, match="already holds a visual-word run"):
        discover_visual_words(datalist, out, resume=False, **SETTINGS)

    seen = []
    original = extractor_module._Progress
    monkeypatch.setattr(extractor_module, "_Progress", lambda what, total: seen.append(what) or original(what, total))
    discover_visual_words(datalist, out, overwrite=True, **{**SETTINGS, "seed": 1})
    assert [w for w in seen if w.startswith("extractor")] == ["extractor epoch 1/2", "extractor epoch 2/2"]  # started afresh

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / EXTRACTOR_NAME).write_bytes(b"the user's own file")
    with pytest.raises(ValueError, match="is not a `dira3d visual-words` extractor checkpoint"):
        discover_visual_words(datalist, foreign, overwrite=True, **SETTINGS)
    assert (foreign / EXTRACTOR_NAME).read_bytes() == b"the user's own file"


def test_a_run_refused_at_its_start_leaves_no_new_empty_folder(datalist, tmp_path):
    new = tmp_path / "new" / "vw"
    with pytest.raises(ValueError, match="at least 2 visual words"):
        discover_visual_words(datalist, new, **{**SETTINGS, "classes": 1})
    assert not new.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(ValueError, match="at least 2 visual words"):
        discover_visual_words(datalist, mine, **{**SETTINGS, "classes": 1})
    assert mine.is_dir()  # a folder the user had is kept


def test_a_rerun_removes_the_half_written_files_a_killed_run_left(datalist, tmp_path):
    # SIGKILL in the middle of an atomic write leaves its hidden temporary file (an exception removes it, a kill cannot):
    # the extractor's is a checkpoint's size; the rerun, holding the --out lock, removes them
    out = tmp_path / "out"
    out.mkdir()
    left = [out / f".{EXTRACTOR_NAME}.k1ll3d0a.tmp", out / ".manifest.json.k1ll3d0b.tmp", out / ".embeddings.npy.k1ll3d0c.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    other = out / ".notes.txt.k1ll3d0d.tmp"  # not a visual-word file: not this command's to remove
    other.write_bytes(b"kept")
    discover_visual_words(str(datalist), str(out), **SETTINGS)
    assert not [p.name for p in left if p.exists()]
    assert other.exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
