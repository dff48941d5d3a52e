"""`codellama-rt serve` as a child process, for the load generator and the tests: started on a loopback
host with --port 0, its stderr read on a thread (the last STDERR_LINES kept; a full pipe never blocks it),
and its URL taken from the line it prints once it listens ("codellama-rt: serving NAME on http://HOST:PORT")."""
from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Optional

READY = " on http://"  # in the ready line, before the URL
STDERR_LINES = 500


class ServeProcess:
    """`python -m codellama_rt serve --host HOST --port 0 *args` (env: the child's environment); a context
    manager that kills it on exit."""

    def __init__(self, args=(), *, env: Optional[dict] = None, host: str = "127.0.0.1"):
        self.cmd = [sys.executable, "-m", "codellama_rt", "serve", "--host", host, "--port", "0", *args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.url: Optional[str] = None  # once `wait_ready` has seen it
        self.lines: queue.Queue = queue.Queue()
        self._stderr: deque = deque(maxlen=STDERR_LINES)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    @property
    def stderr(self) -> str:
        """The last STDERR_LINES lines the child wrote to stderr so far."""
        return "".join(self._stderr)

    def wait_ready(self, timeout_s: float) -> str:
        """The URL the child serves on, once its ready line comes; if the child exits or `timeout_s` passes
        first it is killed and a RuntimeError carries the end of its stderr."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if READY in line:
                self.url = line.strip().rsplit(" on ", 1)[1]
                return self.url
        self.stop()
        raise RuntimeError(f"the server did not start within {timeout_s:.0f} s ({' '.join(self.cmd)}): "
                           f"{self.stderr[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
