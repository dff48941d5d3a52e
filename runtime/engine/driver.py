"""Who runs an engine's scheduler iterations, one thread at a time, and the queue of submitted requests.

The driver is a synchronous caller waiting in `next_event` (the library's generate/stream: its requests,
and every other one batched with them, run on its own thread), a thread in `run_forever` (the server's
main thread), or else a loop thread started for `background` submissions (asyncio callers), alive while
there is work. Keeping the model's work on the thread that loaded it matters on CPUs: a second thread's
OpenMP team hands work over far more slowly once the process has more OpenMP threads than cores (the
default model decoded 2.6x slower on a loop thread of its own on 2 cores).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable, Optional

POLL_S = 0.002  # how often a caller waiting while another thread drives checks whether to take over


class Driver:
    """`iterate(new)` runs one iteration given the requests submitted since the last one and returns
    False when there was nothing to do; `idle()` says whether the engine holds no request."""

    def __init__(self, iterate: Callable[[list], bool], idle: Callable[[], bool], name: str):
        self._iterate, self._idle, self._name = iterate, idle, name
        self._lock = threading.Lock()  # guards _incoming, _thread and _resident
        self._work = threading.Condition(self._lock)  # notified on submission (for run_forever)
        self._incoming: deque = deque()
        self._thread: Optional[threading.Thread] = None
        self._resident = 0  # threads in run_forever
        self._driving = threading.Lock()  # held by whoever runs an iteration

    def enqueue(self, items: list, *, background: bool, check: Callable[[int], None]) -> None:
        """Queue `items` after `check(queued)` (queued: items not yet taken by an iteration) raised nothing;
        with `background`, start a loop thread unless one runs or a thread is in run_forever."""
        with self._lock:
            check(len(self._incoming))
            self._incoming.extend(items)
            self._work.notify_all()
            if background and not self._resident and self._thread is None:
                self._start_thread()

    def queued(self) -> int:
        return len(self._incoming)

    def alive(self) -> bool:
        """A loop thread is running."""
        return self._thread is not None

    def next_event(self, events: queue.SimpleQueue):
        """The next event on `events` (a queue some request's sink puts to), running iterations on the
        calling thread while no other thread does."""
        while True:
            try:
                return events.get_nowait()
            except queue.Empty:
                pass
            if not self.drive(block=False):
                try:
                    return events.get(timeout=POLL_S)
                except queue.Empty:
                    pass

    def drive(self, block: bool = True) -> bool:
        """One iteration on the calling thread. False when there was nothing to do, or when another thread
        was running one and `block` is False."""
        if not self._driving.acquire(blocking=block):
            return False
        try:
            return self._iterate(self._take())
        finally:
            self._driving.release()

    def run_forever(self, stop: threading.Event, *, idle: Optional[Callable[[], None]] = None,
                    idle_s: float = 5.0) -> None:
        """Drive on this thread until `stop` is set, waiting for submissions when idle; `idle()` is called
        (holding the driver role) after each `idle_s` seconds without an iteration."""
        with self._lock:
            self._resident += 1
        last = time.monotonic()
        try:
            while not stop.is_set():
                if self.drive():
                    last = time.monotonic()
                    continue
                with self._lock:
                    if not self._incoming:
                        self._work.wait(timeout=0.1)
                if idle is not None and time.monotonic() - last >= idle_s:
                    with self._driving:
                        idle()
                    last = time.monotonic()
        finally:
            with self._lock:
                self._resident -= 1
                if not self._resident and self._thread is None and (self._incoming or not self._idle()):
                    self._start_thread()  # what is left runs on

    def pending(self) -> tuple:
        """The items submitted but not yet taken by an iteration."""
        with self._lock:
            return tuple(self._incoming)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the loop thread (if any) to run out of work; True once none runs."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            thread.join(timeout=min(left, 0.1))

    def driving(self):
        """The driver role, as a context manager (blocks until no other thread runs an iteration)."""
        return self._driving

    def _take(self) -> list:
        with self._lock:
            new = list(self._incoming)
            self._incoming.clear()
        return new

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        """The loop thread: iterations until there is no work, checked under both locks, so a submission
        either sees this thread alive or starts a new one."""
        try:
            while True:
                with self._driving:
                    with self._lock:
                        if not self._incoming and self._idle():
                            self._thread = None
                            return
                    self._iterate(self._take())
        except BaseException:  # (the engine fails its requests first) a later submission starts a new thread
            with self._lock:
                self._thread = None
            raise
