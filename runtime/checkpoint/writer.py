"""Writing a quantized model in this project's own checkpoint format (`codellama-rt quantize`); the format
is described in `quantized`, which reads it back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..quant.linear import QuantLinear, quantized_modules
from .layouts import hf_plan
from .quantized import _BNB_STATE, OWN_FORMAT_VERSION, OWN_METHOD


def hf_config(args, quantization_config: dict, dtype: torch.dtype) -> dict:
    """A transformers LlamaConfig dict for `args` (what `ModelArgs.from_hf_config` reads back)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling, "max_position_embeddings": args.max_seq_len,
        "bos_token_id": args.bos_id, "eos_token_id": list(args.eos_ids) if len(args.eos_ids) > 1 else args.eos_ids[0],
        "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "quantization_config": quantization_config,
    }
    return cfg


def part_tensors(name: str, part) -> dict:
    """The own-format tensors of part `name` (= `M.k`), in the checkpoint layouts whichever a model holds."""
    if part.format == "int4_cpu":
        part = part.to_int4()
    elif part.format == "nf4_cpu":
        part = part.to_nf4()
    if part.format == "nf4":
        base = f"{name}.weight"
        state = {"quant_type": "nf4", "blocksize": part.blocksize, "dtype": str(part.dtype).replace("torch.", ""),
                 "shape": list(part.shape)}
        t = {base: part.codes.reshape(-1, 1), base + ".absmax": part.absmax, base + ".quant_map": part.code}
        if part.nested_absmax is not None:
            state.update(nested_blocksize=part.nested_blocksize, nested_offset=part.nested_offset,
                         nested_dtype="float32")
            t[base + ".nested_absmax"] = part.nested_absmax
            t[base + ".nested_quant_map"] = part.nested_code
        t[base + _BNB_STATE] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        return t
    if part.format == "int8":
        return {f"{name}.qweight": part.qweight, f"{name}.scales": part.scales}
    if part.format != "int4":
        raise ValueError(f"{name}: {part.format} weights cannot be saved (the checkpoint format holds nf4, int4 "
                         "and int8)")
    return {f"{name}.qweight": part.qweight, f"{name}.qzeros": part.qzeros, f"{name}.scales": part.scales}


def save_quantized(model, directory, *, method: str, group_size: int, quantize_head: bool, source_dir=None,
                   max_shard_bytes: int = 4 << 30, gptq: Optional[dict] = None) -> Path:
    """Write `model` (a loaded `cl.Model` whose projections are quantized) in the codellama-rt format:
    config.json, model.safetensors (or shards with an index), tokenizer.model and generation_config.json
    copied from `source_dir`. `gptq`: how GPTQ made the weights (JSON-able), recorded in the config. Returns the
    directory."""
    from safetensors.torch import save_file

    module, args = model.module, model.args
    out = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    params = dict(module.named_parameters(remove_duplicate=False))
    for target, parts in hf_plan(args).items():
        mod_name, _, leaf = target.rpartition(".")
        if leaf == "weight" and mod_name and isinstance(module.get_submodule(mod_name), QuantLinear):
            continue
        t, row = params[target], 0
        for p in parts:
            tensors[p.name] = t[row:row + p.shape[0]]
            row += p.shape[0]
    for name, q in quantized_modules(module).items():
        for k, part in enumerate(q.parts):
            tensors.update(part_tensors(f"{name}.{k}", part))
    qc = {"quant_method": OWN_METHOD, "format_version": OWN_FORMAT_VERSION, "method": method,
          "quantize_head": bool(quantize_head)}
    if method == "int4":
        qc["group_size"] = group_size
    elif method == "nf4":
        qc.update(blocksize=64, double_quant=True)
    if gptq is not None:
        qc["gptq"] = dict(gptq)

    out.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for names, f in zip(shards, files):
        save_file({n: tensors[n].detach().to("cpu", copy=True).contiguous() for n in names}, str(out / f),
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for names, f in zip(shards, files) for n in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_config(args, qc, module.dtype), indent=2) + "\n")
    if source_dir is not None:
        for f in ("tokenizer.model", "generation_config.json"):
            if (Path(source_dir) / f).is_file():
                shutil.copy(Path(source_dir) / f, out / f)
    return out
