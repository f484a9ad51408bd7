"""Prepare the next batch on a side CUDA stream while the current step runs.

Without it, each iteration's host-to-device copy and its restorative distortion are queued on the
step's own stream, so the GPU runs them between two steps, alone. :class:`Prefetcher` wraps the
engine's data iterator: when it hands out batch ``i`` (already prepared), it at once prepares
batch ``i + 1`` — the copy from pinned memory, the views and the distortion — on a second stream,
where those memory-bound kernels can overlap the convolutions of step ``i``. The step's stream
waits for the prepared batch's event before using it, and every tensor of it is recorded on that
stream (``Tensor.record_stream``) so that the caching allocator never hands its memory back to
the side stream while the step still reads it.

Off a GPU there is no stream: the wrapper only prepares one batch ahead, which changes the order
in which work is done, not its result (the tests check that the losses are identical).

The caller decides, per batch, whether another one will be consumed (``ahead``): the engine never
prepares a batch past the end of an epoch, so the data order and the per-epoch seeding stay exactly
those of a run without prefetching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["Prefetcher", "side_stream", "tensors_in"]


def side_stream(device: torch.device | str) -> torch.cuda.Stream | None:
    """A new CUDA stream on ``device``, or None off CUDA."""
    device = torch.device(device)
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def tensors_in(item: Any) -> list[torch.Tensor]:
    """Every tensor inside ``item`` (nested mappings, tuples and lists), in order."""
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, Mapping):
        values = item.values()
    elif isinstance(item, (tuple, list)):
        values = item
    else:
        return []
    return [t for value in values for t in tensors_in(value)]


class Prefetcher(Iterator):
    """Iterator over ``prepare(raw, ahead)`` of ``source``'s batches, one batch ahead.

    Args:
        source: the raw batch iterator (e.g. ``iter(data_loader)``); also reachable as ``.source``,
            e.g. to skip batches before the first one is prepared.
        prepare: ``prepare(raw, ahead)`` turns a raw batch into what the step consumes; ``ahead`` is
            True when it runs one batch early (while the previous step is queued).
        ahead: ``ahead()`` is asked each time a batch is handed out: whether another batch will be
            consumed after it, so that preparing one now is not wasted (nor reorders anything).
        stream: the side CUDA stream the preparation runs on (e.g. ``side_stream(device)``, made once
            per run: the engine makes a new iterator every epoch); None: the current stream (CPU).
    """

    def __init__(self, source: Iterator, prepare: Callable[[Any, bool], Any], ahead: Callable[[], bool],
                 stream: torch.cuda.Stream | None = None) -> None:
        self.source, self.prepare, self.ahead, self.stream = source, prepare, ahead, stream
        self._pending: tuple[Any, Any] | None = None  # (prepared batch, its CUDA event)
        self._exhausted = False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._pending is None:
            item, event = self._prepare(self._next_raw(), ahead=False)
        else:
            (item, event), self._pending = self._pending, None
        self._hand_over(item, event)
        if self.ahead():
            try:
                self._pending = self._prepare(self._next_raw(), ahead=True)
            except StopIteration:
                pass  # raised again (and only then seen by the engine) at the next call
        return item

    def _next_raw(self) -> Any:
        if self._exhausted:
            raise StopIteration
        try:
            return next(self.source)
        except StopIteration:
            self._exhausted = True
            raise

    def _prepare(self, raw: Any, ahead: bool) -> tuple[Any, Any]:
        if self.stream is None:
            return self.prepare(raw, ahead), None
        with torch.cuda.stream(self.stream):
            item = self.prepare(raw, ahead)
            event = torch.cuda.Event()
            event.record(self.stream)
        return item, event

    def _hand_over(self, item: Any, event: Any) -> None:
        """Make the consumer's (current) stream wait for ``item`` and own its memory."""
        if event is None:
            return
        consumer = torch.cuda.current_stream(self.stream.device)
        consumer.wait_event(event)
        for tensor in tensors_in(item):
            if tensor.device.type == "cuda":
                tensor.record_stream(consumer)
