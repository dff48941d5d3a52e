"""Bad checkpoints fail with a CheckpointError (a ValueError) naming the file and, where one is involved,
the tensor; valid ones (the controls) load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import codellama_rt
from codellama_rt import CheckpointError

TENSOR = "model.layers.1.mlp.up_proj.weight"


def load(path):
    return codellama_rt.load(path, max_seq_len=64, progress=False)


def expect_error(path, file, tensor=None, *fragments) -> CheckpointError:
    """load(path) raises CheckpointError whose message names `file` (full path) and `tensor`."""
    with pytest.raises(CheckpointError) as info:
        load(path)
    err, msg = info.value, str(info.value)
    assert isinstance(err, ValueError)
    assert str(file) in msg, msg
    if tensor is not None:
        assert f"'{tensor}'" in msg, msg
        assert err.tensor == tensor
    for fragment in fragments:
        assert fragment in msg, msg
    return err


def assert_loads(path):
    model = load(path)
    logits = model.logits([1, 5, 7, 11])
    assert logits.shape == (1, 4, model.args.vocab_size)
    assert torch.isfinite(logits).all()
    return model


def rewrite_safetensors(path: Path, edit) -> None:
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def weight_map(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


def truncate(path: Path, size: int) -> None:
    data = path.read_bytes()
    assert 0 < size < len(data)
    path.write_bytes(data[:size])


def cut_tensors(path: Path, size: int) -> set[str]:
    """Tensors of a safetensors file whose data would be (partly) lost by truncating it to `size` bytes."""
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    available = size - 8 - header_len
    assert available > 0, "truncation must keep the header for a tensor to be nameable"
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    header = json.loads(path.read_bytes()[8:8 + header_len])
    return {n for n in names if header[n]["data_offsets"][1] > available}


# ---- controls --------------------------------------------------------------------------------

@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_valid_hf_checkpoint_loads(hf_checkpoint, shard_size):
    directory, _ = hf_checkpoint(shard_size=shard_size)
    assert (directory / "model.safetensors.index.json").is_file() == (shard_size is not None)
    assert_loads(directory)


# ---- truncated files -------------------------------------------------------------------------

@pytest.mark.parametrize("keep", ["half", "all_but_one_byte"])
def test_truncated_shard(hf_checkpoint, keep):
    directory, _ = hf_checkpoint(shard_size="100KB")
    shard = directory / weight_map(directory)[TENSOR]
    size = shard.stat().st_size
    size = size // 2 if keep == "half" else size - 1
    cut = cut_tensors(shard, size)
    truncate(shard, size)
    err = expect_error(directory, shard, None, "truncated")
    assert err.tensor in cut, (err.tensor, cut)
    assert f"'{err.tensor}'" in str(err)


def test_truncated_single_file(hf_checkpoint):
    directory, _ = hf_checkpoint()
    f = directory / "model.safetensors"
    size = f.stat().st_size // 2
    cut = cut_tensors(f, size)
    truncate(f, size)
    err = expect_error(directory, f, None, "truncated")
    assert err.tensor in cut, (err.tensor, cut)
    assert f"'{err.tensor}'" in str(err)


def test_truncated_into_header(hf_checkpoint):
    """With the header itself cut, no tensor can be named, but the file is."""
    directory, _ = hf_checkpoint()
    f = directory / "model.safetensors"
    truncate(f, 100)
    expect_error(directory, f, None, "truncated or corrupt")


# ---- missing / unexpected tensors ------------------------------------------------------------

def test_missing_tensor_single_file(hf_checkpoint):
    directory, _ = hf_checkpoint()
    f = directory / "model.safetensors"
    rewrite_safetensors(f, lambda sd: sd.pop(TENSOR))
    expect_error(directory, f, TENSOR, "missing tensor")


def test_missing_tensor_sharded_and_unlisted(hf_checkpoint):
    """Gone from its shard and from the index: the index is named."""
    directory, _ = hf_checkpoint(shard_size="100KB")
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = directory / data["weight_map"].pop(TENSOR)
    index.write_text(json.dumps(data))
    rewrite_safetensors(shard, lambda sd: sd.pop(TENSOR))
    expect_error(directory, index, TENSOR, "missing tensor")


def test_missing_tensor_sharded_but_listed(hf_checkpoint):
    """Still listed in the index, gone from the shard: the shard is named."""
    directory, _ = hf_checkpoint(shard_size="100KB")
    shard = directory / weight_map(directory)[TENSOR]
    rewrite_safetensors(shard, lambda sd: sd.pop(TENSOR))
    expect_error(directory, shard, TENSOR, "does not contain it")


@pytest.mark.parametrize("shard_size", [None, "100KB"])
def test_wrong_shape(hf_checkpoint, shard_size):
    name = "model.layers.0.self_attn.k_proj.weight"
    directory, _ = hf_checkpoint(shard_size=shard_size)
    f = directory / (weight_map(directory)[name] if shard_size else "model.safetensors")

    def edit(sd):
        sd[name] = sd[name][:32].contiguous()

    rewrite_safetensors(f, edit)
    expect_error(directory, f, name, "[32, 64]", "[64, 64]")


# ---- config.json and weights disagree --------------------------------------------------------

def test_config_more_layers_than_weights(hf_checkpoint):
    directory, _ = hf_checkpoint(n_layers=2)
    edit_config(directory, num_hidden_layers=3)
    expect_error(directory, directory / "model.safetensors", "model.layers.2.input_layernorm.weight",
                 "missing tensor")


def test_config_fewer_layers_than_weights(hf_checkpoint):
    directory, _ = hf_checkpoint(n_layers=2)
    edit_config(directory, num_hidden_layers=1)
    expect_error(directory, directory / "model.safetensors", "model.layers.1.input_layernorm.weight",
                 "unexpected tensor", "n_layers=1")


def test_config_fewer_layers_than_weights_sharded(hf_checkpoint):
    """The unexpected tensor is reported with the shard that holds it."""
    directory, _ = hf_checkpoint(n_layers=2, shard_size="100KB")
    edit_config(directory, num_hidden_layers=1)
    name = "model.layers.1.input_layernorm.weight"
    expect_error(directory, directory / weight_map(directory)[name], name, "unexpected tensor")


def test_config_hidden_size_changed(hf_checkpoint):
    directory, _ = hf_checkpoint(dim=64)
    edit_config(directory, hidden_size=128)
    expect_error(directory, directory / "model.safetensors", "model.embed_tokens.weight",
                 "[1000, 64]", "[1000, 128]")


def test_config_intermediate_size_changed(hf_checkpoint):
    directory, _ = hf_checkpoint(ffn=96)
    edit_config(directory, intermediate_size=128)
    expect_error(directory, directory / "model.safetensors", "model.layers.0.mlp.gate_proj.weight",
                 "[96, 64]", "[128, 64]")


# ---- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_unsupported_dtype(hf_checkpoint, dtype):
    name = "model.layers.0.self_attn.k_proj.weight"
    directory, _ = hf_checkpoint()
    f = directory / "model.safetensors"

    def edit(sd):
        sd[name] = sd[name].to(dtype)

    rewrite_safetensors(f, edit)
    expect_error(directory, f, name, "unsupported dtype")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load(hf_checkpoint, dtype):
    """Control for the dtype cases: supported non-fp32 source dtypes are accepted."""
    name = "model.layers.0.self_attn.k_proj.weight"
    directory, _ = hf_checkpoint()

    def edit(sd):
        sd[name] = sd[name].to(dtype)

    rewrite_safetensors(directory / "model.safetensors", edit)
    assert_loads(directory)


# ---- the directory and its small files -------------------------------------------------------

def test_missing_config_json(hf_checkpoint):
    directory, _ = hf_checkpoint()
    (directory / "config.json").unlink()
    expect_error(directory, directory, None, "not a model directory")


def test_missing_params_json(tmp_path, tiny_tokenizer):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer)
    (directory / "params.json").unlink()
    expect_error(directory, directory, None, "not a model directory")


def test_missing_tokenizer(hf_checkpoint):
    directory, _ = hf_checkpoint()
    (directory / "tokenizer.model").unlink()
    expect_error(directory, directory / "tokenizer.model", None, "not found")


def test_malformed_config_json(hf_checkpoint):
    directory, _ = hf_checkpoint()
    (directory / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": ')
    expect_error(directory, directory / "config.json", None, "cannot read JSON")


def test_config_json_missing_key(hf_checkpoint):
    directory, _ = hf_checkpoint()
    config = json.loads((directory / "config.json").read_text())
    del config["intermediate_size"]
    (directory / "config.json").write_text(json.dumps(config))
    expect_error(directory, directory / "config.json", None, "intermediate_size")


def test_index_points_at_missing_shard(hf_checkpoint):
    directory, _ = hf_checkpoint(shard_size="100KB")
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(data))
    expect_error(directory, directory / "model-00099-of-00099.safetensors", "model.norm.weight", "not found")


def test_deleted_shard(hf_checkpoint):
    directory, _ = hf_checkpoint(shard_size="100KB")
    shard = directory / weight_map(directory)[TENSOR]
    shard.unlink()
    err = expect_error(directory, shard, None, "not found")
    assert weight_map(directory)[err.tensor] == shard.name


def test_path_does_not_exist(tmp_path):
    expect_error(tmp_path / "no-such-model", tmp_path / "no-such-model", None, "no such model directory")


def test_path_is_a_file(hf_checkpoint):
    directory, _ = hf_checkpoint()
    expect_error(directory / "config.json", directory / "config.json", None, "expected a model directory")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-home"
    (cache / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # "org/name" must not exist relative to the working directory either
    return cache / "hub"


def test_hub_id_not_in_cache(empty_hub_cache):
    expect_error("some-org/CodeLlama-tiny", "some-org/CodeLlama-tiny", None, "not in the local Hugging Face cache")


def test_hub_id_in_cache_loads(empty_hub_cache, hf_checkpoint):
    """Control for the hub-id case: the same id resolves once the snapshot is in the cache."""
    directory, _ = hf_checkpoint()
    repo = empty_hub_cache / "models--some-org--CodeLlama-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.move(str(directory), repo / "snapshots" / "0123abcd")
    assert_loads("some-org/CodeLlama-tiny")


# ---- Meta layout (params.json + consolidated.00.pth) -----------------------------------------

META_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32,
                   ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=1e4)
META_FFN = 192  # Meta's FeedForward: 32 * ceil(int(2 * 4 * 64 / 3) / 32) = 32 * ceil(170 / 32)


def meta_state_dict(params=META_PARAMS, seed=0) -> dict:
    d, V, L = params["dim"], 1000, params["n_layers"]
    head_dim = d // params["n_heads"]
    kv = params["n_kv_heads"] * head_dim
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5

    sd = {"tok_embeddings.weight": torch.randn(V, d, generator=g), "norm.weight": torch.ones(d),
          "output.weight": w(V, d)}
    for i in range(L):
        a, m = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        sd.update({f"{a}.wq.weight": w(d, d), f"{a}.wk.weight": w(kv, d), f"{a}.wv.weight": w(kv, d),
                   f"{a}.wo.weight": w(d, d), f"{m}.w1.weight": w(META_FFN, d), f"{m}.w2.weight": w(d, META_FFN),
                   f"{m}.w3.weight": w(META_FFN, d), f"layers.{i}.attention_norm.weight": torch.ones(d),
                   f"layers.{i}.ffn_norm.weight": torch.ones(d)})
    return sd


def write_meta_checkpoint(directory: Path, tokenizer_model: Path, *, params=META_PARAMS, edit=None) -> Path:
    """A valid Meta-layout checkpoint with random weights; `edit(sd)` mutates the state dict before saving."""
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params))
    sd = meta_state_dict()
    if edit is not None:
        edit(sd)
    torch.save(sd, directory / "consolidated.00.pth")
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    return directory


def test_meta_ffn_size_matches_params():
    from codellama_rt.model.config import ModelArgs

    assert ModelArgs.from_meta_params(META_PARAMS).ffn_dim == META_FFN


def test_valid_meta_checkpoint_loads(tmp_path, tiny_tokenizer):
    model = assert_loads(write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer))
    assert (model.args.dim, model.args.n_layers, model.args.n_kv_heads, model.args.ffn_dim) == (64, 2, 2, META_FFN)


def test_meta_truncated_pth(tmp_path, tiny_tokenizer):
    """A truncated zip has lost its central directory, so no tensor can be named; the file is."""
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer)
    f = directory / "consolidated.00.pth"
    truncate(f, f.stat().st_size // 2)
    expect_error(directory, f, None, "truncated or corrupt")


@pytest.mark.parametrize("name", ["layers.1.feed_forward.w3.weight", "layers.0.attention.wk.weight",
                                  "output.weight"])
def test_meta_missing_tensor(tmp_path, tiny_tokenizer, name):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, edit=lambda sd: sd.pop(name))
    expect_error(directory, directory / "consolidated.00.pth", name, "missing tensor")


def test_meta_missing_embedding_with_vocab_from_weights(tmp_path, tiny_tokenizer):
    """params.json vocab_size -1 makes the loader read it from the embedding, which is missing."""
    name = "tok_embeddings.weight"
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, params={**META_PARAMS, "vocab_size": -1},
                                      edit=lambda sd: sd.pop(name))
    expect_error(directory, directory / "consolidated.00.pth", name, "missing tensor")


def test_meta_vocab_from_weights_loads(tmp_path, tiny_tokenizer):
    """Control for the case above."""
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, params={**META_PARAMS, "vocab_size": -1})
    assert assert_loads(directory).args.vocab_size == 1000


def test_meta_wrong_shape(tmp_path, tiny_tokenizer):
    name = "layers.0.feed_forward.w2.weight"

    def edit(sd):
        sd[name] = sd[name][:, :160].contiguous()

    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, edit=edit)
    expect_error(directory, directory / "consolidated.00.pth", name, "[64, 160]", f"[64, {META_FFN}]")


def test_meta_params_fewer_layers_than_weights(tmp_path, tiny_tokenizer):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, params={**META_PARAMS, "n_layers": 1})
    expect_error(directory, directory / "consolidated.00.pth", "layers.1.attention.wk.weight", "unexpected tensor")


def test_meta_unsupported_dtype(tmp_path, tiny_tokenizer):
    name = "layers.1.attention.wv.weight"

    def edit(sd):
        sd[name] = sd[name].to(torch.int8)

    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, edit=edit)
    expect_error(directory, directory / "consolidated.00.pth", name, "unsupported dtype")
