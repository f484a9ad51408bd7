"""``dira3d finetune`` stopped (Ctrl-C / SIGTERM) before its training started (found 2026-11-27, interruption
walkthrough follow-up).

Building the trainer loads and caches the data (minutes on a large dataset). A stop there said the output folder
"holds an unfinished run (no test metrics); rerun with --overwrite to start it again", although nothing was trained
or saved; and a stop after the TensorBoard handlers were built left their empty event files, which the next run took
for an earlier run's curves and refused without ``--overwrite``. Now the line says the training had not started and
to run the same command again, this run's event files are removed, and the same command runs.
"""

from __future__ import annotations

import json

import pytest

from dira3d.evaluation import finetune
from dira3d.utils.interrupts import TerminatedBySignal
from test_bundles_finetune import make_classification

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore")]  # tests/conftest.py


def test_a_stop_before_training_says_so_and_the_same_command_runs(tmp_path, monkeypatch, capsys):
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    out = tmp_path / "out"
    args = ["--bundle", "luna16_nodule_fpr", "--datalist", str(datalist), "--output-dir", str(out), "--tiny",
            "--set", "max_epochs=1"]
    written = finetune.write_preprocessing

    def terminated(*a, **k):  # the last step before the training: the data are cached, TensorBoard's writers made
        assert list(out.glob("events.out.tfevents.*")), "the event files exist by now (what the rerun refused)"
        raise TerminatedBySignal()

    monkeypatch.setattr(finetune, "write_preprocessing", terminated)
    assert finetune.main(args) == 143
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dira3d finetune:")]
    assert lines == [f"dira3d finetune: stopped by SIGTERM before training started (while the data were loaded and "
                     f"cached); nothing was trained or saved in {out.resolve()}; run the same command again to start it"]
    assert not list(out.glob("events.out.tfevents.*")) and not (out / "models" / "model.pt").exists()

    monkeypatch.setattr(finetune, "write_preprocessing", written)
    assert finetune.main(args) == 0, capsys.readouterr().err[-3000:]  # no --overwrite needed
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


def test_event_files_from_before_the_run_are_kept(tmp_path):
    from dira3d.evaluation.stopping import stopped_before_training, stopped_before_training_of

    earlier = tmp_path / "events.out.tfevents.1.host"
    earlier.write_bytes(b"curves")
    with pytest.raises(KeyboardInterrupt) as info:
        with stopped_before_training(tmp_path):
            (tmp_path / "events.out.tfevents.2.host").write_bytes(b"")
            raise KeyboardInterrupt
    assert stopped_before_training_of(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [earlier.name]
    with pytest.raises(KeyboardInterrupt) as info:  # once the training ran: its curves stay, and it is not marked
        with stopped_before_training(tmp_path) as watch:
            watch.started()
            (tmp_path / "events.out.tfevents.3.host").write_bytes(b"steps")
            raise KeyboardInterrupt
    assert not stopped_before_training_of(info.value)
    assert len(list(tmp_path.iterdir())) == 2
