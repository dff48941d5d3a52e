"""Hostile or broken checkpoints: every bad value in config.json, params.json, generation_config.json or a
weight_map, and every unreadable torch file, fails with a CheckpointError naming the file and the key
(or tensor), before any model is built; the valid variants next to each (the controls) still load."""
from __future__ import annotations

import collections
import datetime
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codellama_rt import CheckpointError
from codellama_rt.checkpoint.loader import check_shapes
from codellama_rt.checkpoint.sources import _check_weight_map, detect_layout, open_source, read_args
from codellama_rt.cli import main
from codellama_rt.model.config_rules import MAX_CONTEXT
from conftest import write_hf_checkpoint
from test_checkpoint_errors import META_PARAMS, assert_loads, expect_error, write_meta_checkpoint

NAN, INF = float("nan"), float("inf")  # json.dumps writes them as NaN / Infinity, which json.load reads back


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """A valid tiny HF checkpoint (64 wide, 4 heads, 2 layers), written once; tests edit copies."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("hostile") / "hf", tiny_tokenizer)[0]


@pytest.fixture(scope="module")
def hf_sharded_base(tmp_path_factory, tiny_tokenizer) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("hostile") / "hf", tiny_tokenizer, shard_size="100KB")[0]


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint `src` whose config.json has `changes` (None deletes a key)."""
    directory = copy(src, dst)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def expect_key_error(directory: Path, file: Path, key: str, *fragments) -> CheckpointError:
    """Loading fails with a CheckpointError naming `file` and `key` (as `key=` or `'key'`)."""
    err = expect_error(directory, file, None, *fragments)
    msg = str(err)
    assert f"{key}=" in msg or f"'{key}'" in msg, msg
    assert "\n" not in msg, msg
    return err


# ---- config.json: one bad value ----------------------------------------------------------------

BAD_HF_VALUES = [
    ("num_attention_heads", 0, "expected an integer >= 1"),       # was ZeroDivisionError
    ("vocab_size", 0, "expected an integer >= 1"),                 # was AttributeError (no vocab from weights)
    ("vocab_size", -1, "expected an integer >= 1"),                # HF layout: -1 is not Meta's "from weights"
    ("vocab_size", -5, "expected an integer >= 1"),
    ("hidden_size", -64, "expected an integer >= 1"),
    ("intermediate_size", -96, "expected an integer >= 1"),
    ("num_key_value_heads", -4, "expected an integer >= 1"),
    ("num_key_value_heads", 0, "expected an integer >= 1"),
    ("max_position_embeddings", -1, "expected an integer >= 1"),
    ("max_position_embeddings", 0, "expected an integer >= 1"),  # loaded, then refused every prompt
    ("max_position_embeddings", 10 ** 12, f"larger than any supported context ({MAX_CONTEXT} tokens)"),
    ("max_position_embeddings", MAX_CONTEXT + 1, "corrupt config?"),
    ("num_hidden_layers", -2, "expected an integer >= 1"),
    ("hidden_size", 64.5, "expected an integer"),
    ("hidden_size", True, "expected an integer"),
    ("hidden_size", "64", "expected an integer"),
    ("num_hidden_layers", 10 ** 30, "corrupt config?"),
    ("rope_scaling", "linear", "expected an object"),              # was AttributeError
    ("rms_norm_eps", 0, "expected a finite number > 0"),           # these loaded and emitted garbage
    ("rms_norm_eps", -1e-5, "expected a finite number > 0"),
    ("rms_norm_eps", "nan", "expected a finite number > 0"),
    ("rms_norm_eps", NAN, "expected a finite number > 0"),
    ("rms_norm_eps", INF, "expected a finite number > 0"),
    ("rope_theta", 0, "expected a finite number > 0"),
    ("rope_theta", -1e4, "expected a finite number > 0"),
    ("rope_theta", NAN, "expected a finite number > 0"),
    ("rope_theta", INF, "expected a finite number > 0"),
    ("rope_theta", "10000", "expected a finite number > 0"),
    ("head_dim", 0, "positive even integer"),
    ("head_dim", -16, "positive even integer"),
    ("head_dim", 15, "positive even integer"),
    ("bos_token_id", -1, "token id"),
    ("bos_token_id", "1", "token id"),
    ("bos_token_id", True, "token id"),
    ("eos_token_id", "2", "token id"),
    ("eos_token_id", [2, -3], "token id"),
    ("eos_token_id", [], "token id"),
    ("eos_token_id", False, "token id"),
    ("tie_word_embeddings", "false", "expected true or false"),   # was read as True
    ("tie_word_embeddings", 0, "expected true or false"),
]


@pytest.mark.parametrize("key, value, reason", BAD_HF_VALUES,
                         ids=[f"{k}={json.dumps(v)[:20]}" for k, v, _ in BAD_HF_VALUES])
def test_bad_config_value(hf_base, tmp_path, key, value, reason):
    directory = with_config(hf_base, tmp_path / "m", **{key: value})
    err = expect_key_error(directory, directory / "config.json", key, reason, "is invalid")
    assert err.tensor is None


@pytest.mark.parametrize("scaling, key", [
    ({"type": "linear", "factor": 0}, "rope_scaling.factor"),
    ({"type": "linear", "factor": -2.0}, "rope_scaling.factor"),
    ({"type": "linear", "factor": NAN}, "rope_scaling.factor"),
    ({"type": "linear", "factor": INF}, "rope_scaling.factor"),
    ({"type": "linear", "factor": "2"}, "rope_scaling.factor"),
    ({"rope_type": "linear", "factor": 0}, "rope_scaling.factor"),
    ({"type": "dynamic", "factor": 2.0}, "rope_scaling.type"),
], ids=["zero", "negative", "nan", "inf", "string", "rope_type-zero", "dynamic"])
def test_bad_rope_scaling(hf_base, tmp_path, scaling, key):
    directory = with_config(hf_base, tmp_path / "m", rope_scaling=scaling)
    expect_key_error(directory, directory / "config.json", key)


def test_bad_rope_parameters(hf_base, tmp_path):
    """transformers 5 keeps rope_theta and the scaling in rope_parameters: checked the same way."""
    config = json.loads((hf_base / "config.json").read_text())
    config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
    directory = copy(hf_base, tmp_path / "a")
    (directory / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_theta": -1.0}}))
    expect_key_error(directory, directory / "config.json", "rope_parameters.rope_theta")
    directory = copy(hf_base, tmp_path / "b")
    (directory / "config.json").write_text(json.dumps(
        {**config, "rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": NAN}}))
    expect_key_error(directory, directory / "config.json", "rope_parameters.factor")
    directory = copy(hf_base, tmp_path / "c")
    (directory / "config.json").write_text(json.dumps({**config, "rope_parameters": "linear"}))
    expect_key_error(directory, directory / "config.json", "rope_parameters")


@pytest.mark.parametrize("changes, keys, fragment", [
    ({"hidden_size": 66}, ("hidden_size=66", "num_attention_heads=4"), "is not divisible by"),
    ({"num_key_value_heads": 3}, ("num_attention_heads=4", "num_key_value_heads=3"), "is not a multiple of"),
    ({"hidden_size": 36}, ("hidden_size=36", "num_attention_heads=4"), "must be even"),  # head_dim 9
], ids=["dim-heads", "heads-kv-heads", "odd-head-dim"])
def test_config_values_that_do_not_fit_together(hf_base, tmp_path, changes, keys, fragment):
    """Named by config.json's keys, not by ModelArgs' field names. (head_dim null: derived from the others.)"""
    directory = with_config(hf_base, tmp_path / "m", head_dim=None, **changes)
    msg = str(expect_error(directory, directory / "config.json", None, fragment, *keys))
    detail = msg.split(f"{directory / 'config.json'}: ", 1)[1]
    assert not re.search(r"\b(dim|n_heads|n_kv_heads|head_dim)=", detail), msg


def test_missing_required_key_names_it(hf_base, tmp_path):
    directory = copy(hf_base, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    del config["num_attention_heads"]
    (directory / "config.json").write_text(json.dumps(config))
    expect_key_error(directory, directory / "config.json", "num_attention_heads", "missing required key")


# ---- config.json: the controls -----------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"rope_scaling": None},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2}},
    {"rope_scaling": {"rope_type": "default"}},
    {"hidden_size": 64.0, "num_hidden_layers": 2.0, "max_position_embeddings": 512.0},  # integral floats
    {"head_dim": None, "num_key_value_heads": None},  # null: derived / same as the heads
    {"head_dim": 16, "eos_token_id": [2, 3], "bos_token_id": 1, "tie_word_embeddings": False},
    {"max_position_embeddings": MAX_CONTEXT},
], ids=["scaling-null", "scaling-linear", "scaling-rope_type", "scaling-default", "integral-floats", "nulls",
        "explicit", "max-context"])
def test_valid_config_variants_load(hf_base, tmp_path, changes):
    directory = with_config(hf_base, tmp_path / "m", **changes)
    args = read_args(directory, "hf")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == (64, 2, 4, 4, 16)
    assert type(args.dim) is int and type(args.max_seq_len) is int
    assert_loads(directory)


def test_hub_cache_symlinked_snapshot_loads(hf_sharded_base, tmp_path):
    """The Hugging Face cache stores each snapshot file as a symlink into ../../blobs: not 'outside'."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(hf_sharded_base.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        os.symlink(Path("..", "..", "blobs", f"blob{i}"), snapshot / f.name)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    assert_loads(snapshot)


# ---- generation_config.json -------------------------------------------------------------------

@pytest.mark.parametrize("eos", ["x", -1, [2, "x"], [], True, {"id": 2}])
def test_bad_generation_config_eos(hf_base, tmp_path, eos):
    directory = copy(hf_base, tmp_path / "m")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    expect_key_error(directory, directory / "generation_config.json", "eos_token_id", "token id")


@pytest.mark.parametrize("eos, expect", [(7, (2, 7)), ([2, 9], (2, 9)), (None, (2,))])
def test_valid_generation_config_eos(hf_base, tmp_path, eos, expect):
    directory = copy(hf_base, tmp_path / "m")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert read_args(directory, "hf").eos_ids == expect


# ---- Meta params.json -------------------------------------------------------------------------

BAD_META_VALUES = [
    ("dim", -64, "expected an integer >= 1"),
    ("n_heads", 0, "expected an integer >= 1"),
    ("n_layers", 0, "expected an integer >= 1"),
    ("multiple_of", 0, "expected an integer >= 1"),
    ("multiple_of", -32, "expected an integer >= 1"),
    ("norm_eps", -1e-5, "expected a finite number > 0"),
    ("norm_eps", NAN, "expected a finite number > 0"),
    ("rope_theta", 0, "expected a finite number > 0"),
    ("rope_theta", INF, "expected a finite number > 0"),
    ("ffn_dim_multiplier", 0, "expected a finite number > 0"),
    ("ffn_dim_multiplier", -1.3, "expected a finite number > 0"),
    ("ffn_dim_multiplier", NAN, "expected a finite number > 0"),
    ("ffn_dim_multiplier", "1.3", "expected a finite number > 0"),
    ("n_kv_heads", 0, "expected an integer >= 1"),
    ("n_kv_heads", -2, "expected an integer >= 1"),
    ("n_kv_heads", 1.5, "expected an integer >= 1"),
    ("vocab_size", 0, "or -1"),
    ("vocab_size", -2, "or -1"),
    ("max_seq_len", 10 ** 12, f"larger than any supported context ({MAX_CONTEXT} tokens)"),
    ("max_seq_len", 0, "expected an integer >= 1"),
]


@pytest.mark.parametrize("key, value, reason", BAD_META_VALUES,
                         ids=[f"{k}={json.dumps(v)[:20]}" for k, v, _ in BAD_META_VALUES])
def test_bad_meta_params_value(tmp_path, tiny_tokenizer, key, value, reason):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, params={**META_PARAMS, key: value})
    expect_key_error(directory, directory / "params.json", key, reason, "is invalid")


@pytest.mark.parametrize("changes, keys, fragment", [
    ({"n_heads": 3}, ("dim=64", "n_heads=3"), "is not divisible by"),
    ({"n_kv_heads": 3}, ("n_heads=4", "n_kv_heads=3"), "is not a multiple of"),
    ({"ffn_dim_multiplier": 1e-9}, ("ffn_dim (from dim, multiple_of, ffn_dim_multiplier)=0",), "integer >= 1"),
], ids=["dim-heads", "heads-kv-heads", "ffn-dim-zero"])
def test_meta_params_that_do_not_fit_together(tmp_path, tiny_tokenizer, changes, keys, fragment):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, params={**META_PARAMS, **changes})
    expect_error(directory, directory / "params.json", None, fragment, *keys)


def test_meta_vocab_minus_one_still_loads(tmp_path, tiny_tokenizer):
    """Control: in params.json -1 means "take it from the embedding"."""
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, params={**META_PARAMS, "vocab_size": -1})
    assert read_args(directory, "meta").vocab_size == -1
    assert assert_loads(directory).args.vocab_size == 1000


# ---- weight_map entries outside the model directory -------------------------------------------

def to_bin_shards(directory: Path) -> None:
    """Rewrite a sharded safetensors checkpoint as sharded pytorch_model*.bin with pytorch_model.bin.index.json."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    renamed = {}
    for f in sorted(set(index["weight_map"].values())):
        renamed[f] = f.replace("model", "pytorch_model").replace(".safetensors", ".bin")
        torch.save(load_file(directory / f), directory / renamed[f])
        (directory / f).unlink()
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (directory / "model.safetensors.index.json").unlink()
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("where", ["absolute", "dotdot", "inner-dotdot", "not-a-string", "null", "empty"])
def test_weight_map_outside_the_directory(hf_sharded_base, tmp_path, fmt, where):
    """Refused before anything is opened, even where the named file exists and holds the right tensor."""
    directory = copy(hf_sharded_base, tmp_path / "model")
    if fmt == "bin":
        to_bin_shards(directory)
    index = directory / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
    data = json.loads(index.read_text())
    name = "model.norm.weight"
    shard = data["weight_map"][name]
    shutil.copy(directory / shard, tmp_path / shard)  # a real file, outside the model directory
    data["weight_map"][name] = {"absolute": str(tmp_path / shard), "dotdot": f"../{shard}",
                                "inner-dotdot": f"sub/../../{shard}", "not-a-string": 7, "null": None,
                                "empty": ""}[where]
    index.write_text(json.dumps(data))
    err = expect_error(directory, index, name, "refused")
    assert err.file == str(index)


def test_weight_map_keys_must_be_strings(tmp_path):
    """JSON object keys are always strings; the check guards maps built otherwise."""
    with pytest.raises(CheckpointError, match="weight_map key 7"):
        _check_weight_map({7: "model.safetensors"}, tmp_path / "model.safetensors.index.json")


def test_weight_map_in_subfolder_loads(hf_sharded_base, tmp_path):
    """Control: a relative path inside the directory (even through a harmless '.') is fine."""
    directory = copy(hf_sharded_base, tmp_path / "model")
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    (directory / "shards").mkdir()
    for f in set(data["weight_map"].values()):
        shutil.move(directory / f, directory / "shards" / f)
    data["weight_map"] = {k: f"./shards/{v}" for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert_loads(directory)


# ---- torch files torch.load(weights_only=True, mmap=True) refuses ------------------------------

class _Params(collections.OrderedDict):
    """A class torch's weights-only unpickler does not know: loading it means running this module's code."""


def hf_bin_checkpoint(src: Path, dst: Path, save) -> tuple[Path, Path]:
    """A copy of `src` with its model.safetensors replaced by pytorch_model.bin written by `save(sd, path)`."""
    directory = copy(src, dst)
    f = directory / "pytorch_model.bin"
    save(load_file(directory / "model.safetensors"), f)
    (directory / "model.safetensors").unlink()
    return directory, f


def test_legacy_torch_format(tmp_path, tiny_tokenizer):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer)
    f = directory / "consolidated.00.pth"
    torch.save(torch.load(f, weights_only=True), f, _use_new_zipfile_serialization=False)
    assert f.read_bytes()[:1] == b"\x80"
    err = expect_error(directory, f, None, "legacy (non-zip) torch serialization format", "cannot be memory-mapped",
                       f"torch.save(torch.load({str(f)!r}, weights_only=True), {str(f)!r})")
    assert "truncated" not in str(err)
    # the command the message gives fixes it
    torch.save(torch.load(f, weights_only=True), f)
    assert_loads(directory)


def test_legacy_torch_format_hf_bin(hf_base, tmp_path):
    directory, f = hf_bin_checkpoint(hf_base, tmp_path / "m",
                                     lambda sd, f: torch.save(sd, f, _use_new_zipfile_serialization=False))
    expect_error(directory, f, None, "legacy (non-zip) torch serialization format", "re-save it")


def test_hf_bin_control_loads(hf_base, tmp_path):
    directory, _ = hf_bin_checkpoint(hf_base, tmp_path / "m", torch.save)
    assert_loads(directory)


@pytest.mark.parametrize("extra, found", [(_Params(a=1), f"{__name__}._Params"),
                                          (datetime.datetime(2024, 1, 1), "datetime.datetime")],
                         ids=["dict-subclass", "datetime"])
def test_pickled_python_objects_refused(tmp_path, tiny_tokenizer, extra, found):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer, edit=lambda sd: sd.update(extra=extra))
    f = directory / "consolidated.00.pth"
    err = expect_error(directory, f, None, "contains pickled Python objects other than tensors", found,
                       "refused for safety (loading it could run code)", "convert it to safetensors")
    assert "truncated" not in str(err)


def test_pickled_python_objects_refused_hf_bin(hf_base, tmp_path):
    directory, f = hf_bin_checkpoint(hf_base, tmp_path / "m", lambda sd, f: torch.save(_Params(sd), f))
    expect_error(directory, f, None, "contains pickled Python objects other than tensors", "_Params")


@pytest.mark.parametrize("content, fragment", [(b"", "file is empty"),
                                               (b"hello, world\n" * 10, "not a torch checkpoint")],
                         ids=["empty", "text"])
def test_not_a_torch_file(tmp_path, tiny_tokenizer, content, fragment):
    directory = write_meta_checkpoint(tmp_path / "meta", tiny_tokenizer)
    f = directory / "consolidated.00.pth"
    f.write_bytes(content)
    expect_error(directory, f, None, fragment)


# ---- check_shapes: config dims against tensor metadata, before allocation -----------------------

def shapes_of(directory: Path):
    layout = detect_layout(directory)
    return open_source(directory, layout), layout, read_args(directory, layout)


def test_check_shapes_huge_hidden_size(hf_base, tmp_path):
    """hidden_size 4096 over 64-wide weights: a shape error naming the tensor, no allocation of 4096-wide layers."""
    directory = with_config(hf_base, tmp_path / "m", hidden_size=4096)
    source, layout, args = shapes_of(directory)
    with pytest.raises(CheckpointError) as info:
        check_shapes(source, layout, args)
    msg = str(info.value)
    assert info.value.tensor == "model.embed_tokens.weight"
    assert str(directory / "model.safetensors") in msg and "'model.embed_tokens.weight'" in msg, msg
    assert "[1000, 64]" in msg and "[1000, 4096]" in msg, msg


def test_check_shapes_wrong_ffn_sharded(hf_sharded_base, tmp_path):
    directory = with_config(hf_sharded_base, tmp_path / "m", intermediate_size=128)
    source, layout, args = shapes_of(directory)
    with pytest.raises(CheckpointError) as info:
        check_shapes(source, layout, args)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert info.value.tensor == name
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert str(directory / index["weight_map"][name]) in str(info.value)


def test_check_shapes_corrupt_layer_count(hf_base, tmp_path):
    """A layer count far beyond the weights fails at the first missing layer, without building its plan."""
    directory = with_config(hf_base, tmp_path / "m", num_hidden_layers=2 ** 31 - 1)
    source, layout, args = shapes_of(directory)
    with pytest.raises(CheckpointError, match="missing tensor") as info:
        check_shapes(source, layout, args)
    assert info.value.tensor == "model.layers.2.input_layernorm.weight"


@pytest.mark.parametrize("sharded", [False, True])
def test_check_shapes_valid_hf(hf_base, hf_sharded_base, sharded):
    check_shapes(*shapes_of(hf_sharded_base if sharded else hf_base))


def test_check_shapes_meta(hf_checkpoint, tiny_tokenizer, tmp_path):
    """Meta shards are checked slice by slice, as MetaSource.read reads them; vocab_size -1 is taken from
    the embedding."""
    from test_meta_layout import write_meta_checkpoint as write_sharded

    _, hf_model = hf_checkpoint(n_heads=4, n_kv_heads=2, ffn=192)
    directory = write_sharded(tmp_path / "meta", hf_model, tiny_tokenizer, n_shards=2, multiple_of=64,
                              params_vocab_size=-1)
    source, layout, args = shapes_of(directory)
    assert layout == "meta" and len(source.shards) == 2 and args.vocab_size == -1
    assert source.has("layers.0.feed_forward.w1.weight") and not source.has("nope")
    assert source.shape("layers.0.feed_forward.w1.weight") == (96, 64)  # one shard's slice
    assert source.dtype("norm.weight") == torch.float32
    check_shapes(source, layout, args)
    params = json.loads((directory / "params.json").read_text())
    (directory / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))  # ffn 256, weights 192
    with pytest.raises(CheckpointError) as info:
        check_shapes(*shapes_of(directory))
    assert info.value.tensor == "layers.0.feed_forward.w1.weight"
    assert "[96, 64]" in str(info.value) and "[128, 64]" in str(info.value)  # per-shard shapes
    assert str(directory / "consolidated.00.pth") in str(info.value)


def test_check_shapes_quantized(hf_base, tmp_path):
    """Quantized projections are stored under other names or as integers: skipped; dense tensors checked."""
    from test_quant import write_bnb_like, write_gptq

    for directory in (write_bnb_like(hf_base, tmp_path / "bnb"), write_gptq(hf_base, tmp_path / "gptq", 32)):
        check_shapes(*shapes_of(directory))
        bad = with_config(directory, tmp_path / f"{directory.name}-bad", hidden_size=128)
        with pytest.raises(CheckpointError) as info:
            check_shapes(*shapes_of(bad))
        assert info.value.tensor == "model.embed_tokens.weight"


def test_check_shapes_own_quantized_format(hf_base, tmp_path):
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(hf_base), "--method", "int4", "--group-size", "32",
                 "--out", str(out)]) == 0
    check_shapes(*shapes_of(out))


# ---- the CLI -------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [0, -1])
def test_cli_info_bad_vocab_size(hf_base, tmp_path, capsys, vocab_size):
    """`info` used to die with AttributeError here (an HF checkpoint has no Meta shards to take vocab from)."""
    directory = with_config(hf_base, tmp_path / "m", vocab_size=vocab_size)
    capsys.readouterr()
    assert main(["info", "--model", str(directory)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(directory / "config.json") in lines[0] and "vocab_size" in lines[0], lines[0]
    assert out == ""
