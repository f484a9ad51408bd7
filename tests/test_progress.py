"""Progress where a user waits: the validation of each fine-tuning epoch, the test evaluation and sliding-window
inference over a whole CT printed nothing for minutes (lidc --tiny inference on a real CT: 10 minutes without a
line). The bundles now draw a tqdm bar there, but only on a terminal and on rank 0 (dira3d.utils.show_progress):
never into a log file or a CI log."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D
from dira3d.utils import show_progress

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLIDING_WINDOW = ("lidc_nodule_seg", "lits_liver_seg", "brats_tumor_seg")  # inference over a whole scan


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (and keeps what is drawn on it)."""

    def isatty(self) -> bool:
        return True


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def test_show_progress_only_on_a_terminal_of_rank_0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert show_progress(Terminal()) is True
    assert show_progress(io.StringIO()) is False  # a file, a pipe, a CI log
    assert show_progress(Closed()) is False
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress() is True  # sys.stderr, where tqdm draws
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, a daemon
    assert show_progress() is False
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks share the terminal: rank 0 alone draws
    assert show_progress(Terminal()) is False
    monkeypatch.setenv("RANK", "0")
    assert show_progress(Terminal()) is True


def _progress_bars(parser: ConfigParser, key: str) -> list[str]:
    """The ids of the progress bar entries (ignite ProgressBar, closed also on an early end) of the handler list ``key``."""
    handlers = parser.get(key)
    return [f"{key}#{i}" for i, h in enumerate(handlers)
            if isinstance(h, dict) and h.get("_target_") == "dira3d.evaluation.ClosingProgressBar"]


@pytest.mark.parametrize("bundle", BUNDLES + BUNDLES_2D)
def test_validation_and_test_evaluation_draw_a_bar_on_a_terminal_only(bundle, repo_root, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    configs = repo_root / "bundles" / bundle / "configs"
    for files, key, desc in ((["train.json"], "validate#handlers", "validation"),
                             (["train.json", "evaluate.json"], "validate#handlers", "evaluation")):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in files])
        ids = _progress_bars(parser, key)
        assert len(ids) == 1, (bundle, files)
        for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
            monkeypatch.setattr(sys, "stderr", stream)
            bar = parser.get_parsed_content(ids[0], lazy=False)
            assert bar.tqdm_kwargs == {"desc": desc, "disable": not drawn} and bar.persist is False, (bundle, files)


@pytest.mark.parametrize("end", ["terminate", "interrupt", "fault", "alone"])
def test_the_bar_of_a_run_that_ends_early_is_closed(end, monkeypatch):
    """A validation cut short by a signal (terminate(): no EPOCH_COMPLETED, where ignite closes its bar) or ended by an
    exception left its bar on the terminal, the run's last line written after it. The exception still reaches the
    engine's other handlers (StatsHandler logs it, listed first as in the bundles) and the caller."""
    from ignite.engine import Engine, Events
    from monai.handlers import StatsHandler

    from dira3d.evaluation import ClosingProgressBar

    engine = Engine(lambda e, b: None)
    logged = []
    if end != "alone":
        stats = StatsHandler(iteration_log=False, name="dira3d.test.progress_stats")
        stats.attach(engine)
        monkeypatch.setattr(stats.logger, "exception", lambda message, *a, **k: logged.append(message))
    terminal = Terminal()
    bar = ClosingProgressBar(desc="validation", persist=False, file=terminal)
    bar.attach(engine)
    errors = {"terminate": None, "interrupt": KeyboardInterrupt, "fault": RuntimeError, "alone": RuntimeError}

    @engine.on(Events.ITERATION_COMPLETED(once=2))
    def cut(e):
        if errors[end] is None:
            e.terminate()
        else:
            raise errors[end]("cut")

    if errors[end] is None:
        engine.run(range(5))
    else:
        with pytest.raises(errors[end]):
            engine.run(range(5))
        # StatsHandler's handler ran, after the bar's (ignite handles an Exception twice: the iteration's, the run's)
        assert set(logged) == (set() if end == "alone" else {"Exception: cut"})
    drawn = terminal.getvalue()
    assert bar.pbar is None and "validation: [1/5]" in drawn and re.search(r"\r +\r$", drawn)  # cleared (persist False)
    if errors[end] is not None:
        return  # ignite runs no more after an exception (its run generator is spent)
    engine.run(range(3))  # the next validation draws a bar of its own and closes it as ignite does
    assert bar.pbar is None and "[1/3]" in terminal.getvalue()[len(drawn):] and re.search(r"\r +\r$", terminal.getvalue())


def _cache_datasets(config, path=""):
    """The ids of the CacheDataset items of a config (nested dicts and lists)."""
    if isinstance(config, dict):
        kinds = ("CacheDataset", "monai.data.CacheDataset", "dira3d.engines.cached_dataset")  # the last: cache_dir ''
        found = [path] if config.get("_target_") in kinds else []
        return found + [i for k, v in config.items() for i in _cache_datasets(v, f"{path}#{k}" if path else str(k))]
    if isinstance(config, list):
        return [i for n, v in enumerate(config) for i in _cache_datasets(v, f"{path}#{n}")]
    return []


@pytest.mark.parametrize("bundle", BUNDLES + BUNDLES_2D + ("dira_pretrain",))
def test_cache_datasets_draw_their_loading_bar_on_a_terminal_only(bundle, repo_root, monkeypatch):
    """MONAI's CacheDataset draws its "Loading dataset" bar (progress=True by default) whatever stderr is: a run under
    nohup or SLURM got its redraws in the log. Every CacheDataset of the bundles now asks show_progress."""
    monkeypatch.delenv("RANK", raising=False)
    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / bundle / "configs" / "train.json"))
    ids = _cache_datasets(parser.get())
    assert len(ids) == 2, ids  # train and validate
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        parser.parse(True)
        assert [parser.get_parsed_content(f"{i}#progress") for i in ids] == [drawn, drawn], (bundle, ids)
    # and MONAI then draws nothing into a log file
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        parser.parse(True)
        parser[f"{ids[0]}#data"], parser[f"{ids[0]}#transform"] = [{"image": 0}, {"image": 1}], None
        parser[f"{ids[0]}#num_workers"] = 0
        parser.get_parsed_content(ids[0])
        assert ("Loading dataset" in stream.getvalue()) is drawn, bundle


@pytest.mark.parametrize("bundle", SLIDING_WINDOW)
def test_sliding_window_inference_draws_a_bar_on_a_terminal_only(bundle, repo_root, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    parser = ConfigParser()
    parser.read_config(str(repo_root / "bundles" / bundle / "configs" / "inference.json"))
    parser["roi_size"] = [16, 16, 8]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    inferer = parser.get_parsed_content("inferer", lazy=False)
    assert inferer.progress is True
    inferer(torch.zeros(1, 1, 40, 40, 20), lambda x: x)  # MONAI's bar over the window batches
    assert "100%|" in terminal.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    inferer = parser.get_parsed_content("inferer", lazy=False)
    assert inferer.progress is False
    inferer(torch.zeros(1, 1, 40, 40, 20), lambda x: x)
    assert log.getvalue() == ""


def test_a_fine_tuning_epoch_shows_its_validation_on_a_terminal(tmp_path, repo_root, monkeypatch):
    from test_bundles_finetune import make_classification

    monkeypatch.delenv("RANK", raising=False)
    datalist = make_classification(tmp_path / "data", "ncc_datalist.json", (16, 16, 8), folds=False)
    configs = repo_root / "bundles" / "luna16_nodule_fpr" / "configs"
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    flow = ConfigWorkflow(config_file=[str(configs / "train.json"), str(configs / "tiny.json")],
                          meta_file=str(configs / "metadata.json"), logging_file=False, workflow_type=None,
                          bundle_root=str(tmp_path / "run"), ckpt_dir=str(tmp_path / "run" / "models"),
                          output_dir=str(tmp_path / "run"), datalist=str(datalist), max_epochs=1)
    flow.initialize()
    flow.run()
    flow.finalize()
    assert "validation: [1/1] 100%" in terminal.getvalue()
    assert Path(tmp_path / "run" / "models" / "model.pt").is_file()


def _localise_argv(tmp_path: Path) -> list[str]:
    from test_localise_2d import _write_boxes

    from dira3d.networks import ResNetClassifier
    from dira3d.utils import atomic_save

    torch.manual_seed(0)
    datalist = _write_boxes(tmp_path / "data", [(10, 20, 30, 30), (60, 40, 20, 30)], [0, 1])
    atomic_save(ResNetClassifier(1, 2, backbone="resnet10").state_dict(), tmp_path / "model.pt")
    return ["--bbox-datalist", str(datalist), "--model", str(tmp_path / "model.pt"), "--backbone", "resnet10",
            "--num-classes", "2", "--roi-size", "64", "64", "--target-layer", "encoder.layer3", "--max-overlays", "0"]


def test_localise_draws_its_bar_over_the_boxes_on_a_terminal_only(tmp_path, monkeypatch):
    """`dira3d localise` passed progress=True: its tqdm bar went into log files and pipes (a CI log got the carriage-
    return redraws). It now asks show_progress, as the bundles do."""
    from dira3d.evaluation.localise import main

    monkeypatch.delenv("RANK", raising=False)
    argv = _localise_argv(tmp_path)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert main(argv + ["--output-dir", str(tmp_path / "piped")]) == 0
    assert "localise:" not in log.getvalue() and "box/s" not in log.getvalue(), log.getvalue()
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv + ["--output-dir", str(tmp_path / "watched")]) == 0
    assert "localise: 100%|" in terminal.getvalue() and "2/2" in terminal.getvalue()


def _write_text_case(case) -> dict:
    for path in case.outputs:
        path.write_text(case.case_id)
    return {}


def test_dira3d_prepare_draws_its_bar_over_the_cases_on_a_terminal_only(tmp_path, monkeypatch):
    """Every `dira3d prepare <dataset>` (run_prepare) left run_cases' progress at its default True: a bar in every log
    of a preparation job. run_prepare now passes show_progress()."""
    import argparse

    from dira3d.data.runner import Case, add_common_arguments, run_cases, run_prepare

    def prepare(src, dst, **options):
        cases = [Case(f"c{i}", [Path(dst) / f"c{i}.txt"]) for i in range(3)]
        return run_cases(cases, _write_text_case, out_dir=dst, desc="toy", **options)

    monkeypatch.delenv("RANK", raising=False)
    parser = add_common_arguments(argparse.ArgumentParser())
    for name, stream, drawn in (("piped", io.StringIO(), False), ("watched", Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        args = parser.parse_args(["--src", str(tmp_path), "--dst", str(tmp_path / name)])
        assert run_prepare("dira3d prepare toy", prepare, args) == 0
        assert sorted(p.name for p in (tmp_path / name).glob("c*.txt")) == ["c0.txt", "c1.txt", "c2.txt"]
        assert ("toy: 100%|" in stream.getvalue()) is drawn, (name, stream.getvalue())


def test_the_demo_prepares_its_phantoms_with_a_bar_on_a_terminal_only(tmp_path, monkeypatch):
    import dira3d.data.luna16 as luna16
    import dira3d.data.synthetic as synthetic
    from dira3d import demo

    asked = []
    monkeypatch.setattr(synthetic, "write_luna16_phantoms", lambda raw, **kwargs: None)
    monkeypatch.setattr(luna16, "prepare", lambda raw, prepared, **kwargs: asked.append(kwargs["progress"]) or [])
    monkeypatch.delenv("RANK", raising=False)
    for stream in (io.StringIO(), Terminal()):
        monkeypatch.setattr(sys, "stderr", stream)
        demo._phantoms_and_prepare(tmp_path, count=2, size=(32, 32, 16), seed=0)
    assert asked == [False, True]


def test_dira3d_prepare_in_a_log_says_how_far_it_is(tmp_path, monkeypatch):
    """Without a terminal `dira3d prepare` printed nothing until its summary: over hundreds of full CTs (about 17 s
    each measured, 512x512x300 at --spacing 1 1 2 on a 2-core CPU) a batch job's log stayed empty for hours. It now
    prints a line with the cases done and the time to go at most every minute (every case here: PROGRESS_SECONDS 0);
    a terminal gets the bar alone."""
    import argparse

    import dira3d.utils.progress as progress_module
    from dira3d.data.runner import Case, add_common_arguments, run_cases, run_prepare

    def prepare(src, dst, **options):
        cases = [Case(f"c{i}", [Path(dst) / f"c{i}.txt"]) for i in range(3)]
        return run_cases(cases, _write_text_case, out_dir=dst, desc="toy", **options)

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(progress_module, "PROGRESS_SECONDS", 0.0)
    parser = add_common_arguments(argparse.ArgumentParser())
    for name, stream, workers in (("piped", io.StringIO(), "1"), ("piped_pool", io.StringIO(), "2"),
                                  ("watched", Terminal(), "1")):
        monkeypatch.setattr(sys, "stderr", stream)
        args = parser.parse_args(["--src", str(tmp_path), "--dst", str(tmp_path / name), "--workers", workers])
        assert run_prepare("dira3d prepare toy", prepare, args) == 0
        lines = re.findall(r"^toy: (\d)/3 cases \(\d+ s; about \d+ s to go\)$", stream.getvalue(), re.MULTILINE)
        assert lines == ([] if name == "watched" else ["1", "2"]), (name, stream.getvalue())
    # and never more often than PROGRESS_SECONDS
    monkeypatch.setattr(progress_module, "PROGRESS_SECONDS", 3600.0)
    quiet = io.StringIO()
    lines = progress_module.ProgressLines("toy", 3, stream=quiet)
    lines.update(), lines.update(), lines.update()
    assert quiet.getvalue() == ""
