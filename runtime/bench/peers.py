"""The peers' rows on the same weights: torch.compile(reduce-overhead) of the reference graph
(gpt-fast's recipe) and transformers' `generate` with a static cache."""
from __future__ import annotations

import importlib.util
import time
from functools import partial
from typing import Optional

import torch

from .measure import (decode_rate, decode_row, error_text, free_memory, peak_gib, random_prompts, reset_peak,
                      sync_device, ttft_row)
from .plan import COMPILE, HF, PEERS, ModelSpec, Plan


def compiled_reference_decode(model, spec: ModelSpec, plan: Plan, batch: int = 1) -> dict:
    """gpt-fast's recipe on our graph with the reference ops: eager prefill into a static KV cache, then
    `torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)` fed its own argmax, no host
    sync per token. Falls back to fullgraph=False (noted in the row) when dynamo cannot trace it whole."""
    from ..model.backends import BACKENDS
    from ..model.kv_cache import KVCache
    from ..model.transformer import Decode, Prefill

    row = decode_row(spec, COMPILE, batch, plan, backend="reference")
    module, device = model.module, model.module.device
    saved_ops = module.ops
    module.ops = BACKENDS["reference"]
    P, N = plan.decode_prompt, plan.decode_tokens
    try:
        cache = KVCache(model.args, batch, P + N + 4, module.dtype, device)
        mark_static = getattr(torch._dynamo, "mark_static_address", None)
        if mark_static is not None:
            mark_static(cache.data)  # mutated in place by the graph: a static input, as gpt-fast's buffers
        S = cache.max_seq_len
        prompts = torch.tensor(random_prompts(model.args.vocab_size, batch, P, seed=1000 + batch), device=device)

        def decode_one_token(tok, pos):
            logits = module(tok, Decode(pos, S), cache)[:, -1]
            return torch.argmax(logits, dim=-1, keepdim=True)

        with torch.no_grad():
            first = module(prompts, Prefill(0), cache, last_index=torch.full((batch,), P - 1, device=device))
            first = torch.argmax(first, dim=-1, keepdim=True)  # [B, 1]
        reset_peak(device)
        notes = []
        for fullgraph in (True, False):
            torch._dynamo.reset()
            step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=fullgraph)
            pos = torch.full((batch,), P, dtype=torch.long, device=device)

            def generate(n):
                tok, out = first, []
                for _ in range(n):
                    nxt = step(tok, pos)
                    pos.add_(1)
                    tok = nxt.clone()  # the graph's output buffer is reused by the next replay
                    out.append(tok)
                return out

            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    generate(3)  # compile, then cudagraph warm-up and recording
                sync_device(device)
                compile_s = time.perf_counter() - t0
                break
            except Exception as e:  # noqa: BLE001
                if not fullgraph:
                    raise
                notes.append(f"fullgraph=True failed ({error_text(e)[:160]}); fullgraph=False")
        skips = _cudagraph_skips()
        if skips:
            notes.append(f"inductor skipped CUDA graphs {skips} time(s)")
        with torch.no_grad():
            pos.fill_(P)
            sync_device(device)
            t0 = time.perf_counter()
            toks = generate(N)
            sync_device(device)
            dt = time.perf_counter() - t0
        row.update(status="ok", tok_s=batch * N / dt, ms_per_step=dt / N * 1e3, peak_gib=peak_gib(device),
                   compile_s=compile_s, tokens0=[int(t[0, 0]) for t in [first] + toks[:N - 1]],
                   notes="; ".join(notes) or None)
    except Exception as e:  # noqa: BLE001
        row.update(status=f"failed: {error_text(e)}")
    finally:
        module.ops = saved_ops
        torch._dynamo.reset()
        free_memory()
    return row


def _cudagraph_skips() -> int:
    """How often Inductor declined to CUDA-graph a compiled region (0 where the counter is unknown)."""
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)))
    except Exception:  # noqa: BLE001 - a private counter: absent in some versions
        return 0


class _Stamps:
    """A transformers streamer that records when each generated token reaches the host."""

    def __init__(self, prompt_len: int):
        self.prompt_len, self.times, self.prompt_seen = prompt_len, [], False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self.prompt_seen and value.dim() == 2 and value.shape[-1] == self.prompt_len:
            self.prompt_seen = True  # generate() first streams the prompt
            return
        self.times.append(now)

    def end(self) -> None:
        pass


def hf_model(model):
    """transformers' LlamaForCausalLM holding `model`'s (dense) tensors: the fused projections split into
    q/k/v and gate/up views, no copy. eos is unset so generation always runs max_new_tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..checkpoint.layouts import hf_plan
    from ..tiny import hf_config

    module, args = model.module, model.args
    params = dict(module.named_parameters(remove_duplicate=False))
    state = {}
    for target, parts in hf_plan(args).items():
        tensor, offset = params[target], 0
        for part in parts:
            state[part.name] = tensor[offset:offset + part.shape[0]] if tensor.dim() == 2 else tensor
            offset += part.shape[0]
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    cfg = LlamaConfig.from_dict({**hf_config(args), "eos_token_id": None, "pad_token_id": 0})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(module.dtype)
    try:
        with torch.device(module.device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    hf.load_state_dict(state, strict=True, assign=True)
    hf.eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def _hf_generate(hf, prompts, new_tokens: int):
    ids = torch.tensor(prompts, device=hf.device)
    streamer = _Stamps(ids.shape[1])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", streamer=streamer, pad_token_id=0)
    return t0, streamer.times, out[0, ids.shape[1]:].tolist()


def hf_rows(model, spec: ModelSpec, plan: Plan, emit=None) -> list[dict]:
    """transformers generate (greedy, static cache) on the same weights: TTFT per prompt length (cheap),
    then decode per batch (on CUDA transformers compiles its decode step for each batch size).
    emit(rows so far) after each row, so a child that times out still reports what it finished."""
    device = model.module.device
    rows, emit = [], emit or (lambda rows: None)
    try:
        hf = hf_model(model)
    except Exception as e:  # noqa: BLE001
        return missing_peer_rows("hf", spec, plan, [], f"failed: {error_text(e)}")
    for n in plan.ttft_prompts:
        rows.append(ttft_row(model, spec, plan, HF, "transformers", n, partial(_hf_generate, hf)))
        emit(rows)
        free_memory()
    for b in plan.batches:
        row = decode_row(spec, HF, b, plan, backend="transformers")
        try:
            prompts = random_prompts(model.args.vocab_size, b, plan.decode_prompt, seed=1000 + b)
            reset_peak(device)
            t0 = time.perf_counter()
            _hf_generate(hf, prompts, plan.decode_tokens)
            warmup_s = time.perf_counter() - t0
            _, stamps, ids = _hf_generate(hf, prompts, plan.decode_tokens)
            tok_s, ms = decode_rate(stamps, b)
            row.update(status="ok", tok_s=tok_s, ms_per_step=ms, peak_gib=peak_gib(device), tokens0=ids,
                       warmup_s=warmup_s)
        except Exception as e:  # noqa: BLE001
            row.update(status=f"failed: {error_text(e)}")
        rows.append(row)
        emit(rows)
        free_memory()
    del hf
    free_memory()
    return rows


def peer_unavailable(kind: str) -> Optional[str]:
    """Why peer `kind` cannot run here (a row status), or None."""
    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}")
    if kind == "hf" and importlib.util.find_spec("transformers") is None:
        return "skipped: transformers is not installed"
    return None


def peer_rows(kind: str, model, spec: ModelSpec, plan: Plan, emit=None) -> list[dict]:
    """The rows of one peer ("compile" | "hf") on a built model."""
    reason = peer_unavailable(kind)
    if reason:
        return missing_peer_rows(kind, spec, plan, [], reason)
    if kind == "compile":
        return [compiled_reference_decode(model, spec, plan, batch=1)]
    return hf_rows(model, spec, plan, emit)


def missing_peer_rows(kind: str, spec: ModelSpec, plan: Plan, have: list, status: str) -> list[dict]:
    """`have` plus a row with `status` for every decode batch / TTFT length of the peer it lacks."""
    provider = PEERS[kind]
    rows = list(have)
    done_b = {r["batch"] for r in have if "new_tokens" in r}
    done_t = {r["prompt_tokens"] for r in have if "new_tokens" not in r}
    if kind == "hf":
        rows += [dict(model=spec.name, provider=provider, backend="transformers", prompt_tokens=n, status=status)
                 for n in plan.ttft_prompts if n not in done_t]
    batches = (1,) if kind == "compile" else plan.batches
    rows += [decode_row(spec, provider, b, plan, status=status) for b in batches if b not in done_b]
    return rows
