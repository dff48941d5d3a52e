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
from codellama_rt.engine.decode_graph import DecodeBuffers, DecodeStep, capture_step
from codellama_rt.engine.row_sampling import RowSampling, Stages, sample_rows
from codellama_rt.engine.sampling import SamplingParams
from codellama_rt.model.kv_cache import KVCache
from codellama_rt.model.transformer import Prefill
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


def loaded_step(model, B, stages=Stages(penalty=True, sampled=True, filter=True, logprobs=True), *, seq=64,
                graphed=False):
    """A DecodeStep over a fresh `seq`-token cache and buffers whose B rows decode PROMPTS with mixed sampling
    values (greedy, seeded, seeded with top-k/top-p and a penalty, greedy with a penalty), after their prefill."""
    V, device = model.args.vocab_size, model.module.device
    cache = KVCache(model.args, 4, seq, model.module.dtype, device)
    buffers = DecodeBuffers(4, V, device, seq - 1)
    for b in range(B):
        ids = model.tokenizer.encode(PROMPTS[b])
        buffers.sampling.set_row(b, SamplingParams(**SAMPLINGS[b].values[0]), 1000 + b, ids)
        with torch.inference_mode():
            model.module(torch.tensor([ids], device=device), Prefill(0, slot=b), cache)
        buffers.start_row(b, 5 + b, len(ids))
    pool = torch.cuda.graph_pool_handle() if graphed else None
    return DecodeStep(model.module, cache, buffers, B, stages, graphed=graphed, pool=pool)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("stages", [pytest.param(Stages(), id="greedy"),
                                    pytest.param(Stages(True, True, True, True), id="every-stage")])
def test_step_has_no_host_sync_and_fixed_shapes(checkpoint, backend, stages):
    """Every call runs the same ops on the same shapes and never reads device data on the host."""
    model = cl.load(checkpoint, backend=backend, max_seq_len=1024, max_batch_size=4)
    step = loaded_step(model, 3, stages)
    step()  # a first call may allocate kernels' scratch buffers (a graph's warm-up steps do the same)
    start = step.buffers.positions[:3].clone()
    traces = []
    for _ in range(4):
        with StepTrace() as trace, no_host_reads():
            step()
        traces.append(trace.ops)
    assert traces[0] and all(t == traces[0] for t in traces[1:])
    assert torch.equal(step.buffers.positions[:3], start + 4)
    assert step.buffers.sampling.view(3).counter.tolist() == [5, 5, 5]


def test_step_buffers_are_static_across_steps_and_calls(checkpoint, monkeypatch):
    """data_ptr and shape of every buffer a step touches (KV cache included) never change, across steps
    and across generations; a step is kept per (batch, stages) and reused."""
    model = cl.load(checkpoint, max_seq_len=1024, max_batch_size=2)
    seen_steps, records = [], []
    call = DecodeStep.__call__

    def recording(self):
        seen_steps.append(self)
        named = {**self.buffers.tensors(), "kv_cache": self.cache.data}
        records.append({k: (t.data_ptr(), tuple(t.shape)) for k, t in named.items()})
        return call(self)

    monkeypatch.setattr(DecodeStep, "__call__", recording)
    for sampling in (dict(), dict(temperature=0.7, seed=1)):
        seen_steps.clear(), records.clear()
        token_ids(model, PROMPTS[:2], 12, **sampling)
        token_ids(model, PROMPTS[2:4], 20, **sampling)
        assert len(records) >= 11 + 19  # (more when a request joins the batch a step after the other)
        assert all(r == records[0] for r in records)
        assert records[0]["kv_cache"][1] == tuple(model.engine.cache.data.shape)
        assert {id(s) for s in seen_steps} == {id(s) for s in model.engine.decode_steps().values()
                                               if s.stages.sampled == bool(sampling)}
        assert all(s.batch <= 2 for s in seen_steps)


def no_cache_generate(module, prompts, params: SamplingParams, seed: int, n):
    """Oracle: every token from a full forward pass over the whole sequence (no KV cache, no decode step,
    no engine), each row sampled by `sample_rows` with `params` and `seed` and every id so far seen."""
    V = module.args.vocab_size
    rows = [list(p) for p in prompts]
    sampling = RowSampling(len(rows), V, "cpu")
    for b in range(len(rows)):
        sampling.set_row(b, params, seed, [])
    stages = Stages.of([params], [0], V)
    with torch.inference_mode():
        for _ in range(n):
            logits = torch.cat([module(torch.tensor([r]), Prefill(0), None)[:, -1] for r in rows])
            view = sampling.view(len(rows))
            view.seen.zero_()
            for b, r in enumerate(rows):
                view.seen[b, r] = True
            for r, t in zip(rows, sample_rows(logits, stages, view).tokens.tolist()):
                r.append(t)
    return [r[len(p):] for r, p in zip(rows, prompts)]


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("B", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_eager_step_tokens_equal_a_plain_loop(model, sampling, B):
    params = SamplingParams(max_new_tokens=16, **sampling)
    ids = [model.tokenizer.encode(p) for p in PROMPTS[:B]]
    seed = sampling.get("seed", 0)
    assert token_ids(model, PROMPTS[:B], 16, **sampling) == no_cache_generate(model.module, ids, params, seed, 16)


@pytest.mark.slow
def test_steps_reused_per_key_and_dropped_when_the_cache_grows(checkpoint):
    model = cl.load(checkpoint, max_seq_len=1024, max_batch_size=2)  # two prompts always fill slots 0 and 1
    eng = model.engine
    assert not eng.cuda_graphs and eng.captures == 0 and model.graph_pool_bytes() == 0
    token_ids(model, PROMPTS[:2], 8)
    cache = eng.cache
    [(key, greedy2)] = eng.decode_steps().items()
    assert key == (2, Stages())
    token_ids(model, PROMPTS[2:4], 8)
    assert list(eng.decode_steps().values()) == [greedy2] and eng.cache is cache
    a = token_ids(model, PROMPTS[:2], 8, temperature=0.5, seed=1)
    sampled2 = eng.decode_steps()[(2, Stages(sampled=True))]
    b = token_ids(model, PROMPTS[:2], 8, temperature=1.5, seed=2)  # other values, same stages: same step
    assert eng.decode_steps()[(2, Stages(sampled=True))] is sampled2 and len(eng.decode_steps()) == 2 and a != b
    assert token_ids(model, PROMPTS[:2], 8, temperature=0.5, seed=1) == a
    token_ids(model, PROMPTS[:2], 400)  # needs a 512-token cache: the steps over the old one go
    assert eng.cache is not cache and eng.cache.max_seq_len == 512
    assert list(eng.decode_steps()) == [(2, Stages())] and eng.decode_steps()[(2, Stages())] is not greedy2
    assert eng.decode_steps()[(2, Stages())].cache is eng.cache
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


def test_step_refuses_a_batch_over_the_cache_and_a_graph_off_cuda(model):
    cache = KVCache(model.args, 4, 16, model.module.dtype, model.module.device)
    buffers = DecodeBuffers(4, model.args.vocab_size, model.module.device, 15)
    with pytest.raises(ValueError, match="batch 5 does not fit"):
        DecodeStep(model.module, cache, buffers, 5, Stages())
    with pytest.raises(ValueError, match="batch 0 does not fit"):
        DecodeStep(model.module, cache, buffers, 0, Stages())
    with pytest.raises(ValueError, match="needs a CUDA model"):
        DecodeStep(model.module, cache, buffers, 2, Stages(), graphed=True)


class _FakeStream:
    def wait_stream(self, other):
        pass


def fake_cuda_capture(monkeypatch, named: dict) -> list:
    """Fake torch.cuda's stream and graph calls for `capture_step` on CPU: streams do nothing, and a graph
    capture runs its body (a real one records the work without running it), then puts every tensor of `named`
    back. Returns the list of (graph, pool) of the captures made."""
    captured = []

    @contextlib.contextmanager
    def fake_capture(graph, pool=None):
        state = {k: t.clone() for k, t in named.items()}
        yield
        captured.append((graph, pool))
        for k, t in state.items():
            named[k].copy_(t)

    for name, fake in (("Stream", lambda device=None: _FakeStream()),
                       ("current_stream", lambda device=None: _FakeStream()),
                       ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", object),
                       ("graph", fake_capture)):
        monkeypatch.setattr(torch.cuda, name, fake)
    return captured


def test_capture_leaves_buffers_as_found_and_replays_what_eager_runs(model, monkeypatch):
    """`capture_step`'s own logic on CPU, with torch.cuda's stream and graph calls faked: its eager warm-up steps
    are undone (every buffer, the sampling counters included), the graph is captured in the given pool, and
    a step with a graph routes to it, drawing what the eager step draws."""
    eager = loaded_step(model, 3)
    before = {k: t.clone() for k, t in eager.buffers.tensors().items()}
    want = []
    for _ in range(3):
        eager()
        want.append(eager.buffers.sampled[:3].tolist())

    step = loaded_step(model, 3)
    assert all(torch.equal(step.buffers.tensors()[k], t) for k, t in before.items())
    captured = fake_cuda_capture(monkeypatch, step.buffers.tensors())
    step.graph = capture_step(step._step, step.buffers.tensors(), "cpu", "pool")
    assert [p for _, p in captured] == ["pool"] and step.graph is captured[0][0]
    assert all(torch.equal(step.buffers.tensors()[k], t) for k, t in before.items())
    replays = []
    step.graph = type("Graph", (), {"replay": lambda self: (replays.append(1), step._step())})()
    got = []
    for _ in range(3):
        step()
        got.append(step.buffers.sampled[:3].tolist())
    assert got == want and len(replays) == 3


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
def test_graphs_are_captured_once_per_key_and_replayed(gpu_checkpoint):
    """Each (batch, stages) key is captured once and replayed for later generations and other sampling values;
    a growing cache drops the steps (their graphs point into the old one) and captures again."""
    model = gpu_model(gpu_checkpoint, "triton", None)
    eng = model.engine
    assert eng.cuda_graphs  # the default on CUDA
    first = token_ids(model, PROMPTS[:2], 40)
    steps = dict(eng.decode_steps())
    graphs = {k: s.graph for k, s in steps.items()}
    assert eng.captures == len(steps) >= 1 and all(g is not None for g in graphs.values())
    assert all(batch in (1, 2, 4) for batch, _ in steps)
    assert token_ids(model, PROMPTS[:2], 40) == first
    a = token_ids(model, PROMPTS[:2], 40, temperature=0.8, seed=5)
    b = token_ids(model, PROMPTS[:2], 40, temperature=1.3, seed=6)  # other values: the same graphs
    assert token_ids(model, PROMPTS[:2], 40, temperature=0.8, seed=5) == a != b
    assert eng.captures == len(eng.decode_steps()) <= 2 * 3  # batch sizes 1, 2, 4 x greedy or sampled
    assert all(eng.decode_steps()[k] is s and s.graph is graphs[k] for k, s in steps.items())
    before = eng.captures
    token_ids(model, PROMPTS[:1], 1500)  # the cache grows: its steps are captured again
    assert eng.cache.max_seq_len == 2048 and eng.captures == before + len(eng.decode_steps())
    assert all(s.cache is eng.cache for s in eng.decode_steps().values())


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_step_does_not_sync(gpu_checkpoint, cuda_graphs):
    model = gpu_model(gpu_checkpoint, "triton", cuda_graphs)
    step = loaded_step(model, 4, graphed=cuda_graphs)
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
    """The capture must reuse the step's KV cache. It does allocate other memory: the graph's pool and
    cuBLAS workspaces for the side streams of warm-up and capture (32 MiB each on Hopper: 64 MiB allocated
    and 36 MiB more reserved, measured on an H200), so the cache is made large (512 MiB) for a second copy
    of it to stand far above those."""
    model = cl.load(gpu_long_checkpoint, backend="triton", device=DEV, max_seq_len=32768, max_batch_size=4,
                    cuda_graphs=True)
    eager = loaded_step(model, 4, seq=20480)
    cache = eager.cache
    assert cache.nbytes >= 512 << 20, cache.nbytes
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    step = DecodeStep(model.module, cache, eager.buffers, 4, eager.stages, graphed=True,
                      pool=torch.cuda.graph_pool_handle())
    assert step.graph is not None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    grown_allocated = torch.cuda.memory_allocated() - allocated
    grown_reserved = torch.cuda.memory_reserved() - reserved
    assert 0 < grown_reserved < cache.nbytes // 2, (grown_reserved, cache.nbytes)
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
