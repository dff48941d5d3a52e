"""torch.compile of the triton backend's forward (kernels/ops.py custom ops): one graph (fullgraph, no
graph break) holding the `codellama_rt::` ops, with the eager forward's logits, for a prefill chunk and a
decode step of a tiny random model on CPU (the kernels run in Triton's interpreter).

Backend "aot_eager": dynamo's graph goes through AOTAutograd (functionalization, so the in-place ops
and KV-cache writes are exercised as torch.compile treats them) and then runs eagerly; inductor is not
used (it would compile C++ for the CPU parts, minutes on this machine, and adds nothing for opaque ops).
"""
from __future__ import annotations

import pytest
import torch

from codellama_rt import ModelArgs
from codellama_rt.api import random_model
from codellama_rt.model.kv_cache import KVCache
from codellama_rt.model.transformer import Decode, Prefill

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=64)


@pytest.fixture(scope="module")
def module():
    model = random_model(ModelArgs(**ARGS), None, backend="triton", device="cpu", dtype=torch.float32,
                         max_seq_len=64, max_batch_size=2, seed=0)
    assert model.module.ops.name == "triton"
    return model.module


def _compile(fn):
    """fn compiled with fullgraph=True (a graph break raises) on aot_eager; the graphs dynamo made."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True), graphs


def _ops_in(graphs) -> set:
    return {str(n.target).split(".")[1] for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("codellama_rt.")}


@pytest.mark.slow
@torch.inference_mode()
def test_prefill_and_decode_compile_to_one_graph_with_eager_logits(module):
    args = ModelArgs(**ARGS)
    tokens = torch.randint(0, args.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    eager_cache, compiled_cache = (KVCache(args, 2, 16, torch.float32, "cpu") for _ in range(2))

    want = module(tokens, Prefill(0), eager_cache)
    prefill, graphs = _compile(module)
    got = prefill(tokens, Prefill(0), compiled_cache)
    assert len(graphs) == 1
    assert _ops_in(graphs) == {"rms_norm", "norm_linear", "rotary", "attention_prefill", "linear"}
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(compiled_cache.data, eager_cache.data, atol=0, rtol=0)

    positions = torch.tensor([5, 5])
    step = torch.randint(0, args.vocab_size, (2, 1), generator=torch.Generator().manual_seed(1))
    want = module(step, Decode(positions, 16), eager_cache)
    decode, graphs = _compile(module)
    got = decode(step, Decode(positions, 16), compiled_cache)
    assert len(graphs) == 1
    assert _ops_in(graphs) == {"rms_norm", "norm_linear", "rotary_attention_decode", "linear"}
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(compiled_cache.data, eager_cache.data, atol=0, rtol=0)
