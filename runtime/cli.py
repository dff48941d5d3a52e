"""Command line: `codellama-rt generate | infill | chat | quantize | info | mask | bench` (see ../shared/docs/API.md).

Bad arguments or bad input print one line on stderr and exit with status 2; an internal error prints
one line saying how to report it and exits with status 1 (`--debug`, or CODELLAMA_RT_DEBUG=1, shows
the traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import CheckpointError, MissingExtraError

PROG = "codellama-rt"
# bad arguments or input: one line, exit 2 (FloatingPointError: the model's numerics overflow;
# MemoryError: the KV cache or weights do not fit what was asked for; MissingExtraError: an option
# needs an optional extra, e.g. mask --png needs matplotlib)
_INPUT_ERRORS = (CheckpointError, ValueError, OSError, FloatingPointError, MemoryError, MissingExtraError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (HF or Meta layout) or a hub id in the "
                   "local HF cache; default: the embedded default model")
    p.add_argument("--backend", default="auto", help="auto | reference | triton")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--quantize", default=None, help="nf4 | int4")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128, dividing the "
                   "model's widths (default: the largest that does)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    add_kernel_flags(p)


def add_kernel_flags(p: argparse.ArgumentParser) -> None:
    """--experiments / --no-pdl: the triton backend's KernelOptions (`kernel_options`); unset, they take
    CODELLAMA_RT_EXPERIMENTS / CODELLAMA_RT_PDL."""
    p.add_argument("--experiments", type=_experiment_names, default=None, metavar="NAMES",
                   help="comma-separated kernel paths not yet the default (kernels/options.py lists them; "
                   "default: $CODELLAMA_RT_EXPERIMENTS, else none)")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None, help="programmatic dependent "
                   "launch on sm_90+ GPUs (default: on unless CODELLAMA_RT_PDL=0)")


def _experiment_names(text: str) -> frozenset:
    from .kernels.options import KernelOptions, parse_experiments

    try:
        return KernelOptions(parse_experiments(text)).experiments
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kernel_options(a):
    """The KernelOptions of `add_kernel_flags`' flags; the environment (`KernelOptions.from_env`, read here
    once) fills in those not given."""
    from .kernels.options import KernelOptions

    if a.experiments is not None and a.pdl is not None:
        return KernelOptions(a.experiments, a.pdl)
    env = KernelOptions.from_env()
    return KernelOptions(env.experiments if a.experiments is None else a.experiments,
                         env.pdl if a.pdl is None else a.pdl)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="CodeLlama inference runtime")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    debug = _Parser(add_help=False)  # --debug also after the command (SUPPRESS keeps the top level's value)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)

    g = sub.add_parser("generate", parents=[debug], help="stream a completion of PROMPT to stdout")
    _add_model_flags(g)
    _add_sampling_flags(g)
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")

    i = sub.add_parser("infill", parents=[debug], help="print the middle between a prefix and a suffix")
    _add_model_flags(i)
    _add_sampling_flags(i)
    i.add_argument("--prefix", default=None)
    i.add_argument("--suffix", default=None)
    i.add_argument("--file", default=None, help="a file containing one <FILL_ME> marker")
    i.add_argument("--suffix-first", action="store_true", help="SPM prompt order (suffix before prefix)")

    c = sub.add_parser("chat", parents=[debug], help="interactive Instruct chat on stdin/stdout")
    _add_model_flags(c)
    _add_sampling_flags(c)
    c.add_argument("--system", default=None, help="system prompt")

    k = sub.add_parser("mask", parents=[debug],
                       help="show which prompt token may attend to which (infill segments marked)")
    k.add_argument("--model", default=None, help="model directory whose tokenizer to use")
    k.add_argument("--tokenizer", default=None, help="a tokenizer.model file (instead of --model)")
    k.add_argument("--suffix-first", action="store_true", help="SPM layout for a <FILL_ME> prompt")
    k.add_argument("--max-tokens", type=int, default=48, help="rows/columns shown in the terminal")
    k.add_argument("--png", default=None, help="also write the mask as a PNG picture here")
    k.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    k.add_argument("prompt", help="prompt text; one <FILL_ME> shows the infill prompt's segments")

    q = sub.add_parser("quantize", parents=[debug],
                       help="write a 4-bit checkpoint (nf4 or int4) that load() reads back")
    q.add_argument("--model", default=None, help="model directory (HF or Meta layout) or a hub id in the local HF cache")
    q.add_argument("--method", required=True, choices=("nf4", "int4"))
    q.add_argument("--group-size", type=int, default=None, help="int4: input columns per scale/zero (32, 64, "
                   "128; default: the largest dividing the model's widths)")
    q.add_argument("--quantize-head", action="store_true", help="quantize the lm_head too (default: kept dense)")
    q.add_argument("--out", required=True, help="output directory (new or empty)")
    q.add_argument("--dtype", default=None, help="dtype of the dense tensors and of what the weights dequantize "
                   "to (default: bf16 on CUDA, fp32 on CPU)")
    q.add_argument("--device", default=None, help="where to quantize: cpu | cuda | cuda:N (default: cuda when available)")

    b = sub.add_parser("bench", parents=[debug], help="benchmark report: decode tokens/s vs the bandwidth bound, "
                       "TTFT, memory, peers, kernels (CPU: a CI-sized subset)")
    from .bench import add_arguments

    add_arguments(b)

    n = sub.add_parser("info", parents=[debug], help="config, parameter count, weight and KV-cache memory")
    n.add_argument("--model", default=None, help="model directory, hub id, or a preset name such as CodeLlama-7b")
    n.add_argument("--dtype", default=None)
    n.add_argument("--max-batch-size", type=int, default=1)
    n.add_argument("--max-seq-len", type=int, default=None)
    n.add_argument("--quantize", default=None, choices=("nf4", "int4"),
                   help="also show the weight memory once quantized (nf4 | int4)")
    n.add_argument("--group-size", type=int, default=None, help="int4 group size for --quantize int4 "
                   "(default: the largest of 128, 64, 32 dividing the model's widths)")
    n.add_argument("--quantize-head", action="store_true", help="count the lm_head as quantized too")
    return parser


def _sampling(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)


def _load(a):
    from .api import load_model

    if a.group_size is not None and a.quantize != "int4":
        raise ValueError("--group-size applies to --quantize int4 only")
    return load_model(a.model, backend=a.backend, dtype=a.dtype, device=a.device, quantize=a.quantize,
                      group_size=a.group_size, max_seq_len=a.max_seq_len, kernel_options=kernel_options(a))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(a) -> None:
    from .sampling import SamplingParams

    SamplingParams(**_sampling(a))  # reject bad flags before loading weights
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    model = _load(a)
    for piece in model.stream(prompt, **_sampling(a)):
        _write(piece)
    _write("\n")


def cmd_infill(a) -> None:
    from .sampling import SamplingParams
    from .tokenizer import split_fill

    SamplingParams(**_sampling(a))
    if a.file is not None:
        if a.prefix is not None or a.suffix is not None:
            raise ValueError("give either --file or --prefix/--suffix, not both")
        try:
            text = Path(a.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--file {a.file}: cannot read: {e}") from None
        try:
            prefix, suffix = split_fill(text)
        except ValueError as e:
            raise ValueError(f"--file {a.file}: {e}") from None
    elif a.prefix is None or a.suffix is None:
        raise ValueError("infill needs --prefix and --suffix (or --file with a <FILL_ME> marker)")
    else:
        prefix, suffix = a.prefix, a.suffix
    model = _load(a)
    _write(model.infill(prefix, suffix, suffix_first=a.suffix_first, **_sampling(a)).text + "\n")


def cmd_chat(a) -> None:
    from .sampling import SamplingParams
    from .tokenizer import CHAT_TAGS

    params = SamplingParams(**_sampling(a))
    model = _load(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    if system:
        try:
            model.tokenizer.encode_chat([*system, {"role": "user", "content": "."}])
        except ValueError as e:
            raise ValueError(f"--system: {e}") from None
    turns: list[dict] = []  # user/assistant pairs, oldest first
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            _write("> ")
        line = _read_line()
        if line is None:
            break
        if not line.strip():
            continue
        # a bad line is reported and skipped; the conversation goes on
        try:
            user = {"role": "user", "content": line}
            dropped = _fit_history(model, system, turns, user, params.max_new_tokens)
        except ValueError as e:
            _warn(f"{e}; message ignored")
            continue
        if dropped:
            _warn(f"dropped the {dropped} oldest turn(s) to fit the context ({model.max_seq_len} tokens)")
        reply = ""
        for piece in model.stream_chat([*system, *turns, user], **_sampling(a)):
            reply += piece
            _write(piece)
        _write("\n")
        # the format refuses its own tags in any message: a reply that wrote one is kept without it
        for tag in CHAT_TAGS:
            reply = reply.replace(tag, "")
        turns += [user, {"role": "assistant", "content": reply}]


def _read_line():
    """One line of stdin without its newline; None at the end; "" (and a warning) for invalid UTF-8."""
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.readline() if stream is not None else sys.stdin.readline()
    if not raw:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _warn(f"line is not valid UTF-8 (byte {raw[e.start]:#04x} at {e.start}); message ignored")
            return ""
    return raw.rstrip("\r\n")


def _fit_history(model, system: list, turns: list, user: dict, max_new_tokens: int) -> int:
    """Drop the oldest user/assistant pairs from `turns` (in place) until the prompt leaves room for
    the reply (max_new_tokens, or at least a quarter of the context); returns how many turns went.
    A message that cannot fit even alone raises ValueError."""
    context = model.max_seq_len
    room = min(max_new_tokens, context // 4)
    dropped = 0
    while True:
        n = len(model.tokenizer.encode_chat([*system, *turns, user]))
        if n + room <= context or (not turns and n < context):
            return dropped
        if not turns:
            raise ValueError(f"message is {n} tokens with the system prompt; the context is {context}")
        del turns[:2]
        dropped += 2


def _warn(text: str) -> None:
    print(f"{PROG}: {' '.join(text.split())}", file=sys.stderr, flush=True)


def cmd_mask(a) -> None:
    from .mask_view import prompt_segments, render_text, write_png
    from .tokenizer import Tokenizer

    if a.png:
        from .plotting import require

        require("--png")  # before any work: without matplotlib say how to get it
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens={a.max_tokens} is invalid: expected >= 1")
    if a.tokenizer is not None:
        tok = Tokenizer.from_file(a.tokenizer)
    else:
        from .api import default_model_path
        from .checkpoint import resolve_path

        tok = Tokenizer.from_pretrained(resolve_path(a.model if a.model is not None else default_model_path()))
    ids, labels = prompt_segments(tok, a.prompt, suffix_first=a.suffix_first)
    color = a.color == "always" or (a.color == "auto" and sys.stdout.isatty())
    print(render_text(tok, ids, labels, color=color, max_tokens=a.max_tokens))
    if a.png:
        print(f"wrote {write_png(a.png, labels)}")


def cmd_quantize(a) -> None:
    from .api import default_model_path, load_model, resolve_group_size
    from .quant_checkpoint import save_quantized

    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty directory")
    model = load_model(a.model, dtype=a.dtype, device=a.device, quantize=a.method, group_size=a.group_size,
                       quantize_head=a.quantize_head)
    group_size = resolve_group_size(a.group_size, a.method, model.args)  # what load_model chose
    save_quantized(model, out, method=a.method, group_size=group_size, quantize_head=a.quantize_head,
                   source_dir=model.path or default_model_path())
    from .quant import weight_bytes

    print(f"wrote {out} ({a.method}, weights {weight_bytes(model.module) / 2 ** 30:.2f} GiB)")


def cmd_info(a) -> None:
    import torch

    from .api import check_seq_len, parse_dtype, resolve_group_size
    from .checkpoint import (checkpoint_quantization, detect_layout, fill_vocab_size, open_source, read_args,
                             resolve_path)
    from .config import PRESETS, ModelArgs
    from .quant import model_weight_bytes

    dtype = parse_dtype(a.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if a.group_size is not None and a.group_size < 1:
        raise ValueError(f"--group-size={a.group_size} is invalid: expected >= 1")
    method, group_size, head, quantization = a.quantize, a.group_size, a.quantize_head, None
    if a.model in PRESETS:
        args, where, files = ModelArgs.from_preset(a.model), f"preset {a.model}", None
    else:
        from .api import default_model_path

        directory = resolve_path(a.model if a.model is not None else default_model_path())
        layout = detect_layout(directory)
        args, where = read_args(directory, layout), f"{directory} ({layout} layout)"
        if args.vocab_size <= 0:  # Meta's -1: read the embedding's shape, as load() does
            fill_vocab_size(args, open_source(directory, layout), layout)
        files = sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".pth", ".bin"))
        quantization = checkpoint_quantization(directory, layout)
        if quantization is not None and method is None:  # show the checkpoint's own
            method, head = quantization.method, quantization.quantize_head
            group_size = quantization.group_size
    if a.max_batch_size < 1:
        raise ValueError(f"--max-batch-size={a.max_batch_size} is invalid: expected >= 1")
    if a.max_seq_len is not None and a.max_seq_len < 1:
        raise ValueError(f"--max-seq-len={a.max_seq_len} is invalid: max_seq_len must be >= 1")
    seq = check_seq_len(a.max_seq_len, args)
    if method is not None:
        group_size = resolve_group_size(group_size, method, args)
    elem = torch.empty((), dtype=dtype).element_size()
    n = args.param_count()
    gib = 2 ** 30
    rows = [
        ("model", where),
        ("dim / layers / heads / kv heads / head dim", f"{args.dim} / {args.n_layers} / {args.n_heads} / "
                                                      f"{args.n_kv_heads} / {args.head_dim}"),
        ("ffn dim / vocab", f"{args.ffn_dim} / {args.vocab_size}"),
        ("rope theta / scaling", f"{args.rope_theta:g} / {args.rope_scaling or 'none'}"),
        ("context (max_seq_len)", f"{args.max_seq_len}"),
        ("norm eps / bos / eos", f"{args.norm_eps:g} / {args.bos_id} / {list(args.eos_ids)}"),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)"),
        (f"weight memory ({str(dtype).replace('torch.', '')})", f"{n * elem / gib:.2f} GiB"),
        (f"KV cache ({a.max_batch_size} x {seq} tokens)",
         f"{args.kv_cache_bytes(a.max_batch_size, seq, elem) / gib:.2f} GiB "
         f"({args.kv_cache_bytes(1, 1, elem) / 1024:.0f} KiB per token)"),
    ]
    if quantization is not None:
        rows.insert(1, ("quantization", quantization.describe()))
    if method is not None:
        qbytes = model_weight_bytes(args, bytes_per_elem=elem, method=method, group_size=group_size,
                                    quantize_head=head)
        label = (f"{method}{f' g{group_size}' if method == 'int4' else ''}{', head' if head else ''}"
                 f" + {str(dtype).replace('torch.', '')}")
        rows.insert(next(i for i, (k, _) in enumerate(rows) if k.startswith("weight memory")) + 1,
                    (f"weight memory ({label})", f"{qbytes / gib:.2f} GiB ({qbytes / 1e9:.2f} GB)"))
    if files is not None:
        rows.append(("checkpoint files", f"{files / gib:.2f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_bench(a) -> None:
    from .bench import parse_only
    from .bench.report import run

    run(a.report, quick=a.quick, only=parse_only(a.only), budget_s=a.budget_s, resources=not a.no_resources,
        kernel_options=kernel_options(a))


COMMANDS = {"generate": cmd_generate, "infill": cmd_infill, "chat": cmd_chat, "quantize": cmd_quantize,
            "info": cmd_info, "mask": cmd_mask, "bench": cmd_bench}


def main(argv=None) -> int:
    debug = os.environ.get("CODELLAMA_RT_DEBUG", "") not in ("", "0")
    try:
        a = build_parser().parse_args(argv)
        debug = debug or a.debug
        COMMANDS[a.command](a)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `| head` (an OSError, so before that clause): stop quietly
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except _INPUT_ERRORS as e:
        if debug:
            raise
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours, not bad input
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {' '.join(str(e).split())} (a bug in codellama-rt: "
              "please report it with the output of the same command run with --debug)", file=sys.stderr)
        return 1
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into the closed pipe stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured by a test)
        pass


if __name__ == "__main__":
    sys.exit(main())
