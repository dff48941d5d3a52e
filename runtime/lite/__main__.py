"""`python -m codellama_rt.lite LITE_DIR PROMPT`: generate with a lite model, without importing torch."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m codellama_rt.lite",
                                description="generate from a lite model directory (codellama-rt export-lite) "
                                            "without torch")
    p.add_argument("model", help="lite model directory (lite.safetensors + tokenizer.model)")
    p.add_argument("prompt", help="the prompt (BOS added); with --suffix, the code before the gap")
    p.add_argument("--suffix", default=None, help="infill: the code after the gap")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--speculate", choices=("lookup",), default=None,
                   help="prompt-lookup speculative decoding (greedy only; the same tokens, sooner where the output "
                        "repeats the prompt)")
    p.add_argument("--num-speculative-tokens", type=int, default=8, help="most proposals a verify pass")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    p.add_argument("--stats", action="store_true", help="print token counts and speeds to stderr")
    a = p.parse_args(argv)
    from .model import LiteModel

    try:
        model = LiteModel(a.model, threads=a.threads)
        sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                        seed=a.seed, stop=tuple(a.stop), speculate=a.speculate,
                        num_speculative_tokens=a.num_speculative_tokens)
        if a.suffix is not None:
            c = model.infill(a.prompt, a.suffix, **sampling)
            print(c.text)
        else:
            run = model.stream(a.prompt, **sampling)
            for piece in run:
                print(piece, end="", flush=True)
            print()
            c = run.completion
    except (ValueError, RuntimeError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.stats:
        n = len(c.token_ids)
        print(f"prompt {c.prompt_tokens} tokens in {c.prefill_seconds * 1e3:.1f} ms "
              f"({c.prompt_tokens / max(c.prefill_seconds, 1e-9):.0f} tok/s); {n} new tokens in "
              f"{c.decode_seconds * 1e3:.1f} ms ({n / max(c.decode_seconds, 1e-9):.1f} tok/s); "
              f"finish: {c.finish_reason}", file=sys.stderr)
        if c.speculation is not None:
            sp = c.speculation
            print(f"speculation: {sp.verifies} verify passes, {sp.accepted} of {sp.proposed} proposals accepted "
                  f"({sp.mean_accepted:.2f} a pass)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
