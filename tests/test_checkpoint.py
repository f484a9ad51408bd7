import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import RunsCodeWhenUnpickled

from dira3d.utils.checkpoint import atomic_save, check_writable, load_checkpoint


def test_round_trip_weights_only(tmp_path):
    state = {"encoder": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"epoch": 3, "stage": "dis"}}
    path = atomic_save(state, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["encoder"]["w"], state["encoder"]["w"])
    assert loaded["meta"] == {"epoch": 3, "stage": "dis"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left



def test_a_saved_state_dict_keeps_its_layer_versions_and_shared_tensors(tmp_path):
    """atomic_save rebuilds the containers to write host tensors (dira3d.utils.checkpoint.on_host): a state_dict's
    _metadata (the versions load_state_dict reads, e.g. BatchNorm's) and a tensor found twice must survive it."""
    state = torch.nn.BatchNorm3d(2).state_dict()
    weight = torch.ones(3)
    loaded = load_checkpoint(atomic_save({"bn": state, "tied": [weight, weight]}, tmp_path / "c.pt"))
    assert loaded["bn"]._metadata == state._metadata and loaded["bn"]._metadata[""]["version"] == 2
    assert loaded["tied"][0].data_ptr() == loaded["tied"][1].data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tensors saved from it)")
def test_atomic_save_on_cuda_writes_host_tensors(tmp_path):
    """A checkpoint of a GPU run held CUDA tensors: torch.load(path, weights_only=True) on a machine without a GPU
    raised 'Attempting to deserialize object on a CUDA device'. Now every tensor is written from the host."""
    bn = torch.nn.BatchNorm3d(2).cuda()
    weight = torch.ones(3, device="cuda")
    atomic_save({"bn": bn.state_dict(), "tied": (weight, weight), "n": 3}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # no map_location: where each tensor was saved
    assert all(t.device.type == "cpu" for t in [*loaded["bn"].values(), *loaded["tied"]])
    assert loaded["bn"]._metadata == bn.state_dict()._metadata and loaded["n"] == 3
    assert loaded["tied"][0].data_ptr() == loaded["tied"][1].data_ptr()
    assert bn.weight.is_cuda  # the module saved is left where it was

class Evil:
    """Any non-tensor class: a weights-only load must refuse to unpickle it."""


def test_load_rejects_pickled_code(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")


def test_a_file_that_is_no_checkpoint_gets_a_short_message(tmp_path):
    # e.g. a scan given as --checkpoint: torch's error is a page on weights_only; the message names the file
    # and the way out in a few lines (torch's full text stays the __cause__)
    (tmp_path / "scan.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path / "scan.nii.gz")
    message = str(info.value)
    assert "scan.nii.gz" in message and "models/best.pt" in message and len(message) < 600, message
    assert "\n" not in message and info.value.__cause__ is not None


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_kill_during_save_keeps_previous(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"v": torch.zeros(3)}, path)
    # A child process starts writing a large checkpoint and is SIGKILLed mid-write.
    script = textwrap.dedent(
        f"""
        import os, torch, dira3d.utils.checkpoint as c
        real = torch.save
        def slow(obj, handle):
            real(obj, handle); handle.flush(); print('written', flush=True); import time; time.sleep(60)
        torch.save = slow  # the torch module atomic_save imports (inside the function)
        c.atomic_save({{'v': torch.ones(1_000_000)}}, {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.equal(load_checkpoint(path)["v"], torch.zeros(3))


def test_check_writable_names_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="file"):
        check_writable(blocker / "sub")
    with pytest.raises(OSError, match="MiB free"):
        check_writable(tmp_path, min_free_bytes=2**62)


def test_a_checkpoint_crafted_to_run_code_is_refused_without_advice_to_turn_the_check_off(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"encoder": RunsCodeWhenUnpickled(marker), "meta": {"width": 1}}, tmp_path / "crafted.pt")
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path / "crafted.pt")
    assert not marker.exists()
    message = str(info.value)
    # the reason (the blocked global), not torch's first line cut short: "Re-running `torch.load` with
    # `weights_only` set to `False`" read as advice to load the file unsafely
    assert "crafted.pt" in message and "could run code" in message and "system" in message, message
    assert "weights_only` set to `False" not in message and "\n" not in message, message
