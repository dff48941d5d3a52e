"""`codellama-rt mask PROMPT`: which prompt token may attend to which, infill segments marked (`mask_view`)."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, parents: list) -> None:
    k = sub.add_parser("mask", parents=parents,
                       help="show which prompt token may attend to which (infill segments marked)")
    k.add_argument("--model", default=None, help="model directory whose tokenizer to use")
    k.add_argument("--tokenizer", default=None, help="a tokenizer.model file (instead of --model)")
    k.add_argument("--suffix-first", action="store_true", help="SPM layout for a <FILL_ME> prompt")
    k.add_argument("--max-tokens", type=int, default=48, help="rows/columns shown in the terminal")
    k.add_argument("--png", default=None, help="also write the mask as a PNG picture here")
    k.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    k.add_argument("prompt", help="prompt text; one <FILL_ME> shows the infill prompt's segments")
    k.set_defaults(run=run)


def run(a) -> None:
    from .mask_view import prompt_segments, render_text, write_png
    from ..tokenizer.tokenizer import Tokenizer

    if a.png:
        from ..plotting import require

        require("--png")  # before any work: without matplotlib say how to get it
        if not Path(a.png).resolve().parent.is_dir():
            raise ValueError(f"--png {a.png}: its directory does not exist")
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens={a.max_tokens} is invalid: expected >= 1")
    if a.tokenizer is not None:
        tok = Tokenizer.from_file(a.tokenizer)
    else:
        from ..api import default_model_path
        from ..checkpoint.sources import resolve_path

        tok = Tokenizer.from_pretrained(resolve_path(a.model if a.model is not None else default_model_path()))
    ids, labels = prompt_segments(tok, a.prompt, suffix_first=a.suffix_first)
    color = a.color == "always" or (a.color == "auto" and sys.stdout.isatty())
    print(render_text(tok, ids, labels, color=color, max_tokens=a.max_tokens))
    if a.png:
        print(f"wrote {write_png(a.png, labels)}")
