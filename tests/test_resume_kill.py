"""Exact resume after SIGKILL: the pretraining bundle is killed at a random iteration (and, in a
second run, in the middle of writing a checkpoint), the same command is run again, and the final
weights equal those of an uninterrupted run bit for bit (CPU)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import torch

CONFIGS = "bundles/dira_pretrain/configs"

# Runs `python -m monai.bundle run ...` with torch.save wrapped: it prints "SAVED n" after the n-th
# checkpoint write and, for the write number SLOW_SAVE, writes half the bytes, prints "SAVING"
# and sleeps, so the test can kill the process in the middle of a checkpoint write.
RUNNER = textwrap.dedent('''
    import io, os, runpy, sys, time
    import torch
    real_save, count, slow = torch.save, [0], int(os.environ.get("SLOW_SAVE", "0"))
    def save(obj, f, *args, **kwargs):
        count[0] += 1
        if count[0] == slow and hasattr(f, "write"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush()
            print("SAVING", count[0], flush=True)
            time.sleep(60)
            f.write(data[len(data) // 2 :])
        else:
            real_save(obj, f, *args, **kwargs)
        print("SAVED", count[0], flush=True)
    torch.save = save
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    runpy.run_module("monai.bundle", run_name="__main__")
''')


def command(runner, data_dir, out):
    return [
        sys.executable, str(runner), "run",
        "--config_file", f"['{CONFIGS}/train.json','{CONFIGS}/tiny.json']",
        "--meta_file", f"{CONFIGS}/metadata.json", "--logging_file", f"{CONFIGS}/logging.conf",
        "--dataset_dir", str(data_dir), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
        "--patch_size", "[16,16,8]", "--dis_mode", "moco", "--queue_size", "8", "--max_epochs", "3",
        "--save_every", "1",
    ]


def run(cmd, cwd, kill_after: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess | None:
    """Run to completion, or SIGKILL the process as soon as a stdout line equals ``kill_after``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if kill_after is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended (rc={proc.returncode}) before '{kill_after}'"
    return None


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    flat = {}
    for part in ("encoder", "decoder", "dis_head", "adversary", "momentum_encoder", "momentum_head", "queue"):
        flat.update({f"{part}.{k}": v for k, v in ckpt[part].items()})
    flat.update({f"optimizer_d.{k}.exp_avg": v["exp_avg"] for k, v in ckpt["optimizer_d"]["state"].items()})
    assert ckpt["trainer"]["iteration"] == 6
    return flat


def test_sigkill_at_a_random_iteration_and_during_a_save_then_rerun_is_exact(tmp_path, repo_root):
    from test_bundle_pretrain import write_volumes

    data = tmp_path / "data"
    data.mkdir()
    write_volumes(data, count=6)  # 4 training volumes, batch 2: 2 iterations x 3 epochs
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    seed = int(os.environ.get("DIRA3D_KILL_SEED", random.randrange(1 << 30)))  # printed on failure
    rng = random.Random(seed)

    reference = tmp_path / "uninterrupted"
    run(command(runner, data, reference), repo_root)
    expected = weights(reference / "models" / "last.pt")

    # 1) killed at a random checkpoint write (saves: one per iteration + best/last at epoch ends)
    killed = tmp_path / "killed"
    # ("SAVED k" is printed inside torch.save, before atomic_save's rename: last.pt is then save k-1's)
    k = rng.randint(2, 9)
    run(command(runner, data, killed), repo_root, kill_after=f"SAVED {k}")
    partial = torch.load(killed / "models" / "last.pt", weights_only=True)["trainer"]["iteration"]
    assert 1 <= partial < 6, (seed, partial)
    run(command(runner, data, killed), repo_root)
    got = weights(killed / "models" / "last.pt")
    assert got.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"seed {seed}: killed after save {k} (iteration {partial}): {different[:5]}"

    # 2) killed in the middle of a checkpoint write: the previous last.pt stays readable
    torn = tmp_path / "torn"
    slow = rng.randint(2, 8)
    run(command(runner, data, torn), repo_root, kill_after=f"SAVING {slow}", env_extra={"SLOW_SAVE": str(slow)})
    before = torch.load(torn / "models" / "last.pt", weights_only=True)  # intact: the old file
    assert before["trainer"]["iteration"] < 6, seed
    leftovers = [p.name for p in (torn / "models").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1, leftovers  # the half-written temporary file (a checkpoint's size on a real run)
    run(command(runner, data, torn), repo_root)
    assert not [p.name for p in (torn / "models").iterdir() if p.name.endswith(".tmp")]  # the rerun removed it
    got = weights(torn / "models" / "last.pt")
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"seed {seed}: killed during save {slow}: {different[:5]}"


def test_a_run_removes_the_half_written_last_and_best_temporaries_but_no_other_file(tmp_path):
    # a SIGKILL in a save leaves ``.last.pt.<8>.tmp`` or ``.best.pt.<8>.tmp`` (each a checkpoint's size); the next run,
    # holding the folder's lock, removes both kinds before it loads anything, and leaves another file's temporary alone
    from test_engine import make_trainer

    from dira3d.engines import DiRACheckpoint

    models = tmp_path / "models"
    models.mkdir()
    left = [models / ".last.pt.k1ll3d0a.tmp", models / ".best.pt.k1ll3d0b.tmp"]
    other = models / ".notes.txt.k1ll3d0c.tmp"
    for path in (*left, other):
        path.write_bytes(b"half a file")
    make_trainer(handlers=[DiRACheckpoint(models, resume=True)]).run()
    assert [p.name for p in left if p.exists()] == []
    assert other.read_bytes() == b"half a file"
    assert (models / "last.pt").is_file()
