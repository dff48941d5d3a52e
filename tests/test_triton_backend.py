"""End to end: the unchanged module graph on backend="triton" (interpreter on CPU, fp32) gives the
reference backend's logits and greedy tokens on tiny checkpoints written by transformers."""
from __future__ import annotations

import pytest

import codellama_rt as cl

REL_TOL = 2e-3  # max|Δ| / max|ref| (issue bar)

CONFIGS = [
    pytest.param(dict(dim=256, n_heads=4, n_kv_heads=4, rope_theta=1e4), id="mha-d64"),
    pytest.param(dict(dim=256, n_heads=4, n_kv_heads=1, rope_theta=1e6), id="gqa4-d64"),
    pytest.param(dict(dim=512, n_heads=8, n_kv_heads=1, rope_theta=1e6), id="gqa8-d64"),
]
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n"


@pytest.mark.parametrize("cfg", CONFIGS)
def test_triton_backend_matches_reference(hf_checkpoint, cfg):
    path, _ = hf_checkpoint(n_layers=2, ffn=160, **cfg)
    ref = cl.load(path, backend="reference", max_seq_len=128, max_batch_size=2)
    tri = cl.load(path, backend="triton", max_seq_len=128, max_batch_size=2)
    assert tri.backend == "triton" and ref.backend == "reference"
    ids = ref.tokenizer.encode(PROMPT)
    a, b = tri.logits(ids), ref.logits(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < REL_TOL
    prompts = [PROMPT, "import os"]
    got = tri.generate(prompts, max_new_tokens=10)
    want = ref.generate(prompts, max_new_tokens=10)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_auto_backend_is_reference_on_cpu(hf_checkpoint):
    path, _ = hf_checkpoint()
    assert cl.load(path, backend="auto", device="cpu").backend == "reference"
