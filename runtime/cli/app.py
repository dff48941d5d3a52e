"""Command line: `codellama-rt generate | infill | chat | serve | quantize | info | mask | bench`
(see ../shared/docs/API.md; serving: docs/serving.md).

Bad arguments or bad input print one line on stderr and exit with status 2; an internal error prints
one line saying how to report it and exits with status 1 (`--debug`, or CODELLAMA_RT_DEBUG=1, shows
the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import CheckpointError, MissingExtraError
from . import bench, chat, export_lite, generate, info, infill, mask, quantize, serve
from .common import PROG, Parser, UsageError

# bad arguments or input: one line, exit 2 (FloatingPointError: the model's numerics overflow;
# MemoryError: the KV cache or weights do not fit what was asked for; MissingExtraError: an option
# needs an optional extra, e.g. mask --png needs matplotlib)
_INPUT_ERRORS = (CheckpointError, ValueError, OSError, FloatingPointError, MemoryError, MissingExtraError)
SUBCOMMANDS = (generate, infill, chat, serve, mask, quantize, export_lite, bench, info)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="CodeLlama inference runtime")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    debug = Parser(add_help=False)  # --debug also after the command (SUPPRESS keeps the top level's value)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", parser_class=Parser, required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub, [debug])
    return parser


def main(argv=None) -> int:
    debug = os.environ.get("CODELLAMA_RT_DEBUG", "") not in ("", "0")
    if sys.stdout is None:  # (started with stdout closed: nowhere to print what it makes)
        print(f"{PROG}: error: stdout is closed", file=sys.stderr)
        return 2
    try:
        a = build_parser().parse_args(argv)
        debug = debug or a.debug
        a.run(a)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `| head` (an OSError, so before that clause): stop quietly
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except _INPUT_ERRORS as e:
        if debug:  # where it was raised; still bad input, not a bug (exit 2)
            traceback.print_exc()
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours, not bad input ...
        if _environment_failure(e):  # ... unless the machine failed it: a disk, memory, another rank
            if debug:
                traceback.print_exc()
            print(f"{PROG}: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {' '.join(str(e).split())} (a bug in codellama-rt: "
              "please report it with the output of the same command run with --debug)", file=sys.stderr)
        return 1
    return 0


def _environment_failure(e: BaseException) -> bool:
    """A failure of the machine rather than of codellama-rt: writing a file (safetensors' I/O errors), memory,
    or a tensor-parallel rank that died or never came (torch.distributed's store and network errors)."""
    from ..errors import is_allocation_failure

    names = {"SafetensorError", "TensorParallelError", "DistStoreError", "DistNetworkError"}
    return any(t.__name__ in names for t in type(e).__mro__) or (isinstance(e, RuntimeError)
                                                                  and is_allocation_failure(e))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into the closed pipe stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured by a test)
        pass


if __name__ == "__main__":
    sys.exit(main())
