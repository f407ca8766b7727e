"""Background client traffic for the server tests: bounded in time, every outcome recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import requests


def scale_out_and_back(server, model: str, workers: int, hold_s: float, traffic: Traffic) -> tuple[float, float]:
    """With ``traffic`` flowing: scale ``model`` to ``workers``, hold, scale back to 1 (each step checked), and
    wait for requests answered after it; returns the scale-down window.

    TorchServe 0.12 stops a busy worker at once on scale-down and drops the batch it is running
    (pytorch/serve issue #1101, open): requests in flight in that window may be lost, no others.
    """
    traffic.wait_for_outcomes(2)
    server.scale(model, workers)
    assert server.ready_workers(model) == workers
    time.sleep(hold_s)  # serving on several workers for a while: the point of the exercise
    scale_down_started = time.monotonic()
    server.scale(model, 1)
    scale_down_done = time.monotonic()
    assert server.ready_workers(model) == 1
    traffic.wait_for_outcomes(2, started_after=scale_down_done)
    return scale_down_started, scale_down_done


class Traffic:
    """``with Traffic(send, clients=3) as traffic: ...`` runs ``send()`` in a loop on each client thread.

    ``send`` returns an HTTP status; a connection error counts as -1. Outcomes are
    (started, finished, status) in monotonic seconds.
    """

    def __init__(self, send: Callable[[], int], clients: int, max_seconds: float = 300) -> None:
        self.send = send
        self.max_seconds = max_seconds
        self.outcomes: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = self.send()
            except requests.RequestException:
                status = -1
            self.outcomes.append((started, time.monotonic(), status))

    def wait_for_outcomes(self, count: int, started_after: float = 0.0, timeout: float = 120) -> None:
        """Block until ``count`` requests that started after ``started_after`` have been answered."""
        deadline = time.monotonic() + timeout
        while sum(outcome[0] > started_after for outcome in self.outcomes) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} requests answered within {timeout} s")
            time.sleep(0.1)

    @property
    def failures(self) -> list[tuple[float, float, int]]:
        return [outcome for outcome in self.outcomes if outcome[2] != 200]

    def failures_in_flight_during(self, start: float, end: float) -> list[tuple[float, float, int]]:
        """Failed requests that were already running at some moment between start and end."""
        return [f for f in self.failures if f[0] <= end and f[1] >= start]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
