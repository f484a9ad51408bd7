"""Session 24b mutation audit of dira3d.evaluation.batch_failures: what a failed input's reason and key are, which
errors stop a batch, and when a failed collated batch splits into its inputs, pinned on the public functions."""

from __future__ import annotations

import errno

import pytest
import torch

from dira3d.evaluation.batch_failures import failure_key, failure_reason, split_batch, stops_batch


def test_failure_reason_is_one_line_and_a_bare_type_for_an_empty_message():
    assert failure_reason(RuntimeError("cannot read\n  the header\tof it")) == "RuntimeError: cannot read the header of it"
    assert failure_reason(RuntimeError()) == "RuntimeError"
    assert failure_reason(ValueError("   ")) == "ValueError"


def test_failure_key_leaves_out_a_path_with_spaces_whole():
    """The longest name is left out first: a folder with a space, its file name replaced first, left two words
    behind (``<file> <file>``), and two inputs of one folder with and one without a space did not count as the same
    error."""
    for path in ("/my data/case 1.nii.gz", "/data/case2.nii.gz"):
        assert failure_key(RuntimeError(f"cannot read {path}"), [path]) == "RuntimeError: cannot read <file>", path


def test_failure_key_leaves_out_a_windows_path_it_was_not_given():
    keys = {failure_key(RuntimeError(f"cannot open {p} (bad header)")) for p in ("C:\\runs\\a\\scan", "D:\\b\\other")}
    assert keys == {"RuntimeError: cannot open <file> (bad header)"}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM])
def test_a_full_disk_or_a_folder_that_cannot_be_written_stops_the_batch(code):
    assert stops_batch(OSError(code, "no"))
    assert not stops_batch(OSError(errno.ENOENT, "no such file"))  # one input's missing file: the batch goes on


def test_stops_batch_follows_the_error_it_was_raised_while_handling():
    """A writer's own error raised while handling ENOSPC (its ``__context__``, no ``from``) stops the batch too."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("cannot write the prediction")  # noqa: B904 - implicit context, as writers do
    except RuntimeError as err:
        wrapped = err
    assert wrapped.__cause__ is None and stops_batch(wrapped)
    outer = RuntimeError("applying transform")
    outer.__cause__ = wrapped
    assert stops_batch(outer)


@pytest.mark.timeout(60)  # a guard: without it a loop in the chain would hang the suite
def test_stops_batch_ends_on_an_error_chain_that_loops():
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not stops_batch(first)


def test_split_batch_splits_only_a_collated_dictionary_of_that_many_inputs():
    batch = {"image": torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)}
    parts = split_batch(batch, 2)
    assert parts is not None and [tuple(p["image"].shape) for p in parts] == [(1, 1, 3, 3)] * 2
    assert torch.equal(parts[1]["image"][0], batch["image"][1])
    assert split_batch(batch, 3) is None  # not a batch of 3 inputs
    assert split_batch(batch["image"], 2) is None  # not a dictionary
    assert split_batch({"image": batch["image"][:1]}, 1) is None  # a batch of one is not split again
