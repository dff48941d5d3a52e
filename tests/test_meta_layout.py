"""Meta's original checkpoint layout (params.json + consolidated.NN.pth) and hub-id resolution.

Everything layout-specific is rebuilt here from Meta's and Hugging Face's published code, not
from the runtime: the HF -> Meta conversion (q/k un-permutation, model-parallel sharding,
params.json with Meta's FeedForward sizing) and Meta's complex-number `apply_rotary_emb`.
A Meta-layout copy of a transformers-written checkpoint must then give the same logits as the
HF layout and as transformers itself, and Meta's interleaved RoPE must agree with our
rotate-half `rotary_ref` on HF-permuted weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import codellama_rt as cl
from codellama_rt.checkpoint.layouts import interleaved_to_rotate_half
from codellama_rt.checkpoint.sources import resolve_path
from codellama_rt.kernels.rotary import rope_tables, rotary_ref

LOGITS_REL_TOL = 1e-4  # max|Δ| / max|ref|, fp32
PROMPT = "def fibonacci(n):\n    if n < 2:"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


# ---- Meta's conventions, written out independently of the runtime -------------------------

def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier) -> int:
    """Meta llama/model.py FeedForward: hidden size from (dim, multiple_of, ffn_dim_multiplier)."""
    hidden_dim = 4 * dim
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF convert_llama_weights_to_hf.py `permute`: Meta (interleaved) q/k rows -> HF (rotate-half)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `hf_permute`: HF row h*D + j*D/2 + i goes back to Meta row h*D + 2i + j."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# Meta's model parallelism (fairscale): ParallelEmbedding splits the embedding dim;
# ColumnParallelLinear (output, wq, wk, wv, w1, w3) splits output rows; RowParallelLinear
# (wo, w2) splits input columns; norms are replicated in every shard.
def meta_split_dim(name: str):
    if name == "tok_embeddings.weight":
        return 1
    leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
    if name == "output.weight" or leaf in ("wq", "wk", "wv", "w1", "w3"):
        return 0
    if leaf in ("wo", "w2"):
        return 1
    return None  # attention_norm, ffn_norm, norm, rope.freqs


def hf_rope_theta(cfg) -> float:
    """rope_theta of a transformers LlamaConfig (v5 keeps it in rope_parameters, v4 as an attribute)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope["rope_theta"] if "rope_theta" in rope else cfg.rope_theta)


def write_meta_checkpoint(directory: Path, hf_model, tokenizer_model: Path, *, n_shards: int = 2,
                          multiple_of: int = 256, ffn_dim_multiplier=None, params_vocab_size=None,
                          write_n_kv_heads: bool = True, dtype=torch.float32,
                          allow_split_heads: bool = False) -> Path:
    """Convert a transformers LlamaForCausalLM into Meta's original layout (as Meta's release ships it)."""
    cfg = hf_model.config
    dim, L, H = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    Hkv = cfg.num_key_value_heads
    D = dim // H
    theta = hf_rope_theta(cfg)
    assert meta_ffn_dim(dim, multiple_of, ffn_dim_multiplier) == cfg.intermediate_size, \
        "params.json would not reproduce intermediate_size; pick another ffn/multiple_of/multiplier"
    # Meta's code: n_local_heads = n_heads // mp, n_local_kv_heads = n_kv_heads // mp
    assert allow_split_heads or (H % n_shards == 0 and Hkv % n_shards == 0), "no such Meta checkpoint exists"
    sd = {k: v.detach().to(dtype).clone() for k, v in hf_model.state_dict().items()}

    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(L):
        a, m, layer = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp", f"model.layers.{i}"
        meta[f"layers.{i}.attention.wq.weight"] = hf_unpermute(sd[f"{a}.q_proj.weight"], H)
        meta[f"layers.{i}.attention.wk.weight"] = hf_unpermute(sd[f"{a}.k_proj.weight"], Hkv)
        meta[f"layers.{i}.attention.wv.weight"] = sd[f"{a}.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[f"{a}.o_proj.weight"]
        meta[f"layers.{i}.feed_forward.w1.weight"] = sd[f"{m}.gate_proj.weight"]
        meta[f"layers.{i}.feed_forward.w2.weight"] = sd[f"{m}.down_proj.weight"]
        meta[f"layers.{i}.feed_forward.w3.weight"] = sd[f"{m}.up_proj.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[f"{layer}.input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[f"{layer}.post_attention_layernorm.weight"]
    # Llama 1/2 consolidated files also carry the (unused) rotary inverse frequencies
    meta["rope.freqs"] = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))

    shards = [{} for _ in range(n_shards)]
    for name, t in meta.items():
        d = meta_split_dim(name)
        pieces = [t] * n_shards if d is None else list(t.chunk(n_shards, dim=d))
        assert len(pieces) == n_shards
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone().contiguous()  # clone: torch.save would store the whole storage

    directory = Path(directory)
    directory.mkdir(parents=True)
    for r, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{r:02d}.pth")
    params = {"dim": dim, "n_layers": L, "n_heads": H, "multiple_of": multiple_of,
              "ffn_dim_multiplier": ffn_dim_multiplier, "norm_eps": cfg.rms_norm_eps,
              "rope_theta": theta,
              "vocab_size": cfg.vocab_size if params_vocab_size is None else params_vocab_size}
    if write_n_kv_heads:
        params["n_kv_heads"] = Hkv
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


def hf_logits(hf_model, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits.float()


# ---- Meta layout == HF layout == transformers -----------------------------------------------

# dim=64 (fixture): Meta's base hidden is int(2*256/3) = 170.
#   multiple_of=64, no multiplier     -> 192
#   multiple_of=32, multiplier 0.55   -> int(93.5) = 93 -> 96
#   multiple_of=16, multiplier 1.3    -> 221 -> 224
CASES = [
    pytest.param(dict(n_heads=4, n_kv_heads=4, rope_theta=1e4, ffn=192), dict(multiple_of=64, write_n_kv_heads=False),
                 id="mha-theta1e4-no-n_kv_heads"),
    pytest.param(dict(n_heads=4, n_kv_heads=4, rope_theta=1e6, ffn=96), dict(multiple_of=32, ffn_dim_multiplier=0.55),
                 id="mha-theta1e6"),
    pytest.param(dict(n_heads=8, n_kv_heads=2, rope_theta=1e4, ffn=224), dict(multiple_of=16, ffn_dim_multiplier=1.3),
                 id="gqa4-theta1e4"),
    pytest.param(dict(n_heads=8, n_kv_heads=2, rope_theta=1e6, ffn=96), dict(multiple_of=32, ffn_dim_multiplier=0.55),
                 id="gqa4-theta1e6"),
    # n_kv_heads=1 cannot be split over 2 model-parallel ranks in Meta's code (n_local_kv_heads = 0),
    # so such checkpoints only exist unsharded.
    pytest.param(dict(n_heads=8, n_kv_heads=1, rope_theta=1e4, ffn=192), dict(multiple_of=64, n_shards=1),
                 id="mqa-theta1e4-1shard"),
    pytest.param(dict(n_heads=8, n_kv_heads=1, rope_theta=1e6, ffn=224), dict(multiple_of=16, ffn_dim_multiplier=1.3,
                 n_shards=1), id="mqa-theta1e6-1shard"),
]


@pytest.mark.parametrize("hf_kwargs, meta_kwargs", CASES)
def test_meta_layout_matches_hf_and_transformers(hf_checkpoint, tiny_tokenizer, tmp_path, hf_kwargs, meta_kwargs):
    hf_dir, hf_model = hf_checkpoint(**hf_kwargs)
    n_shards = meta_kwargs.get("n_shards", 2)
    meta_dir = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, **meta_kwargs)
    assert len(list(meta_dir.glob("consolidated.*.pth"))) == n_shards

    meta_model, hf_rt = cl.load(meta_dir), cl.load(hf_dir)
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                  "norm_eps", "rope_theta"):
        assert getattr(meta_model.args, field) == getattr(hf_rt.args, field), field
    assert meta_model.args.max_seq_len == (16384 if hf_kwargs["rope_theta"] >= 1e6 else 4096)

    # the loaded parameters are bit-identical: un-sharding and the q/k permutation are exact
    hf_params = dict(hf_rt.module.named_parameters())
    for name, p in meta_model.module.named_parameters():
        assert torch.equal(p, hf_params[name]), name

    ids = meta_model.tokenizer.encode(PROMPT * 8)  # ~100 tokens
    assert len(ids) > 100
    ref = hf_logits(hf_model, ids)
    got_meta, got_hf = meta_model.logits(ids), hf_rt.logits(ids)
    assert got_meta.shape == got_hf.shape == ref.shape
    assert rel_err(got_meta, got_hf) < LOGITS_REL_TOL
    assert rel_err(got_meta, ref) < LOGITS_REL_TOL
    assert rel_err(got_hf, ref) < LOGITS_REL_TOL

    # greedy generation: identical ids from both layouts, each the transformers argmax
    prompt = meta_model.tokenizer.encode(PROMPT)
    a = meta_model.generate(prompt, max_new_tokens=10)
    b = hf_rt.generate(prompt, max_new_tokens=10)
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    assert a.token_ids, "generated nothing"
    seq = prompt + a.token_ids
    teacher = hf_logits(hf_model, seq[:-1])[0, len(prompt) - 1:].argmax(-1).tolist()
    assert a.token_ids == teacher


def test_meta_bf16_shards_match_hf_bf16(hf_checkpoint, tiny_tokenizer, tmp_path):
    """Meta ships bf16 shards: loading them gives the same weights as the same values in HF layout."""
    hf_dir, hf_model = hf_checkpoint(n_heads=8, n_kv_heads=2, rope_theta=1e6, ffn=192)
    meta_dir = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, multiple_of=64,
                                     dtype=torch.bfloat16)
    meta_model = cl.load(meta_dir, dtype="float32")
    hf_model.to(torch.bfloat16).to(torch.float32)  # the values the bf16 shards hold
    ids = meta_model.tokenizer.encode(PROMPT * 4)
    assert rel_err(meta_model.logits(ids), hf_logits(hf_model, ids)) < LOGITS_REL_TOL


def test_meta_single_shard(hf_checkpoint, tiny_tokenizer, tmp_path):
    hf_dir, hf_model = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, ffn=192)
    meta_dir = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, n_shards=1, multiple_of=64)
    assert [p.name for p in meta_dir.glob("consolidated.*.pth")] == ["consolidated.00.pth"]
    ids = cl.load(hf_dir).tokenizer.encode(PROMPT * 4)
    got, ref = cl.load(meta_dir).logits(ids), cl.load(hf_dir).logits(ids)
    assert rel_err(got, ref) < LOGITS_REL_TOL
    assert rel_err(got, hf_logits(hf_model, ids)) < LOGITS_REL_TOL


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_vocab_size_minus_one_comes_from_embeddings(hf_checkpoint, tiny_tokenizer, tmp_path, n_shards):
    hf_dir, hf_model = hf_checkpoint(n_heads=4, n_kv_heads=4, rope_theta=1e4, ffn=192)
    meta_dir = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, n_shards=n_shards,
                                     multiple_of=64, params_vocab_size=-1)
    assert json.loads((meta_dir / "params.json").read_text())["vocab_size"] == -1
    model = cl.load(meta_dir)
    assert model.args.vocab_size == hf_model.config.vocab_size
    ids = model.tokenizer.encode(PROMPT * 4)
    got = model.logits(ids)
    assert got.shape[-1] == hf_model.config.vocab_size
    assert rel_err(got, hf_logits(hf_model, ids)) < LOGITS_REL_TOL


@pytest.mark.parametrize("n_heads, n_kv_heads, dim, ffn", [(8, 1, 64, 192), (6, 3, 96, 256)],
                         ids=["kv1-over-2-shards", "kv3-over-2-shards"])
def test_meta_heads_not_dividing_shards_load_right(hf_checkpoint, tiny_tokenizer, tmp_path,
                                                            n_heads, n_kv_heads, dim, ffn):
    """Meta's code cannot write such shards (n_local_kv_heads = n_kv_heads // mp), but a re-sharded copy
    may exist: rows split evenly, heads do not. The q/k permutation runs after concatenation, so it loads right."""
    _, hf_model = hf_checkpoint(n_heads=n_heads, n_kv_heads=n_kv_heads, dim=dim, ffn=ffn)
    meta_dir = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, multiple_of=256 if ffn == 256
                                     else 64, allow_split_heads=True)
    model = cl.load(meta_dir)
    ids = model.tokenizer.encode(PROMPT * 4)
    assert rel_err(model.logits(ids), hf_logits(hf_model, ids)) < LOGITS_REL_TOL


# ---- RoPE layout oracle: Meta's complex rotation vs our rotate-half ------------------------

def meta_precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    """Meta's precompute_freqs_cis, with the angles formed in fp64 before the complex64 cast.

    (Meta forms them in fp32, which is off by ~angle * 6e-8 rad, ~3e-4 at position 5000; that is
    the angle precision, not the layout, and would mask a 1e-4 comparison.)
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: (dim // 2)] / dim))
    t = torch.arange(end, dtype=torch.float64)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs).to(torch.complex64)


def meta_apply_rotary_emb(xq, xk, freqs_cis):
    """Meta llama/model.py apply_rotary_emb: xq [B, T, H, D], xk [B, T, Hkv, D], freqs_cis [B, T, D/2]
    (per-row positions; Meta's own broadcasts one [T, D/2] table). Pairs (2i, 2i+1) are complex numbers."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    f = freqs_cis[:, :, None, :]
    xq_out = torch.view_as_real(xq_ * f).flatten(3)
    xk_out = torch.view_as_real(xk_ * f).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def test_hf_permute_roundtrip_and_runtime_agree():
    g = torch.Generator().manual_seed(1)
    for n_heads, D, cols in [(4, 16, 64), (8, 128, 32), (1, 8, 8)]:
        w = torch.randn(n_heads * D, cols, generator=g)
        assert torch.equal(hf_unpermute(hf_permute(w, n_heads), n_heads), w)
        assert torch.equal(hf_permute(hf_unpermute(w, n_heads), n_heads), w)
        # the runtime's loader permutes Meta -> HF exactly as HF's convert script does
        assert torch.equal(interleaved_to_rotate_half(w, n_heads), hf_permute(w, n_heads))


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_meta_interleaved_rope_equals_rotate_half_on_permuted_weights(theta):
    B, T, dim, H, Hkv, D = 2, 48, 96, 4, 2, 128
    max_pos = 5000
    g = torch.Generator().manual_seed(int(theta) % 1000 + 7)
    x = torch.randn(B, T, dim, generator=g)
    wq_meta = torch.randn(H * D, dim, generator=g) / dim ** 0.5
    wk_meta = torch.randn(Hkv * D, dim, generator=g) / dim ** 0.5
    positions = torch.randint(0, max_pos, (B, T), generator=g)
    positions[0, :4] = torch.tensor([0, 1, max_pos - 1, max_pos - 2])

    # Meta: project with Meta-layout weights, rotate interleaved pairs as complex numbers
    q_m = (x @ wq_meta.T).view(B, T, H, D)
    k_m = (x @ wk_meta.T).view(B, T, Hkv, D)
    freqs_cis = meta_precompute_freqs_cis(D, max_pos, theta)[positions]  # [B, T, D/2]
    q_m, k_m = meta_apply_rotary_emb(q_m, k_m, freqs_cis)
    q_m, k_m = q_m.transpose(1, 2), k_m.transpose(1, 2)  # [B, H, T, D]

    # ours: project with HF-permuted weights, rotate-half with our tables
    q_h = (x @ hf_permute(wq_meta, H).T).view(B, T, H, D).transpose(1, 2)
    k_h = (x @ hf_permute(wk_meta, Hkv).T).view(B, T, Hkv, D).transpose(1, 2)
    cos, sin = rope_tables(D, max_pos, theta)
    q_h, k_h = rotary_ref(q_h, k_h, cos, sin, positions)

    # same vectors up to the within-head re-ordering: Meta dim 2i+j is HF dim j*D/2 + i
    perm = torch.tensor([(m % 2) * (D // 2) + m // 2 for m in range(D)])
    for ours, meta in ((q_h, q_m), (k_h, k_m)):
        torch.testing.assert_close(ours[..., perm], meta, rtol=1e-4, atol=1e-4 * meta.abs().max().item())

    # hence the attention scores (a permutation-invariant dot product within each head) agree
    rep = H // Hkv
    s_m = q_m @ k_m.repeat_interleave(rep, dim=1).transpose(-1, -2)
    s_h = q_h @ k_h.repeat_interleave(rep, dim=1).transpose(-1, -2)
    torch.testing.assert_close(s_h, s_m, rtol=1e-4, atol=1e-4 * s_m.abs().max().item())

    # and the check has teeth: without the weight permutation the scores disagree
    q_bad = (x @ wq_meta.T).view(B, T, H, D).transpose(1, 2)
    k_bad = (x @ wk_meta.T).view(B, T, Hkv, D).transpose(1, 2)
    q_bad, k_bad = rotary_ref(q_bad, k_bad, cos, sin, positions)
    s_bad = q_bad @ k_bad.repeat_interleave(rep, dim=1).transpose(-1, -2)
    assert rel_err(s_bad, s_m) > 1e-2


# ---- hub ids through the local Hugging Face cache -------------------------------------------

def _fake_hub_repo(cache: Path, repo_id: str, src: Path, *, set_ref: bool = True) -> Path:
    """Lay `src` out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}:{src}".encode()).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    if set_ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)  # huggingface_hub writes it without a newline
    return snap


def test_hub_id_resolves_through_local_cache(hf_checkpoint, tmp_path, monkeypatch):
    path_a, model_a = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, seed=0)
    path_b, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, seed=1)
    cache = tmp_path / "hub"
    snap_a = _fake_hub_repo(cache, "org/name", path_a)
    # a newer snapshot that refs/main does not point to must not win
    snap_b = _fake_hub_repo(cache, "org/name", path_b, set_ref=False)
    os.utime(snap_a, (1_000_000, 1_000_000))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    assert resolve_path("org/name") == snap_a != snap_b
    model = cl.load("org/name")
    assert model.path == snap_a
    ids = model.tokenizer.encode(PROMPT * 4)
    assert rel_err(model.logits(ids), hf_logits(model_a, ids)) < LOGITS_REL_TOL

    with pytest.raises(cl.CheckpointError, match="not in the local Hugging Face cache"):
        cl.load("org/missing")


def test_hub_id_via_hf_home_and_newest_snapshot_without_ref(hf_checkpoint, tmp_path, monkeypatch):
    path_a, _ = hf_checkpoint(n_heads=4, n_kv_heads=4, rope_theta=1e4, seed=0)
    path_b, model_b = hf_checkpoint(n_heads=4, n_kv_heads=4, rope_theta=1e4, seed=1)
    cache = tmp_path / "hf_home" / "hub"
    snap_a = _fake_hub_repo(cache, "org/name", path_a, set_ref=False)
    snap_b = _fake_hub_repo(cache, "org/name", path_b, set_ref=False)
    os.utime(snap_a, (1_000_000, 1_000_000))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    model = cl.load("org/name")
    assert model.path == snap_b
    ids = model.tokenizer.encode(PROMPT * 4)
    assert rel_err(model.logits(ids), hf_logits(model_b, ids)) < LOGITS_REL_TOL
