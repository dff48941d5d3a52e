"""Tiny CodeLlama-architecture models for demos and tests.

`train_tokenizer` trains a SentencePiece BPE model (byte fallback, CodeLlama's infill pieces)
on Python's own standard-library sources; `write_random_checkpoint` writes random weights in
HF layout. Neither needs a download.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

from .model.config import ModelArgs

INFILL_PIECES = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


def stdlib_sources(limit_bytes: int = 2_000_000) -> list[Path]:
    """Python files of the running interpreter's standard library, sorted, up to ~limit_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        size = f.stat().st_size
        if total + size > limit_bytes:
            break
        files.append(f)
        total += size
    return files


def train_tokenizer(out_prefix: Path, *, vocab_size: int = 1000, corpus: list[Path] | None = None,
                    max_sentences: int = 200_000) -> Path:
    """Train a BPE SentencePiece model like Llama's (byte fallback, digits split, dummy prefix,
    unk 0 / bos 1 / eos 2) with the four infill pieces as control symbols, on the first
    `max_sentences` non-blank lines of `corpus` (0: all). Returns the .model path."""
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in (corpus or stdlib_sources()))
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for text in texts for line in text.splitlines() if line.strip()),
        model_prefix=str(out_prefix), model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=0.9995, user_defined_symbols=["☺"],
        control_symbols=INFILL_PIECES, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=max_sentences, shuffle_input_sentence=False, minloglevel=2,
    )
    return out_prefix.with_suffix(".model")


def hf_config(args: ModelArgs) -> dict:
    """config.json of a LlamaForCausalLM with these shapes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "intermediate_size": args.ffn_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling, "max_position_embeddings": args.max_seq_len,
        "bos_token_id": args.bos_id, "eos_token_id": args.eos_ids[0], "hidden_act": "silu",
        "tie_word_embeddings": args.tie_word_embeddings, "torch_dtype": "float32",
    }


def write_random_checkpoint(directory: Path, args: ModelArgs, tokenizer_model: Path, *, seed: int = 0,
                            std: float = 0.5) -> Path:
    """Write random weights (normal, std / sqrt(fan_in)) in HF layout with the given tokenizer."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    d, q, kv, f, V = args.dim, args.q_dim, args.kv_dim, args.ffn_dim, args.vocab_size

    def w(rows, cols):
        return torch.randn(rows, cols, generator=g) * (std / cols ** 0.5)

    def norm():
        return 1.0 + 0.1 * torch.randn(d, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(V, d, generator=g), "model.norm.weight": norm()}
    for i in range(args.n_layers):
        p = f"model.layers.{i}"
        t.update({
            f"{p}.input_layernorm.weight": norm(), f"{p}.post_attention_layernorm.weight": norm(),
            f"{p}.self_attn.q_proj.weight": w(q, d), f"{p}.self_attn.k_proj.weight": w(kv, d),
            f"{p}.self_attn.v_proj.weight": w(kv, d), f"{p}.self_attn.o_proj.weight": w(d, q),
            f"{p}.mlp.gate_proj.weight": w(f, d), f"{p}.mlp.up_proj.weight": w(f, d),
            f"{p}.mlp.down_proj.weight": w(d, f),
        })
    if not args.tie_word_embeddings:
        t["lm_head.weight"] = w(V, d) * 4
    save_file({k: v.contiguous() for k, v in t.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config(args), indent=2))
    (directory / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return directory


def main(argv=None) -> None:
    """`python -m codellama_rt.tiny --out DIR`: a tiny random-weight model (tokenizer trained on the stdlib)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m codellama_rt.tiny", description=main.__doc__)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    tok = train_tokenizer(a.out / "sp-train", vocab_size=1000)
    args = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=344, vocab_size=1000, rope_theta=1e6,
                     max_seq_len=2048)
    write_random_checkpoint(a.out, args, tok, seed=a.seed)
    for suffix in (".model", ".vocab"):
        tok.with_suffix(suffix).unlink()
    print(f"wrote a tiny random-weight model to {a.out}")


if __name__ == "__main__":
    main()
