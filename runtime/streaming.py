"""Plumbing for overlapped stages: a cancel token, bounded channels that wake up on cancel, and
per-stage busy/wait clocks.

Every blocking call between stages goes through `Channel.put`/`Channel.get`, which return
(by raising `Cancelled`) as soon as the shared `CancelToken` is set, so cancelling a reply stops
each stage at its next hand-off: within one chunk of work, never after a timeout.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside a stage when its reply has been cancelled; the stage returns quietly."""


class CancelToken:
    """A one-way flag shared by the stages of one reply; `cancel()` wakes every waiting channel."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._channels: list[Channel] = []

    def cancel(self) -> None:
        self._event.set()
        with self._lock:
            channels = list(self._channels)
        for ch in channels:
            ch._wake()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds; True if cancelled meanwhile."""
        return self._event.wait(timeout)

    def _register(self, ch: "Channel") -> None:
        with self._lock:
            self._channels.append(ch)


class Channel(Generic[T]):
    """A bounded FIFO between two stages. `put` blocks while full and `get` while empty; both raise
    `Cancelled` once the token is cancelled. `clear()` drops what is queued (queued audio on barge-in)."""

    def __init__(self, maxsize: int, cancel: CancelToken, name: str = "") -> None:
        if maxsize < 1:
            raise ValueError(f"a channel needs room for at least one item, got maxsize={maxsize}")
        self.maxsize = maxsize
        self.name = name
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._cancel = cancel
        cancel._register(self)

    def put(self, item: T) -> float:
        """Enqueue; returns the seconds spent waiting for room."""
        t = time.perf_counter()
        with self._cond:
            while len(self._items) >= self.maxsize:
                self._cancel.check()
                self._cond.wait()
            self._cancel.check()
            self._items.append(item)
            self._cond.notify_all()
        return time.perf_counter() - t

    def get(self, timeout: float | None = None) -> tuple[T, float]:
        """Dequeue; returns (item, seconds waited). With a timeout, raises TimeoutError when it passes."""
        t = time.perf_counter()
        deadline = None if timeout is None else t + timeout
        with self._cond:
            while not self._items:
                self._cancel.check()
                if deadline is None:
                    self._cond.wait()
                else:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise TimeoutError(f"nothing arrived on channel {self.name!r} within {timeout} s")
                    self._cond.wait(left)
            self._cancel.check()
            item = self._items.popleft()
            self._cond.notify_all()
        return item, time.perf_counter() - t

    def wait_drained(self, stop: Callable[[], bool], poll: float = 0.005) -> float:
        """Block until the consumer has taken everything queued or `stop()` holds (checked every
        `poll` s: it may change without touching this channel); returns the seconds waited."""
        t = time.perf_counter()
        with self._cond:
            while self._items and not stop():
                self._cancel.check()
                self._cond.wait(poll)
            self._cancel.check()
        return time.perf_counter() - t

    def clear(self) -> int:
        """Drop everything queued; returns how many items were dropped."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self._cond.notify_all()
        return n

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class StageClock:
    """Busy time (computing) and wait time (blocked on a channel) per stage, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.wait: dict[str, float] = defaultdict(float)
        self.spans: list[tuple[str, float, float]] = []  # (stage, start, end) in perf_counter seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            with self._lock:
                self.busy[name] += end - t
                self.calls[name] += 1
                self.spans.append((name, t, end))

    def waited(self, name: str, seconds: float) -> None:
        with self._lock:
            self.wait[name] += seconds
