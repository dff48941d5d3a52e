"""`codellama-rt info`: a model's config, parameter count, weight and KV-cache memory."""
from __future__ import annotations


def add_parser(sub, parents: list) -> None:
    n = sub.add_parser("info", parents=parents, help="config, parameter count, weight and KV-cache memory")
    n.add_argument("--model", default=None, help="model directory, hub id, or a preset name such as CodeLlama-7b")
    n.add_argument("--dtype", default=None)
    n.add_argument("--max-batch-size", type=int, default=1)
    n.add_argument("--max-seq-len", type=int, default=None)
    n.add_argument("--quantize", default=None, choices=("nf4", "int4", "int8"),
                   help="also show the weight memory once quantized (nf4 | int4 | int8)")
    n.add_argument("--group-size", type=int, default=None, help="int4 group size for --quantize int4 "
                   "(default: the largest of 128, 64, 32 dividing the model's widths)")
    n.add_argument("--quantize-head", action="store_true", help="count the lm_head as quantized too")
    n.set_defaults(run=run)


def run(a) -> None:
    import torch

    from ..api import check_seq_len, parse_dtype, resolve_group_size
    from ..checkpoint.loader import checkpoint_quantization, fill_vocab_size
    from ..errors import CheckpointError
    from ..checkpoint.sources import detect_layout, open_source, read_args, resolve_path
    from ..model.config import PRESETS, ModelArgs
    from ..quant.linear import model_weight_bytes

    dtype = parse_dtype(a.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if a.group_size is not None and a.quantize != "int4":
        raise ValueError("--group-size applies to --quantize int4 only")
    if a.quantize_head and a.quantize is None:
        raise ValueError("--quantize-head applies with --quantize")
    if a.group_size is not None:
        from ..kernels.int4_format import GROUP_SIZES

        if a.group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size={a.group_size} is not supported; expected one of {GROUP_SIZES}")
    method, group_size, head, quantization = a.quantize, a.group_size, a.quantize_head, None
    if a.model in PRESETS:
        args, where, files = ModelArgs.from_preset(a.model), f"preset {a.model}", None
    else:
        from ..api import default_model_path

        try:
            directory = resolve_path(a.model if a.model is not None else default_model_path())
        except CheckpointError as e:
            raise CheckpointError(f"{e}; nor a preset (one of {', '.join(sorted(PRESETS))})") from None
        layout = detect_layout(directory)
        args, where = read_args(directory, layout), f"{directory} ({layout} layout)"
        if args.vocab_size <= 0:  # Meta's -1: read the embedding's shape, as load() does
            fill_vocab_size(args, open_source(directory, layout), layout)
        files = sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".pth", ".bin"))
        quantization = checkpoint_quantization(directory, layout)
        if quantization is not None and method is not None and (
                method != quantization.method or group_size not in (None, quantization.group_size)):
            raise ValueError(f"--quantize {method}{f' --group-size {group_size}' if group_size else ''}: "
                             f"{directory} is already quantized as {quantization.describe()} (loading would "
                             "refuse it; it loads as stored)")
        if quantization is not None:  # show the checkpoint's own
            method, head = quantization.method, quantization.quantize_head
            group_size = quantization.group_size
    if a.max_batch_size < 1:
        raise ValueError(f"--max-batch-size={a.max_batch_size} is invalid: expected >= 1")
    if a.max_seq_len is not None and a.max_seq_len < 1:
        raise ValueError(f"--max-seq-len={a.max_seq_len} is invalid: max_seq_len must be >= 1")
    seq = check_seq_len(a.max_seq_len, args)
    if method is not None:
        group_size = resolve_group_size(group_size, method, args)
    elem = torch.empty((), dtype=dtype).element_size()
    n = args.param_count()
    gib = 2 ** 30
    rows = [
        ("model", where),
        ("dim / layers / heads / kv heads / head dim", f"{args.dim} / {args.n_layers} / {args.n_heads} / "
                                                      f"{args.n_kv_heads} / {args.head_dim}"),
        ("ffn dim / vocab", f"{args.ffn_dim} / {args.vocab_size}"),
        ("rope theta / scaling", f"{args.rope_theta:g} / {args.rope_scaling or 'none'}"),
        ("context (max_seq_len)", f"{args.max_seq_len}"),
        ("norm eps / bos / eos", f"{args.norm_eps:g} / {args.bos_id} / {list(args.eos_ids)}"),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)"),
        (f"weight memory ({str(dtype).replace('torch.', '')})", f"{n * elem / gib:.2f} GiB"),
        (f"KV cache ({a.max_batch_size} x {seq} tokens)",
         f"{args.kv_cache_bytes(a.max_batch_size, seq, elem) / gib:.2f} GiB "
         f"({args.kv_cache_bytes(1, 1, elem) / 1024:.0f} KiB per token)"),
    ]
    if quantization is not None:
        rows.insert(1, ("quantization", quantization.describe()))
    if method is not None:
        qbytes = model_weight_bytes(args, bytes_per_elem=elem, method=method, group_size=group_size,
                                    quantize_head=head)
        label = (f"{method}{f' g{group_size}' if method == 'int4' else ''}{', head' if head else ''}"
                 f" + {str(dtype).replace('torch.', '')}")
        rows.insert(next(i for i, (k, _) in enumerate(rows) if k.startswith("weight memory")) + 1,
                    (f"weight memory ({label})", f"{qbytes / gib:.2f} GiB ({qbytes / 1e9:.2f} GB)"))
    if files is not None:
        rows.append(("checkpoint files", f"{files / gib:.2f} GiB"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
