"""``dira3d finetune`` shows the caches' lines (their size; with ``cache_dir``, where they are on disk).

``run_finetune`` leaves the logging setup as it is (``logging_file=False``), so under ``dira3d finetune`` nothing
printed the INFO lines of ``dira3d.engines.cache`` / ``dira3d.engines.diskcache``: README.md and the bundles'
READMEs say the run logs ``caching N item(s) in memory before training ...`` and ``caching on disk in DIR
(cache_dir): N entries already there ...``, and neither appeared (they did under ``python -m monai.bundle run``,
through the bundle's ``logging.conf``).
"""

from __future__ import annotations

import io
import logging

from dira3d.evaluation import finetune
from dira3d.evaluation.finetune_messages import show_cache_lines

LINE = "caching on disk in /scratch/c (cache_dir): 3 entries already there (1.0 MiB), 0 to write"


def test_dira3d_finetune_prints_the_cache_line_of_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a plain command: no logging set up

    def fake_run(bundle, overrides, **kwargs):  # the run: its cache logs the line, as the bundle's data step does
        logging.getLogger("dira3d.engines.diskcache").info(LINE)
        logging.getLogger("dira3d.engines.cache").info("caching 4 item(s) in memory before training")
        return {"metrics": {"dice": 0.5}, "eval_split": "test", "settings": {}}

    monkeypatch.setattr(finetune, "run_finetune", fake_run)
    assert finetune.main(["--bundle", "lits_liver_seg", "--output-dir", str(tmp_path / "out"),
                          "--set", f"cache_dir={tmp_path / 'c'}"]) == 0
    err = capsys.readouterr().err
    assert f"- INFO - {LINE}" in err and "- INFO - caching 4 item(s) in memory before training" in err, err


def test_the_cache_lines_are_printed_once_and_left_to_a_logging_setup_that_exists(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    show_cache_lines(stream)
    show_cache_lines(stream)  # twice (two runs in one process): one handler
    log = logging.getLogger("dira3d.engines.diskcache")
    log.info(LINE)
    assert stream.getvalue().count(LINE) == 1, stream.getvalue()
    # a root handler (the caller's logging setup, a bundle's logging.conf) prints it: not a second time here
    root = io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(root)])
    log.info("second")
    assert "second" not in stream.getvalue() and "second" in root.getvalue()


def test_dira3d_experiment_prints_the_cache_lines_of_its_runs(monkeypatch, capsys, tmp_path):
    import yaml

    from dira3d.evaluation import experiment

    (tmp_path / "dl.json").write_text("{}")
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"bundle": "lits_liver_seg", "datalist": "dl.json", "metric": "dice",
                                      "output_dir": "out", "seeds": [0, 1], "label_fractions": [1.0],
                                      "methods": {"random": None}, "overrides": {"cache_dir": "cache"}}))
    monkeypatch.setattr(logging.getLogger(), "handlers", [])

    def fake_experiment(config):  # each run's fine-tuning logs its cache line
        logging.getLogger("dira3d.engines.diskcache").info(LINE)
        raise experiment.ExperimentRunsFailed("stopped here")

    monkeypatch.setattr(experiment, "run_experiment", fake_experiment)
    assert experiment.main(["--config", str(config)]) == 1
    assert f"- INFO - {LINE}" in capsys.readouterr().err


def test_dira3d_finetune_does_not_print_monais_warning_about_the_logging_file_it_asks_not_to_read(monkeypatch, tmp_path):
    """``ConfigWorkflow(logging_file=False)`` (the caller's logging kept as it is) logs "Logging file is set to False,
    skipping logging." at WARNING: every ``dira3d finetune`` printed it twice (its training and evaluation workflow),
    with nothing wrong. Only that record is dropped, while the workflow is built: the logger's other warnings stay."""
    import pytest
    from monai.bundle import ConfigWorkflow

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("monai.bundle.workflows")
    monkeypatch.setattr(log, "handlers", [handler])

    class Built(Exception):
        """Raised by the stubbed initialize: the workflow was built, its warnings were sent."""

    def stop(self):  # the workflow is built; stop before any training
        raise Built

    monkeypatch.setattr(ConfigWorkflow, "initialize", stop)
    with pytest.raises(Built):
        finetune.run_finetune("chestxray14_cls", {}, output_dir=tmp_path / "out", tiny=True)
    messages = [r.getMessage() for r in records]
    assert not any(m.startswith("Logging file is set to False") for m in messages), messages
    from dira3d.evaluation.finetune_messages import without_logging_file_warning

    with without_logging_file_warning():
        log.warning("Logging file is set to False, skipping logging.")
        log.warning("Not all config files are in /x.")  # another warning of the logger
    log.warning("Logging file is set to False, skipping logging.")  # outside: the filter is gone
    assert [r.getMessage() for r in records] == messages + ["Not all config files are in /x.",
                                                            "Logging file is set to False, skipping logging."]
