"""``prefetch``: the next batch is prepared (device copy, views, distortion) during the current step.

It changes when work is done, never what is computed: the same losses at every iteration as without
it, across epochs, stage changes, an epoch shorter than the loader and a mid-epoch resume; and it
never prepares a batch that will not be consumed.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from test_engine import make_trainer

from dira3d.engines import DiRACheckpoint
from dira3d.engines.prefetch import Prefetcher, tensors_in
from dira3d.engines.trainer import Prepared

STAGES = [
    {"name": "dis", "until_iteration": 2, "losses": ["dis"]},
    {"name": "dis_res", "until_iteration": 4, "losses": ["dis", "res"]},
    {"name": "dira", "losses": ["dis", "res", "adv"]},
]


def test_prefetcher_prepares_one_ahead_only_when_asked_and_ends_cleanly():
    calls, allow = [], iter([True, True, False, True, True, True])
    source = iter(range(5))
    fetch = Prefetcher(source, lambda raw, ahead: calls.append((raw, ahead)) or raw * 10, lambda: next(allow))
    assert calls == []  # lazy: nothing drawn before the first next()
    assert next(fetch) == 0 and calls == [(0, False), (1, True)]
    assert next(fetch) == 10 and calls[-1] == (2, True)
    assert next(fetch) == 20 and len(calls) == 3  # told no other batch follows: nothing prepared
    assert next(fetch) == 30 and calls[-2:] == [(3, False), (4, True)]
    assert next(fetch) == 40  # the look-ahead met the end: seen only at the next call
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(fetch)
    assert [raw for raw, _ in calls] == [0, 1, 2, 3, 4]  # each raw batch prepared once, in order


def test_tensors_in_walks_nested_batches():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    item = Prepared({"image": a, "case_id": ["x"]}, torch.Generator(), (b, None, [c]), 3, "dis")
    assert [t is u for t, u in zip(tensors_in(item), (a, b, c))] == [True, True, True]


def per_iteration_losses(trainer) -> list[tuple[int, str, dict[str, float]]]:
    log = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        out = engine.state.output
        log.append((engine.state.iteration, out["stage"],
                    {k: float(v) for k, v in out.items() if isinstance(v, torch.Tensor) and k.startswith(("loss", "d_"))}))
    return log


# epoch_length 2 and 4 against 3 batches per pass: the loader's iterator lives on across epochs / restarts within one
@pytest.mark.parametrize("mode,epoch_length", [("visual_words", None), ("moco", None), ("barlow", 2), ("simsiam", 4)])
def test_prefetch_trains_exactly_like_the_plain_loop(mode, epoch_length):
    runs = {}
    for prefetch in (False, True):
        trainer = make_trainer(mode, stages=STAGES, max_epochs=3, batch=2, volumes=6, epoch_length=epoch_length,
                               prefetch=prefetch)
        seen, generators = [], []
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: seen.append(type(e.state.batch)))
        make_generator = trainer.step_generator
        trainer.step_generator = lambda counter, *a: generators.append(counter) or make_generator(counter, *a)
        log = per_iteration_losses(trainer)
        trainer.run()
        runs[prefetch] = log
        assert all((t is Prepared) == prefetch for t in seen)
        # one generator per iteration, for that iteration: the prepared draws are used, not drawn again
        assert generators == [i for i, _, _ in log]
    plain, fetched = runs[False], runs[True]
    assert len(plain) == 3 * (epoch_length or 3) and {s for _, s, _ in plain} == {"dis", "dis_res", "dira"}
    assert fetched == plain  # every loss of every iteration, bit for bit


def test_prefetch_prepares_no_batch_past_an_epoch_and_no_batch_twice():
    trainer = make_trainer(stages=STAGES, max_epochs=2, batch=2, volumes=6, prefetch=True)
    prepared = []
    inner = trainer._prepare_ahead
    trainer._prepare_ahead = lambda raw, ahead: prepared.append((trainer.state.epoch, ahead)) or inner(raw, ahead)
    trainer.run()
    # three batches per epoch: the first drawn when its step starts, the next two one step early
    assert prepared == [(1, False), (1, True), (1, True), (2, False), (2, True), (2, True)]


def test_prefetch_resumes_mid_epoch_exactly(tmp_path):
    def run(folder, prefetch, stop_at=None):
        trainer = make_trainer("moco", stages=STAGES, max_epochs=2, batch=2, volumes=6, seed=3, prefetch=prefetch,
                               handlers=[DiRACheckpoint(folder, resume=True, save_every_iterations=1)])
        if stop_at is not None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
        log = per_iteration_losses(trainer)
        trainer.run()
        return trainer, log

    full, full_log = run(tmp_path / "full", prefetch=False)
    _, first = run(tmp_path / "split", prefetch=True, stop_at=4)  # epoch 2, one of its three batches done
    resumed, rest = run(tmp_path / "split", prefetch=True)
    assert [i for i, _, _ in first] == [1, 2, 3, 4] and [i for i, _, _ in rest] == [5, 6]
    assert first + rest == full_log
    for name, module in full.modules().items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, resumed.modules()[name].state_dict()[key]), f"{name}.{key}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream exists only on a CUDA device")
def test_prefetch_on_cuda_side_stream_gives_the_same_losses(monkeypatch):
    # cuDNN's fastest kernels may sum in another order from run to run: pick the deterministic ones, so that
    # a difference can only come from the stream handling (a tensor read before its copy or distortion ended)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runs = {}
    for prefetch in (False, True):
        trainer = make_trainer("moco", stages=STAGES, max_epochs=2, batch=2, volumes=6, prefetch=prefetch, device="cuda")
        log = per_iteration_losses(trainer)
        trainer.run()
        runs[prefetch] = log
    for (i, s, a), (j, t, b) in zip(runs[False], runs[True]):
        assert (i, s) == (j, t) and a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])) for k in a), (i, a, b)
