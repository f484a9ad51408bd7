"""SIGTERM to a whole pretraining run (what SLURM, Kubernetes and torchrun send before SIGKILL):
`dira3d pretrain` and a 2-rank gloo `torchrun` finish the step in progress, write last.pt at that
iteration (mid-epoch, past the last periodic save), exit with 143, and the same command resumes to the
bit-identical final checkpoint of an uninterrupted run (CPU)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import torch

from test_distributed import free_port
from test_resume_kill import CONFIGS

# Wraps a command (dira3d pretrain, or monai.bundle under torchrun): prints "STEP <rank> <iteration>" as each
# step starts (and, at STEP_PAUSE_AT, waits STEP_PAUSE seconds, 1 unless set, so that the test's signal arrives inside
# that step),
# "SAVING" halfway through every checkpoint write (each write then pauses SAVE_PAUSE seconds), and
# "EXIT <rank> <code> <iteration>" as the process leaves.
RUNNER = textwrap.dedent('''
    import io, os, runpy, sys, time
    import torch
    from dira3d.engines import trainer as trainer_module

    RANK, PAUSE_AT = os.environ.get("RANK", "0"), int(os.environ.get("STEP_PAUSE_AT", "0"))

    def say(*words):  # one write: the ranks share torchrun's stdout
        os.write(1, (" ".join(str(w) for w in words) + "\\n").encode())
    real_save, save_pause = torch.save, float(os.environ.get("SAVE_PAUSE", "0"))

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush()
        say("SAVING")
        time.sleep(save_pause)
        f.write(data[len(data) // 2 :])

    torch.save = save
    real_init = trainer_module.DiRATrainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        step = self._process_function

        def announced_step(engine, batch):
            say("STEP", RANK, engine.state.iteration)
            if engine.state.iteration == PAUSE_AT:
                time.sleep(float(os.environ.get("STEP_PAUSE", "1.0")))
            return step(engine, batch)

        self._process_function = announced_step

    trainer_module.DiRATrainer.__init__ = init
    try:
        if sys.argv[1] == "pretrain":
            from dira3d.cli import main
            code = main(sys.argv[1:])
        else:
            sys.argv = ["monai.bundle"] + sys.argv[1:]
            runpy.run_module("monai.bundle", run_name="__main__")
            code = 0
    except SystemExit as stop:
        say("EXIT", RANK, stop.code, getattr(stop, "iteration", None))
        raise
    say("EXIT", RANK, code, None)
    sys.exit(code)
''')

# MoCo (queue, EMA key encoder) with batch 1: 4 iterations per epoch, 12 in all; last.pt at epoch ends only
PRETRAIN = ["--tiny", "--override", "patch_size=[16,16,8]", "--override", "dis_mode=moco", "--override", "queue_size=8",
            "--override", "batch_size=1"]


def run_until(cmd, cwd, env_extra, events) -> tuple[int, str]:
    """Run ``cmd``; for each ``(line, signal, target)`` in ``events``, in order, send ``signal`` to ``target``
    (the process, or a function of the process) when a stdout line equals ``line``. Returns (exit code, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pending = [], list(events)
    try:
        for line in proc.stdout:
            lines.append(line)
            if pending and line.strip() == pending[0][0]:
                proc.send_signal(pending.pop(0)[1])
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not pending, f"never saw {pending[0][0]!r}: " + "".join(lines)[-3000:]
    return proc.returncode, "".join(lines)


def weights(path, iteration) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    flat = {}
    for part in ("encoder", "decoder", "dis_head", "adversary", "momentum_encoder", "momentum_head", "queue"):
        flat.update({f"{part}.{k}": v for k, v in ckpt[part].items()})
    for opt in ("optimizer_g", "optimizer_d"):
        for k, v in ckpt[opt]["state"].items():
            flat.update({f"{opt}.{k}.{name}": t for name, t in v.items() if isinstance(t, torch.Tensor)})
    assert ckpt["trainer"]["iteration"] == iteration
    return flat


def assert_same(got, expected, what):
    assert got.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"{what}: {different[:5]}"


def epoch_means(log_dir) -> dict[str, list]:
    """The ``train_*`` epoch means in the TensorBoard event files of ``log_dir``, as (epoch, value) lists."""
    from test_bundle_pretrain import scalars

    values, _ = scalars(log_dir)
    return {tag: points for tag, points in values.items() if tag.startswith("train_")}


def test_dira3d_pretrain_stopped_by_sigterm_saves_the_step_exits_143_and_resumes_exactly(tmp_path, repo_root):
    from test_bundle_pretrain import write_volumes

    data = tmp_path / "data"
    data.mkdir()
    datalist = write_volumes(data, count=6)  # 4 training volumes
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)

    def cmd(out):
        return [sys.executable, str(runner), "pretrain", "--datalist", str(datalist), "--output", str(out), *PRETRAIN]

    reference = tmp_path / "uninterrupted"
    code, output = run_until(cmd(reference), repo_root, {}, [])
    assert code == 0, output[-3000:]
    expected = weights(reference / "models" / "last.pt", 12)

    # SIGTERM inside step 6 (epoch 2, whose first save comes at its end, iteration 8), and again while
    # the checkpoint of the stop is being written: the second one must not break the write
    out = tmp_path / "stopped"
    code, output = run_until(cmd(out), repo_root, {"STEP_PAUSE_AT": "6", "SAVE_PAUSE": "0.5"},
                             [("STEP 0 6", signal.SIGTERM), ("SAVING", signal.SIGTERM)])
    assert code == 143, output[-3000:]
    last = out / "models" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["trainer"]["iteration"], ckpt["trainer"]["epoch"], ckpt["trainer"]["epoch_iteration"]) == (6, 1, 2)
    assert "STEP 0 7" not in output  # no step after the one in progress
    assert [p.name for p in (out / "models").iterdir() if p.name.endswith(".tmp")] == []
    assert "Traceback" not in output, output[-3000:]
    logged = re.findall(r"stopped by SIGTERM at iteration 6; (\S+) saved; run the same command to resume", output)
    assert logged == [str(last)], output[-3000:]
    assert f"dira3d pretrain: stopped by SIGTERM at iteration 6; {last} saved; rerun the same command to resume from it" in output
    assert "EXIT 0 143 None" in output  # dira3d pretrain returned 143

    code, output = run_until(cmd(out), repo_root, {}, [])
    assert code == 0, output[-3000:]
    assert "STEP 0 6" not in output and "STEP 0 7" in output  # resumed after the saved step
    assert f"resumed from {last} at iteration 6, mid-epoch (epoch 2: 2 of its 4 iterations done)" in output
    assert_same(weights(last, 12), expected, "resumed after SIGTERM at iteration 6")
    # epoch 2's means cover its 4 iterations, 2 of them before the stop (the running sums were in last.pt)
    means = epoch_means(out / "eval")
    assert means and means == epoch_means(reference / "eval") and len(means["train_loss"]) == 3, means


def torchrun(runner, data, out, port):
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(runner),
        "run", "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json','{CONFIGS}/multi_gpu_train.json']",
        "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
        "--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
        "--patch_size", "[16,16,8]", "--dis_mode", "moco", "--queue_size", "16", "--batch_size", "1",
        "--max_epochs", "3", "--log_every", "3",
    ]


def test_torchrun_two_gloo_ranks_stopped_by_sigterm_stop_at_the_same_iteration_and_resume(tmp_path, repo_root):
    """torchrun passes the SIGTERM on to both workers; they agree to stop at the next periodic check
    (every log_every = 3 iterations), rank 0 writes last.pt there, both exit 143; the rerun resumes."""
    from test_bundle_pretrain import write_volumes

    data = tmp_path / "data"
    data.mkdir()
    write_volumes(data, count=6)  # 4 training volumes, 2 ranks x batch 1: 2 iterations per epoch, 6 in all
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)

    reference = tmp_path / "uninterrupted"
    code, output = run_until(torchrun(runner, data, reference, free_port()), repo_root, {}, [])
    assert code == 0, output[-3000:]
    expected = weights(reference / "models" / "last.pt", 6)

    out = tmp_path / "stopped"
    # the signal comes inside step 3 (epoch 2's first; a signal in epoch 1, whose last step is 2, stops the run right
    # after epoch 1's end, where the ranks agree too): the ranks agree at the check after iteration 3, mid-epoch
    code, output = run_until(torchrun(runner, data, out, free_port()), repo_root,
                             {"STEP_PAUSE_AT": "3", "STEP_PAUSE": "3"}, [("STEP 0 3", signal.SIGTERM)])
    assert code != 0, output[-3000:]  # torchrun reports its workers' exit
    exits = sorted(re.findall(r"^EXIT (\d) (\S+) (\S+)$", output, flags=re.M))
    assert exits == [("0", "143", "3"), ("1", "143", "3")], output[-3000:]
    assert "STEP 0 4" not in output and "STEP 1 4" not in output
    ckpt = torch.load(out / "models" / "last.pt", weights_only=True)
    assert (ckpt["trainer"]["iteration"], ckpt["trainer"]["epoch_iteration"]) == (3, 1)
    assert re.search(r"stopped by SIGTERM at iteration 3; \S+last\.pt saved; run the same command to resume", output)

    code, output = run_until(torchrun(runner, data, out, free_port()), repo_root, {}, [])
    assert code == 0, output[-3000:]
    assert "STEP 0 4" in output and "STEP 0 3" not in output
    assert_same(weights(out / "models" / "last.pt", 6), expected, "torchrun resumed after SIGTERM")
    means = epoch_means(out / "eval")  # rank 0's, its sums of iteration 3 included
    assert means and means == epoch_means(reference / "eval") and len(means["train_loss"]) == 3, means
