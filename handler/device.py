"""What the engine needs from its device besides tensors: fences that order host work after queued copies,
pinned staging buffers reused only when their copy has completed, results copied back without a
device-wide sync, and a verdict on whether a failure left the device usable.

On the CPU every copy is complete when it returns, so fences do nothing and nothing is pinned; the same
calls run, which is what lets the CPU tests check the ordering with recording fences.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import torch

logger = logging.getLogger(__name__)


DEVICE_LOST_EXIT_CODE = 70  # EX_SOFTWARE; TorchServe restarts a worker whatever its exit code


class DeviceLost(RuntimeError):
    """The device context is unusable (a sticky CUDA error): only a new process can use the GPU again."""


def end_process(exit_code: int = DEVICE_LOST_EXIT_CODE) -> NoReturn:
    """End this process at once, after flushing the logs.

    ``os._exit``, not ``sys.exit``: no exception handler can swallow it, and no clean-up runs against a
    poisoned CUDA context (which can hang at interpreter shutdown).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)


class Fence(Protocol):
    def record(self) -> None:
        """Mark the work queued so far on the device's current stream (the decoder's own inside its scope)."""

    def wait(self) -> None:
        """Block the host until the work marked by the last ``record`` has run (at once if never recorded)."""

    def order_before_current(self) -> None:
        """Make the device's current stream wait, on the device, for the work marked by the last ``record``."""


class _NoFence:
    def record(self) -> None:
        pass

    def wait(self) -> None:
        pass

    def order_before_current(self) -> None:
        pass


class _CudaFence:
    """A CUDA event recorded on *its device's* current stream, never the thread's current device's: on a worker
    given ``cuda:1`` an event recorded on idle ``cuda:0`` would complete at once and order nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # blocking: a host wait sleeps until the event completes instead of spinning a core the decode pool needs.
        self._event = torch.cuda.Event(blocking=True)

    def record(self) -> None:
        self._event.record(torch.cuda.current_stream(self.device))

    def wait(self) -> None:
        self._event.synchronize()

    def order_before_current(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self._event)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError)


class DeviceRuntime:
    """Fences, pinning, streams and the health verdict for one device, and the one place that names it to CUDA.

    On CUDA the device is made the process's current device at construction (TorchServe gives each worker a
    ``gpu_id`` but sets no current device, and pinned memory, cuDNN/cuBLAS handles and nvJPEG use the current
    one), and ``scope()`` guards it again around every call. ``placement`` is where tensors live: the device
    itself, except under tests/harness/simulated_device.py, which runs the CUDA branches with tensors on the CPU.
    """

    def __init__(self, device: torch.device, pin_memory: bool = True, placement: torch.device | None = None) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.placement = placement or device
        self.pin_memory = pin_memory and self.is_cuda
        if self.is_cuda:
            torch.cuda.set_device(device)
            if not pin_memory:
                logger.warning("pin_memory is false on %s: every copy of results back to the host waits for the "
                               "model, so chunk k+1 is not queued while chunk k runs, and every upload is synchronous. "
                               "Set pin_memory: true unless pinned host memory is scarce.", device)

    def scope(self) -> contextlib.AbstractContextManager:
        """Make this runtime's device current for the enclosed work (restored afterwards)."""
        return torch.cuda.device(self.device) if self.is_cuda else contextlib.nullcontext()

    def fence(self, name: str) -> Fence:
        return _CudaFence(self.device) if self.is_cuda else _NoFence()

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for transfers: pinned on CUDA (so that non_blocking copies are asynchronous)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)

    def new_stream(self) -> torch.cuda.Stream | None:
        """A stream of this device's own (None on the CPU)."""
        return torch.cuda.Stream(self.device) if self.is_cuda else None

    def on_stream(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def keep_for_current_stream(self, tensors: Sequence[torch.Tensor]) -> None:
        """Tell the caching allocator that the current stream uses ``tensors`` made on another stream, so their
        memory is not reused before that stream has read them."""
        if self.is_cuda:
            current = torch.cuda.current_stream(self.device)
            for tensor in tensors:
                if tensor.is_cuda:
                    tensor.record_stream(current)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def probe(self) -> None:
        """Raise if the device can no longer run work. After a sticky CUDA error (illegal address, ECC,
        launch failure, device-side assert) every later CUDA call reports it again, so a synchronize and
        one tiny kernel are a reliable test; after a contained error they succeed."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.placement).add_(1).item()

    def check_after_failure(self, error: BaseException) -> None:
        """Return if ``error`` may be contained to the work that raised it; raise DeviceLost if not.

        Out-of-memory is contained without a probe (nothing is wrong with the context). Anything else is
        judged by probing the device, not by its message or code: a list of sticky error codes would go
        stale, while a poisoned context fails every probe.
        """
        if is_out_of_memory(error):
            return
        try:
            self.probe()
        except Exception as probe_error:
            raise DeviceLost(f"the device failed ({error!r}) and is unusable since ({probe_error!r})") from error

    def to_host(self, outputs: Mapping[str, torch.Tensor], fence_name: str) -> PendingHost:
        """Start copying each output to pinned host memory (non_blocking) and fence the copies.

        The fence is recorded before any later work is queued, so waiting on it never waits for that work.
        """
        host = dict(outputs)  # on the CPU they are host tensors already
        if self.is_cuda:
            for name, tensor in outputs.items():
                host[name] = self.host_empty(tuple(tensor.shape), tensor.dtype)
                host[name].copy_(tensor, non_blocking=True)
        fence = self.fence(fence_name)
        fence.record()
        return PendingHost(host, fence)


@dataclass
class PendingHost:
    """Device outputs on their way to host memory: ``lists()`` waits for them, and only for them."""

    tensors: dict[str, torch.Tensor]
    fence: Fence

    def lists(self) -> dict[str, list]:
        self.fence.wait()
        return {name: tensor.tolist() for name, tensor in self.tensors.items()}


class StagingBuffers:
    """uint8 host buffers (pinned on CUDA) used in turn. A non_blocking copy reads its buffer later than it
    is queued, so a buffer is handed out again only after the copy that last read it has completed."""

    def __init__(self, runtime: DeviceRuntime, count: int, shape: tuple[int, ...]) -> None:
        self._buffers = [runtime.host_empty(shape, torch.uint8) for _ in range(count)]
        self._fences = [runtime.fence(f"staging[{index}]") for index in range(count)]
        self._next = 0

    def take(self) -> tuple[int, torch.Tensor]:
        """The next buffer, safe to overwrite, and its index (for ``sent``)."""
        index = self._next
        self._next = (index + 1) % len(self._buffers)
        self._fences[index].wait()
        return index, self._buffers[index]

    def sent(self, index: int) -> None:
        """Call right after queuing the copy that reads buffer ``index``."""
        self._fences[index].record()
