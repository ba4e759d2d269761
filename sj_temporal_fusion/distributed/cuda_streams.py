"""The device side of ``NcclTransport`` on a GPU: PyTorch's streams and events on one CUDA device
(tests/_nccl_emulation.py's ``HostStreams`` has the same methods on the CPU), and ``indexed``,
which every place that selects a device goes through."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def indexed(device) -> torch.device:
    """``device`` as a ``torch.device`` with an index for CUDA: ``torch.device('cuda')`` becomes
    ``cuda:<current device>``. ``torch.cuda.set_device`` refuses a CUDA device without an index
    (ValueError), and in another thread 'the current device' is GPU 0, so the index is fixed here,
    once, on the thread that named the device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class CudaStreams:
    """PyTorch's current stream and one side stream on ``device``, and events on them."""

    host_follows_stream = False  # the GPU orders work on a stream; the host need not wait

    def __init__(self, device: torch.device):
        self.device = indexed(device)
        self._side: Optional[torch.cuda.Stream] = None

    def set_device(self) -> None:
        torch.cuda.set_device(self.device)  # per thread: without it a thread works on GPU 0

    def current(self):
        return torch.cuda.current_stream(self.device)

    def side(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    @staticmethod
    def handle(stream) -> int:
        return stream.cuda_stream

    @staticmethod
    def order(first, then) -> None:
        then.wait_stream(first)

    @staticmethod
    def keep(tensor: Tensor, stream) -> None:
        tensor.record_stream(stream)  # the allocator keeps it until the stream's work is done

    @staticmethod
    def record(stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    @staticmethod
    def done(event) -> bool:
        return event.query()
