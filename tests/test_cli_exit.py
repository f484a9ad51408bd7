"""A command that fails while a thread pool is loading data exits with its own code, not SIGABRT.

MONAI's CacheDataset fills its cache in a ``ThreadPool``; when one item fails (e.g. a raw-HU scan in
a pretraining datalist), `dira3d pretrain` printed its one-line error and then the process aborted
("FATAL: exception not rethrown", exit code 134): the pool's other thread was still in SimpleITK
when the interpreter exited; `python -m monai.bundle run` did the same after its traceback. The
script below reproduces both without MONAI (the same pool, one bad item, one item loading in native
code): through `dira3d.cli.main`, and as an uncaught error in a process that imported dira3d.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.dummy import DummyProcess
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest

from dira3d.utils.threads import finish_pool_threads

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from multiprocessing.pool import ThreadPool
    import SimpleITK as sitk
    import dira3d.cli as cli

    def load(i):
        if i == 0:
            time.sleep(0.3)  # the other item is being loaded by then
            raise ValueError("item 0 is bad")
        image, end = sitk.Image(48, 48, 48, sitk.sitkFloat32), time.monotonic() + 1.5
        while time.monotonic() < end:  # native calls that release the GIL, as reading a scan does
            sitk.DiscreteGaussian(image)
        return i

    def fake_main(argv):
        try:
            with ThreadPool(2) as pool:  # as MONAI's CacheDataset fills its cache
                list(pool.imap(load, [0, 1]))
        except ValueError as err:
            print(f"fake: error: {err}", file=sys.stderr)
            return 2
        return 0

    if sys.argv[1] == "cli":
        cli.COMMANDS["fake"] = ("__main__:fake_main", "a command whose data loading fails")
        sys.exit(cli.main(["fake"]))
    with ThreadPool(2) as pool:  # uncaught, as `python -m monai.bundle run` lets a CacheDataset error go
        list(pool.imap(load, [0, 1]))
    """
)


@pytest.mark.parametrize(("mode", "message", "code"), [("cli", "fake: error: item 0 is bad", 2),
                                                       ("uncaught", "ValueError: item 0 is bad", 1)])
def test_failed_run_exits_with_its_code_while_a_pool_thread_is_in_native_code(tmp_path, mode, message, code):
    script = tmp_path / "fail_while_loading.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env, timeout=120)
    assert message in result.stderr
    assert "FATAL" not in result.stderr and "terminate called" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)


def test_finish_pool_threads_waits_for_busy_workers_only_up_to_the_timeout():
    before = set(threading.enumerate())
    release = threading.Event()
    pool = ThreadPool(1)
    ours = [t.name for t in threading.enumerate() if t not in before and isinstance(t, DummyProcess)]
    pool.apply_async(release.wait)
    time.sleep(0.05)
    start = time.monotonic()
    assert set(ours) <= set(finish_pool_threads(timeout=0.3)), "a worker still busy is named"
    assert 0.25 < time.monotonic() - start < 5
    release.set()
    pool.terminate()  # as CacheDataset's `with ThreadPool` does on an error: the worker ends after its item
    still_running = finish_pool_threads(timeout=10)
    assert not set(ours) & set(still_running)


# `dira3d prepare` stands for any command that catches Ctrl-C and returns 130; the interrupt reaches it inside an
# `exec` of a string, as MONAI's `$@trainer.run()` expression of a bundle config (dira3d finetune, pretrain) does.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os, sys
    import dira3d.data.command as command

    def interrupted_command(argv):
        try:  # the signal is sent on READY: it comes inside the exec
            exec("import time; print('READY', flush=True); time.sleep(60)")
        except KeyboardInterrupt:
            if os.environ.get("FAKE_CATCH") == "1":
                print("fake: interrupted", file=sys.stderr)
                return 130
            raise
        return 0

    command.main = interrupted_command
    """
)


def _default_sigint() -> None:
    # in the child, before it starts Python: a SIGINT ignored by the process that runs the tests (a background job
    # of a shell script, nohup) would be inherited as ignored, and Python installs no Ctrl-C handler then: the
    # command never saw the test's SIGINT, slept on, and the case failed with subprocess.TimeoutExpired
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_when_ready(cmd: list[str], env: dict, signum: int) -> tuple[int, str]:
    """Run ``cmd``, send it ``signum`` once it prints READY; its return code and stderr. The command starts with
    SIGINT at its default, whatever the test run's (a Ctrl-C from a terminal reaches a command that way)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize(("how", "catch", "code"), [("-m", "1", 130), ("script", "1", 130), ("-m", "0", -signal.SIGINT)])
def test_ctrl_c_a_command_caught_exits_130_also_under_python_m(tmp_path, how, catch, code):
    """`python -m dira3d.cli finetune ...` printed its "interrupted" line, then died by SIGINT (returncode -2):
    CPython took the Ctrl-C that left MONAI's `exec`'d config expression for an unhandled one, and `python -m`
    exits by SIGINT then. The installed `dira3d` command (a script calling `dira3d.cli.main()`) exited 130.
    A Ctrl-C that no one caught still ends the process by SIGINT."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = dict(os.environ, FAKE_CATCH=catch,
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = ([sys.executable, "-m", "dira3d.cli", "prepare"] if how == "-m" else
           [sys.executable, "-c", "import sys; from dira3d.cli import main; sys.exit(main())", "prepare"])
    returncode, err = _signal_when_ready(cmd, env, signal.SIGINT)
    if catch == "1":
        assert err.strip() == "fake: interrupted", err
    assert returncode == code, (returncode, err)


PRETRAIN_WHILE_CACHING = textwrap.dedent(
    """
    import sys, time
    import dira3d.engines.command as command
    import dira3d.utils.overrides as overrides

    def caching(*args, **kwargs):  # stands in for the bundle run while it caches the datasets
        print("READY", flush=True)
        time.sleep(60)

    overrides.run_bundle = caching
    sys.exit(command.main(sys.argv[1:]))
    """
)


def test_sigterm_while_pretraining_caches_its_data_is_one_line_and_exit_143(tmp_path):
    # the trainer's own stop (dira3d.engines.stopping) is in place only while it runs: a SIGTERM while the
    # datasets were cached (minutes to hours) ended the process at once, without a word
    datalist = tmp_path / "dl.json"
    datalist.write_text('{"training": []}', encoding="utf-8")
    returncode, err = _signal_when_ready([sys.executable, "-c", PRETRAIN_WHILE_CACHING, "--datalist", str(datalist),
                                          "--output", str(tmp_path / "run"), "--tiny"],
                                         dict(os.environ, PYTHONPATH=str(REPO)), signal.SIGTERM)
    assert returncode == 143, (returncode, err)
    assert err.strip() == (f"dira3d pretrain: stopped by SIGTERM before the first checkpoint ({tmp_path / 'run'}"
                           "/models/last.pt does not exist); rerunning the same command starts afresh"), err


# Ctrl-C while a command's module loads (torch and MONAI take seconds): the import of `dira3d prepare`'s module
# stands for it; the signal is sent while that import is in progress (no sleep race: READY is printed inside it)
SLOW_IMPORT = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys, time

    class SlowLoader(importlib.abc.Loader):
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            print("READY", flush=True)
            time.sleep(60)
            self.loader.exec_module(module)

    class SlowFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "dira3d.data.command":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            spec.loader = SlowLoader(spec.loader)
            return spec

    sys.meta_path.insert(0, SlowFinder())
    """
)


@pytest.mark.parametrize("how", ["-m", "script"])
def test_ctrl_c_while_the_command_module_loads_is_one_line_and_exit_130(tmp_path, how):
    """Ctrl-C in the first seconds of a command (while torch / MONAI were imported) printed an import traceback
    (exit 1 from the installed command, death by SIGINT under `python -m`) instead of one line and 130."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = ([sys.executable, "-m", "dira3d.cli", "prepare", "--help"] if how == "-m" else
           [sys.executable, "-c", "import sys; from dira3d.cli import main; sys.exit(main())", "prepare", "--help"])
    returncode, err = _signal_when_ready(cmd, env, signal.SIGINT)
    assert err.strip() == "dira3d prepare: interrupted while loading, before the command started; nothing was written", err
    assert returncode == 130, (returncode, err)


def test_sigterm_while_the_command_module_loads_is_one_line_and_exit_143(tmp_path):
    """SIGTERM (``kill``, ``scancel``) in the first seconds of a command, while torch / MONAI are imported, ended it
    without a word (exit -15; found 2026-11-27 with ``dira3d export``): the Ctrl-C line, naming the signal, and 143."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    returncode, err = _signal_when_ready([sys.executable, "-m", "dira3d.cli", "prepare", "--help"], env, signal.SIGTERM)
    assert err.strip() == ("dira3d prepare: stopped by SIGTERM while loading, before the command started; nothing was "
                           "written"), err
    assert returncode == 143, (returncode, err)


@pytest.mark.parametrize(("command", "slow", "signum"), [
    ("pretrain", "dira3d.engines.finished", signal.SIGINT),
    ("visual-words", "dira3d.visual_words.discover", signal.SIGTERM),
])
def test_a_signal_while_a_command_loads_torch_after_its_quick_checks_is_one_line(tmp_path, command, slow, signum):
    """`dira3d pretrain` and `dira3d visual-words` import torch and MONAI only after their quick refusals, in the
    command itself rather than as dira3d.cli imports its module: a Ctrl-C or SIGTERM there must still end with the
    loading line and 130 / 143, not a traceback (Ctrl-C) or a silent exit -15 (SIGTERM)."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT.replace('"dira3d.data.command"', repr(slow)), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]))
    datalist = tmp_path / "dl.json"
    datalist.write_text('{"training": []}', encoding="utf-8")
    out = tmp_path / "out"
    returncode, err = _signal_when_ready([sys.executable, "-m", "dira3d.cli", command, "--datalist", str(datalist),
                                          "--output" if command == "pretrain" else "--out", str(out)], env, signum)
    word = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert err.strip() == f"dira3d {command}: {word} while loading, before the command started; nothing was written", err
    assert returncode == (130 if signum == signal.SIGINT else 143), (returncode, err)
    assert not out.exists()


# Ctrl-C (or SIGTERM) once a command has loaded and works: `dira3d synthetic`, `localise`, `export` and `demo` printed
# a KeyboardInterrupt traceback (SIGTERM ended them without a word). The work is stood in for by a function that
# writes one file of the command's (or none), prints READY and sleeps: the signal comes in the middle of the work.
WORKING = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import dira3d.cli as cli

    command, out, writes = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"

    def working(first):
        def work(*args, **kwargs):
            if writes:
                (out / first).parent.mkdir(parents=True, exist_ok=True)
                (out / first).write_bytes(b"x")
            print("READY", flush=True)
            time.sleep(60)
        return work

    if command == "synthetic":
        import dira3d.data.synthetic as module
        module.write_luna16_phantoms = working("subset0/1.mhd")
        argv = ["synthetic", "--out", str(out), "--count", "4"]
    elif command == "localise":
        import dira3d.evaluation.localise as module
        module.run_localisation = working("overlays/0000_a_Mass.png")
        argv = ["localise", "--bbox-datalist", "bbox_datalist.json", "--model", "model.pt", "--output-dir", str(out)]
    elif command == "export pretrained":
        import dira3d.deploy.weights as module
        module.export_pretrained = working("encoder.pt")
        (out.parent / "best.pt").write_bytes(b"x")  # the command checks that it exists first (export_checks), not read
        argv = ["export", "pretrained", "--checkpoint", str(out.parent / "best.pt"), "--out", str(out)]
    elif command == "export torchscript":
        import dira3d.deploy.export as module
        module.export_torchscript_with_report = working("model.ts")
        (out.parent / "model.pt").write_bytes(b"x")  # as best.pt above
        argv = ["export", "torchscript", "--bundle", "luna16_nodule_fpr", "--out", str(out / "model.ts"), "--checkpoint",
                str(out.parent / "model.pt")]
    else:
        import dira3d.demo as module
        module._phantoms_and_prepare = working("luna16_raw/subset0/1.mhd")
        argv = ["demo", "--out", str(out)]
    sys.exit(cli.main(argv))
    """
)


@pytest.mark.parametrize(("command", "writes", "signum", "expected"), [
    ("synthetic", True, signal.SIGINT, "interrupted; 1 file(s) written to {out} (1 of 4 phantoms), an incomplete LUNA16 "
                                       "tree: rerun with --overwrite to write it whole"),
    ("synthetic", False, signal.SIGTERM, "stopped by SIGTERM; nothing was written to {out}"),
    ("localise", True, signal.SIGINT, "interrupted; no localisation.json was written; 1 overlay(s) written to "
                                      "{out}/overlays so far: rerun the same command for the results"),
    ("localise", False, signal.SIGTERM, "stopped by SIGTERM; nothing was written to {out}"),
    ("export pretrained", True, signal.SIGINT, "interrupted; encoder.pt written to {out} before it stopped, an "
                                               "unfinished export: rerun with --overwrite"),
    ("export torchscript", False, signal.SIGTERM, "stopped by SIGTERM; nothing was written to {out}/model.ts"),
    ("demo", True, signal.SIGINT, "interrupted; what it wrote so far is kept in {out}: rerun the same command to go on "
                                  "(finished steps are reused)"),
    ("demo", False, signal.SIGTERM, "stopped by SIGTERM; nothing was written to {out}"),
])
def test_ctrl_c_or_sigterm_while_a_command_works_is_one_line_on_what_was_written(tmp_path, command, writes, signum,
                                                                                  expected):
    out = (tmp_path / "out").resolve()
    returncode, err = _signal_when_ready([sys.executable, "-c", WORKING, command, str(out), "1" if writes else "0"],
                                         dict(os.environ, PYTHONPATH=str(REPO)), signum)
    assert err.strip() == f"dira3d {command.split()[0]}: {expected.format(out=out)}", err
    assert returncode == 128 + signum, (returncode, err)
