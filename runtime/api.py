"""Public Python API: `load()` and `Model` (see ../shared/docs/API.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .model.backends import resolve_backend
from .checkpoint.loader import (check_shapes, checkpoint_quantization, fill_vocab_size, load_weights,
                                settle_heap)
from .checkpoint.sources import detect_layout, open_source, read_args, resolve_path
from .distributed.tensor_parallel import TensorParallel
from .model.config import ModelArgs
from .errors import CheckpointError, is_allocation_failure
from .engine.generate import Completion, Engine, Run
from .kernels.options import parse_kernel_options
from .model.transformer import Linear, Transformer
from .quant.linear import hold_parts, quantize_model
from .engine.sampling import SamplingParams
from .load_args import (LONG_CONTEXT, MAX_THREADS, check_options, check_path, check_quantizer_knobs,  # noqa: F401
                        check_seq_len, check_threads, context_limit, int4_group_size, parse_device, parse_dtype,
                        resolve_group_size)
from .tokenizer.tokenizer import Tokenizer

Prompt = Union[str, list]
def default_model_path() -> Path:
    """The embedded default model shipped as package data (its README.md says how it was trained)."""
    return Path(__file__).parent / "default_model"


def load(path=None, *, backend: str = "auto", dtype=None, device=None, quantize: Optional[str] = None,
         max_seq_len: Optional[int] = None, max_batch_size: int = 1, progress: Optional[bool] = None,
         cuda_graphs: Optional[bool] = None, kernel_options=None, tensor_parallel: bool = False,
         dist_init: Optional[str] = None, threads: Optional[int] = None, draft=None) -> "Model":
    """Load a model directory (HF or Meta layout), a hub id from the local cache, or (None) the default model.

    Weights are converted once to `dtype` (bf16 on CUDA, fp32 on CPU by default) on `device`.
    `quantize="nf4" | "int4" | "int8"` quantizes the blocks' projections while loading (int4: groups of 128,
    or the largest of 64 and 32 that divides the model's widths; int8: one scale per output row);
    a quantized checkpoint (bitsandbytes 4-bit, GPTQ, or `codellama-rt quantize` output) loads as
    stored without it. The KV cache holds `max_batch_size` sequences of `max_seq_len` tokens
    (default: the model's context; at most `context_limit`) and is allocated on first generation.
    `cuda_graphs` (default: on for CUDA, off on CPU) captures each decode step into a CUDA graph once
    per batch size and sampling signature and replays it for every token; the tokens are those of
    eager decoding. `kernel_options`: the Triton backend's kernel paths, a `KernelOptions` or a dict of
    its fields (experiments, pdl); None: `KernelOptions()` (no experiments, PDL on; the environment is
    not read). Calls from any thread share the model: up to `max_batch_size` requests decode together
    (continuous batching), the rest wait for a slot (see `Model`).

    `tensor_parallel=True`: this process is one rank of a torch.distributed group (started by torchrun,
    or from `dist_init`, e.g. "file:///shared/path", with RANK and WORLD_SIZE set) and holds its slice of
    every block (`codellama_rt.distributed`); every rank must load the same checkpoint and make the same
    calls, in the same order, and gets the same text. CUDA graphs stay off unless asked for.

    `threads`: CPU threads torch's ops use (`torch.set_num_threads`: the whole process, every model);
    None leaves torch's default, one per physical core.

    `draft`: the model `speculate="draft"` drafts with, sharing the tokenizer and device: a path (loaded as this
    one is, unquantized) or a loaded `Model` (e.g. `cl.load(path, quantize="int4")`).
    """
    return load_model(path, backend=backend, dtype=dtype, device=device, quantize=quantize,
                      max_seq_len=max_seq_len, max_batch_size=max_batch_size, progress=progress,
                      cuda_graphs=cuda_graphs, kernel_options=kernel_options, tensor_parallel=tensor_parallel,
                      dist_init=dist_init, threads=threads, draft=draft)


def load_model(path=None, *, backend: str = "auto", dtype=None, device=None, quantize: Optional[str] = None,
               group_size: Optional[int] = None, quantize_head: bool = False, max_seq_len: Optional[int] = None,
               max_batch_size: int = 1, progress: Optional[bool] = None,
               cuda_graphs: Optional[bool] = None, kernel_options=None, tensor_parallel: bool = False,
               dist_init: Optional[str] = None, threads: Optional[int] = None, draft=None) -> "Model":
    """`load` with the quantizer's knobs: int4 `group_size` (None: `int4_group_size`), and
    `quantize_head` (the lm_head too)."""
    check_path("path", path)
    if not isinstance(draft, Model):
        check_path("draft", draft, also=", a loaded Model")
    if draft is not None and tensor_parallel:
        raise ValueError("draft= with tensor_parallel=True is not supported yet: speculate with 'lookup'")
    device = parse_device(device)
    check_threads(threads)
    if threads is not None:
        torch.set_num_threads(threads)
    check_quantizer_knobs(quantize, group_size, quantize_head)
    tp = TensorParallel.join(device, init_method=dist_init) if tensor_parallel else None
    if tp is not None:
        device, cuda_graphs = tp.device, bool(cuda_graphs)  # graphs with NCCL inside: not measured yet
        progress = progress if tp.rank == 0 else False
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs={cuda_graphs!r} is invalid: expected True, False or None (auto)")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, not device={str(device)!r}")
    dtype = parse_dtype(dtype, device)
    check_options(quantize, group_size, max_batch_size, max_seq_len)
    ops = resolve_backend(backend, device, parse_kernel_options(kernel_options))

    if path is None:
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise CheckpointError("the embedded default model is missing from this installation (package data "
                                  "not installed?); pass a model directory (CLI: --model PATH)", file=path)
    directory = resolve_path(path)
    layout = detect_layout(directory)
    args = read_args(directory, layout)
    seq_len = check_seq_len(max_seq_len, args)
    tokenizer = Tokenizer.from_pretrained(directory)
    source = open_source(directory, layout)
    fill_vocab_size(args, source, layout)
    outside = [i for i in (args.bos_id, *args.eos_ids) if i >= args.vocab_size]
    if outside:  # (an EOS the model can never produce: generation would never stop at the real one)
        raise CheckpointError(f"special token id {outside[0]} (bos / eos) is outside the vocabulary of "
                              f"{args.vocab_size}", file=directory)
    check_shapes(source, layout, args)  # before allocating what the config asks for
    if tokenizer.vocab_size > args.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} pieces but the model embeds only "
                              f"{args.vocab_size}", file=directory / "tokenizer.model")
    quantization = checkpoint_quantization(directory, layout)
    if quantize is not None and quantization is not None and quantize != quantization.method:
        raise ValueError(f"quantize={quantize!r}, but {directory} is already quantized as "
                         f"{quantization.describe()}")
    if group_size is not None and quantization is not None and group_size != quantization.group_size:
        raise ValueError(f"group_size={group_size}, but {directory} is already quantized as "
                         f"{quantization.describe()}: its groups stay as stored")
    local = args if tp is None else tp.local_args(args)
    group_size = resolve_group_size(group_size, quantize, local)  # (a rank's widths must split into groups)
    quantized = quantize is not None or quantization is not None
    if tp is not None:
        tp.check_same("checkpoint and options", (directory.name, args.to_dict(), str(dtype), quantize, group_size,
                                                  seq_len, max_batch_size))
        if quantize == "int4":
            tp.check_group_size(local, group_size)
    model = _transformer(local, ops, dtype, device, seq_len, quantized)
    load_weights(model, source, layout, quantization=quantization, quantize=quantize, group_size=group_size,
                 quantize_head=quantize_head, progress=progress, args=args,
                 shard=None if tp is None else (tp.rank, tp.world))
    hold_parts(model, ops.held_part)  # (the layout the backend's kernels take)
    settle_heap()
    if tp is not None:
        tp.attach(model)
    engine = Engine(model, tokenizer, max_batch=max_batch_size, max_seq_len=seq_len, cuda_graphs=cuda_graphs,
                    seed_source=None if tp is None else tp.seed_source())
    engine.speculator.timing_free = tp is not None  # the ranks choose passes alone: no clock may decide them
    if draft is not None:
        if not isinstance(draft, Model):
            draft = load_model(draft, backend=backend, dtype=dtype, device=device, max_seq_len=seq_len,
                               max_batch_size=max_batch_size, progress=progress, cuda_graphs=False,
                               kernel_options=kernel_options)
        engine.speculator.attach_draft(draft.module, draft.tokenizer, draft.path)
    return Model(args, model, tokenizer, engine, path=directory, tensor_parallel=tp)


def random_model(args: ModelArgs, tokenizer, *, backend: str = "auto", dtype=None, device=None,
                 quantize: Optional[str] = None, group_size: Optional[int] = None, quantize_head: bool = False,
                 max_seq_len: Optional[int] = None, max_batch_size: int = 1, seed: int = 0,
                 std: float = 0.5, kernel_options=None) -> "Model":
    """A Model with random weights at `args`' shapes, drawn directly on `device`: benchmarks at real
    shapes without a checkpoint. Arguments as `load_model`.

    Weights are drawn as `tiny.write_random_checkpoint` draws them (projections normal with std / sqrt(fan_in),
    the lm_head 4x that, the embedding N(0, 1), norms 1 + 0.1 N(0, 1)) in fp32 from a generator on `device`
    seeded with `seed`, then cast to `dtype`; the same seed and device give the same weights. With `quantize`
    each projection is quantized right after it is drawn, so the dense model never exists whole (as loading
    does). `tokenizer`: a `Tokenizer`, or any object with its decoding interface when only token ids are
    generated (the engine streams text through `decode_in_context`).
    """
    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    check_options(quantize, group_size, max_batch_size, max_seq_len)
    ops = resolve_backend(backend, device, parse_kernel_options(kernel_options))
    seq_len = check_seq_len(max_seq_len, args)
    group_size = resolve_group_size(group_size, quantize, args)
    model = _transformer(args, ops, dtype, device, seq_len, quantize is not None)
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(shape, scale: float, offset: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return (t.mul_(scale).add_(offset) if scale != 1 or offset else t).to(dtype)

    with torch.no_grad():
        model.tok_embeddings.copy_(draw(model.tok_embeddings.shape, 1.0))
        model.norm.copy_(draw(model.norm.shape, 0.1, 1.0))
        for layer in model.layers:
            layer.attn_norm.copy_(draw(layer.attn_norm.shape, 0.1, 1.0))
            layer.mlp_norm.copy_(draw(layer.mlp_norm.shape, 0.1, 1.0))
        for name, lin in list(model.named_modules()):
            if not isinstance(lin, Linear):
                continue
            if lin.weight is not model.tok_embeddings:  # a tied head is the embedding
                out_f, in_f = lin.weight.shape
                w = draw((out_f, in_f), std / in_f ** 0.5 * (4 if name == "output" else 1))
                lin.weight = torch.nn.Parameter(w, requires_grad=False)
            if quantize is not None and (name != "output" or quantize_head):
                quantize_model(model, quantize, group_size=group_size, quantize_head=quantize_head, only=[name])
    hold_parts(model, ops.held_part)
    return Model(args, model, tokenizer, Engine(model, tokenizer, max_batch=max_batch_size, max_seq_len=seq_len))


def _transformer(args: ModelArgs, ops, dtype, device, seq_len: int, quantized: bool) -> Transformer:
    """The module graph with uninitialised weights (the projections on the meta device when they will be
    quantized one by one); a failed allocation becomes a MemoryError saying how much was asked for."""
    try:
        return Transformer(args, ops, dtype=dtype, device=device, rope_len=seq_len,
                           linear_device="meta" if quantized else None)
    except RuntimeError as e:
        if not is_allocation_failure(e):
            raise
        raise MemoryError(f"not enough {device} memory for the model ({args.param_count() / 1e9:.2f} B "
                          f"parameters in {dtype})") from None


class Model:
    """A loaded model with its tokenizer and generation engine (see API.md).

    Any number of `generate`/`stream`/`infill`/`chat` calls may run at once (threads, live streams): each
    is a request of the serving engine, decoded in one batch with up to `max_batch_size - 1` others and
    waiting for a free slot beyond that; each gets exactly the tokens it would get alone."""

    def __init__(self, args: ModelArgs, module: Transformer, tokenizer: Tokenizer, engine: Engine, path=None,
                 tensor_parallel=None):
        self.args, self.module, self.tokenizer, self.engine, self.path = args, module, tokenizer, engine, path
        self.tensor_parallel = tensor_parallel  # a TensorParallel (this rank's place), or None

    @property
    def backend(self) -> str:
        return self.module.ops.name

    @property
    def max_seq_len(self) -> int:
        """The context this model was loaded with: prompt plus generated tokens, per sequence."""
        return self.engine.max_seq_len

    def graph_pool_bytes(self) -> int:
        """Device memory held by the captured decode CUDA graphs (0 on CPU or before any capture)."""
        return self.engine.graph_pool_bytes()

    # ---- scoring -------------------------------------------------------------------------

    def logits(self, token_ids) -> torch.Tensor:
        """list[int] [T] or int64 [B, T] -> fp32 logits [B, T, vocab] (full forward, no cache)."""
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dim() != 2 or token_ids.dtype not in (torch.int64, torch.int32) or 0 in token_ids.shape \
                    or token_ids.device.type == "meta":
                raise ValueError(f"token_ids must be a non-empty integer tensor [B, T] with values, got "
                                 f"{token_ids.dtype} {list(token_ids.shape)} on {token_ids.device}")
            rows = token_ids.tolist()
        elif isinstance(token_ids, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in token_ids):
            raise ValueError("token_ids must be a list of token ids (ints) or an int64 tensor [B, T]; encode "
                             "text with model.tokenizer.encode")
        else:
            rows = [list(token_ids)]
        for r in rows:
            self.engine.check_prompt(r, "token_ids")
        return self.engine.logits(torch.tensor(rows, dtype=torch.long))

    # ---- generation ----------------------------------------------------------------------

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=True)
        if isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            return list(prompt)
        raise ValueError("prompt must be a str or a list of token ids")

    def stop_tokens(self, mode: str = "text") -> dict:
        """Token id -> finish_reason for `mode` "text", "infill" or "chat": EOS always; infilling also stops
        at <EOT>; step-format chat at <step>."""
        tok = self.tokenizer
        stops = {e: "eos" for e in self.args.eos_ids}
        if tok.eos_id is not None:
            stops[tok.eos_id] = "eos"
        if mode == "infill":
            stops[tok.eot_id] = "eot"
        if mode == "chat" and tok.step_id is not None:
            stops[tok.step_id] = "eos"
        return stops

    def _run(self, prompts: list[list[int]], sampling: dict, mode: str = "text") -> Run:
        """A Run of `prompts` (checked now; submitted at its first piece)."""
        return self.engine.run(prompts, SamplingParams(**sampling), self.stop_tokens(mode))

    def generate(self, prompt, **sampling) -> Union[Completion, list]:
        """prompt: str | list[int], or a list of those -> Completion (or a list of them)."""
        batch = isinstance(prompt, (list, tuple)) and bool(prompt) and \
            all(isinstance(p, (str, list, tuple)) for p in prompt)
        prompts = [self._ids(p) for p in prompt] if batch else [self._ids(prompt)]
        completions = _finish(self._run(prompts, sampling))
        return completions if batch else completions[0]

    def stream(self, prompt, **sampling) -> Iterator[str]:
        """Text pieces of one prompt's completion as they become final (arguments checked now).

        The request is submitted at the first piece and runs until the stream is exhausted or closed
        (`close()`, or dropped), which cancels it and frees its slot."""
        return _Pieces(self._run([self._ids(prompt)], sampling))

    def infill(self, prefix: str, suffix: str, *, suffix_first: bool = False, **sampling) -> Completion:
        """The middle between `prefix` and `suffix` (Meta's prompt format); stops at <EOT>."""
        ids = self.tokenizer.encode_infill(prefix, suffix, suffix_first=suffix_first)
        return _finish(self._run([ids], sampling, mode="infill"))[0]

    def chat(self, messages: list, **sampling) -> Completion:
        """Instruct chat: messages [{'role': 'system'|'user'|'assistant', 'content': str}, ...]."""
        return _finish(self._run([self.tokenizer.encode_chat(messages)], sampling, mode="chat"))[0]

    def stream_chat(self, messages: list, **sampling) -> Iterator[str]:
        """`chat`, streamed as text pieces."""
        return _Pieces(self._run([self.tokenizer.encode_chat(messages)], sampling, mode="chat"))


class _Pieces:
    """The text pieces of a one-prompt Run. `close()` (or dropping it) cancels the request and frees the engine;
    called from another thread while one iterates (a UI cancelling the stream its worker reads), it cancels the
    request and that thread's loop ends at its next event."""

    def __init__(self, run):
        self._run, self._it = run, iter(run)

    def __iter__(self) -> "_Pieces":
        return self

    def __next__(self) -> str:
        return next(self._it)[1]

    def close(self) -> None:
        try:
            self._it.close()
        except ValueError:  # "generator already executing": another thread is inside it
            self._run.cancel()


def _finish(run) -> list[Completion]:
    for _ in run:
        pass
    return run.completions
