"""Shared fixtures: a SentencePiece tokenizer trained here, tiny checkpoints written by transformers, and
NaN-filled fresh allocations (tests/nan_poison.py has the NaN helpers).

Tests import the modules beside this file (`tolerances`, `nan_poison`, `tool_modules`) by plain name:
pytest puts tests/, the first directory up from a test file without an __init__.py, on sys.path.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from codellama_rt.tiny import train_tokenizer
from nan_poison import nan_allocations

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_TOKENIZERS = SHARED / "tokenizers"

TINY_VOCAB = 1000


def pytest_collection_modifyitems(config, items):
    # experiment tests last: a kernel path that never ran on this GPU could leave the CUDA context broken
    # (an illegal address is sticky) and fail every test after it
    # Under xdist (a worker has `workerinput`) slow tests go first among the rest, so that what is left at the
    # end for a worker to take is short (else the whole-model interpreter runs, in test_t*.py files, ran last
    # on one worker while the other idled). Stable: the order within each group holds.
    slow_first = hasattr(config, "workerinput")
    items.sort(key=lambda item: ("experiment" in item.keywords, not (slow_first and "slow" in item.keywords)))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 1000-piece BPE tokenizer (byte fallback, infill pieces) trained on the stdlib's sources."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tiny", vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny(tiny_tokenizer):
    """The tiny tokenizer as a codellama_rt.Tokenizer."""
    from codellama_rt import Tokenizer

    return Tokenizer.from_file(tiny_tokenizer)


def real_tokenizer(path: Path):
    """(Tokenizer, plain SentencePieceProcessor) of a file in ../shared/tokenizers; skips when absent."""
    import sentencepiece as spm

    from codellama_rt import Tokenizer

    if not SHARED_TOKENIZERS.is_dir() or not path.is_file():
        pytest.skip(f"{path} not available")
    return Tokenizer.from_file(path), spm.SentencePieceProcessor(model_file=str(path))


def available_tokenizers(*paths: Path) -> list:
    """Tokenizers of those real files that exist (none when ../shared/tokenizers is absent)."""
    from codellama_rt import Tokenizer

    return [Tokenizer.from_file(p) for p in paths if p.is_file()]


def _peaky_init(model, seed: int) -> None:
    """Weights with std ~ 1/sqrt(fan_in) so logits are far from flat (greedy choices are stable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / p.shape[-1] ** 0.5))


def write_hf_checkpoint(directory: Path, tokenizer_model: Path, *, n_heads=4, n_kv_heads=4, rope_theta=1e4,
                        dim=64, n_layers=2, ffn=96, max_pos=512, rope_scaling=None, shard_size=None,
                        tie=False, seed=0):
    """Write a random LlamaForCausalLM with transformers' own save_pretrained; return (dir, hf_model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, rope_theta=rope_theta,
                      rope_scaling=rope_scaling, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    _peaky_init(model, seed)
    if tie:
        model.tie_weights()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    shutil.copy(tokenizer_model, Path(directory) / "tokenizer.model")
    return Path(directory), model


@pytest.fixture
def hf_checkpoint(tmp_path, tiny_tokenizer):
    """Factory: hf_checkpoint(**kwargs) -> (dir, transformers model); kwargs as write_hf_checkpoint."""
    counter = iter(range(1000))

    def make(**kwargs):
        return write_hf_checkpoint(tmp_path / f"ckpt{next(counter)}", tiny_tokenizer, **kwargs)

    return make


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors during the test, so an output
    element a launcher allocates but its kernel never writes shows up as NaN (inputs have none)."""
    nan_allocations(monkeypatch)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable for the test, as on an install without the `plots` extra."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
