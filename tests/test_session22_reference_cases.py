"""Reference check of the per-rank gather of ``test_cases.csv`` (dira3d.evaluation.case_metrics, session 22 mutation
audit): with two ranks (ranks run as threads of this process, conftest's ``thread_ranks``: ``ignite.distributed`` replaced as the gloo test's
collectives behave), the second without a case, rank 0 writes each case once with its own values: no empty id, no
row of another width."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine

from dira3d.evaluation.case_metrics import CASES_FILE, CasePredictionsWriter


@pytest.mark.parametrize("second", [[], [("c2.png", [0.75], [1.0])]])
def test_two_ranks_rank_0_writes_every_case_once(tmp_path, thread_ranks, second):
    ranks = thread_ranks(2)
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
