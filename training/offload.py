"""``offload_unet``: the frozen UNet's layer weights wait on the CPU during training and stream to the device one
layer at a time, the next layer's copy overlapping the current layer's compute.

The layers are the ones :mod:`.fp8` takes out of their modules (frozen Linear/Conv weights; with ``fp8_base`` the
float8 copies stream, 1 byte a value). :class:`Streamer` is their weight source: :meth:`Streamer.fetch` returns a
layer's weight on the device, and starts copying the layer that comes next, so at most :data:`.memory.STREAM_WINDOW`
(2) layers' weights are on the device at once (the one computing and the one arriving); the estimate counts that.

What comes next is learned from the first pass of each kind: the order the layers run in the forward pass, and the
order the backward pass asks for them again (the input's gradient of each layer that needs one, in reverse; a
layer whose input needs no gradient is not asked). A prefetched copy that is not the one asked for is dropped.

On CUDA the CPU copies are pinned (page-locked, so a copy runs asynchronously) and the copies run on a side stream;
the compute stream waits for a copy's event before using it, and the tensor is recorded on the compute stream so
the allocator does not reuse it early. On the CPU the weights are where they are already: a "copy" is the tensor
itself, but the schedule (and its counters, which the tests read) runs all the same.
"""

from __future__ import annotations

from typing import Any

import torch


class Streamer:
    """The weight source of streamed layers (module doc)."""

    def __init__(self, layers: list[Any], device: torch.device) -> None:
        self.layers, self.device = layers, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.orders: dict[bool, list[int]] = {False: [], True: []}  # forward, backward: layer indices in call order
        self.position: dict[bool, dict[int, int]] = {False: {}, True: {}}
        self.pending: tuple[int, bool, torch.Tensor, Any] | None = None  # (index, backward, tensor, event)
        self.copies = 0       # copies started (on the CPU: the schedule's moves, no bytes)
        self.prefetched = 0   # fetches a prefetch had started already
        for i, layer in enumerate(layers):
            layer.index = i
            layer.fetch = self.fetch
            if self.cuda:
                layer.pin()

    def _copy(self, i: int) -> tuple[torch.Tensor, Any]:
        self.copies += 1
        src = self.layers[i].stored()
        if not self.cuda:
            return src.to(self.device), None
        with torch.cuda.stream(self.stream):
            t = src.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return t, event

    def fetch(self, layer: Any, backward: bool) -> torch.Tensor:
        """``layer``'s stored weight on the device; starts the copy of the layer expected next."""
        i = layer.index
        order, position = self.orders[backward], self.position[backward]
        if i not in position:  # the first pass of this kind: learn the order
            position[i] = len(order)
            order.append(i)
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == i and pending[1] == backward:
            t, event = pending[2], pending[3]
            self.prefetched += 1
        else:
            t, event = self._copy(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            t.record_stream(current)
        k = position[i] + 1
        if k < len(order):
            nxt = order[k]
            self.pending = (nxt, backward, *self._copy(nxt))
        return t

    def close(self) -> None:
        self.pending = None
        for layer in self.layers:
            layer.fetch = None
