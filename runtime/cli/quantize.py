"""`codellama-rt quantize`: write a quantized checkpoint (nf4, int4 or int8) that `load()` reads back."""
from __future__ import annotations

import shutil
from pathlib import Path

from . import calibration


def add_parser(sub, parents: list) -> None:
    q = sub.add_parser("quantize", parents=parents,
                       help="write a quantized checkpoint (nf4, int4 or int8) that load() reads back")
    q.add_argument("--model", default=None,
                   help="model directory (HF or Meta layout) or a hub id in the local HF cache")
    q.add_argument("--method", required=True, choices=("nf4", "int4", "int8"))
    q.add_argument("--group-size", type=int, default=None, help="int4: input columns per scale/zero (32, 64, "
                   "128; default: the largest dividing the model's widths)")
    q.add_argument("--quantize-head", action="store_true", help="quantize the lm_head too (default: kept dense)")
    calibration.add_arguments(q)
    q.add_argument("--out", required=True, help="output directory (new or empty)")
    q.add_argument("--dtype", default=None, help="dtype of the dense tensors and of what the weights dequantize "
                   "to (default: bf16 on CUDA, fp32 on CPU)")
    q.add_argument("--device", default=None,
                   help="where to quantize: cpu | cuda | cuda:N (default: cuda when available)")
    q.set_defaults(run=run)


def run(a) -> None:
    if a.group_size is not None and a.method != "int4":
        raise ValueError("--group-size applies to --method int4 only")
    calibration.check(a, a.method)
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty directory")
    created = not out.exists()
    try:  # now, not after loading and quantizing the model
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror})") from None
    try:
        _quantize_into(a, out)
    except BaseException:  # (a failed run leaves no directory, nor a half-written checkpoint, behind)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:  # (it was empty)
            for p in out.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


def _quantize_into(a, out: Path) -> None:
    from ..api import default_model_path, load_model, resolve_group_size
    from ..checkpoint.writer import save_quantized

    if a.gptq:
        model, group_size, how = calibration.load_gptq(a, a.method, quantize_head=a.quantize_head, dtype=a.dtype,
                                                       device=a.device)
    else:
        model = load_model(a.model, dtype=a.dtype, device=a.device, quantize=a.method, group_size=a.group_size,
                           quantize_head=a.quantize_head)
        group_size = resolve_group_size(a.group_size, a.method, model.args)  # what load_model chose
        how = None
    # (a checkpoint whose lm_head is already quantized keeps it so: its dense weight is not there to write)
    head = a.quantize_head or type(model.module.output).__name__ != "Linear"
    save_quantized(model, out, method=a.method, group_size=group_size, quantize_head=head,
                   source_dir=model.path or default_model_path(), gptq=how)
    from ..quant.linear import weight_bytes

    print(f"wrote {out} ({a.method}, weights {weight_bytes(model.module) / 2 ** 30:.2f} GiB)")
