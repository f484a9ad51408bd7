"""A batch inference under ``torchrun`` stopped by SIGTERM, and what each rank says (session 25).

``kill <torchrun pid>`` sends SIGTERM to every rank (Slurm's ``scancel`` sends it to every process of the job step):
each rank keeps the predictions it wrote, rank 0 writes the report of every input, and every rank says what it kept.
The line after the signal was rank 0's alone, and said "nothing was written to <prob.json>" even when rank 0 then wrote
the other ranks' rows there; the ranks' per-input lines (``writing: ...``) could not be told apart in the one console.
A real 2-rank gloo ``torchrun`` on CPU (``tests/test_inference_batch_torchrun.py``'s tiny network and faults), and the
lines of rank 0 and of rank 1 with the gather faked.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import pytest

from conftest import kill_process_tree
from dira3d.evaluation.outputs import is_own_prediction
from dira3d.utils.warning_format import prefix_warnings
from test_inference_batch import _report, _scans
from test_inference_batch_torchrun import torchrun_command

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore"),
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="a hung run is killed through /proc (Linux)")]

AGAIN = ("run the same command again with --skip_written True to run only the inputs not written (without it, every "
         "input is run again)")


def test_sigterm_to_torchrun_mid_batch_ends_every_rank_with_the_report_of_what_was_written(tmp_path):
    """Rank 0 wrote a and waits in c, rank 1 wrote b and waits in d, when torchrun gets SIGTERM: it sends SIGTERM to
    both ranks, each ends its share, rank 0 writes the report (a and b written, the others not run), each rank says what
    it kept in its one line, naming its rank, and exits 143 (as one process does), within seconds; no file is left
    half-written. torchrun itself ends with its own error (SignalException: exit 1)."""
    scans = _scans(tmp_path, ["a", "b", "c", "d", "e"])
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    cmd, env = torchrun_command(tmp_path, scans, out, STALL="c.nii.gz,d.nii.gz", MARKS=str(marks))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        while not ((marks / "c.nii.gz.started").exists() and (marks / "d.nii.gz.started").exists()):
            assert proc.poll() is None and time.monotonic() - started < 90, "the ranks did not reach c and d"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # `kill <torchrun pid>`
        stdout, stderr = proc.communicate(timeout=60)  # no rank waits for ever (each sleeps 60 s in its input)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(f"a rank did not end after SIGTERM:\n{(stdout + stderr)[-3000:]}")
    finally:
        if proc.poll() is None:
            kill_process_tree(proc.pid)
            proc.communicate()
    log = stdout + stderr
    assert proc.returncode == 1 and "SignalException: Process" in log, log[-3000:]  # torchrun's own
    assert [(marks / f"rank{r}.exit").read_text() for r in (0, 1)] == ["143", "143"], log[-3000:]
    assert "[rank0]:" not in log and "[rank1]:" not in log, log[-3000:]  # no rank's traceback
    report_path = out / "inference_report.json"
    assert is_own_prediction(report_path)
    report = _report(out)
    assert [r["status"] for r in report["inputs"]] == ["written", "written", "not run", "not run", "not run"]
    assert report["exit_status"] is None and report["stopped"] == "stopped by SIGTERM"
    assert sorted(os.listdir(out)) == ["a_seg.nii.gz", "b_seg.nii.gz", "inference_report.json"]  # no temporary
    for mask in ("a_seg.nii.gz", "b_seg.nii.gz"):
        assert is_own_prediction(out / mask) and nib.load(str(out / mask)).get_fdata().shape, mask
    assert log.count("inference stopped by SIGTERM;") == 2, log[-3000:]
    assert (f" - WARNING - [rank 0/2] inference stopped by SIGTERM; the 2 prediction(s) written are kept, each whole; "
            f"report: {report_path}; {AGAIN}\n") in log, log[-3000:]
    assert (f" - WARNING - [rank 1/2] inference stopped by SIGTERM; this rank's 1 prediction(s) written are kept, each "
            f"whole; report: {report_path} (rank 0 writes it); {AGAIN}\n") in log, log[-3000:]


# --- without torchrun --------------------------------------------------------------------------------------------------

def test_a_ranks_log_lines_name_it_and_one_process_keeps_its_own(caplog):
    from dira3d.evaluation.batch_ranks import prefix_rank_logs

    before = logging.getLogRecordFactory()
    log = logging.getLogger("dira3d.evaluation.outputs")
    try:
        prefix_rank_logs(0, 1)  # one process: nothing
        assert logging.getLogRecordFactory() is before
        with caplog.at_level(logging.INFO, logger="dira3d.evaluation.outputs"):
            prefix_rank_logs(1, 2)
            log.info("writing: %s", "/out/b_seg.nii.gz")
            prefix_rank_logs(1, 2)  # a second batch in the same process: one prefix, not two
            log.warning("failed: %s: %d", "/in/d.nii.gz", 5)
        assert [r.getMessage() for r in caplog.records] == [
            "[rank 1/2] writing: /out/b_seg.nii.gz", "[rank 1/2] failed: /in/d.nii.gz: 5"]
        # a call whose arguments do not fit its message: the record is left as it is, for logging to report as usual
        record = logging.getLogRecordFactory()("x", logging.INFO, "x.py", 1, "100%% %s", ("a", "b"), None)
        assert (record.msg, record.args) == ("100%% %s", ("a", "b"))
    finally:
        logging.setLogRecordFactory(before)
        prefix_warnings("")


def test_a_ranks_warnings_name_it_too():
    """A rank's input check warned `1 of 3 inputs left out` of its share (the batch held 6) with no rank: two such lines
    under torchrun, neither saying whose."""
    import warnings

    from dira3d.data.errors import DataWarning
    from dira3d.evaluation.batch_ranks import prefix_rank_logs

    before = logging.getLogRecordFactory()
    try:
        prefix_rank_logs(1, 2)
        line = warnings.formatwarning("1 of 3 inputs left out", DataWarning, "inputs.py", 1)
        assert line == "WARNING: [rank 1/2] 1 of 3 inputs left out\n"
    finally:
        logging.setLogRecordFactory(before)
        prefix_warnings("")
    assert warnings.formatwarning("x", DataWarning, "inputs.py", 1) == "WARNING: x\n"


def _stopped_rank(monkeypatch, tmp_path, rank: int, theirs: tuple):
    """Rank ``rank`` of 2 of a batch of inputs a and b into one prob.json (the gather faked: the other rank's record is
    ``theirs``), stopped by SIGTERM while its model runs; ``(the batch, prob.json, the report)``."""
    import torch.distributed as dist

    import dira3d.evaluation.batch as batch_module
    from dira3d.evaluation import InferenceBatch, ProbabilityWriter
    from dira3d.utils.interrupts import TerminatedBySignal

    monkeypatch.setattr(batch_module, "join_ranks", lambda: (rank, 2, False))

    def all_gather_object(gathered, mine):
        gathered[:] = [mine, theirs] if rank == 0 else [theirs, mine]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    target, report = tmp_path / "prob.json", tmp_path / "report.json"
    batch = InferenceBatch([{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], report_path=report, output_path=target)
    ProbabilityWriter(target, ["nodule"], batch=batch)

    def run():
        raise TerminatedBySignal()

    with pytest.raises(TerminatedBySignal):
        batch.run(type("Evaluator", (), {"run": lambda self: run()})())
    return batch, target, report


def _stop_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "inference stopped by SIGTERM" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    return lines[0]


def test_rank_0_stopped_while_another_rank_completed_says_what_the_one_file_holds(monkeypatch, tmp_path, caplog):
    """Only rank 0 got the signal; rank 1 completed its share (b): rank 0 writes b's row into prob.json, and its line
    says so (it said "nothing was written to prob.json")."""
    rows = {1: {"image": "b.nii.gz", "status": "written", "output": str(tmp_path / "prob.json")}}
    theirs = (rows, None, True, ([1], [{"image": "b.nii.gz", "probabilities": [0.25]}]))
    with caplog.at_level(logging.WARNING, logger="dira3d.evaluation.batch"):
        _, target, report = _stopped_rank(monkeypatch, tmp_path, 0, theirs)
    assert json.loads(target.read_text())["predictions"] == [{"image": "b.nii.gz", "probabilities": [0.25]}]
    assert [r["status"] for r in json.loads(report.read_text())["inputs"]] == ["not run", "written"]
    assert _stop_line(caplog) == (
        f"inference stopped by SIGTERM; {target} holds the rows of the 1 input(s) written; report: {report}; {AGAIN}")


def test_another_rank_stopped_before_any_row_says_none_of_the_file_is_its_own(monkeypatch, tmp_path, caplog):
    """Rank 1 got the signal in its first input (rank 0 completed a): rank 1 writes neither prob.json nor the report,
    and says so in its own line (it said nothing: the line was rank 0's alone)."""
    rows = {0: {"image": "a.nii.gz", "status": "written", "output": str(tmp_path / "prob.json")}}
    theirs = (rows, None, True, ([0], [{"image": "a.nii.gz", "probabilities": [0.5]}]))
    with caplog.at_level(logging.WARNING, logger="dira3d.evaluation.batch"):
        _, target, report = _stopped_rank(monkeypatch, tmp_path, 1, theirs)
    assert not target.exists() and not report.exists()
    assert _stop_line(caplog) == (
        f"inference stopped by SIGTERM; this rank ran no input to the end, so no row of {target} is this rank's; report: "
        f"{report} (rank 0 writes it); {AGAIN}")


@pytest.mark.parametrize(("rank", "world", "output_path", "written", "expected"), [
    (0, 1, "p.json", (0, 0), "nothing was written to p.json; report: r.json"),
    (0, 1, None, (3, 3), "the 3 prediction(s) written are kept, each whole; report: r.json"),
    (0, 2, None, (5, 2), "the 5 prediction(s) written are kept, each whole; report: r.json"),
    (0, 2, "p.json", (0, 0), "nothing was written to p.json; report: r.json"),
    (0, 2, "p.json", (3, 1), "p.json holds the rows of the 3 input(s) written; report: r.json"),
    (1, 2, "p.json", (3, 2), "rank 0 writes p.json with this rank's rows of the 2 input(s) it ran (the report says which "
                             "inputs are written); report: r.json (rank 0 writes it)"),
    (1, 2, None, (5, 3), "this rank's 3 prediction(s) written are kept, each whole; report: r.json (rank 0 writes it)"),
])
def test_what_the_line_after_a_signal_says_was_kept_on_each_rank(rank, world, output_path, written, expected):
    from dira3d.evaluation.batch_ranks import stop_note

    assert stop_note(rank, world, output_path, written, "r.json") == expected
    assert stop_note(rank, world, output_path, written, None) == expected.split("; report:")[0]  # a single --image


# --- a stopped rank's rows of the one output file (the gather faked) ------------------------------------------------

ROWS = {n: {"image": f"{n}.nii.gz", "probabilities": [p]} for n, p in zip("abcd", (0.125, 0.25, 0.5, 0.75))}


def _rank_stopped_after_one_input(monkeypatch, tmp_path, rank: int, theirs: tuple, raises: type = None):
    """Rank ``rank`` of 2 of a batch of a, b, c, d into one prob.json: it runs its first input (rank 0: a, rank 1: b;
    its writer takes the row), then SIGTERM stops it in its second; the other rank's record is ``theirs``; the run
    ends with ``raises`` (the interrupt). Returns ``(what this rank handed to the gather, prob.json, the report)``."""
    import torch.distributed as dist

    import dira3d.evaluation.batch as batch_module
    from dira3d.evaluation import InferenceBatch, ProbabilityWriter
    from dira3d.utils.interrupts import TerminatedBySignal

    monkeypatch.setattr(batch_module, "join_ranks", lambda: (rank, 2, False))
    handed = []

    def all_gather_object(gathered, mine):
        handed.append(mine)
        gathered[:] = [mine, theirs] if rank == 0 else [theirs, mine]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    target, report = tmp_path / "prob.json", tmp_path / "report.json"
    batch = InferenceBatch([{"image": f"{n}.nii.gz"} for n in "abcd"], report_path=report, output_path=target)
    writer = ProbabilityWriter(target, ["nodule"], batch=batch)

    def run():
        batch.done.add(rank)  # its first input run, its row taken
        writer.rows.append(ROWS["ab"[rank]])
        raise TerminatedBySignal()

    with pytest.raises(raises or TerminatedBySignal) as ended:
        batch.run(type("Evaluator", (), {"run": lambda self: run()})())
    if raises is SystemExit:  # under python -m monai.bundle run
        assert ended.value.code == 143
    return handed[0], target, report


def _theirs(rank: int, target) -> tuple:
    """The record of the other rank, stopped by SIGTERM after its first input (rank 0: a; rank 1: b)."""
    name = "ab"[rank]
    rows = {rank: {"image": f"{name}.nii.gz", "status": "written", "output": str(target)},
            rank + 2: {"image": f"{'cd'[rank]}.nii.gz", "status": "not run", "reason": "stopped"}}
    return rows, "stopped by SIGTERM", False, ([rank], [ROWS[name]])


def test_a_rank_stopped_by_a_signal_hands_rank_0_the_rows_of_the_inputs_it_ran(monkeypatch, tmp_path, caplog):
    """Rank 1 ran b, then SIGTERM: it hands rank 0 b's row with its report's rows, b ``written`` there (it handed over
    none: b was failed, its row lost, and a rerun with --skip_written True ran it again), and says where the row goes."""
    with caplog.at_level(logging.WARNING, logger="dira3d.evaluation.batch"):
        handed, target, report = _rank_stopped_after_one_input(monkeypatch, tmp_path, 1, _theirs(0, tmp_path / "prob.json"))
    rows, stopped, completed, held = handed
    assert held == ([1], [ROWS["b"]]) and rows[1] == {"image": "b.nii.gz", "status": "written", "output": str(target)}
    assert stopped == "stopped by SIGTERM" and completed is False
    assert not target.exists() and not report.exists()  # rank 0 writes both
    assert _stop_line(caplog) == (
        f"inference stopped by SIGTERM; rank 0 writes {target} with this rank's rows of the 1 input(s) it ran (the report "
        f"says which inputs are written); report: {report} (rank 0 writes it); {AGAIN}")


def test_rank_0_writes_the_rows_of_every_stopped_rank_as_one_process_that_stops(monkeypatch, tmp_path, caplog):
    """SIGTERM to both ranks, each after its first input: rank 0 writes prob.json with a's row and b's (no rank completed
    its share, so nothing was written), and the report has a and b written: a rerun with --skip_written keeps them."""
    with caplog.at_level(logging.WARNING, logger="dira3d.evaluation.batch"):
        _, target, report = _rank_stopped_after_one_input(monkeypatch, tmp_path, 0, _theirs(1, tmp_path / "prob.json"))
    assert json.loads(target.read_text())["predictions"] == [ROWS["a"], ROWS["b"]] and is_own_prediction(target)
    assert [r["status"] for r in json.loads(report.read_text())["inputs"]] == ["written", "written", "not run", "not run"]
    assert _stop_line(caplog) == (
        f"inference stopped by SIGTERM; {target} holds the rows of the 2 input(s) written; report: {report}; {AGAIN}")


def test_stopped_ranks_leave_an_earlier_file_holding_rows_they_did_not_reach(monkeypatch, tmp_path, caplog):
    """As one process that stops: an earlier run's prob.json of a, b, c and d is left as it was (writing a and b would
    lose c's and d's rows), and the report has a and b failed, in one summary line saying so."""
    from dira3d.evaluation import ProbabilityWriter

    target = tmp_path / "prob.json"
    ProbabilityWriter(target, ["nodule"]).write(list(ROWS.values()))
    earlier = target.read_bytes()
    with caplog.at_level(logging.WARNING, logger="dira3d"):
        _, _, report = _rank_stopped_after_one_input(monkeypatch, tmp_path, 0, _theirs(1, target))
    assert target.read_bytes() == earlier
    lost = f"the batch stopped before {target} was written: stopped by SIGTERM"
    assert [(r["status"], r.get("reason")) for r in json.loads(report.read_text())["inputs"]] == [
        ("failed", lost), ("failed", lost), ("not run", "the batch stopped before it: stopped by SIGTERM"),
        ("not run", "stopped")]  # (d: rank 1's record as faked)
    lines = [r.getMessage() for r in caplog.records]
    assert any("is left as it was: it holds rows of inputs that this stopped run did not reach" in m for m in lines)
    assert [m for m in lines if m.startswith("failed:")] == [
        f"failed: the rows of 2 inputs run (a.nii.gz, b.nii.gz) are lost, not in {target}: stopped by SIGTERM; run the "
        "same command again to run them again"]


def test_rank_0_failing_to_write_the_one_file_after_a_signal_ends_as_one_process_does(monkeypatch, tmp_path, caplog):
    """SIGTERM to both ranks, each after its first input, and rank 0 cannot write prob.json (a full disk): as one process
    (tests/test_inference_stopped_classification.py), the run exits 143 under python -m monai.bundle run, one
    ``failed:`` line says the rows are lost, the error and what to do, and the stop line says nothing was written, why.
    It raised the OSError instead: a traceback, exit 1, no stop line."""
    import errno

    from dira3d.evaluation import ProbabilityWriter
    from dira3d.utils import bundle_errors

    target = tmp_path / "prob.json"
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    def write(self, rows):
        raise error

    monkeypatch.setattr(ProbabilityWriter, "write", write)
    monkeypatch.setattr(bundle_errors, "run_by_monai_bundle_command", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dira3d"):
        _, _, report = _rank_stopped_after_one_input(monkeypatch, tmp_path, 0, _theirs(1, target), raises=SystemExit)
    assert not target.exists()
    said = f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{target}'"
    lost = f"the batch stopped before {target} was written: stopped by SIGTERM; writing it then failed: {said}"
    payload = json.loads(report.read_text())
    assert [(r["status"], r.get("reason")) for r in payload["inputs"][:2]] == [("failed", lost), ("failed", lost)]
    assert payload["stopped"] == "stopped by SIGTERM"  # as one process's report: the stop; the error is the rows'
    assert [m for m in (r.getMessage() for r in caplog.records) if m.startswith("failed:")] == [
        f"failed: the rows of 2 inputs run (a.nii.gz, b.nii.gz) are lost, not in {target}: stopped by SIGTERM; writing it "
        f"then failed: {said}; free space on that disk or raise your quota, or pass --output_path with another file; then "
        "run the same command again to run them again"]
    assert _stop_line(caplog) == (
        f"inference stopped by SIGTERM; nothing was written to {target} ({said}); report: {report}; run the same command "
        "again for every input (it replaces dira3d's own earlier predictions)")
