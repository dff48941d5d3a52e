"""Writes a loaded CPU model as a lite model directory (`lite.safetensors` + `tokenizer.model`): what
`codellama_rt.lite` runs without torch. This side needs torch (it reads a Model); the reading side does not."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..model.native_decoder import DecoderParts, decoder_parts
from .file import FILE_NAME, KINDS, VERSION, write

_KIND_NAMES = {v: k for k, v in KINDS.items()}


def export_lite(model, out, *, integer_activations: bool = False) -> Path:
    """Writes `model` (a codellama_rt Model loaded on the CPU in fp32, dense, int8 or int4/NF4 weights) to the
    directory `out` (created; existing lite files replaced) and returns the file's path. integer_activations:
    int8 / int4 weights multiply activations rounded to int16 / int8 blocks (KernelOptions.cpu_integer_activations;
    measured faster on AVX2 CPUs only). ValueError where the native step cannot run the model."""
    parts = decoder_parts(model.module, integer_activations)
    if parts is None:
        raise ValueError("only a CPU fp32 model (dense, int8, int4 with groups of multiples of 32 or NF4 weights, "
                         "no tensor parallelism) can be written as a lite model: load it with device='cpu', "
                         "dtype=torch.float32")
    tok = model.tokenizer
    if tok.path is None:
        raise ValueError("the model's tokenizer has no file to copy")
    eos = sorted({int(i) for i in (*model.args.eos_ids, tok.eos_id) if i is not None})
    tensors, config = _tensors_and_config(parts)
    config.update(eos_ids=eos, max_seq_len=min(int(model.args.max_seq_len), int(parts.rope_cos.shape[0])))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE_NAME
    write(path, tensors, config)
    if Path(tok.path).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tok.path, out / "tokenizer.model")
    return path


def _tensors_and_config(parts: DecoderParts) -> tuple[dict, dict]:
    tensors = {"embedding": parts.embedding, "final_norm": parts.final_norm,
               "rope_cos": parts.rope_cos, "rope_sin": parts.rope_sin}
    tensors.update({f"norm.{i}": t for i, t in enumerate(parts.norms)})
    projections = []
    for j, projection in enumerate(parts.projections):
        described = []
        for i, (kind, w, scale, zs, n, k, group, levels) in enumerate(projection):
            name = f"proj.{j}.{i}"
            tensors[f"{name}.w"] = w
            held = ["w"]
            for suffix, t in (("scale", scale), ("zs", zs), ("levels", levels)):
                if t.numel():
                    tensors[f"{name}.{suffix}"] = t
                    held.append(suffix)
            described.append({"kind": _KIND_NAMES[kind], "N": int(n), "K": int(k), "group": int(group),
                              "tensors": held})
        projections.append(described)
    dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size = (int(d) for d in parts.dims)
    config = {"version": VERSION, "dim": dim, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim,
              "ffn_dim": ffn_dim, "vocab_size": vocab_size, "norm_eps": parts.eps, "layers": len(parts.norms) // 2,
              "projections": projections}
    for name, t in tensors.items():
        if t.dtype not in (torch.float32, torch.int8, torch.uint8):
            raise ValueError(f"tensor {name} is {t.dtype}; lite files hold fp32, int8 and uint8")
    # (numpy views of the model's own tensors: `write` copies only a view that is not contiguous)
    return {name: t.detach().numpy() for name, t in tensors.items()}, config
