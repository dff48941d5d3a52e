"""ModelArgs: presets carry the published CodeLlama shapes, Meta's params.json and HF config.json (transformers 4
and 5 styles) are read right, bad configs fail naming the problem, and a checkpoint's own values win.

Expected numbers are literals from the published models (params.json / config.json of
meta-llama/codellama and codellama/CodeLlama-*-hf, and their published parameter counts), not
values computed by the code under test."""
from __future__ import annotations

import copy
import json

import pytest

import codellama_rt
from codellama_rt import PRESETS, CheckpointError, ModelArgs
from codellama_rt.model.config_rules import MAX_CONTEXT

# name: (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size)
PUBLISHED = {
    "7b": (4096, 32, 32, 32, 11008, 32016),
    "13b": (5120, 40, 40, 40, 13824, 32016),
    "34b": (8192, 48, 64, 8, 22016, 32000),
    "70b": (8192, 80, 64, 8, 28672, 32016),
}
VARIANTS = ("", "-Python", "-Instruct")


# ---- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS, ids=["base", "Python", "Instruct"])
@pytest.mark.parametrize("size", PUBLISHED)
def test_preset_shapes(size, variant):
    name = f"CodeLlama-{size}{variant}"
    assert name in PRESETS
    a = ModelArgs.from_preset(name)
    dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab = PUBLISHED[size]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == \
        (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab)
    assert a.head_dim == 128
    assert a.rope_theta == 1e6
    assert a.rope_scaling is None
    assert a.max_seq_len == 16384
    assert a.norm_eps == 1e-5
    assert a.bos_id == 1 and a.eos_ids == (2,)
    assert a.tie_word_embeddings is False


def test_preset_names_are_exactly_the_published_ones():
    assert set(PRESETS) == {f"CodeLlama-{s}{v}" for s in ("7b", "13b", "34b", "70b") for v in VARIANTS}


@pytest.mark.parametrize("name", ["codellama-7b", "CodeLlama-7B", "CodeLlama-7b-python", "CodeLlama-7b-hf",
                                  "codellama/CodeLlama-7b-hf", "CodeLlama-7b ", "Llama-2-7b", "", "CodeLlama-8b"])
def test_unknown_preset_raises(name):
    with pytest.raises(ValueError, match="unknown preset") as info:
        ModelArgs.from_preset(name)
    assert repr(name) in str(info.value)


def test_from_preset_returns_a_copy():
    before = copy.deepcopy(PRESETS["CodeLlama-7b"])
    a = ModelArgs.from_preset("CodeLlama-7b")
    assert a is not PRESETS["CodeLlama-7b"]
    a.dim, a.n_layers, a.rope_theta, a.max_seq_len = 1, 2, 3.0, 4
    a.eos_ids = (2, 99)
    assert PRESETS["CodeLlama-7b"] == before
    assert ModelArgs.from_preset("CodeLlama-7b").dim == 4096
    # variants are separate objects too: changing one preset's copy leaves the others alone
    b = ModelArgs.from_preset("CodeLlama-7b-Python")
    b.vocab_size = 7
    assert PRESETS["CodeLlama-7b-Instruct"].vocab_size == 32016


def test_param_count_published():
    # published sizes: CodeLlama-7b-hf 6,738,546,688; CodeLlama-34b-hf 33,743,970,304
    assert ModelArgs.from_preset("CodeLlama-7b").param_count() == 6_738_546_688
    assert ModelArgs.from_preset("CodeLlama-7b-Instruct").param_count() == 6_738_546_688
    assert ModelArgs.from_preset("CodeLlama-34b").param_count() == 33_743_970_304
    assert ModelArgs.from_preset("CodeLlama-13b").param_count() == 13_016_028_160


def test_param_count_tied_embeddings_counts_the_matrix_once():
    a = ModelArgs(dim=64, n_layers=2, n_heads=4, ffn_dim=96, vocab_size=1000)
    tied = ModelArgs(dim=64, n_layers=2, n_heads=4, ffn_dim=96, vocab_size=1000, tie_word_embeddings=True)
    assert a.param_count() - tied.param_count() == 1000 * 64


def test_kv_cache_bytes():
    # fp16 K and V: 7B (MHA, 32 layers x 32 heads x 128) 512 KiB per token; 34B and 70B use GQA with 8 kv heads:
    # 48 x 8 x 128 -> 192 KiB, 80 x 8 x 128 -> 320 KiB per token
    assert ModelArgs.from_preset("CodeLlama-7b").kv_cache_bytes(1, 1, 2) == 524_288
    assert ModelArgs.from_preset("CodeLlama-34b").kv_cache_bytes(1, 1, 2) == 196_608
    assert ModelArgs.from_preset("CodeLlama-70b").kv_cache_bytes(1, 1, 2) == 327_680
    # full 16k context, batch 2, bf16, 7B: 2 x 16384 x 512 KiB = 16 GiB
    assert ModelArgs.from_preset("CodeLlama-7b").kv_cache_bytes(2, 16384, 2) == 16 * 2 ** 30
    assert ModelArgs.from_preset("CodeLlama-13b").kv_cache_bytes(1, 4096, 4) == 2 * 40 * 40 * 128 * 4096 * 4


# ---- Meta params.json ----------------------------------------------------------------------

META_PARAMS = {  # the params.json files of Meta's CodeLlama release
    "7b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": None,
           "norm_eps": 1e-05, "rope_theta": 1000000, "vocab_size": 32016},
    "13b": {"dim": 5120, "n_layers": 40, "n_heads": 40, "multiple_of": 256, "ffn_dim_multiplier": None,
            "norm_eps": 1e-05, "rope_theta": 1000000, "vocab_size": 32016},
    "34b": {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 256,
            "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 1000000, "vocab_size": 32000},
    "70b": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
            "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 1000000, "vocab_size": 32016},
}


@pytest.mark.parametrize("size", META_PARAMS)
def test_from_meta_params_published(size):
    a = ModelArgs.from_meta_params(META_PARAMS[size])
    dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab = PUBLISHED[size]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_dim, a.vocab_size) == \
        (dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab)
    assert a.rope_theta == 1e6
    assert a.norm_eps == 1e-5
    assert a.max_seq_len == 16384  # CodeLlama: trained on 16k-token sequences
    assert a == PRESETS[f"CodeLlama-{size}"]


@pytest.mark.parametrize("size, ffn_dim", [("7b", 11008), ("13b", 13824), ("34b", 22016), ("70b", 28672)])
def test_from_meta_params_ffn_dim(size, ffn_dim):
    assert ModelArgs.from_meta_params(META_PARAMS[size]).ffn_dim == ffn_dim


def test_from_meta_params_llama2_defaults():
    # Llama 2 7B's params.json: no rope_theta (1e4), vocab_size -1 (taken from the embedding at load)
    a = ModelArgs.from_meta_params({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                    "norm_eps": 1e-05, "vocab_size": -1})
    assert a.rope_theta == 10000.0
    assert a.ffn_dim == 11008
    assert a.n_kv_heads == 32
    assert a.max_seq_len == 4096


@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads"])
def test_from_meta_params_missing_key(key):
    params = dict(META_PARAMS["7b"])
    del params[key]
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_meta_params(params, file="/models/x/params.json")
    assert repr(key) in str(info.value) and "/models/x/params.json" in str(info.value)


# ---- HF config.json ------------------------------------------------------------------------

# codellama/CodeLlama-7b-hf config.json (transformers 4 style)
HF4_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 16384,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.33.0.dev0",
    "use_cache": True, "vocab_size": 32016,
}

# codellama/CodeLlama-34b-hf config.json (transformers 4 style, GQA)
HF4_34B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 22016, "max_position_embeddings": 16384,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.32.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}

# what transformers 5 writes for a LlamaConfig (rope settings moved into rope_parameters)
HF5_TINY = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 2048, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "pad_token_id": None,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06,
    "rope_parameters": {"factor": 2.0, "rope_theta": 10000.0, "rope_type": "linear", "type": "linear"},
    "tie_word_embeddings": False, "transformers_version": "5.24.0", "use_cache": True, "vocab_size": 1000,
}


@pytest.mark.parametrize("config, size", [(HF4_7B, "7b"), (HF4_34B, "34b")], ids=["7b", "34b"])
def test_from_hf_config_published(config, size):
    a = ModelArgs.from_hf_config(config)
    assert a == PRESETS[f"CodeLlama-{size}"]


def test_from_hf_config_transformers4_linear_scaling():
    config = dict(HF4_7B, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    a = ModelArgs.from_hf_config(config)
    assert a.rope_theta == 500000.0
    assert a.rope_scaling == {"type": "linear", "factor": 2.0}
    assert a.rope_factor == 2.0
    # transformers >= 4.45 writes rope_type next to (or instead of) type
    b = ModelArgs.from_hf_config(dict(HF4_7B, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    assert b.rope_scaling == {"type": "linear", "factor": 4.0}
    c = ModelArgs.from_hf_config(dict(HF4_7B, rope_scaling={"rope_type": "default"}))
    assert c.rope_scaling is None and c.rope_factor == 1.0


def test_from_hf_config_transformers5_rope_parameters():
    a = ModelArgs.from_hf_config(HF5_TINY)
    assert a.rope_theta == 10000.0
    assert a.rope_scaling == {"type": "linear", "factor": 2.0}
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim) == (64, 2, 4, 4, 16, 96)
    assert a.norm_eps == 1e-6 and a.max_seq_len == 2048 and a.vocab_size == 1000
    # CodeLlama 7B as transformers 5 would write it: theta only inside rope_parameters, default rope type
    hf5_7b = {k: v for k, v in HF4_7B.items() if k not in ("rope_theta", "rope_scaling")}
    hf5_7b["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
    b = ModelArgs.from_hf_config(hf5_7b)
    assert b.rope_theta == 1e6 and b.rope_scaling is None
    assert b == PRESETS["CodeLlama-7b"]
    hf5_7b["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 4.0}
    c = ModelArgs.from_hf_config(hf5_7b)
    assert c.rope_theta == 1e6 and c.rope_scaling == {"type": "linear", "factor": 4.0}


def test_from_hf_config_eos_int_or_list():
    assert ModelArgs.from_hf_config(dict(HF4_7B, eos_token_id=2)).eos_ids == (2,)
    assert ModelArgs.from_hf_config(dict(HF4_7B, eos_token_id=[2, 32010])).eos_ids == (2, 32010)


def test_from_hf_config_head_dim():
    config = {k: v for k, v in HF4_7B.items()}
    assert "head_dim" not in config
    assert ModelArgs.from_hf_config(config).head_dim == 128
    assert ModelArgs.from_hf_config(dict(config, head_dim=None)).head_dim == 128
    a = ModelArgs.from_hf_config(dict(HF5_TINY, head_dim=32))  # explicit head_dim wins over dim / n_heads
    assert a.head_dim == 32 and a.q_dim == 128 and a.kv_dim == 128


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                                 "vocab_size"])
def test_from_hf_config_missing_key(key):
    config = {k: v for k, v in HF4_7B.items() if k != key}
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_hf_config(config, file="/models/x/config.json")
    assert isinstance(info.value, ValueError)
    assert repr(key) in str(info.value) and "/models/x/config.json" in str(info.value)


@pytest.mark.parametrize("config", [
    dict(HF4_7B, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
    dict(HF4_7B, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    {**{k: v for k, v in HF5_TINY.items() if k != "rope_parameters"},
     "rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}},
], ids=["hf4-type", "hf4-rope_type", "hf5"])
def test_from_hf_config_unsupported_rope_scaling(config):
    with pytest.raises(ValueError) as info:
        ModelArgs.from_hf_config(config, file="/models/x/config.json")
    assert "yarn" in str(info.value) and "rope_scaling" in str(info.value)


@pytest.mark.parametrize("changes, names", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "mistral"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "gpt2"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
])
def test_from_hf_config_not_llama(changes, names):
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_hf_config(dict(HF4_7B, **changes), file="/models/x/config.json")
    assert names in str(info.value) and "/models/x/config.json" in str(info.value)


@pytest.mark.parametrize("changes, fragment", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"), ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
])
def test_from_hf_config_refuses_what_it_would_silently_run_otherwise(changes, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        ModelArgs.from_hf_config(dict(HF4_7B, **changes), file="config.json")
    assert ModelArgs.from_hf_config(dict(HF4_7B, hidden_act="silu", attention_bias=False, mlp_bias=False))

def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match="n_heads"):
        ModelArgs(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=4096, n_heads=32, n_kv_heads=5)
    with pytest.raises(ValueError, match="factor"):
        ModelArgs(rope_scaling={"type": "linear", "factor": 0})


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_heads=0), "n_heads"),  # was ZeroDivisionError
    (dict(dim=-1), "dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(ffn_dim=-11008), "ffn_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dim=4096.5), "dim"),
    (dict(n_layers=True), "n_layers"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(rope_theta="1e6"), "rope_theta"),
    (dict(rope_scaling="linear"), "rope_scaling"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(max_seq_len=MAX_CONTEXT + 1), "max_seq_len"),
    (dict(head_dim=7), "head_dim"),
    (dict(head_dim=-128), "head_dim"),
    (dict(bos_id=-1), "bos_id"),
    (dict(eos_ids=("x",)), "eos_ids"),
    (dict(eos_ids=()), "eos_ids"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(dim=72, n_heads=8, n_kv_heads=8), "n_heads"),  # head_dim 9: odd
])
def test_invalid_values_raise_plain_value_error(kwargs, field):
    """Code that builds ModelArgs directly gets a ValueError (not a CheckpointError: no file is involved)
    naming the field."""
    with pytest.raises(ValueError) as info:
        ModelArgs(**kwargs)
    assert type(info.value) is ValueError
    assert f"{field}=" in str(info.value)


def test_values_are_normalized():
    a = ModelArgs(dim=4096.0, n_layers=32.0, max_seq_len=16384.0, rope_theta=1000000, norm_eps=1e-5, eos_ids=2)
    assert (type(a.dim), type(a.n_layers), type(a.max_seq_len), type(a.rope_theta)) == (int, int, int, float)
    assert a == PRESETS["CodeLlama-7b"]
    assert ModelArgs(vocab_size=-1).vocab_size == -1  # Meta's "from the embedding"
    assert ModelArgs(rope_scaling={"rope_type": "linear", "factor": 2}).rope_scaling == {"type": "linear",
                                                                                          "factor": 2.0}
    a.n_heads = 0
    with pytest.raises(ValueError, match="n_heads=0"):
        a.validate()


@pytest.mark.parametrize("changes, key", [
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"vocab_size": -1}, "vocab_size=-1"),
    ({"hidden_size": 4096.5}, "hidden_size=4096.5"),
    ({"rope_theta": float("nan")}, "rope_theta=NaN"),
    ({"rope_scaling": {"type": "linear", "factor": float("inf")}}, "rope_scaling.factor=Infinity"),
    ({"max_position_embeddings": 10 ** 12}, "max_position_embeddings=1000000000000"),
    ({"tie_word_embeddings": "false"}, 'tie_word_embeddings="false"'),
    ({"hidden_size": 4100}, "hidden_size=4100 is not divisible by num_attention_heads=32"),
    ({"num_key_value_heads": 5}, "num_attention_heads=32 is not a multiple of num_key_value_heads=5"),
])
def test_from_hf_config_invalid_value_names_file_and_key(changes, key):
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_hf_config(dict(HF4_7B, **changes), file="/models/x/config.json")
    assert str(info.value).startswith(f"/models/x/config.json: {key}"), str(info.value)


def test_from_hf_config_integral_floats():
    config = dict(HF4_7B, hidden_size=4096.0, num_hidden_layers=32.0, max_position_embeddings=16384.0)
    assert ModelArgs.from_hf_config(config) == PRESETS["CodeLlama-7b"]


@pytest.mark.parametrize("changes, key", [
    ({"n_heads": 0}, "n_heads=0"),
    ({"dim": -4096}, "dim=-4096"),
    ({"multiple_of": 0}, "multiple_of=0"),
    ({"norm_eps": -1e-5}, "norm_eps=-1e-05"),
    ({"ffn_dim_multiplier": float("nan")}, "ffn_dim_multiplier=NaN"),
    ({"n_kv_heads": 0}, "n_kv_heads=0"),
    ({"vocab_size": 0}, "vocab_size=0"),
    ({"max_seq_len": 2 ** 40}, "max_seq_len=1099511627776"),
])
def test_from_meta_params_invalid_value_names_file_and_key(changes, key):
    with pytest.raises(CheckpointError) as info:
        ModelArgs.from_meta_params(dict(META_PARAMS["70b"], **changes), file="/models/x/params.json")
    assert str(info.value).startswith(f"/models/x/params.json: {key} is invalid"), str(info.value)


# ---- a checkpoint's values win over defaults ----------------------------------------------------

def test_checkpoint_values_win(hf_checkpoint):
    directory, hf_model = hf_checkpoint(rope_theta=1e4, max_pos=512)
    config = json.loads((directory / "config.json").read_text())
    model = codellama_rt.load(directory, progress=False)
    assert model.args.rope_theta == 1e4 != ModelArgs().rope_theta
    assert model.args.max_seq_len == 512
    assert (model.args.dim, model.args.n_layers, model.args.vocab_size) == (64, 2, 1000)
    assert model.args.norm_eps == config["rms_norm_eps"] == 1e-5
    assert model.args.param_count() == hf_model.num_parameters()


def test_checkpoint_linear_rope_scaling_read(hf_checkpoint):
    directory, _ = hf_checkpoint(rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = codellama_rt.load(directory, progress=False)
    assert model.args.rope_theta == 1e4
    assert model.args.rope_scaling == {"type": "linear", "factor": 2.0}


def test_generation_config_eos_ids_added(hf_checkpoint):
    directory, _ = hf_checkpoint(rope_theta=1e4)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    assert codellama_rt.load(directory, progress=False).args.eos_ids == (2, 7)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert codellama_rt.load(directory, progress=False).args.eos_ids == (2, 9)


def test_special_ids_outside_the_vocabulary_are_refused(hf_checkpoint):
    """An EOS the model can never produce would let generation run past the real one to max tokens."""
    directory, _ = hf_checkpoint(rope_theta=1e4)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [99999]}))
    with pytest.raises(CheckpointError, match="special token id 99999"):
        codellama_rt.load(directory, progress=False)


def test_generation_config_eos_stops_generation(hf_checkpoint):
    """An eos id that only generation_config.json names ends generation with finish_reason 'eos'."""
    directory, _ = hf_checkpoint(rope_theta=1e4)
    (directory / "generation_config.json").unlink(missing_ok=True)
    prompt = "def fibonacci(n):"
    free = codellama_rt.load(directory, progress=False).generate(prompt, max_new_tokens=12)
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    target = free.token_ids[2]
    assert target != 2
    k = free.token_ids.index(target)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, target]}))
    model = codellama_rt.load(directory, progress=False)
    assert model.args.eos_ids == (2, target)
    got = model.generate(prompt, max_new_tokens=12)
    assert got.finish_reason == "eos"
    assert got.token_ids == free.token_ids[:k]
