"""What the subcommands share: the parser class, model / kernel / sampling flags, loading the model, and
writing to stdout / stderr."""
from __future__ import annotations

import argparse
import os
import sys

PROG = "codellama-rt"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


class UsageError(Exception):
    pass


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (HF or Meta layout) or a hub id in the "
                   "local HF cache; default: the embedded default model")
    p.add_argument("--backend", default="auto",
                   help="auto | reference | cpu | triton (auto: triton on CUDA, cpu on a CPU)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--quantize", default=None, help="nf4 | int4 | int8")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128, dividing the "
                   "model's widths (default: the largest that does)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model's ops (default: one per "
                   "physical core)")
    p.add_argument("--tensor-parallel", action="store_true", help="this process is one rank of a tensor-parallel "
                   "group (implied under torchrun with more than one process): it holds its slice of the model, "
                   "and only rank 0 prints")
    p.add_argument("--dist-init", default=None, metavar="URL", help="how the ranks find each other when torchrun "
                   "does not say (torch.distributed init_method, e.g. file:///shared/path; RANK and WORLD_SIZE set)")
    p.add_argument("--draft", default=None, metavar="PATH", help="draft model for --speculate draft (a smaller "
                   "model sharing the tokenizer); with --draft-quantize alone, the model itself quantized")
    p.add_argument("--draft-quantize", default=None, help="nf4 | int4 | int8: quantize the draft model")
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
    from ..kernels.options import KernelOptions, parse_experiments

    try:
        return KernelOptions(parse_experiments(text)).experiments
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kernel_options(a):
    """The KernelOptions of `add_kernel_flags`' flags; the environment (`KernelOptions.from_env`, read here
    once) fills in those not given."""
    from ..kernels.options import KernelOptions

    if a.experiments is not None and a.pdl is not None:
        return KernelOptions(a.experiments, a.pdl)
    env = KernelOptions.from_env()
    return KernelOptions(env.experiments if a.experiments is None else a.experiments,
                         env.pdl if a.pdl is None else a.pdl)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculate", default=None, help="lookup (prompt lookup) | draft (the --draft model): "
                   "speculative decoding, the same tokens as without")
    p.add_argument("--num-speculative-tokens", type=int, default=8, help="most ids proposed per verify pass")


def sampling(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed, speculate=a.speculate,
                num_speculative_tokens=a.num_speculative_tokens)


def load(a, **options):
    """The model of `add_model_flags`' flags; `options`: further `load_model` keywords (e.g. max_batch_size)."""
    from ..api import load_model

    if a.group_size is not None and a.quantize != "int4":
        raise ValueError("--group-size applies to --quantize int4 only")
    drafted = a.draft is not None or a.draft_quantize is not None
    if hasattr(a, "speculate"):  # (serve has no --speculate: its requests choose)
        if a.speculate == "draft" and not drafted:
            raise UsageError("--speculate draft needs a draft model: --draft PATH (a smaller model sharing the "
                             "tokenizer) or --draft-quantize METHOD (the model itself, quantized)")
        if drafted and a.speculate != "draft":
            raise UsageError("--draft / --draft-quantize give the model of --speculate draft, which is not set")
    draft = None
    if drafted:
        draft = load_model(a.draft if a.draft is not None else a.model, backend=a.backend, dtype=a.dtype,
                           device=a.device, quantize=a.draft_quantize, max_seq_len=a.max_seq_len,
                           kernel_options=kernel_options(a), cuda_graphs=False,
                           max_batch_size=options.get("max_batch_size", 1))
    model = load_model(a.model, backend=a.backend, dtype=a.dtype, device=a.device, quantize=a.quantize,
                       group_size=a.group_size, max_seq_len=a.max_seq_len, kernel_options=kernel_options(a),
                       tensor_parallel=wants_tensor_parallel(a), dist_init=a.dist_init, threads=a.threads,
                       draft=draft, **options)
    if model.tensor_parallel is not None and model.tensor_parallel.rank != 0:
        sys.stdout = open(os.devnull, "w")  # every rank computes the same text; rank 0 prints it
    return model


def wants_tensor_parallel(a) -> bool:
    """--tensor-parallel, --dist-init, or a launch by torchrun with more than one process."""
    return a.tensor_parallel or a.dist_init is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1


def read_stdin(model) -> str:
    """All of stdin; under tensor parallelism read by rank 0 alone and sent to the others."""
    if sys.stdin is None:
        raise ValueError("stdin is closed: give the prompt as an argument instead of '-'")
    tp = model.tensor_parallel
    if tp is None:
        return utf8_text(sys.stdin.read(), "stdin")
    return tp.broadcast(utf8_text(sys.stdin.read(), "stdin") if tp.rank == 0 else None)


def utf8_text(text: str, what: str) -> str:
    """`text` as read from argv or stdin, which Python decodes keeping undecodable bytes as lone surrogates
    (U+DC80..U+DCFF): ValueError naming `what` where the bytes were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        if "\udc80" <= ch <= "\udcff":
            raise ValueError(f"{what} is not valid UTF-8 (byte {ord(ch) - 0xDC00:#04x} at character {e.start})") \
                from None
    return text


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def warn(text: str) -> None:
    print(f"{PROG}: {' '.join(text.split())}", file=sys.stderr, flush=True)
