"""`codellama-rt infill`: print the middle between a prefix and a suffix (or a file's <FILL_ME>)."""
from __future__ import annotations

from pathlib import Path

from .common import add_model_flags, add_sampling_flags, load, sampling, utf8_text, write


def add_parser(sub, parents: list) -> None:
    i = sub.add_parser("infill", parents=parents, help="print the middle between a prefix and a suffix")
    add_model_flags(i)
    add_sampling_flags(i)
    i.add_argument("--prefix", default=None)
    i.add_argument("--suffix", default=None)
    i.add_argument("--file", default=None, help="a file containing one <FILL_ME> marker")
    i.add_argument("--suffix-first", action="store_true", help="SPM prompt order (suffix before prefix)")
    i.set_defaults(run=run)


def run(a) -> None:
    from ..engine.sampling import SamplingParams
    from ..tokenizer.tokenizer import split_fill

    SamplingParams(**sampling(a))
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
        prefix, suffix = utf8_text(a.prefix, "--prefix"), utf8_text(a.suffix, "--suffix")
    model = load(a)
    if model.tensor_parallel is not None:  # (each rank's command line is its own: a node's may differ)
        model.tensor_parallel.check_same("prefix, suffix and sampling flags",
                                         (prefix, suffix, a.suffix_first, sampling(a)))
    write(model.infill(prefix, suffix, suffix_first=a.suffix_first, **sampling(a)).text + "\n")
