"""`codellama-rt serve`: the OpenAI-compatible HTTP server (runtime/server) on uvicorn.

Prints one line on stderr once it accepts connections ("serving NAME on http://HOST:PORT"; with
`--port 0` the port the system picked) and serves until interrupted (SIGINT or SIGTERM). uvicorn runs on
a thread of its own; the engine's iterations run on the main thread, which loaded the model. Under
torchrun (tensor parallelism) rank 0 serves and the other ranks replay its schedule
(`codellama_rt.distributed.lockstep`).
"""
from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

from ..errors import MissingExtraError
from .common import PROG, add_model_flags, load, wants_tensor_parallel


def add_parser(sub, parents: list) -> None:
    s = sub.add_parser("serve", parents=parents, help="serve the model over HTTP (OpenAI-compatible API, "
                       "llama.cpp's /infill, Prometheus /metrics)")
    add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    s.add_argument("--max-batch-size", type=_positive, default=8, help="requests decoded at once: KV cache "
                   "slots (default: 8)")
    s.add_argument("--max-queue", type=_positive, default=None, help="requests waiting for a slot before "
                   "new ones get HTTP 429 (default: unbounded)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (all routes but /health)")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                   "--model directory's name, or codellama-rt-default)")
    s.set_defaults(run=run)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: a free port); a ValueError saying why it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer >= 1")
    return value


def run(a) -> None:
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        raise MissingExtraError(f"serve needs fastapi, uvicorn and prometheus_client ({e}); install them with "
                                "pip install 'codellama-rt[serve]'") from None
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port {a.port} is invalid: expected 0..65535")
    if a.api_key is not None and not a.api_key.strip():
        raise ValueError("--api-key is empty: give a key, or leave the flag out to serve without one")
    tensor_parallel = wants_tensor_parallel(a)
    sock = None if tensor_parallel else _listen(a.host, a.port)  # a busy port fails before the weights load
    model = load(a, max_batch_size=a.max_batch_size)
    tp = model.tensor_parallel
    if tp is not None:
        from ..distributed.lockstep import Lockstep, Plan

        lockstep = Lockstep(tp)
        if tp.rank != 0:  # rank 0 answers HTTP and schedules; this rank replays its steps
            model.engine.follow(lockstep)
            return
        try:
            sock = _listen(a.host, a.port)
        except BaseException:
            lockstep.send(Plan("stop"))
            raise
        model.engine.lockstep = lockstep
    model.engine.max_queue = a.max_queue
    name = a.served_model_name or (Path(a.model).name if a.model else "codellama-rt-default")
    app = create_app(model, served_model_name=name, api_key=a.api_key)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                print(f"{PROG}: serving {name} on {url}", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server, stop = Server(config), threading.Event()

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            stop.set()

    def on_signal(signum, frame) -> None:
        server.should_exit = True
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http = threading.Thread(target=serve_http, name="codellama-rt-http", daemon=True)
    http.start()
    # HTTP on that thread, the model's work on this one, which loaded it (see engine/driver.py: on a CPU,
    # a second thread's OpenMP team is several times slower per op)
    try:
        model.engine.run_forever(stop)
    finally:
        server.should_exit = True
    http.join(timeout=30)
    model.engine.cancel_all()  # what no response waits for any more (a loop thread mid-step at exit aborts)
    if not server.started:
        raise RuntimeError(f"the HTTP server on {url} did not start (see the messages above)")
