"""`codellama-rt generate PROMPT`: stream a completion to stdout."""
from __future__ import annotations

from .common import add_model_flags, add_sampling_flags, load, read_stdin, sampling, utf8_text, write


def add_parser(sub, parents: list) -> None:
    g = sub.add_parser("generate", parents=parents, help="stream a completion of PROMPT to stdout")
    add_model_flags(g)
    add_sampling_flags(g)
    g.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    g.set_defaults(run=run)


def run(a) -> None:
    from ..engine.sampling import SamplingParams

    SamplingParams(**sampling(a))  # reject bad flags before loading weights
    model = load(a)
    prompt = read_stdin(model) if a.prompt == "-" else utf8_text(a.prompt, "the prompt")
    if model.tensor_parallel is not None:  # (each rank's command line is its own: a node's may differ)
        model.tensor_parallel.check_same("prompt and sampling flags", (prompt, sampling(a)))
    for piece in model.stream(prompt, **sampling(a)):
        write(piece)
    write("\n")
