"""SIGTERM / Ctrl-C while a bundle caches its data, before training starts (found 2026-11-27): building the trainer
loads and caches the data (MONAI's CacheDataset) before the engine's SignalStop handler is installed, and a SIGTERM
then ended `python -m monai.bundle run` of the pretraining or a fine-tuning bundle at once without a word (exit -15);
a Ctrl-C printed a traceback. The bundles' last initialize step, stop_before_training, now makes both end with one
line and exit 143 / 130, as a stop during training does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from dira3d.engines.stopping import SignalStop, stop_before_training
from dira3d.utils.interrupts import StoppedBySignal
from test_finetune_signal_stop import _bundle_args, _datalist
from test_resume_kill import CONFIGS as PRETRAIN_CONFIGS
from test_signal_stop_runs import run_until

# Wraps `python -m monai.bundle`: each item CacheDataset loads prints "CACHING" on a line of its own (tqdm's bar
# shares the pipe, hence the leading newline); the first waits for the signal, so the signal comes during the caching.
RUNNER = textwrap.dedent('''
    import os, runpy, select, signal, sys, time
    from monai.data import CacheDataset

    def say(*words):
        os.write(1, ("\\n" + " ".join(str(w) for w in words) + "\\n").encode())

    load = CacheDataset._load_cache_item
    waited = []
    # Python writes the number of each signal it catches here, in whichever thread the kernel delivered it to
    arrived, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
    STOPS = {signal.SIGTERM, signal.SIGINT}

    def until_the_signal(limit=60.0):
        # waits for the signal to arrive, not for dira3d's handler to have run: the item is loaded in one of
        # CacheDataset's threads, and when the kernel hands the signal to that thread (or another of the pool's),
        # Python runs the handler only when the main thread next runs Python code, after the pool's imap gives it
        # this very item; waiting for the handler then lasted the whole limit (60 s in a CI run)
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            if select.select([arrived], [], [], left)[0] and STOPS & set(os.read(arrived, 64)):
                return

    def slow_load(self, *args, **kwargs):
        first = not waited
        waited.append(1)
        say("CACHING")
        # the first item waits for the signal: on a loaded machine the test's reader can see the line seconds late,
        # and a fixed short pause let the run finish caching (even training) first
        if first:
            until_the_signal()
        else:
            time.sleep(0.5)
        return load(self, *args, **kwargs)

    CacheDataset._load_cache_item = slow_load
    sys.argv = ["monai.bundle"] + sys.argv[1:]
    try:
        runpy.run_module("monai.bundle", run_name="__main__")
    except SystemExit as stop:
        say("EXIT", stop.code)
        raise
    say("EXIT", 0)
''')


def _pretrain_args(tmp_path, out) -> list[str]:
    from test_bundle_pretrain import write_volumes

    data = tmp_path / "volumes"
    data.mkdir()
    write_volumes(data, count=6)
    return ["run", "--config_file", f"['{PRETRAIN_CONFIGS}/train.json','{PRETRAIN_CONFIGS}/tiny.json']",
            "--meta_file", f"{PRETRAIN_CONFIGS}/metadata.json", "--logging_file", f"{PRETRAIN_CONFIGS}/logging.conf",
            "--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"),
            "--patch_size", "[16,16,8]"]


@pytest.mark.parametrize(("what", "signum", "code"), [("fine-tuning", signal.SIGTERM, 143),
                                                      ("pretraining", signal.SIGINT, 130)])
def test_a_signal_while_the_data_are_cached_ends_the_bundle_run_with_one_line(tmp_path, repo_root, what, signum, code):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "run"
    args = (_bundle_args(repo_root, _datalist(tmp_path), out, ["train.json", "tiny.json"]) if what == "fine-tuning"
            else _pretrain_args(tmp_path, out))
    returncode, output = run_until([sys.executable, str(runner), *args], repo_root, {}, [("CACHING", signum)])
    assert returncode == code, output[-3000:]
    assert re.search(rf"^EXIT {code}$", output, flags=re.M), output[-3000:]
    name = signal.Signals(signum).name
    lines = re.findall(r"WARNING - (.* before training started.*)", output)
    assert lines == [f"{what} stopped by {name} before training started (while the data were loaded and cached); "
                     "nothing was trained or saved; run the same command again to start it"], output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert not list(out.rglob("*.pt"))


# A signal while a CacheDataset's pool loads an item in native code (SimpleITK here, as reading a scan): the pool is
# terminated on the way out, and its worker was still loading when the interpreter exited, which aborted the process
# (SIGABRT, "terminate called without an active exception") after the stop's line. MONAI's pool, without MONAI.
NATIVE_LOAD = textwrap.dedent("""
    import signal, threading, time
    from multiprocessing.pool import ThreadPool
    import SimpleITK as sitk
    from dira3d.engines.stopping import stop_before_training

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh `python` has them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop_before_training("fine-tuning")

    def load(i):
        if i == 0:
            time.sleep(0.3)  # the other item is being loaded by then
            # to the main thread, whose handler then runs at once (the kernel may hand a `kill` to any thread)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            return i
        image, end = sitk.Image(48, 48, 48, sitk.sitkFloat32), time.monotonic() + 1.5
        while time.monotonic() < end:  # native calls that release the GIL
            sitk.DiscreteGaussian(image)
        print("LOADED", flush=True)
        return i

    with ThreadPool(2) as pool:  # as MONAI's CacheDataset fills its cache
        list(pool.imap(load, [0, 1]))
""")


def test_a_signal_while_a_pool_thread_loads_in_native_code_exits_with_its_code_after_the_item(tmp_path, repo_root):
    script = tmp_path / "stop_while_loading.py"
    script.write_text(NATIVE_LOAD, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert "fine-tuning stopped by SIGTERM before training started" in result.stderr, result.stderr
    assert "terminate called" not in result.stderr and "FATAL" not in result.stderr, result.stderr
    assert result.returncode == 143, (result.returncode, result.stderr)
    assert result.stdout.split() == ["LOADED"]  # the exit waited for the item in flight


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no pthread_sigmask on this platform (Windows)")
def test_the_caches_loading_threads_leave_sigterm_and_sigint_to_the_main_thread():
    """The kernel may hand a process-directed SIGTERM to a CacheDataset pool thread; Python then ran the handler only
    when the main thread next ran Python code, once the pool's next item was loaded (minutes for a big CT). The
    bundles' memory cache (dira3d.engines.cached_dataset) and the cache-size probe block both signals in their pool
    threads, so the kernel delivers them to the main thread, whose own mask is left as it was."""
    import threading

    from monai.transforms import Compose, Lambda

    from dira3d.engines import cached_dataset
    from dira3d.engines.cache import prefix_item_bytes

    stops, seen = {signal.SIGTERM, signal.SIGINT}, []

    def record(item):  # in each item's load: which thread, and whether it blocks both signals
        seen.append((threading.current_thread() is threading.main_thread(),
                     stops <= signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        return item

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not stops & before
    dataset = cached_dataset([{"x": i} for i in range(8)], Compose([Lambda(record)]), num_workers=3, progress=False)
    assert len(dataset) == 8 and seen == [(False, True)] * 8
    seen.clear()
    assert prefix_item_bytes({"x": 0}, Compose([Lambda(record)])) is not None and seen == [(False, True)]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main thread takes them as before


def test_the_engine_takes_the_signals_over_and_puts_back_the_handlers_from_before(monkeypatch):
    """stop_before_training replaces the default handlers only; SignalStop (the training) puts back those it replaced, so
    its second Ctrl-C is Python's KeyboardInterrupt again and nothing of the data loading's handler is left after."""
    from ignite.engine import Engine

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # a test runner may have its own
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    try:
        for signum, handler in defaults.items():
            signal.signal(signum, handler)
        stop_before_training("pretraining")
        installed = {s: signal.getsignal(s) for s in defaults}
        assert all(h not in (signal.SIG_DFL, signal.default_int_handler) for h in installed.values())
        stop_before_training("pretraining")  # a second initialize: the defaults stay the ones to put back
        engine = Engine(lambda e, b: None)
        stop = SignalStop()
        with stop.installed(engine):
            assert stop._previous == defaults  # the engine's handlers replace the defaults, not the data loading's
        assert {s: signal.getsignal(s) for s in defaults} == defaults
        stop_before_training("fine-tuning")
        with pytest.raises(StoppedBySignal) as stopped:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stopped.value.code == 143
        assert {s: signal.getsignal(s) for s in defaults} == defaults  # the first signal put the defaults back
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_process_that_handles_sigterm_itself_is_left_as_it_is():
    """dira3d pretrain / finetune / experiment handle SIGTERM (sigterm_as_interrupt) and print their own line."""
    from dira3d.utils.interrupts import sigterm_as_interrupt

    with sigterm_as_interrupt():
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        stop_before_training("fine-tuning")
        assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_every_training_config_ends_its_initialize_with_the_stop_before_training(repo_root):
    import json

    from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D

    for bundle in (*BUNDLES, *BUNDLES_2D, "dira_pretrain"):
        step = ("$dira3d.engines.stop_before_training('pretraining')" if bundle == "dira_pretrain" else
                "$dira3d.evaluation.stop_before_training('fine-tuning')")
        for name in ("train.json", "multi_gpu_train.json"):
            config = json.loads((repo_root / "bundles" / bundle / "configs" / name).read_text(encoding="ascii"))
            assert config["initialize"][-1] == step, (bundle, name)


def test_every_training_config_puts_the_handlers_back_first_in_its_finalize(repo_root):
    import json

    from dira3d.evaluation.finetune import BUNDLES, BUNDLES_2D

    for bundle in (*BUNDLES, *BUNDLES_2D, "dira_pretrain"):
        step = ("$dira3d.engines.end_stop_before_training()" if bundle == "dira_pretrain" else
                "$dira3d.evaluation.end_stop_before_training()")
        for name in ("train.json", "multi_gpu_train.json"):
            config = json.loads((repo_root / "bundles" / bundle / "configs" / name).read_text(encoding="ascii"))
            assert config["finalize"][0] == step, (bundle, name)  # first: a later step may raise


@pytest.mark.parametrize("bundle", ["luna16_nodule_fpr", "montgomery_lung_seg"])
def test_a_workflow_initialised_and_finalised_without_run_puts_the_handlers_back(bundle, tmp_path, repo_root):
    """A notebook: ``initialize()``, then ``finalize()`` without ``run()``. The handlers of stop_before_training stayed:
    a later Ctrl-C in the notebook raised StoppedBySignal (a SystemExit) with a line about a training that never
    started. finalize now puts back the handlers from before initialize."""
    from monai.bundle import create_workflow

    configs = repo_root / "bundles" / bundle / "configs"
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    for signum, handler in defaults.items():  # as a fresh `python` or a notebook kernel has them (the conftest
        signal.signal(signum, handler)        # fixture puts the test runner's back after)
    with pytest.warns(UserWarning, match="Only proceed if this config is from a source you trust"):  # MONAI's
        flow = create_workflow(config_file=str(configs / "train.json"), meta_file=str(configs / "metadata.json"),
                               workflow_type="train", bundle_root=str(tmp_path))  # initialised
    assert all(signal.getsignal(s) is not h for s, h in defaults.items())  # the data loading's, until training starts
    flow.finalize()
    assert {s: signal.getsignal(s) for s in defaults} == defaults
