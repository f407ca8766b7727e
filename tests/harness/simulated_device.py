"""A CPU stand-in for what only a GPU shows.

- ``SimulatedRuntime``: the CPU runtime with fences that log ``("record"|"wait"|"order", name)`` in order, and a
  health probe that can fail as a poisoned CUDA context does after a sticky error.
- ``SimulatedCuda``: the part of ``torch.cuda`` the handler calls (devices, the per-thread current device and
  current stream, streams, events, synchronize) over several simulated GPUs, installed with pytest's monkeypatch
  so that the handler's own CUDA code runs unchanged. Tensors stay on the CPU (``SimulatedCudaRuntime``); each
  stream has a timeline in wall-clock seconds: ``launch(seconds)`` queues work on the current stream, events
  complete when the work queued before them has, and host waits sleep until then. Every call is logged as an
  ``Op`` with the device it acted on and the calling thread's current device, so tests and measurements read
  which device each object was made or used on, where the host waited, and when each device was busy.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from handler.device import DeviceRuntime

Log = list[tuple]


class RecordingFence:
    def __init__(self, name: str, log: Log) -> None:
        self.name = name
        self.log = log

    def record(self) -> None:
        self.log.append(("record", self.name))

    def wait(self) -> None:
        self.log.append(("wait", self.name))

    def order_before_current(self) -> None:
        self.log.append(("order", self.name))


class SimulatedRuntime(DeviceRuntime):
    """The CPU runtime with logged fences; ``lost=True`` makes every health probe fail."""

    def __init__(self, log: Log | None = None, lost: bool = False) -> None:
        super().__init__(torch.device("cpu"))
        self.log: Log = [] if log is None else log
        self.lost = lost

    def fence(self, name: str) -> RecordingFence:
        return RecordingFence(name, self.log)

    def probe(self) -> None:
        self.log.append(("probe",))
        if self.lost:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated, sticky)")


def sticky_error() -> RuntimeError:
    return RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")


def out_of_memory() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


# --- Simulated CUDA ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str           # e.g. "event.record", "event.synchronize", "stream.wait_event", "launch", "host_alloc"
    device: int | None  # the device the call acted on
    current: int        # the calling thread's current device at the time
    thread: str
    stream: str = ""
    detail: dict = field(default_factory=dict)
    start: float = 0.0  # launches: when the work starts and ends on the device (seconds, perf_counter)
    end: float = 0.0


class SimulatedStream:
    def __init__(self, cuda: SimulatedCuda, device: int, name: str) -> None:
        self.cuda, self.device, self.name = cuda, device, name
        self.busy_until = 0.0

    def wait_event(self, event: SimulatedEvent) -> None:
        self.cuda.op("stream.wait_event", self.device, stream=self, event=event.id)
        self.busy_until = max(self.busy_until, event.done_at)

    def wait_stream(self, other: SimulatedStream) -> None:
        self.cuda.op("stream.wait_stream", self.device, stream=self, other=other.name)
        self.busy_until = max(self.busy_until, other.busy_until)

    def synchronize(self) -> None:
        self.cuda.op("stream.synchronize", self.device, stream=self)
        self.cuda.sleep_until(self.busy_until)

    def query(self) -> bool:
        return time.perf_counter() >= self.busy_until


class SimulatedEvent:
    def __init__(self, cuda: SimulatedCuda, blocking: bool) -> None:
        self.cuda, self.blocking = cuda, blocking
        self.id = next(cuda.ids)
        self.device: int | None = None  # bound by the first record, as a CUDA event is
        self.done_at = 0.0
        cuda.op("event.create", None, event=self.id, blocking=blocking)

    def record(self, stream: SimulatedStream | None = None) -> None:
        stream = stream or self.cuda.current_stream()
        if self.device is not None and self.device != stream.device:
            raise RuntimeError(f"Event device {self.device} does not match recording stream's device "
                               f"{stream.device} (simulated)")
        self.device = stream.device
        self.done_at = stream.busy_until
        self.cuda.op("event.record", stream.device, stream=stream, event=self.id, blocking=self.blocking)

    def synchronize(self) -> None:
        self.cuda.op("event.synchronize", self.device, event=self.id, blocking=self.blocking)
        self.cuda.sleep_until(self.done_at)

    def query(self) -> bool:
        return time.perf_counter() >= self.done_at


class SimulatedCuda:
    """``devices`` simulated GPUs; device ``current`` is every thread's current device until it sets another."""

    def __init__(self, devices: int = 2, current: int = 0) -> None:
        self.count = devices
        self.initial = current
        self.ids = itertools.count()
        self.log: list[Op] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self.default_streams = [SimulatedStream(self, index, f"default:{index}") for index in range(devices)]
        self.failures: dict[str, BaseException] = {}  # op kind -> error raised once by the next such call

    # torch.cuda's API ---------------------------------------------------------------------------------------------
    def current_device(self) -> int:
        return getattr(self._local, "device", self.initial)

    def set_device(self, device) -> None:
        index = self._index(device)
        self.op("set_device", index)
        self._local.device = index

    def device_count(self) -> int:
        return self.count

    @contextlib.contextmanager
    def device(self, device):
        previous = self.current_device()
        self._local.device = self._index(device)
        try:
            yield
        finally:
            self._local.device = previous

    def current_stream(self, device=None) -> SimulatedStream:
        index = self.current_device() if device is None else self._index(device)
        return self._streams().get(index, self.default_streams[index])

    def Stream(self, device=None, priority: int = 0) -> SimulatedStream:
        index = self.current_device() if device is None else self._index(device)
        stream = SimulatedStream(self, index, f"stream{next(self.ids)}:{index}")
        self.op("stream.create", index, stream=stream)
        return stream

    @contextlib.contextmanager
    def stream(self, stream: SimulatedStream):
        """As torch.cuda.stream: the stream's device becomes current, and the stream that device's current one."""
        previous_device, streams = self.current_device(), self._streams()
        previous_stream = streams.get(stream.device)
        self._local.device = stream.device
        streams[stream.device] = stream
        try:
            yield
        finally:
            if previous_stream is None:
                streams.pop(stream.device, None)
            else:
                streams[stream.device] = previous_stream
            self._local.device = previous_device

    def Event(self, enable_timing: bool = False, blocking: bool = False,
              interprocess: bool = False) -> SimulatedEvent:
        return SimulatedEvent(self, blocking)

    def synchronize(self, device=None) -> None:
        index = self.current_device() if device is None else self._index(device)
        self.op("device.synchronize", index)
        self.sleep_until(max([s.busy_until for s in self.default_streams if s.device == index]
                             + [op.end for op in self.log if op.kind == "launch" and op.device == index]))

    # the simulation -----------------------------------------------------------------------------------------------
    def install(self, monkeypatch) -> SimulatedCuda:
        for name in ("current_device", "set_device", "device_count", "device", "current_stream", "Stream", "stream",
                     "Event", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    def launch(self, seconds: float, what: str) -> None:
        """Queue ``seconds`` of device work on the current stream of the current device."""
        stream = self.current_stream()
        start = max(time.perf_counter(), stream.busy_until)
        stream.busy_until = start + seconds
        self.op("launch", stream.device, stream=stream, start=start, end=stream.busy_until, what=what)

    def op(self, kind: str, device: int | None, stream: SimulatedStream | None = None, start: float = 0.0,
           end: float = 0.0, **detail) -> None:
        with self._lock:
            self.log.append(Op(kind, device, self.current_device(), threading.current_thread().name,
                               stream.name if stream else "", detail, start, end))
        error = self.failures.pop(kind, None)
        if error is not None:
            raise error

    def sleep_until(self, moment: float) -> None:
        remaining = moment - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def ops(self, *kinds: str) -> list[Op]:
        return [op for op in self.log if op.kind in kinds]

    def _streams(self) -> dict[int, SimulatedStream]:
        if not hasattr(self._local, "streams"):
            self._local.streams = {}
        return self._local.streams

    def _index(self, device) -> int:
        if isinstance(device, int):
            index = device
        elif isinstance(device, str):
            index = torch.device(device).index or 0
        elif device is None or device.index is None:
            index = self.current_device()
        else:
            index = device.index
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (simulated)")
        return index


class SimulatedCudaRuntime(DeviceRuntime):
    """The real runtime of ``cuda:index`` on a SimulatedCuda, with tensors on the CPU. Pinned host memory is
    logged (with the thread's current device, where a real allocation opens a context) instead of pinned."""

    def __init__(self, cuda: SimulatedCuda, index: int, pin_memory: bool = True, lost: bool = False) -> None:
        self.cuda = cuda
        self.lost = lost
        super().__init__(torch.device("cuda", index), pin_memory, placement=torch.device("cpu"))

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.cuda.op("host_alloc", None, pinned=self.pin_memory, shape=shape)
        return torch.empty(shape, dtype=dtype)

    def probe(self) -> None:
        self.cuda.op("probe", self.device.index)
        if self.lost:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated, sticky)")


class TimedModel(torch.nn.Module):
    """A real model whose forward also queues ``base + per_image * batch`` seconds on the simulated device."""

    def __init__(self, model: torch.nn.Module, cuda: SimulatedCuda, base: float, per_image: float) -> None:
        super().__init__()
        self.model, self.cuda, self.base, self.per_image = model, cuda, base, per_image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.cuda.launch(self.base + self.per_image * images.shape[0], f"model[{images.shape[0]}]")
        return self.model(images)
