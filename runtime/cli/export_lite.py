"""`codellama-rt export-lite`: write a lite model directory that `python -m codellama_rt.lite` (and
codellama_rt.lite.LiteModel) runs without torch."""
from __future__ import annotations

from pathlib import Path

from . import calibration


def add_parser(sub, parents: list) -> None:
    q = sub.add_parser("export-lite", parents=parents,
                       help="write a lite model (the native CPU step's weights in its layout) that "
                            "`python -m codellama_rt.lite` runs without torch")
    q.add_argument("--model", default=None,
                   help="model directory (HF or Meta layout, or a codellama-rt 4-bit checkpoint; default: the "
                        "embedded model)")
    q.add_argument("--quantize", default=None, choices=("int8", "int4", "nf4"),
                   help="weight format (default: the checkpoint's own, dense fp32 for float checkpoints)")
    q.add_argument("--group-size", type=int, default=None,
                   help="int4: input columns per scale/zero (default: the largest of 32, 64, 128 dividing the "
                        "model's widths)")
    q.add_argument("--integer-activations", action="store_true",
                   help="int8 / int4 weights multiply activations rounded to int16 / int8 blocks (faster on "
                        "AVX2-only CPUs, measured; not on AVX-512 ones)")
    calibration.add_arguments(q)
    q.add_argument("--out", required=True, help="output directory (created; an existing lite model is replaced)")
    q.set_defaults(run=run)


def run(a) -> None:
    import torch

    from ..api import load_model
    from ..lite.export import export_lite

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in ("lite.safetensors", "tokenizer.model")) \
        if out.is_dir() else []
    if others:  # (another model's directory: its tokenizer.model would be replaced)
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ValueError(f"--out {out}: holds other files ({shown}); give a new or empty directory, or an earlier "
                         "lite export")
    if a.group_size is not None and a.quantize != "int4":
        raise ValueError("--group-size applies to --quantize int4 only")
    calibration.check(a, a.quantize)
    if a.gptq:
        model = calibration.load_gptq(a, a.quantize, dtype=torch.float32, device="cpu", progress=False)[0]
    else:
        model = load_model(a.model, dtype=torch.float32, device="cpu", quantize=a.quantize,
                           group_size=a.group_size, progress=False)
    path = export_lite(model, out, integer_activations=a.integer_activations)
    print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB); run it with: python -m codellama_rt.lite "
          f"{out} PROMPT")
