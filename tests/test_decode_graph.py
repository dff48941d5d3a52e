"""The decode step (`codellama_rt.engine.decode_graph.DecodeStep`): static buffers, no host sync, fixed shapes,
eager tokens equal to a plain no-cache loop, reuse and recapture rules; on CUDA (tests marked `gpu`),
the graph-captured step against the eager one, replay without recapture, no sync, no second KV cache."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import codellama_rt as cl
from codellama_rt.model.config import ModelArgs
from codellama_rt.engine.decode_graph import DecodeStep
from codellama_rt.model.transformer import Prefill
from codellama_rt.engine.sampling import SamplingParams, SamplingSignature, sample_next
from codellama_rt.tiny import write_random_checkpoint

PROMPTS = ["def fibonacci(n):\n    if n < 2:", "import os\n", "class Config:\n    def __init__(self", "x = ["]
SAMPLINGS = [pytest.param(dict(), id="greedy"),
             pytest.param(dict(temperature=0.9, seed=7), id="seeded"),
             pytest.param(dict(temperature=1.1, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=3), id="seeded-all"),
             pytest.param(dict(repetition_penalty=1.2), id="greedy-penalty")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=1000, rope_theta=1e6,
                     max_seq_len=1024)
    return write_random_checkpoint(tmp_path_factory.mktemp("decode_graph") / "m", args, tiny_tokenizer)


@pytest.fixture
def model(checkpoint):
    return cl.load(checkpoint, max_seq_len=1024, max_batch_size=4)


def token_ids(model, prompts, n, **sampling):
    """Generated ids of each prompt, exactly n of them (no stop tokens)."""
    run = model.engine.run([model.tokenizer.encode(p) for p in prompts],
                           SamplingParams(max_new_tokens=n, **sampling), {})
    for _ in run:
        pass
    return [c.token_ids for c in run.completions]


# ---- host-sync and shape guards ------------------------------------------------------------------

_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.unique_consecutive.default", "aten._unique2.default", "aten.repeat_interleave.Tensor"}
_INDEX_OPS = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default",
              "aten._index_put_impl_.default"}


class StepTrace(TorchDispatchMode):
    """Records every op with its output shapes; raises on ops that read device data on the host
    (`.item()`, `bool()`, data-dependent shapes such as nonzero or boolean-mask indexing), and on the
    forms that are free on CPU but sync on CUDA: `t[idx] = 1` (index_put_ copies the 0-dim CPU value
    to the device and waits), indexing with a 0-dim tensor, masked_fill with a tensor value."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _SYNC_OPS:
            raise AssertionError(f"host sync in the decode step: {name}")
        if name in _INDEX_OPS:
            indices = [i for i in (args[1] or ()) if isinstance(i, torch.Tensor)]
            if any(i.dtype in (torch.bool, torch.uint8) or i.dim() == 0 for i in indices):
                raise AssertionError(f"boolean-mask or 0-dim tensor indexing (a host sync): {name}")
            if name != "aten.index.Tensor" and args[2].dim() == 0:
                raise AssertionError(f"scalar assignment by index_put_ (a host-to-device sync on CUDA): {name}")
        if name.startswith("aten.masked_fill") and ".Tensor" in name:
            raise AssertionError(f"masked_fill with a tensor value (an item() sync on CUDA): {name}")
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


@contextlib.contextmanager
def no_host_reads():
    """Any Python-level read of tensor data (item, tolist, bool/int/float conversion, numpy) raises."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"host read in the decode step: Tensor.{name}")
        return f

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_guards_catch_host_reads():
    x = torch.arange(6.0)
    rows = torch.arange(2)

    def assign():
        x[rows] = 1.0

    for bad in (lambda: x.max().item(), lambda: bool(x.any()), lambda: x[x > 2], lambda: x.tolist(),
                lambda: torch.nonzero(x), assign, lambda: x.masked_fill(x > 2, x[0])):
        with pytest.raises(AssertionError, match="sync|host read"):
            with StepTrace(), no_host_reads():
                bad()


def _step(model, B, sampling) -> DecodeStep:
    eng = model.engine
    return eng.decode_step(B, SamplingSignature.of(SamplingParams(**sampling)), eng._cache)


@pytest.mark.parametrize("backend,sampling", [*(pytest.param("reference", s.values[0], id=f"reference-{s.id}")
                                                 for s in SAMPLINGS),
                                               pytest.param("triton", SAMPLINGS[2].values[0], id="triton-seeded-all",
                                                            marks=pytest.mark.slow)])
def test_step_has_no_host_sync_and_fixed_shapes(checkpoint, backend, sampling):
    """Every call runs the same ops on the same shapes and never reads device data on the host."""
    model = cl.load(checkpoint, backend=backend, max_seq_len=1024, max_batch_size=4)
    token_ids(model, PROMPTS[:3], 3, **sampling)  # builds the step and loads a generation into it
    step = _step(model, 3, sampling)
    traces = []
    for _ in range(4):
        with StepTrace() as trace, no_host_reads():
            step()
        traces.append(trace.ops)
    assert traces[0] and all(t == traces[0] for t in traces[1:])
    assert step.positions.tolist() == [len(model.tokenizer.encode(p)) + 2 + 4 for p in PROMPTS[:3]]


def test_step_buffers_are_static_across_steps_and_calls(model, monkeypatch):
    """data_ptr and shape of every buffer the step touches (KV cache included) never change, across
    steps and across generations of the same batch size, which reuse the same step object."""
    seen_steps, records = [], []
    call = DecodeStep.__call__

    def recording(self):
        seen_steps.append(self)
        records.append({k: (t.data_ptr(), tuple(t.shape)) for k, t in self.buffers().items()})
        return call(self)

    monkeypatch.setattr(DecodeStep, "__call__", recording)
    for sampling in (dict(), dict(temperature=0.7, seed=1)):
        seen_steps.clear(), records.clear()
        token_ids(model, PROMPTS[:2], 12, **sampling)
        token_ids(model, PROMPTS[2:4], 20, **sampling)
        assert len(records) == 11 + 19
        assert len({id(s) for s in seen_steps}) == 1
        assert all(r == records[0] for r in records)
        assert records[0]["kv_cache"][1] == tuple(model.engine._cache.data.shape)


def no_cache_generate(module, prompts, params: SamplingParams, n):
    """Oracle: every token from a full forward pass over the whole sequence (no KV cache, no decode
    step), one [B, V] sampler draw per token from a freshly seeded generator."""
    gen = None if params.greedy else torch.Generator().manual_seed(params.seed)
    rows = [list(p) for p in prompts]
    with torch.inference_mode():
        for _ in range(n):
            logits = torch.cat([module(torch.tensor([r]), Prefill(0), None)[:, -1] for r in rows])
            seen = torch.zeros(len(rows), module.args.vocab_size, dtype=torch.bool)
            for b, r in enumerate(rows):
                seen[b, r] = True
            for r, t in zip(rows, sample_next(logits, params, seen, gen).tolist()):
                r.append(t)
    return [r[len(p):] for r, p in zip(rows, prompts)]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("B", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_eager_step_tokens_equal_a_plain_loop(model, sampling, B):
    params = SamplingParams(max_new_tokens=16, **sampling)
    ids = [model.tokenizer.encode(p) for p in PROMPTS[:B]]
    assert token_ids(model, PROMPTS[:B], 16, **sampling) == no_cache_generate(model.module, ids, params, 16)


@pytest.mark.slow
def test_steps_reused_per_shape_and_dropped_when_the_cache_grows(model):
    eng = model.engine
    assert not eng.cuda_graphs and eng.captures == 0 and model.graph_pool_bytes() == 0
    token_ids(model, PROMPTS[:2], 8)
    cache = eng._cache
    greedy2 = _step(model, 2, dict())
    token_ids(model, PROMPTS[2:4], 8)
    assert _step(model, 2, dict()) is greedy2 and eng._cache is cache
    a = token_ids(model, PROMPTS[:2], 8, temperature=0.5, seed=1)
    sampled2 = _step(model, 2, dict(temperature=0.5))
    assert sampled2 is not greedy2
    b = token_ids(model, PROMPTS[:2], 8, temperature=1.5, seed=2)  # other values, same signature
    assert _step(model, 2, dict(temperature=1.5)) is sampled2 and a != b
    assert token_ids(model, PROMPTS[:2], 8, temperature=0.5, seed=1) == a
    token_ids(model, PROMPTS[:3], 8)
    assert _step(model, 3, dict()) is not greedy2 and len(eng._steps) == 3
    token_ids(model, PROMPTS[:2], 400)  # needs a 512-token cache: the steps over the old one go
    assert eng._cache is not cache and eng._cache.max_seq_len == 512
    assert len(eng._steps) == 1 and _step(model, 2, dict()) is not greedy2
    assert _step(model, 2, dict()).cache is eng._cache
    assert eng.captures == 0


def test_a_prompt_filling_the_context_beside_a_short_one(checkpoint):
    """The full row generates nothing (and its position stays inside the cache); the other row is
    unaffected by it."""
    model = cl.load(checkpoint, max_seq_len=128, max_batch_size=2)
    full = model.tokenizer.encode("a = 1\n" * 200)[:128]
    got = model.generate([full, PROMPTS[1]], max_new_tokens=5)
    assert got[0].token_ids == [] and got[0].finish_reason == "length"
    assert got[1].token_ids == model.generate(PROMPTS[1], max_new_tokens=5).token_ids


def test_cuda_graphs_option(checkpoint):
    assert cl.load(checkpoint).engine.cuda_graphs is (torch.cuda.is_available())
    assert cl.load(checkpoint, device="cpu", cuda_graphs=None).engine.cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs"):
        cl.load(checkpoint, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs"):
        cl.load(checkpoint, device="cpu", cuda_graphs="yes")


def test_step_refuses_a_batch_over_the_cache(model):
    cache = model.engine.cache_for(16)
    with pytest.raises(ValueError, match="batch"):
        model.engine.decode_step(5, SamplingSignature.of(SamplingParams()), cache)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    def __init__(self):
        self.registered = []

    def register_generator_state(self, generator):
        self.registered.append(generator)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_capture_leaves_buffers_and_generator_as_found(model, monkeypatch, sampling):
    """`_capture`'s own logic on CPU, with torch.cuda's stream and graph calls faked: its eager warm-up
    steps are undone (every buffer but the KV cache, and the generator's state), the sampling generator
    is registered with the graph, and a replaying step routes to the graph."""
    params = SamplingParams(max_new_tokens=6, **sampling)
    eng = model.engine
    first = token_ids(model, PROMPTS[:2], 6, **sampling)
    step = _step(model, 2, sampling)
    before = {k: t.clone() for k, t in step.buffers().items() if k != "kv_cache"}
    rng = eng.generator.get_state()
    captured = []

    @contextlib.contextmanager
    def fake_capture(graph, pool=None):  # a real capture records the work without running it
        state = {k: t.clone() for k, t in step.buffers().items()}
        gen_state = eng.generator.get_state()
        yield
        captured.append((graph, pool))
        for k, t in state.items():
            step.buffers()[k].copy_(t)
        eng.generator.set_state(gen_state)

    for name, fake in (("Stream", lambda device=None: _FakeStream()),
                       ("current_stream", lambda device=None: _FakeStream()),
                       ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", _FakeGraph),
                       ("graph", fake_capture)):
        monkeypatch.setattr(torch.cuda, name, fake)
    step._capture("pool")
    assert [p for _, p in captured] == ["pool"] and step.graph is captured[0][0]
    assert step.graph.registered == ([] if params.greedy else [eng.generator])
    assert all(torch.equal(step.buffers()[k], t) for k, t in before.items())
    assert torch.equal(eng.generator.get_state(), rng)
    step.graph.replay = step._step  # what the recorded graph would run
    assert token_ids(model, PROMPTS[:2], 6, **sampling) == first


# ---- CUDA graphs (need a GPU) --------------------------------------------------------------------

DEV = "cuda"
GPU_SAMPLINGS = [pytest.param(dict(), id="greedy"),
                 pytest.param(dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=1234),
                              id="seeded")]


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=512, vocab_size=1000, rope_theta=1e6,
                     max_seq_len=2048)
    return write_random_checkpoint(tmp_path_factory.mktemp("decode_graph_gpu") / "m", args, tiny_tokenizer)


def gpu_model(path, backend, cuda_graphs, kernel_options=None):
    return cl.load(path, backend=backend, device=DEV, max_seq_len=2048, max_batch_size=4, cuda_graphs=cuda_graphs,
                   kernel_options=kernel_options)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("sampling", GPU_SAMPLINGS)
@pytest.mark.parametrize("B", [1, 4])
def test_graph_tokens_equal_eager_tokens(gpu_checkpoint, backend, sampling, B):
    graphed, eager = gpu_model(gpu_checkpoint, backend, True), gpu_model(gpu_checkpoint, backend, False)
    assert graphed.engine.cuda_graphs and not eager.engine.cuda_graphs
    want = token_ids(eager, PROMPTS[:B], 1001, **sampling)
    got = token_ids(graphed, PROMPTS[:B], 1001, **sampling)
    assert graphed.engine.captures == 1 and eager.engine.captures == 0
    assert [len(r) for r in got] == [1001] * B
    assert [r[:2] for r in got] == [r[:2] for r in want], "after 1 step"
    assert got == want, "after 1000 steps"


@pytest.mark.gpu
def test_second_generation_replays_without_recapture(gpu_checkpoint):
    model = gpu_model(gpu_checkpoint, "triton", None)
    eng = model.engine
    assert eng.cuda_graphs  # the default on CUDA
    first = token_ids(model, PROMPTS[:2], 40)
    step = _step(model, 2, dict())
    graph = step.graph
    assert eng.captures == 1 and graph is not None
    assert token_ids(model, PROMPTS[:2], 40) == first
    assert token_ids(model, PROMPTS[2:4], 60)
    assert eng.captures == 1 and _step(model, 2, dict()) is step and step.graph is graph
    a = token_ids(model, PROMPTS[:2], 40, temperature=0.8, seed=5)
    assert eng.captures == 2
    b = token_ids(model, PROMPTS[:2], 40, temperature=1.3, seed=6)  # other values: same graph
    assert token_ids(model, PROMPTS[:2], 40, temperature=0.8, seed=5) == a != b
    assert eng.captures == 2
    token_ids(model, PROMPTS[:1], 10)
    assert eng.captures == 3  # a new batch size
    token_ids(model, PROMPTS[:1], 1500)  # the cache grows: its steps are captured again
    assert eng.captures == 4 and len(eng._steps) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_step_does_not_sync(gpu_checkpoint, cuda_graphs):
    model = gpu_model(gpu_checkpoint, "triton", cuda_graphs)
    sampling = dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=0)
    token_ids(model, PROMPTS[:4], 5, **sampling)
    step = _step(model, 4, sampling)
    assert (step.graph is not None) == cuda_graphs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def gpu_long_checkpoint(tmp_path_factory, tiny_tokenizer):
    args = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=512, vocab_size=1000, rope_theta=1e6,
                     max_seq_len=32768)
    return write_random_checkpoint(tmp_path_factory.mktemp("decode_graph_gpu_long") / "m", args, tiny_tokenizer)


@pytest.mark.gpu
def test_capture_adds_no_second_kv_cache(gpu_long_checkpoint):
    """The capture must reuse the engine's KV cache. It does allocate other memory: the graph's pool and
    cuBLAS workspaces for the side streams of warm-up and capture (32 MiB each on Hopper: 64 MiB allocated
    and 36 MiB more reserved, measured on an H200), so the cache is made large (512 MiB) for a second copy
    of it to stand far above those."""
    model = cl.load(gpu_long_checkpoint, backend="triton", device=DEV, max_seq_len=32768, max_batch_size=4,
                    cuda_graphs=True)
    eng = model.engine
    cache = eng.cache_for(20000)
    assert cache.max_seq_len >= 20000 and cache.nbytes >= 512 << 20, (cache.max_seq_len, cache.nbytes)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    step = eng.decode_step(4, SamplingSignature.of(SamplingParams(temperature=1.0, top_p=0.9)), cache)
    assert step.graph is not None and eng.captures == 1
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    grown_allocated = torch.cuda.memory_allocated() - allocated
    grown_reserved = torch.cuda.memory_reserved() - reserved
    pool = model.graph_pool_bytes()
    assert 0 < pool <= grown_reserved < cache.nbytes // 2, (pool, grown_reserved, cache.nbytes)
    assert grown_allocated < cache.nbytes // 4, (grown_allocated, cache.nbytes)
    assert step.cache.data.data_ptr() == cache.data.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_pdl_on_and_off_give_the_same_tokens(gpu_checkpoint, cuda_graphs):
    """Programmatic dependent launch only changes when kernels start, never what they compute."""
    from codellama_rt.kernels._triton import pdl_enabled

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    no_pdl = cl.KernelOptions(pdl=False)
    assert pdl_enabled(torch.device(DEV), cl.KernelOptions()) and not pdl_enabled(torch.device(DEV), no_pdl)
    sampling = dict(temperature=0.9, top_k=50, seed=7)
    with_pdl = token_ids(gpu_model(gpu_checkpoint, "triton", cuda_graphs), PROMPTS[:1], 300, **sampling)
    model = gpu_model(gpu_checkpoint, "triton", cuda_graphs, kernel_options=no_pdl)
    assert model.module.ops.options == no_pdl
    without = token_ids(model, PROMPTS[:1], 300, **sampling)
    assert with_pdl == without


@pytest.mark.gpu
@pytest.mark.experiment
@pytest.mark.parametrize("B", [1, 4])
def test_experiments_keep_graph_tokens_equal_eager_tokens(gpu_checkpoint, B):
    """With every experiment on (`kernel_options`: kernel paths not yet the default), the graphed decode step
    still gives the eager step's tokens, over 300 sampled steps."""
    from codellama_rt.kernels.options import EXPERIMENTS

    every = cl.KernelOptions(experiments=EXPERIMENTS)
    sampling = dict(temperature=0.9, top_k=50, seed=7)
    graphed = token_ids(gpu_model(gpu_checkpoint, "triton", True, every), PROMPTS[:B], 300, **sampling)
    eager = token_ids(gpu_model(gpu_checkpoint, "triton", False, every), PROMPTS[:B], 300, **sampling)
    assert graphed == eager
