"""A CPU stand-in for what only a GPU shows: fences whose use is logged in order, and a device that is lost.

The runtime is the real CPU runtime with two seams overridden: its fences log ``("record"|"wait", name)``
into a shared list, and its health probe can fail as a poisoned CUDA context does after a sticky error.
"""

from __future__ import annotations

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
