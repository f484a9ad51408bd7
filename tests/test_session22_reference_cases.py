"""Reference check of the per-rank gather of ``test_cases.csv`` (dira3d.evaluation.case_metrics, session 22 mutation
audit): with two ranks (ranks run as threads of this process, ``ignite.distributed`` replaced as the gloo test's
collectives behave), the second without a case, rank 0 writes each case once with its own values: no empty id, no
row of another width."""

from __future__ import annotations

import csv
import threading
from numbers import Number
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine

from dira3d.evaluation.case_metrics import CASES_FILE, CasePredictionsWriter


class ThreadRanks:
    def __init__(self, ranks: int) -> None:
        self.ranks, self.local, self.slots = ranks, threading.local(), [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=60)

    def rank(self) -> int:
        return self.local.rank

    def all_gather(self, item, group=None):
        self.slots[self.local.rank] = item
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()
        if isinstance(item, torch.Tensor):
            return torch.cat([g.reshape(1) if g.ndim == 0 else g for g in gathered])
        return torch.tensor(gathered) if isinstance(item, Number) else gathered

    def run(self, job) -> list:
        results, errors = [None] * self.ranks, []

        def one(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = job(rank)
            except Exception as err:  # noqa: BLE001 - raised in the test's thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.ranks)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("second", [[], [("c2.png", [0.75], [1.0])]])
def test_two_ranks_rank_0_writes_every_case_once(tmp_path, monkeypatch, second):
    import ignite.distributed as idist

    ranks = ThreadRanks(2)
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "get_rank", ranks.rank)
    monkeypatch.setattr(idist, "all_gather", ranks.all_gather)
    cases = {0: [("c0.png", [0.25], [1.0]), ("c1.png", [0.5], [0.0])], 1: second}

    def job(number: int):
        writer = CasePredictionsWriter(save_dir=tmp_path, batch_transform=lambda b: [{"filename_or_obj": n} for n in b[0]],
                                       output_transform=lambda output: output)
        if not cases[number]:
            writer(SimpleNamespace(state=SimpleNamespace()))
            return None
        engine = Engine(lambda engine, batch: batch[1])
        writer.attach(engine)
        engine.run([([name], ([torch.tensor(p)], [torch.tensor(y)])) for name, p, y in cases[number]])
        return getattr(engine.state, "case_metrics_file", None)

    assert ranks.run(job) == [str(tmp_path / CASES_FILE), None]
    with open(tmp_path / CASES_FILE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"case": "c0.png", "label": "1", "probability": "0.25"},
                    {"case": "c1.png", "label": "0", "probability": "0.5"}] + [
        {"case": "c2.png", "label": "1", "probability": "0.75"} for _ in second]
