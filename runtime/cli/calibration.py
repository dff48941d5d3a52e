"""The `--gptq` flags `quantize` and `export-lite` share: GPTQ on calibration text instead of rounding each
weight to nearest (`codellama_rt.quant.gptq`)."""
from __future__ import annotations

import sys

ROWS, LENGTH = 128, 512  # the calibration windows' defaults


def add_arguments(q) -> None:
    q.add_argument("--gptq", action="store_true", help="GPTQ on calibration text (each block's "
                   "outputs on it kept close to the dense model's) instead of rounding each weight to nearest; the "
                   "same format")
    q.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                   help="--gptq: text files, or directories of them (hidden ones and files that are not UTF-8 text "
                   "skipped; default: the running Python's standard library)")
    q.add_argument("--calibration-rows", type=int, default=ROWS, help=f"--gptq: token windows (default {ROWS})")
    q.add_argument("--calibration-len", type=int, default=LENGTH,
                   help=f"--gptq: tokens per window (default {LENGTH}, at most the model's context)")


def check(a, method) -> None:
    """ValueError naming the flag when the --gptq flags do not fit `method` (the weights asked for) or are invalid."""
    if a.gptq and method not in ("int4", "int8", "nf4"):
        raise ValueError("--gptq applies to quantized weights (int4, int8, nf4), not dense ones")
    if not a.gptq and (a.calibration is not None or a.calibration_rows != ROWS or a.calibration_len != LENGTH):
        raise ValueError("--calibration, --calibration-rows and --calibration-len apply with --gptq only")
    for flag, v in (("--calibration-rows", a.calibration_rows), ("--calibration-len", a.calibration_len)):
        if v < 1:
            raise ValueError(f"{flag} {v}: must be at least 1")


def load_gptq(a, method: str, *, quantize_head: bool = False, **load_kwargs):
    """The dense model (`load_model(a.model, **load_kwargs)`), its projections swapped for GPTQ `method` ones;
    (model, int4 group size, how: the record a checkpoint's config keeps, with a file count, not paths)."""
    from ..api import load_model, resolve_group_size
    from ..quant.gptq import DAMP, calibration_files, calibration_tokens, quantize_gptq

    files = calibration_files(a.calibration) if a.calibration else None  # (directories walked once)
    model = load_model(a.model, **load_kwargs)
    if a.calibration_len > model.args.max_seq_len:
        raise ValueError(f"--calibration-len {a.calibration_len}: the model's context is {model.args.max_seq_len}")
    group_size = resolve_group_size(a.group_size, method, model.args)
    tokens = calibration_tokens(model.tokenizer, files, rows=a.calibration_rows, seq_len=a.calibration_len)
    quantize_gptq(model.module, tokens, method=method, group_size=group_size, quantize_head=quantize_head,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = f"{len(files)} file(s)" if files else \
        f"the Python {sys.version_info.major}.{sys.version_info.minor} standard library"
    how = {"calibration": text, "rows": a.calibration_rows, "seq_len": a.calibration_len, "damp": DAMP,
           "act_order": True, "static_groups": True}
    return model, group_size, how
