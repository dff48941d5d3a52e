"""Reference backend vs transformers' LlamaForCausalLM on tiny random checkpoints written by transformers."""
from __future__ import annotations

import pytest
import torch

import codellama_rt as cl

LOGITS_REL_TOL = 1e-4  # max|Δ| / max|ref|, fp32 (issue bar)

CONFIGS = [
    pytest.param(dict(n_heads=4, n_kv_heads=4, rope_theta=1e4), id="mha-theta1e4"),
    pytest.param(dict(n_heads=4, n_kv_heads=4, rope_theta=1e6), id="mha-theta1e6"),
    pytest.param(dict(n_heads=8, n_kv_heads=2, rope_theta=1e6), id="gqa4-theta1e6"),
    pytest.param(dict(n_heads=8, n_kv_heads=1, rope_theta=1e4), id="gqa8-theta1e4"),
    pytest.param(dict(n_heads=8, n_kv_heads=1, rope_theta=1e6, shard_size="40KB"), id="gqa8-sharded"),
    pytest.param(dict(n_heads=4, n_kv_heads=2, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                 id="gqa2-linear-scaling"),
    pytest.param(dict(n_heads=4, n_kv_heads=4, rope_theta=1e4, tie=True), id="tied-embeddings"),
]

PROMPTS = ["def fibonacci(n):\n    if n < 2:", "import os\nclass Config:\n    def __init__(self", "x = [i * i for i in"]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def hf_logits(hf_model, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits.float()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_logits_match_transformers(hf_checkpoint, cfg):
    path, hf_model = hf_checkpoint(**cfg)
    if "shard_size" in cfg:
        assert (path / "model.safetensors.index.json").is_file()
    model = cl.load(path, max_seq_len=512)
    ids = model.tokenizer.encode(PROMPTS[0] * 8)  # ~ a hundred tokens, positions well past 64
    assert len(ids) > 100
    ours, ref = model.logits(ids), hf_logits(hf_model, ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (1, len(ids), model.args.vocab_size)
    assert rel_err(ours, ref) < LOGITS_REL_TOL


@pytest.mark.parametrize("cfg", CONFIGS[:5])
def test_greedy_matches_transformers(hf_checkpoint, cfg):
    path, hf_model = hf_checkpoint(**cfg)
    model = cl.load(path, max_seq_len=512)
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                    pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        got = model.generate(ids, max_new_tokens=24)
        # transformers does not stop at EOS when min_new_tokens is set; compare up to our stop
        n = len(got.token_ids)
        assert got.token_ids == expected[:n]
        assert n == 24 or (got.finish_reason == "eos" and expected[n] in model.args.eos_ids)


def test_decode_with_cache_equals_full_forward(hf_checkpoint):
    """Prefill + one-token decode steps through the static KV cache give the no-cache logits."""
    path, _ = hf_checkpoint(n_heads=8, n_kv_heads=2, rope_theta=1e6)
    model = cl.load(path, max_seq_len=256)
    ids = model.tokenizer.encode(PROMPTS[1])
    full = model.logits(ids)[0]
    module = model.module
    from codellama_rt.model.kv_cache import KVCache
    from codellama_rt.model.transformer import Decode, Prefill

    cache = KVCache(model.args, 1, 256, module.dtype, module.device)

    with torch.inference_mode():
        k = 5
        prefill = module(torch.tensor([ids[:k]]), Prefill(0), cache)[0]
        assert rel_err(prefill, full[:k]) < LOGITS_REL_TOL
        for t in range(k, len(ids)):
            pos = torch.tensor([t])
            step = module(torch.tensor([[ids[t]]]), Decode(pos, kv_len=256), cache)[0, -1]
            assert rel_err(step, full[t]) < LOGITS_REL_TOL


def test_chunked_prefill_equals_single_pass(hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    whole = cl.load(path, max_seq_len=512)
    chunked = cl.load(path, max_seq_len=512)
    chunked.engine.prefill_chunk = 7
    prompt = PROMPTS[0] * 4
    a, b = whole.generate(prompt, max_new_tokens=16), chunked.generate(prompt, max_new_tokens=16)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_batched_equals_one_by_one(hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=8, n_kv_heads=2, rope_theta=1e6)
    model = cl.load(path, max_seq_len=256, max_batch_size=4)
    batch = model.generate(PROMPTS, max_new_tokens=20)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    for prompt, got in zip(PROMPTS, batch):
        single = model.generate(prompt, max_new_tokens=20)
        assert got.token_ids == single.token_ids
        assert got.text == single.text and got.finish_reason == single.finish_reason
        assert got.prompt_tokens == len(model.tokenizer.encode(prompt))


def test_batch_larger_than_max_batch_runs_in_groups(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = cl.load(path, max_seq_len=256, max_batch_size=2)
    prompts = PROMPTS + ["print(", "return"]
    got = model.generate(prompts, max_new_tokens=6)
    assert [c.token_ids for c in got] == [model.generate(p, max_new_tokens=6).token_ids for p in prompts]


def test_bf16_logits_close_to_fp32(hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=8, n_kv_heads=2, rope_theta=1e6)
    ids = cl.load(path).tokenizer.encode(PROMPTS[0])
    ref = cl.load(path, dtype=torch.float32).logits(ids)
    for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
        ours = cl.load(path, dtype=dtype).logits(ids)
        assert ours.dtype == torch.float32
        assert rel_err(ours, ref) < tol, dtype
