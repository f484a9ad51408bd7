"""A resume with another stage schedule (found in session 30): ``last.pt`` of a run trained with stages dis <= 1,
dis_res <= 2, dira to epoch 3, rerun with dis <= 2, dis_res <= 4 and max_epochs 6, resumed "at the end of epoch 3,
stage 'dis_res'" and trained epoch 4 without the adversary after an epoch with it: the epochs of one stage were counted
in another (train values, TensorBoard's stage, the per-stage best.pt: epoch 4 became the new best of 'dis_res') and the
optimiser state of another stage went on. ``last.pt`` now records the schedule and the loss weights (``trainer`` keys
``stages`` and ``loss_weights``); a resume that moves a stage end at or before the steps trained, or changes a stage up
to the one trained last or that stage's loss weights, is refused in one line before anything is loaded (the bundle's
``initialize``) and in ``restore_checkpoint`` (the Python API). Lengthening the last stage (a larger max_epochs) goes on.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from monai.data import CacheDataset

from dira3d.data.errors import DataError
from dira3d.engines import DiRACheckpoint, StageSchedule
from dira3d.engines.finished import RunAlreadyFinished, finished_line_unlogged, finished_note
from dira3d.engines.stages import check_resume_stages, resume_stage_problem
from dira3d.utils import load_checkpoint
from dira3d.utils.checkpoint import atomic_save
from test_bundle_pretrain import write_volumes
from test_engine import make_trainer

REPO = Path(__file__).resolve().parents[1]

DIS, DIS_RES, DIRA = ({"name": "dis", "losses": ["dis"]}, {"name": "dis_res", "losses": ["dis", "res"]},
                      {"name": "dira", "losses": ["dis", "res", "adv"]})
WEIGHTS = {"dis": 1.0, "res": 100.0, "adv": 1.0}


def staged(dis: int, dis_res: int, last=None) -> list[dict]:
    """dis to epoch ``dis``, dis_res to epoch ``dis_res``, then dira (or ``last``) to the end."""
    return [{**DIS, "until_epoch": dis}, {**DIS_RES, "until_epoch": dis_res}, *(last or [DIRA])]


def saved(stages, epoch, iteration=None, epoch_iteration=0, weights=WEIGHTS) -> dict:
    """A checkpoint's ``trainer`` entries at the end of ``epoch`` (2 iterations an epoch), or inside the next one."""
    return {"epoch": epoch, "iteration": 2 * epoch + epoch_iteration if iteration is None else iteration,
            "epoch_iteration": epoch_iteration, "stages": stages, "loss_weights": dict(weights)}


@pytest.mark.parametrize("new, weights", [
    (staged(1, 2), WEIGHTS),  # the same
    (staged(1, 2, [{**DIRA, "until_epoch": 9}, {"name": "more", "losses": ["res"]}]), WEIGHTS),  # the last stage longer
    (staged(1, 2, [{"name": "dira", "losses": ["adv", "res", "dis"]}]), WEIGHTS),  # the same losses in another order
])
def test_the_same_stages_or_a_longer_last_stage_go_on(new, weights):
    at_3 = saved(staged(1, 2), 3)
    assert resume_stage_problem(at_3, StageSchedule(new), weights) == ""
    check_resume_stages(at_3, StageSchedule(new), weights)  # no error


def test_a_stage_end_still_ahead_and_later_stages_may_change():
    at_3 = saved(staged(5, 8), 3)  # in 'dis', which ends at 5
    for new in (staged(4, 8), staged(9, 12), staged(5, 6, [{"name": "other", "losses": ["res"]}]), [{**DIS, "until_epoch": 4}, DIRA]):
        assert resume_stage_problem(at_3, StageSchedule(new), {**WEIGHTS, "res": 1.0}) == "", new  # res: not trained yet


@pytest.mark.parametrize("checkpoint, new", [
    (saved(staged(3, 8), 3), staged(4, 8)),  # the stage trained last, ending at the checkpoint, runs longer
    (saved(staged(3, 8), 3), staged(6, 8)),
    (saved(staged(2, 5), 3), staged(2, 3)),  # dis_res, trained to epoch 3 of 5, ends at the checkpoint: dira next
    (saved(staged(5, 8), 2, epoch_iteration=1), staged(3, 8)),  # inside epoch 3: dis still holds it
    (saved([{**DIS, "until_iteration": 6}, DIRA], 3), [{**DIS, "until_iteration": 9}, DIRA]),  # by iteration (6)
    (saved(staged(1, 2), 3), [{**DIS, "until_epoch": 1}, {**DIS_RES, "until_epoch": 2}, {**DIRA, "until_epoch": 3},
                              {"name": "more", "losses": ["res"]}]),  # dira ends at the checkpoint, a stage after it
])
def test_the_stage_trained_last_may_end_elsewhere_while_it_holds_the_last_step(checkpoint, new):
    """The steps trained stay in the stages they were trained in: the stage of the last step may run longer (more
    epochs of discrimination before restoration joins) or end at that step; the stages before it may not move."""
    assert resume_stage_problem(checkpoint, StageSchedule(new), WEIGHTS) == ""
    check_resume_stages(checkpoint, StageSchedule(new), WEIGHTS)  # no error


@pytest.mark.parametrize("checkpoint, new, what", [
    (saved(staged(1, 2), 3), staged(2, 4), "stage 'dis' ends at epoch 1 there and at epoch 2 here"),  # the session's run
    (saved(staged(5, 8), 3), staged(2, 8), "stage 'dis' ends at epoch 5 there and at epoch 2 here"),  # moved over epoch 3
    (saved(staged(3, 8), 3), staged(2, 8), "stage 'dis' ends at epoch 3 there and at epoch 2 here"),  # ends at the ckpt
    (saved(staged(5, 8), 2, epoch_iteration=1), staged(2, 8), "ends at epoch 5 there and at epoch 2 here"),  # mid epoch 3
    (saved(staged(1, 2), 4), [{**DIS, "until_epoch": 1}, {**DIS_RES, "until_epoch": 2}, {**DIRA, "until_epoch": 3},
                              {"name": "more", "losses": ["res"]}], "stage 'dira' ends at the end there and at epoch 3"),
    (saved(staged(1, 2), 3), [{**DIS_RES, "until_epoch": 1}, {**DIS, "until_epoch": 2}, DIRA],
     "stage 1 is dis (dis) there and dis_res (dis+res) here"),  # another order
    (saved(staged(1, 2), 3), staged(1, 2, [{"name": "dira", "losses": ["dis", "res"]}]),
     "stage 3 is dira (dis+res+adv) there and dira (dis+res) here"),  # another kind of the stage trained last
    (saved(staged(1, 2), 3), [{**DIS, "until_epoch": 1}, DIS_RES], "stage 'dis_res' ends at epoch 2 there and at the end"),
    (saved(staged(1, 2), 3), [{**DIS, "until_epoch": 1}, {**DIS_RES, "until_epoch": 2}, {**DIS_RES, "name": "last"}],
     "stage 3 is dira (dis+res+adv) there and last (dis+res) here"),
    (saved([{**DIS, "until_iteration": 4}, DIRA], 3), [{**DIS, "until_iteration": 5}, DIRA],
     "stage 'dis' ends at iteration 4 there and at iteration 5 here"),
])
def test_a_stage_end_moved_over_the_steps_trained_or_another_stage_kind_is_refused(checkpoint, new, what):
    problem = resume_stage_problem(checkpoint, StageSchedule(new), WEIGHTS)
    assert what in problem, problem
    with pytest.raises(DataError) as refused:
        check_resume_stages(checkpoint, StageSchedule(new), WEIGHTS, "run/models/last.pt")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("run/models/last.pt was trained to ")
    assert f"with stages {StageSchedule(checkpoint['stages']).describe()}; this run's stages are " \
           f"{StageSchedule(new).describe()}: " in line  # the recorded schedule and the new one
    assert ("rerun with the stages and loss weights it was trained with" in line and "another ckpt_dir" in line
            and "set resume to false to start afresh (it replaces last.pt and best.pt in run/models)" in line)


def test_the_loss_weights_of_the_stage_trained_last_cannot_change():
    at_3 = saved(staged(1, 2), 3)  # in 'dira': every weight
    problem = resume_stage_problem(at_3, StageSchedule(staged(1, 2)), {**WEIGHTS, "res": 10.0})
    assert "in stage 'dira', whose losses (dis+res+adv) it weighted otherwise: lambda_res=100 there and 10 here" in problem
    at_1 = saved(staged(1, 2), 1)  # 'dis' ended at 1: the weights of res and adv, not trained yet, may change
    assert resume_stage_problem(at_1, StageSchedule(staged(1, 2)), {**WEIGHTS, "res": 10.0, "adv": 3.0}) == ""
    assert "lambda_dis=1 there and 2 here" in resume_stage_problem(at_1, StageSchedule(staged(1, 2)), {**WEIGHTS, "dis": 2})
    assert resume_stage_problem(at_3, StageSchedule(staged(1, 2)), None) == ""  # not given: not checked


def test_a_checkpoint_that_records_no_schedule_goes_on_as_before():
    old = {"epoch": 3, "iteration": 6, "epoch_iteration": 0}  # dira_pretrain 0.1.55 or earlier
    assert resume_stage_problem(old, StageSchedule(staged(2, 4)), WEIGHTS) == ""


def _run(data, out, **overrides):
    """The pretraining bundle with its tiny preset, as in tests/test_rerun_finished.py."""
    from dira3d.utils.overrides import run_bundle

    configs = REPO / "bundles" / "dira_pretrain" / "configs"
    run_bundle([str(configs / "train.json"), str(configs / "tiny.json")], meta_file=str(configs / "metadata.json"),
               logging_file=str(configs / "logging.conf"), dataset_dir=str(data), ckpt_dir=str(out / "models"),
               output_dir=str(out / "eval"), patch_size=[16, 16, 8], **overrides)


def _refused(data, out, **overrides) -> str:
    """The one-line error (behind MONAI's wrapper, as `python -m monai.bundle run` prints it) of a refused run."""
    from dira3d.utils.bundle_errors import user_error_in

    with pytest.raises(Exception) as refused:
        _run(data, out, **overrides)
    assert isinstance(user_error_in(refused.value), DataError), refused.value
    return str(user_error_in(refused.value))


def _files(out):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def _trainer(stages, ckpt_dir, max_epochs, **options):
    return make_trainer("visual_words", 3, stages=stages, max_epochs=max_epochs, volumes=2, batch=2,
                        handlers=[DiRACheckpoint(ckpt_dir)], **options)


def test_the_trainer_records_its_schedule_and_refuses_another_before_loading_anything(tmp_path):
    """The Python API (DiRATrainer + DiRACheckpoint): restore_checkpoint checks the schedule before any state is put
    back (the same check as the bundle's initialize)."""
    first = [{**DIS, "until_epoch": 1}, DIS_RES]
    _trainer(first, tmp_path, 2, loss_weights={"res": 10.0}).run()
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["trainer"]["stages"] == [{"name": "dis", "losses": ["dis"], "until_epoch": 1},
                                         {"name": "dis_res", "losses": ["dis", "res"]}]
    assert last["trainer"]["loss_weights"] == {"dis": 1.0, "res": 10.0, "adv": 1.0}
    moved = _trainer([{**DIS, "until_epoch": 2}, DIS_RES], tmp_path, 3, loss_weights={"res": 10.0})
    before = {k: v.clone() for k, v in moved.network.encoder.state_dict().items()}
    with pytest.raises(ValueError, match=r"last\.pt was trained to epoch 2, in stage 'dis_res', .*stage 'dis' ends at "
                                         r"epoch 1 there and at epoch 2 here"):
        moved.run()
    assert moved.state.iteration == 0 and all(torch.equal(v, moved.network.encoder.state_dict()[k])
                                              for k, v in before.items())  # nothing loaded, nothing trained
    with pytest.raises(ValueError, match="lambda_res=10 there and 100 here"):
        _trainer(first, tmp_path, 3).run()
    longer = _trainer(first, tmp_path, 3, loss_weights={"res": 10.0})  # the last stage longer: goes on
    longer.run()
    assert load_checkpoint(tmp_path / "last.pt")["trainer"]["epoch"] == 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The pretraining bundle's tiny stages (dis <= 1, dis_res <= 2, dira) trained to epoch 2 (the end of dis_res)."""
    root = tmp_path_factory.mktemp("staged")
    data = root / "volumes"
    data.mkdir()
    write_volumes(data, count=6)
    _run(data, root / "run", max_epochs=2)
    return data, root / "run"


def test_the_bundle_refuses_moved_stage_ends_before_any_data_is_loaded(tiny_run, monkeypatch):
    data, out = tiny_run
    before = _files(out)
    assert load_checkpoint(out / "models" / "last.pt")["trainer"]["stages"][0] == {
        "name": "dis", "losses": ["dis"], "until_epoch": 1}
    monkeypatch.setattr(CacheDataset, "_load_cache_item", lambda *a, **k: pytest.fail("the rerun loaded data"))
    moved = staged(2, 4)
    assert re.search(r"last\.pt was trained to epoch 2, in stage 'dis_res', .*stage 'dis' ends at epoch 1 there and at epoch 2 "
                     "here", _refused(data, out, max_epochs=6, stages=moved))
    assert "lambda_dis=1 there and 2 here" in _refused(data, out, max_epochs=3, lambda_dis=2.0)
    # finished, but with other stages: refused, not "finished"
    assert "stage 'dis' ends at epoch 1 there and at epoch 2 here" in _refused(data, out, max_epochs=2, stages=moved)
    with pytest.raises(RunAlreadyFinished):  # the same stages and weights: finished as before (lambda_adv: not trained)
        _run(data, out, max_epochs=2, lambda_adv=10.0)
    assert _files(out) == before
    # a last.pt of dira_pretrain 0.1.55 (no schedule recorded): finished as before, whatever the stages
    ckpt = load_checkpoint(out / "models" / "last.pt")
    old = {k: v for k, v in ckpt["trainer"].items() if k not in ("stages", "loss_weights")}
    atomic_save({**ckpt, "trainer": old}, out.parent / "old" / "last.pt")
    assert finished_note(out.parent / "old", 2, stages=moved, loss_weights=WEIGHTS)


def test_dira3d_pretrain_refuses_moved_stage_ends_in_one_line(tiny_run, monkeypatch, capsys):
    from dira3d.engines.command import main

    data, out = tiny_run
    before = _files(out)
    monkeypatch.setattr(CacheDataset, "_load_cache_item", lambda *a, **k: pytest.fail("the rerun loaded data"))
    code = main(["--datalist", str(data / "pretrain_datalist.json"), "--output", str(out), "--tiny", "--override",
                 "patch_size=[16,16,8]", "--override", "max_epochs=6", "--override",
                 "stages=[{'name':'dis','until_epoch':2,'losses':['dis']},{'name':'dis_res','until_epoch':4,"
                 "'losses':['dis','res']},{'name':'dira','losses':['dis','res','adv']}]"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("dira3d pretrain: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"dira3d pretrain: error: {out / 'models' / 'last.pt'} was trained "
                                                   "to epoch 2, in stage 'dis_res', with stages dis (dis) to epoch 1, "), err
    assert _files(out) == before


def test_dira3d_pretrain_names_its_own_option_for_a_larger_max_epochs(tiny_run, capsys):
    """The finished line's advice, "rerun with a larger max_epochs", is the bundle's setting; dira3d pretrain sets it
    with --override max_epochs=N: it prints the line naming that, once (the bundle's logged line is left out)."""
    from dira3d.engines.command import main

    data, out = tiny_run
    code = main(["--datalist", str(data / "pretrain_datalist.json"), "--output", str(out), "--tiny", "--override",
                 "patch_size=[16,16,8]", "--override", "max_epochs=2"])
    printed = capsys.readouterr().out
    assert code == 0
    last = out / "models" / "last.pt"
    assert (f"dira3d pretrain: {last} is at epoch 2, max_epochs=2: this run has already finished; nothing was loaded, "
            "trained or written; to train more, rerun with a larger --override max_epochs=N (it continues from "
            "last.pt)") in printed.splitlines()
    assert printed.count("has already finished") == 1, printed
    assert not logging.getLogger("dira3d.finished").filters


def test_the_finished_line_names_a_commands_setting_without_another_text():
    done = RunAlreadyFinished("a/last.pt ... a larger max_epochs", last="a/last.pt", epoch=4, max_epochs=4)
    assert done.told_with("--max_epochs N") == (
        "a/last.pt is at epoch 4, max_epochs=4: this run has already finished; nothing was loaded, trained or written; "
        "to train more, rerun with a larger --max_epochs N (it continues from last.pt)")
    assert RunAlreadyFinished("note").told_with("x") == "note"
    with finished_line_unlogged():
        assert logging.getLogger("dira3d.finished").filters
    assert not logging.getLogger("dira3d.finished").filters
