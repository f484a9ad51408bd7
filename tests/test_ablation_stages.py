"""The staged schedule and the ablation arms, checked on real (tiny) runs: each stage trains exactly its parts
(METHOD.md section 1: L_dis alone, then + L_res, then + L_adv with D's own optimiser), a resume in the middle of the
second stage goes on with that stage and the optimiser state it had, a restoration-only arm leaves the
discrimination head alone, and ``dira3d experiment`` does not report a pretraining that never reached a stage
bounded by ``until_iteration`` under its method's name. Tiny networks, as in test_engine.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from ignite.engine import Events
from test_engine import PATCH3, make_trainer

from dira3d.engines import DiRACheckpoint, checkpoint_dict
from dira3d.evaluation.experiment import load_config
from dira3d.evaluation.experiment_pretrain import pretrain_method
from dira3d.utils import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

STAGES = [{"name": "dis", "until_iteration": 2, "losses": ["dis"]},
          {"name": "dis_res", "until_iteration": 4, "losses": ["dis", "res"]},
          {"name": "dira", "losses": ["dis", "res", "adv"]}]


def _parts(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of each part, buffers (BatchNorm statistics) included."""
    modules = {"encoder": trainer.network.encoder, "decoder": trainer.network.decoder, "dis_head": trainer.dis_head,
               "adversary": trainer.adversary}
    return {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


def _changed(before, after) -> set[str]:
    return {part for part in before if any(not torch.equal(v, after[part][k]) for k, v in before[part].items())}


def test_each_stage_trains_only_its_parts():
    """dis: encoder and head only (the decoder, its BatchNorm statistics included, and D untouched, L_res not in G's
    loss); dis_res: the decoder too, D still untouched and its optimiser without state; dira: D steps with its own
    optimiser and G's loss is 1·dis + 100·res + 1·adv (METHOD.md section 2)."""
    trainer = make_trainer("visual_words", 3, stages=STAGES, max_epochs=1, volumes=12, batch=2)  # 6 iterations
    steps: list[tuple[str, set[str], set[str], int]] = []
    before = [_parts(trainer)]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        after = _parts(engine)
        out = engine.state.output
        steps.append((out["stage"], _changed(before[0], after), {k for k in out if k.startswith("loss")},
                      len(engine.optimizer_d.state)))
        if out["stage"] == "dira":
            assert float(out["loss"]) == pytest.approx(float(out["loss_dis"]) + 100 * float(out["loss_res"])
                                                       + float(out["loss_adv"]), rel=1e-5)
        before[0] = after

    trainer.run()
    assert [s[0] for s in steps] == ["dis", "dis", "dis_res", "dis_res", "dira", "dira"]
    for stage, changed, losses, d_state in steps:
        expected = {"dis": {"encoder", "dis_head"}, "dis_res": {"encoder", "dis_head", "decoder"},
                    "dira": {"encoder", "dis_head", "decoder", "adversary"}}[stage]
        assert changed == expected, (stage, changed)
        assert losses == {"dis": {"loss", "loss_dis"}, "dis_res": {"loss", "loss_dis", "loss_res"},
                          "dira": {"loss", "loss_dis", "loss_res", "loss_adv", "loss_d"}}[stage]
        assert (d_state > 0) == (stage == "dira")
    # G's Adam counts the decoder's steps from its first stage with L_res: 4 of the 6
    steps_of = {id(p): int(s["step"]) for p, s in trainer.optimizer.state.items()}
    assert {steps_of[id(p)] for p in trainer.network.decoder.parameters()} == {4}
    assert {steps_of[id(p)] for p in trainer.network.encoder.parameters()} == {6}
    assert not any(id(p) in steps_of for p in trainer.adversary.parameters())  # D is not in G's optimiser
    assert {int(s["step"]) for s in trainer.optimizer_d.state.values()} == {2}


def test_a_restoration_only_stage_leaves_the_discrimination_head_alone():
    """The Models Genesis-style arm (``losses: [res]``): no L_dis, the visual-word head is neither run nor
    stepped (no optimiser state), and D is untouched."""
    trainer = make_trainer("visual_words", 3, stages=[{"name": "res", "losses": ["res"]}], volumes=4, batch=2)
    first = _parts(trainer)
    keys = []
    trainer.dis_head.register_forward_hook(lambda *args: pytest.fail("the head ran in a restoration-only stage"))
    trainer.on(Events.ITERATION_COMPLETED)(lambda e: keys.append({k for k in e.state.output if k.startswith("loss")}))
    trainer.run()
    assert keys == [{"loss", "loss_res"}] * 2
    assert _changed(first, _parts(trainer)) == {"encoder", "decoder"}
    assert not any(p in trainer.optimizer.state for p in trainer.dis_head.parameters())


def test_a_resume_in_the_middle_of_the_second_stage_goes_on_with_it_and_its_optimiser_state(tmp_path):
    """Stopped at the first iteration of ``dis_res`` (the middle of epoch 2), the same run resumed from ``last.pt``
    trains ``dis_res`` (not ``dis`` or ``dira``), with G's Adam state of that point (the decoder's first step done),
    and ends bit for bit where an uninterrupted run does."""
    stages = [{"name": "dis", "until_epoch": 1, "losses": ["dis"]},
              {"name": "dis_res", "until_epoch": 3, "losses": ["dis", "res"]},
              {"name": "dira", "losses": ["dis", "res", "adv"]}]
    meta = {"width": 0.125, "patch_size": PATCH3}

    def trainer(folder, stop_at=None):
        t = make_trainer("visual_words", 3, stages=stages, max_epochs=4, volumes=4, batch=2, seed=2,
                         handlers=[DiRACheckpoint(tmp_path / folder, resume=True, meta=meta)])  # 2 iterations an epoch
        if stop_at is not None:
            t.on(Events.ITERATION_COMPLETED(once=stop_at))(lambda e: e.terminate())  # last.pt written on COMPLETED
        return t

    full = trainer("full")
    full.run()
    trainer("split", stop_at=3).run()
    saved = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (saved["trainer"]["iteration"], saved["trainer"]["stage"]) == (3, "dis_res")
    resumed = trainer("split")
    seen = []
    resumed.on(Events.STARTED)(lambda e: seen.append({int(s["step"]) for s in e.optimizer.state.values()}))
    resumed.on(Events.ITERATION_COMPLETED)(lambda e: seen.append((e.state.iteration, e.state.output["stage"])))
    resumed.run()
    assert seen[0] == {1, 3}  # encoder and head: 3 steps; decoder: 1 (its first, in dis_res)
    assert seen[1:] == [(4, "dis_res"), (5, "dis_res"), (6, "dis_res"), (7, "dira"), (8, "dira")]
    a, b = checkpoint_dict(full), checkpoint_dict(resumed)
    for part in ("encoder", "decoder", "dis_head", "adversary"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    for opt in ("optimizer_g", "optimizer_d"):
        for index, state in a[opt]["state"].items():
            assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(b[opt]["state"][index][k]))
                       for k, v in state.items()), (opt, index)


@pytest.mark.parametrize("dis_res_until, reached", [(100, False), (8, True)])
def test_a_pretraining_that_never_reached_a_stage_bounded_by_iterations_is_not_reported_under_its_name(
        tmp_path, monkeypatch, dis_res_until, reached):
    """Before any run the epoch length is unknown, so ``until_iteration`` bounds are not judged: a ``dira`` whose
    ``dis_res`` lasted until iteration 100 of a 3-epoch run of 4 iterations each trained without L_adv, only the
    pretraining's log warning of it, and was fine-tuned and reported as ``dira`` in the ablation table. Its
    ``last.pt`` gives the epoch length: the pretraining is refused, done.json is not written, and a rerun that finds
    an earlier done.json refuses it too."""
    from dira3d.utils import overrides

    def run_bundle(configs, bundle_root, **kwargs):  # what the pretraining bundle leaves: last.pt and best.pt
        models = Path(bundle_root) / "models"
        models.mkdir(parents=True)
        for name in ("last.pt", "best.pt"):
            torch.save({"trainer": {"epoch": 3, "iteration": 12, "epoch_length": 4, "stage": "dis_res"}}, models / name)

    monkeypatch.setattr(overrides, "run_bundle", run_bundle)
    (tmp_path / "dl.json").write_text('{"training": [], "test": []}')
    (tmp_path / "vw").mkdir()
    stages = [{"name": "dis", "until_iteration": 4, "losses": ["dis"]},
              {"name": "dis_res", "until_iteration": dis_res_until, "losses": ["dis", "res"]},
              {"name": "dira", "losses": ["dis", "res", "adv"]}]
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({
        "bundle": "luna16_nodule_fpr", "datalist": "dl.json", "metric": "auc", "output_dir": "out", "seeds": [0],
        "label_fractions": [1.0], "overrides": {"tiny": True},
        "methods": {"random": None, "dira": {"pretrain": {"stages": stages}}},
        "pretrain": {"dataset_dir": "vw", "configs": ["train.json", "tiny.json"], "overrides": {"max_epochs": 3}}}))
    config = load_config(path)  # passes: the epoch length is not known yet
    folder = tmp_path / "out" / "pretrain" / "dira"
    if reached:
        assert pretrain_method("dira", config["methods"]["dira"], config, log=lambda _: None).endswith("best.pt")
        assert json.loads((folder / "done.json").read_text())["method"] == "dira"
        return
    where = re.escape(str(folder))
    refused = (r"pretrain stages of method 'dira' in the experiment config: stage 'dira' \(losses dis\+res\+adv\) never "
               r"runs: stage 'dis_res' lasts until iteration 100 and max_epochs is 3 \(of 4 iterations each\), so its "
               rf"pretraining in {where} trained without them and is not used as 'dira'; lower the stages' "
               rf"until_iteration or raise max_epochs \(pretrain overrides\), then delete {where} to pretrain it again")
    with pytest.raises(ValueError, match=refused):
        pretrain_method("dira", config["methods"]["dira"], config, log=lambda _: None)
    assert not (folder / "done.json").exists()
    (folder / "done.json").write_text('{"method": "dira"}')  # written by an earlier dira3d
    with pytest.raises(ValueError, match=refused):
        pretrain_method("dira", config["methods"]["dira"], config, log=lambda _: None)
