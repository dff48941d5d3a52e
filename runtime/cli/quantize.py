"""`codellama-rt quantize`: write a quantized checkpoint (nf4, int4 or int8) that `load()` reads back."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub, parents: list) -> None:
    q = sub.add_parser("quantize", parents=parents,
                       help="write a quantized checkpoint (nf4, int4 or int8) that load() reads back")
    q.add_argument("--model", default=None,
                   help="model directory (HF or Meta layout) or a hub id in the local HF cache")
    q.add_argument("--method", required=True, choices=("nf4", "int4", "int8"))
    q.add_argument("--group-size", type=int, default=None, help="int4: input columns per scale/zero (32, 64, "
                   "128; default: the largest dividing the model's widths)")
    q.add_argument("--quantize-head", action="store_true", help="quantize the lm_head too (default: kept dense)")
    q.add_argument("--gptq", action="store_true", help="int4 / int8: GPTQ on calibration text (each block's "
                   "outputs on it kept close to the dense model's) instead of rounding each weight to nearest; the "
                   "same format")
    q.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                   help="--gptq: text files, or directories of them (hidden ones and files that are not UTF-8 text "
                   "skipped; default: the running Python's standard library)")
    q.add_argument("--calibration-rows", type=int, default=128, help="--gptq: token windows (default 128)")
    q.add_argument("--calibration-len", type=int, default=512,
                   help="--gptq: tokens per window (default 512, at most the model's context)")
    q.add_argument("--out", required=True, help="output directory (new or empty)")
    q.add_argument("--dtype", default=None, help="dtype of the dense tensors and of what the weights dequantize "
                   "to (default: bf16 on CUDA, fp32 on CPU)")
    q.add_argument("--device", default=None,
                   help="where to quantize: cpu | cuda | cuda:N (default: cuda when available)")
    q.set_defaults(run=run)


def run(a) -> None:
    from ..api import default_model_path, load_model, resolve_group_size
    from ..checkpoint.writer import save_quantized

    if a.group_size is not None and a.method != "int4":
        raise ValueError("--group-size applies to --method int4 only")
    if a.gptq and a.method == "nf4":
        raise ValueError("--gptq applies to --method int4 and int8 only")
    if not a.gptq and (a.calibration is not None or a.calibration_rows != 128 or a.calibration_len != 512):
        raise ValueError("--calibration, --calibration-rows and --calibration-len apply with --gptq only")
    for flag, v in (("--calibration-rows", a.calibration_rows), ("--calibration-len", a.calibration_len)):
        if v < 1:
            raise ValueError(f"{flag} {v}: must be at least 1")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty directory")
    try:  # now, not after loading and quantizing the model
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror})") from None
    if a.gptq:
        model, group_size = _gptq(a)
    else:
        model = load_model(a.model, dtype=a.dtype, device=a.device, quantize=a.method, group_size=a.group_size,
                           quantize_head=a.quantize_head)
        group_size = resolve_group_size(a.group_size, a.method, model.args)  # what load_model chose
    save_quantized(model, out, method=a.method, group_size=group_size, quantize_head=a.quantize_head,
                   source_dir=model.path or default_model_path())
    from ..quant.linear import weight_bytes

    print(f"wrote {out} ({a.method}, weights {weight_bytes(model.module) / 2 ** 30:.2f} GiB)")


def _gptq(a):
    """The dense model, its projections swapped for GPTQ int4 ones; (model, group size)."""
    import sys

    from ..api import load_model, resolve_group_size
    from ..quant.gptq import calibration_tokens, quantize_gptq

    model = load_model(a.model, dtype=a.dtype, device=a.device)
    if a.calibration_len > model.args.max_seq_len:
        raise ValueError(f"--calibration-len {a.calibration_len}: the model's context is {model.args.max_seq_len}")
    group_size = resolve_group_size(a.group_size, a.method, model.args)
    tokens = calibration_tokens(model.tokenizer, a.calibration, rows=a.calibration_rows, seq_len=a.calibration_len)
    quantize_gptq(model.module, tokens, method=a.method, group_size=group_size, quantize_head=a.quantize_head,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    return model, group_size
