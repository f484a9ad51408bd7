"""Reference checks of session 25's new code (its mutation audit): cases of the ``--skip_written`` rerun decision
(dira3d.evaluation.batch_resume), check_split_settings / check_seed, WriterCloser / close_writers, stop_note /
prefix_rank_logs and DiRATrainer's ``second_view`` that the earlier tests left open. Each is a unit check of a public
function on tiny inputs (no bundle run, no torchrun)."""

from __future__ import annotations

import json
import logging

import pytest

from dira3d.data.errors import DataError
from dira3d.evaluation import check_split_settings
from dira3d.evaluation.batch_resume import earlier_rows, kept_inputs, log_kept, made_by_record, output_states
from dira3d.evaluation.outputs import json_digest


def _own_report(path, made_by, rows) -> None:
    """An inference report as dira3d writes it (marked: ``written_by`` and the checksum)."""
    payload = {"summary": {}, "exit_status": 0, "stopped": None, "made_by": made_by, "inputs": rows}
    payload.update(written_by="dira3d test", sha256=json_digest(payload))
    path.write_text(json.dumps(payload), encoding="utf-8")


def _model(tmp_path, content: bytes = b"weights"):
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    return model


# --- batch_resume -------------------------------------------------------------------------------------------------

def test_an_unreadable_model_keeps_nothing_even_when_the_earlier_run_could_not_read_it_either(tmp_path):
    """Two sha256 nulls are not the same model: the message names the file that cannot be read."""
    gone = tmp_path / "gone.pt"
    now = made_by_record({"model": str(gone), "settings": {}})
    assert now["model"] == {"path": str(gone), "size": None, "sha256": None}
    report = tmp_path / "inference_report.json"
    _own_report(report, now, [{"image": "a", "status": "written", "output": "a_seg.nii.gz"}])
    assert earlier_rows(report, now) == ([], f"the model file {gone} cannot be read")


def test_an_own_report_without_a_usable_made_by_or_rows_keeps_nothing_without_an_error(tmp_path):
    """Defensive cases of a marked report (an older dira3d wrote none, or its fields are not the expected kinds)."""
    now = made_by_record({"model": str(_model(tmp_path)), "settings": {}})
    report = tmp_path / "inference_report.json"
    for then in (None, ["not", "a", "mapping"]):
        _own_report(report, then, [])
        assert earlier_rows(report, now) == ([], f"the earlier report {report} does not record the model and settings "
                                                 "of its run (written by dira3d test)")
    _own_report(report, now, [{"image": "a", "status": "written"}, "junk", None])
    assert earlier_rows(report, now) == ([{"image": "a", "status": "written"}], "")
    _own_report(report, now, {"image": "a"})
    assert earlier_rows(report, now) == ([], "")


def test_a_setting_added_as_null_is_a_difference_and_only_three_are_named(tmp_path):
    model = str(_model(tmp_path))
    then = made_by_record({"model": model, "settings": {"a": 1, "b": 1, "c": 1, "d": 1}})
    report = tmp_path / "inference_report.json"
    _own_report(report, then, [])
    added = made_by_record({"model": model, "settings": {"a": 1, "b": 1, "c": 1, "d": 1, "e": None}})
    assert earlier_rows(report, added) == (
        [], 'the settings differ from the earlier run\'s: e "(none)" then, null now')
    five = made_by_record({"model": model, "settings": {k: 2 for k in "abcde"}})
    assert earlier_rows(report, five)[1] == (
        'the settings differ from the earlier run\'s: a 1 then, 2 now; b 1 then, 2 now; c 1 then, 2 now and 2 more')
    four = made_by_record({"model": model, "settings": {**{k: 2 for k in "abc"}, "d": 1, "e": 2}})
    assert earlier_rows(report, four)[1].endswith("c 1 then, 2 now and 1 more")
    three = made_by_record({"model": model, "settings": {**{k: 2 for k in "abc"}, "d": 1}})
    assert earlier_rows(report, three)[1].endswith("c 1 then, 2 now")


def test_only_the_rows_written_then_are_considered_and_carry_an_output_state(tmp_path):
    """An input not run or failed in the earlier run is simply run: it is not named among those 'written by the
    earlier run' that are run again; only a written row records its output's state."""
    from dira3d.evaluation.batch_resume import state_of

    a, b = tmp_path / "a_seg.nii.gz", tmp_path / "b_seg.nii.gz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")  # an older file where b's output goes: b failed in the earlier run
    rows = output_states([{"image": "a", "status": "written", "output": str(a)},
                          {"image": "b", "status": "failed", "reason": "CUDA out of memory", "output": str(b)},
                          {"image": "c", "status": "not run", "reason": "the batch stopped before it"}])
    assert rows[0]["output_state"] == state_of(a) and "output_state" not in rows[1]
    kept, again = kept_inputs({0: "a", 1: "b", 2: "c"}, {0: str(a), 1: str(b), 2: str(tmp_path / "c_seg.nii.gz")},
                              rows, single_file=False)
    assert kept == {0: {"state": state_of(a), "row": None}} and again == []


def test_an_output_written_elsewhere_is_not_kept_though_that_file_is_unchanged(tmp_path):
    """Another --output_dir (not in made_by): the input is run again, so the new folder gets its output."""
    old, new = tmp_path / "old" / "a_seg.nii.gz", tmp_path / "new" / "a_seg.nii.gz"
    old.parent.mkdir()
    old.write_bytes(b"a")
    rows = output_states([{"image": "a", "status": "written", "output": str(old)}])
    kept, again = kept_inputs({0: "a"}, {0: str(new)}, rows, single_file=False)
    assert kept == {} and again == [f"a: it was written to {old}, this run writes {new}"]


def test_a_row_is_found_under_the_name_the_loader_records_and_a_multichannel_input_by_its_first_file(tmp_path,
                                                                                                     monkeypatch):
    """The datalist's ``~/a.nii.gz`` is the earlier _prob.json's row of ``<home>/a.nii.gz`` (MONAI's loader expands
    it); an input of several files (one per channel) is named by its first in the lines."""
    from dira3d.evaluation import ProbabilityWriter

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    prob = tmp_path / "prob.json"
    row = {"image": str(tmp_path / "home" / "a.nii.gz"), "probabilities": [0.25]}
    ProbabilityWriter(prob, ["nodule"]).write([row])
    images = {0: "~/a.nii.gz", 1: ["t1.nii.gz", "t2.nii.gz"]}
    rows = output_states([{"image": image, "status": "written", "output": str(prob)} for image in images.values()])
    kept, again = kept_inputs(images, {0: str(prob), 1: str(prob)}, rows, single_file=True)
    assert kept == {0: {"state": rows[0]["output_state"], "row": row}}
    assert again == [f"t1.nii.gz: its row is not in {prob}"]
    prob.write_text(prob.read_text().replace("0.25", "0.5"))  # not dira3d's own any more (its state recorded again)
    kept, again = kept_inputs({0: "~/a.nii.gz"}, {0: str(prob)}, output_states(rows[:1]), single_file=True)
    assert kept == {} and again == [f"~/a.nii.gz: {prob} is not dira3d's own unchanged file"]


def test_rows_of_an_own_output_transform_come_after_the_kept_ones():
    """Run rows that are not one per input (an output_transform of one's own) follow the kept inputs' rows."""
    from dira3d.evaluation.batch_resume import held_rows, in_order

    kept = {1: {"state": None, "row": {"image": "b"}}}
    assert in_order(held_rows([0, 2], [{"image": "a"}, {"image": "c"}], kept)) == [
        {"image": "a"}, {"image": "b"}, {"image": "c"}]
    assert in_order(held_rows([0, 2], [{"n": 1}, {"n": 2}, {"n": 3}], kept)) == [
        {"image": "b"}, {"n": 1}, {"n": 2}, {"n": 3}]


def test_the_lines_on_what_is_kept(caplog):
    with caplog.at_level(logging.INFO, logger="dira3d.evaluation.batch_resume"):
        log_kept({0: {}, 1: {}}, 3, [f"{c}.nii.gz: why" for c in "cdefg"], "", "r.json")
        log_kept({0: {}}, 3, ["c.nii.gz: why"], "", "r.json")
    assert [r.getMessage() for r in caplog.records] == [
        "--skip_written: 2 of the 3 inputs are kept from the earlier run (report: r.json), the other 1 is run",
        "--skip_written: 5 input(s) written by the earlier run are run again: c.nii.gz: why; d.nii.gz: why; "
        "e.nii.gz: why; and 2 more",
        "--skip_written: 1 of the 3 inputs are kept from the earlier run (report: r.json), the other 2 are run",
        "--skip_written: 1 input(s) written by the earlier run are run again: c.nii.gz: why"]


def test_a_batch_without_a_report_keeps_nothing_and_says_why():
    assert earlier_rows(None, {"model": {}, "settings": {}}) == (
        [], 'the batch writes no report (report_path ""), so no earlier run can be told apart')


# --- check_split_settings / check_seed ----------------------------------------------------------------------------

def test_check_split_settings_refuses_a_text_holdout_other_than_validation():
    with pytest.raises(DataError, match=r"^holdout='validaton' is not a number; give the share in \[0, 1\)"):
        check_split_settings(holdout="validaton")


def test_check_split_settings_keeps_fold_0_and_returns_the_documented_types():
    settings = check_split_settings(label_fraction=1, seed=3.0, holdout=0, fold=0)
    assert settings == {"label_fraction": 1.0, "seed": 3, "holdout": 0.0, "fold": 0}
    assert [type(settings[k]) for k in ("label_fraction", "seed", "holdout", "fold")] == [float, int, float, int]


def test_check_seed_names_the_setting_it_checks_in_its_advice():
    from dira3d.utils import check_seed

    with pytest.raises(DataError) as err:
        check_seed(-2, name="split_seed")
    assert str(err.value) == "split_seed=-2 is negative; give a whole number >= 0, e.g. --split_seed 0"


# --- close_writers / WriterCloser ---------------------------------------------------------------------------------

def _writer_threads() -> set:
    import threading

    return {t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread" and t.is_alive()}


def _logging_engine(**handler):
    """An engine of 2 iterations a run whose TensorBoardStatsHandler logs its iteration (``handler``: its writer)."""
    from ignite.engine import Engine
    from monai.handlers import TensorBoardStatsHandler

    engine = Engine(lambda engine, batch: float(engine.state.iteration))
    TensorBoardStatsHandler(tag_name="value", output_transform=lambda x: x, **handler).attach(engine)
    return engine


def test_close_writers_finds_a_handler_behind_an_event_filter_and_leaves_none_out(tmp_path):
    """MONAI's handler logging every 2nd iteration is attached through ignite's event filter (a wrapper): its own
    writer is closed all the same; None engines and writers are left out."""
    from dira3d.engines.summary import close_writers

    before = _writer_threads()
    engine = _logging_engine(log_dir=str(tmp_path / "own"), iteration_log=2, epoch_log=False)
    engine.run([0, 1], max_epochs=1)
    assert _writer_threads() - before
    close_writers(None, engine, writers=[None])
    assert _writer_threads() - before == set()


def test_writer_closer_given_a_generator_closes_the_writers_at_the_end_of_every_run(tmp_path):
    from dira3d.engines.summary import LazySummaryWriter, WriterCloser

    before = _writer_threads()
    writer = LazySummaryWriter(log_dir=str(tmp_path / "shared"))
    engine = _logging_engine(summary_writer=writer)
    WriterCloser(w for w in [writer]).attach(engine)
    engine.run([0, 1], max_epochs=1)
    assert _writer_threads() - before == set()
    engine.run([0, 1], max_epochs=2)  # run on: the writer opens a new event file, closed at this run's end too
    assert _writer_threads() - before == set()


# --- DiRATrainer second_view --------------------------------------------------------------------------------------

def test_a_stage_without_discrimination_restores_the_first_view_only_in_every_form():
    """second_view applies while ``dis`` is active: a restoration-only stage draws no second distortion, and its L_res
    is the same in the three forms."""
    import torch
    from test_engine import make_trainer
    from test_engine_second_view import first_batch

    res = {}
    for form in ("augmented", "distorted", "restored"):
        trainer = make_trainer("barlow", 3, stages=[{"name": "r", "losses": ["res"]}], batch=2, volumes=2,
                               second_view=form)
        batch = first_batch(trainer)
        inputs = trainer.step_inputs(batch, trainer.step_generator(1), trainer.current_stage())
        assert inputs.distorted2 is None and inputs.target2 is None, form
        fwd = trainer.forward_terms(batch, trainer.step_generator(1), trainer.current_stage(), train=False)
        assert set(fwd.terms) == {"res"} and fwd.restored.shape[0] == batch["image"].shape[0], form
        res[form] = fwd.terms["res"]
    assert torch.equal(res["distorted"], res["augmented"]) and torch.equal(res["restored"], res["augmented"])


def test_writer_closer_leaves_the_error_to_the_engines_other_exception_handler(tmp_path):
    """With another exception handler on the engine (MONAI's StatsHandler logs the error and raises it again),
    WriterCloser closes the writer and does not raise the error itself first: the other handler runs."""
    from ignite.engine import Engine, Events

    from dira3d.engines.summary import LazySummaryWriter, WriterCloser

    def fail(engine, batch):
        raise RuntimeError("a fault in the step")

    def other(engine, err):
        seen.append(str(err))
        raise err

    before, seen = _writer_threads(), []
    writer = LazySummaryWriter(log_dir=str(tmp_path / "error"))
    writer.add_scalar("value", 1.0, 1)
    engine = Engine(fail)
    engine.add_event_handler(Events.EXCEPTION_RAISED, other)
    WriterCloser([writer]).attach(engine)
    with pytest.raises(RuntimeError, match="fault"):
        engine.run([0])
    assert _writer_threads() - before == set() and seen and set(seen) == {"a fault in the step"}  # (fired per level)


def test_restoring_the_second_view_reuses_the_discrimination_pass_of_barlow():
    """Barlow Twins' other branch already encodes the distorted second view: "restored" decodes that pass (two
    encoder passes in all), no third."""
    from test_engine import make_trainer
    from test_engine_second_view import first_batch

    trainer = make_trainer("barlow", 3, stages=[{"name": "dir", "losses": ["dis", "res"]}], batch=2, volumes=2,
                           second_view="restored")
    batch, encode, calls = first_batch(trainer), trainer.network.encode, []
    trainer.network.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    trainer.forward_terms(batch, trainer.step_generator(1), trainer.current_stage(), train=False)
    assert calls == [2, 2]
