"""Tensor parallelism on CPUs (gloo, ranks as separate processes joined through a file: no TCP store, gloo on
loopback): each rank's logits equal the single-process model's to 1e-5 relative and its tokens (greedy and
seeded) are identical, for MHA and GQA checkpoints in HF layout and Meta's (2 shards loaded 1:1 onto 2 ranks),
dense and int4; every rank holds half the projection weights and half the kv heads; a world size that does
not divide the heads is an error naming it; a rank that dies makes the others fail, not hang; and the CLI
under a 2-rank launch prints the single-process text once."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import codellama_rt as cl
from codellama_rt.api import load_model
from tp_worker import projection_elements

WORKER = Path(__file__).with_name("tp_worker.py")
PROMPT = "def fibonacci(n):\n    if n < 2:"
REL_TOL = 1e-5  # max|Δ| / max|ref| of fp32 logits: only the summation order of wo and down differs
TIMEOUT_S = 240


def rank_env(rank: int, world: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    return env


def run_ranks(tmp_path: Path, world: int, argv: list, name: str = "run") -> list:
    """Start `world` ranks of `argv` (after the interpreter) and wait for all; their CompletedProcess-like
    (returncode, stdout, stderr), killed past TIMEOUT_S."""
    procs = [subprocess.Popen([sys.executable, *argv], env=rank_env(r, world), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for r in range(world)]
    deadline = time.monotonic() + TIMEOUT_S
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def workers(tmp_path: Path, world: int, checkpoint: Path, *extra: str) -> list:
    """Each rank's saved results (a dict), or the text of the error it raised."""
    out = tmp_path / f"out-{time.monotonic_ns()}"
    out.mkdir()
    init = out / "rendezvous"
    done = run_ranks(tmp_path, world, [str(WORKER), str(checkpoint), str(init), str(out), *extra])
    results = []
    for r, (code, _, err) in enumerate(done):
        saved, error = out / f"rank{r}.pt", out / f"rank{r}.err"
        if saved.is_file():
            results.append(torch.load(saved))
        elif error.is_file():
            results.append(error.read_text())
        else:
            results.append(f"exit {code}: {err[-2000:]}")
    return results


def single(checkpoint: Path, **kwargs) -> dict:
    model = load_model(checkpoint, **kwargs)
    ids = model.tokenizer.encode(PROMPT)
    return {"logits": model.logits(ids)[0], "greedy": model.generate(PROMPT, max_new_tokens=24).token_ids,
            "sampled": model.generate(PROMPT, max_new_tokens=16, temperature=0.9, top_k=20, seed=3).token_ids,
            "lookup": model.generate(PROMPT * 3, max_new_tokens=24).token_ids,
            "projection_elements": projection_elements(model.module),
            "n_kv_heads": model.args.n_kv_heads}


def check_against_single(results: list, want: dict, dense: bool = True) -> None:
    assert all(isinstance(r, dict) for r in results), results
    for r in results:
        err = ((r["logits"] - want["logits"]).abs().max() / want["logits"].abs().max()).item()
        assert err <= REL_TOL, err
        assert r["greedy"] == want["greedy"] and r["sampled"] == want["sampled"] and r["lookup"] == want["lookup"]
        assert r["kv_heads"] == want["n_kv_heads"] // 2
        share = r["projection_elements"] / want["projection_elements"]
        assert share <= 0.55 and (share == 0.5 or not dense), share
    assert results[0]["unseeded"] == results[1]["unseeded"]  # requests without a seed draw the same on every rank


@pytest.mark.parametrize("heads", [pytest.param((4, 2), id="gqa"), pytest.param((4, 4), id="mha",
                                                                                  marks=pytest.mark.slow)])
def test_hf_checkpoint_on_two_ranks_equals_one_process(tmp_path, hf_checkpoint, heads):
    path, _ = hf_checkpoint(n_heads=heads[0], n_kv_heads=heads[1], rope_theta=1e6)
    check_against_single(workers(tmp_path, 2, path), single(path))


def test_meta_shards_load_one_per_rank(tmp_path, hf_checkpoint, tiny_tokenizer, monkeypatch):
    from test_meta_layout import write_meta_checkpoint

    _, hf_model = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, ffn=192)
    path = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, n_shards=2, multiple_of=32)
    check_against_single(workers(tmp_path, 2, path), single(path))


def test_meta_rank_reads_only_its_shard(tmp_path, hf_checkpoint, tiny_tokenizer):
    """In process (world 2, rank 1, no group): the split projections come from consolidated.01 alone."""
    from test_meta_layout import write_meta_checkpoint

    from codellama_rt.checkpoint.layouts import meta_plan
    from codellama_rt.checkpoint.sources import MetaSource

    _, hf_model = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, ffn=192)
    path = write_meta_checkpoint(tmp_path / "meta", hf_model, tiny_tokenizer, n_shards=2, multiple_of=32)
    source = MetaSource(path)
    args = cl.load(path).args
    reads = []
    for shard in source.shards:
        get = shard.get
        shard.get = lambda name, get=get, shard=shard: reads.append(shard.path.name) or get(name)
    for parts in meta_plan(args).values():
        for part in parts:
            if part.tp_dim is not None:
                whole = torch.cat([s.get(part.name) for s in source.shards], dim=part.cat_dim)
                reads.clear()
                got = source.read_shard(part, 1, 2)
                assert reads == ["consolidated.01.pth"], part.name
                if not part.rope_heads:
                    assert torch.equal(got, whole.chunk(2, dim=part.tp_dim)[1])
                else:  # q/k: the same rows as the whole tensor's, permuted to rotate-half, then split
                    assert torch.equal(got, source.read(part).chunk(2, dim=0)[1])


def test_hf_rank_reads_only_its_slices(hf_checkpoint):
    """In process (world 2, rank 1): split tensors come from safetensors slices, never the whole tensor."""
    from codellama_rt.checkpoint.layouts import hf_plan
    from codellama_rt.checkpoint.sources import HFSource

    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    source, args = HFSource(path), cl.load(path).args
    whole = {name: reader.get(name) for name, reader in source.where.items()}
    for reader in source.files:
        reader.get = lambda name: pytest.fail(f"{name} read whole")
    split = [part for parts in hf_plan(args).values() for part in parts if part.tp_dim is not None]
    assert len(split) == 7 * args.n_layers
    for part in split:
        assert torch.equal(source.read_shard(part, 1, 2), whole[part.name].chunk(2, dim=part.tp_dim)[1]), part.name


@pytest.mark.slow
def test_int4_on_two_ranks_equals_one_process(tmp_path, hf_checkpoint):
    """(Prefill in fp32: in bf16, where the CPU has it, each rank rounds its slice's outputs.)"""
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, ffn=128)
    want = single(path, quantize="int4", group_size=32, kernel_options={"cpu_bf16_prefill": False})
    check_against_single(workers(tmp_path, 2, path, "--quantize", "int4", "--group-size", "32", "--fp32-prefill"), want,
                         dense=False)


def test_a_world_size_that_does_not_divide_the_kv_heads_is_an_error(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=6, n_kv_heads=2, dim=96, ffn=96, rope_theta=1e6)
    results = workers(tmp_path, 3, path)
    assert all(isinstance(r, str) and "n_kv_heads=2 is not divisible by the world size 3" in r for r in results), \
        results


def test_ranks_that_load_different_checkpoints_fail_naming_the_rank(tmp_path, tiny_tokenizer):
    from conftest import write_hf_checkpoint

    for rank, layers in enumerate((2, 3)):
        write_hf_checkpoint(tmp_path / f"ckpt{rank}", tiny_tokenizer, n_heads=4, n_kv_heads=2, n_layers=layers)
    results = workers(tmp_path, 2, Path(f"{tmp_path}/ckpt{{rank}}"))
    assert all(isinstance(r, str) and "ranks disagree on the checkpoint and options" in r and "rank 1 has" in r
               for r in results), results


@pytest.mark.slow
def test_a_rank_that_exits_makes_the_others_fail_not_hang(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    t0 = time.monotonic()
    results = workers(tmp_path, 2, path, "--exit-after-load", "1")
    assert time.monotonic() - t0 < TIMEOUT_S / 2
    assert isinstance(results[0], str) and "all-reduce with the other ranks failed" in results[0]
    assert results[1].startswith("exit 3")


@pytest.mark.slow
def test_cli_generate_on_two_ranks_prints_the_single_process_text_once(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    argv = ["-m", "codellama_rt", "generate", "--model", str(path), "--max-new-tokens", "16", PROMPT]
    alone = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=TIMEOUT_S,
                           env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert alone.returncode == 0, alone.stderr
    ranks = run_ranks(tmp_path, 2, [*argv[:3], "--dist-init", f"file://{tmp_path / 'rendezvous'}", *argv[3:]])
    assert [code for code, _, _ in ranks] == [0, 0], [err for _, _, err in ranks]
    assert ranks[0][1] == alone.stdout and alone.stdout.strip() and ranks[1][1] == ""


def test_cli_ranks_given_different_prompts_refuse_naming_them(tmp_path, hf_checkpoint):
    """Each node's command line is typed on its own: ranks with different prompts (or sampling flags) would
    print a mixture; they stop with exit 2 naming what differs."""
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, "-m", "codellama_rt", "generate", "--dist-init", init, "--model",
                               str(path), "--max-new-tokens", "4", prompt], env=rank_env(r, 2), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, prompt in enumerate(("def f(x):", "def g(y):"))]
    try:
        done = [(p.wait(timeout=TIMEOUT_S), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, err in done:
        assert code == 2 and "ranks disagree on the prompt and sampling flags" in err and "def g(y):" in err, err


def test_without_a_group_tensor_parallelism_is_refused_naming_why(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        cl.load(tensor_parallel=True)
    done = subprocess.run([sys.executable, "-m", "codellama_rt", "serve", "--tensor-parallel", "--port", "0"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert done.returncode == 2 and "launch with torchrun" in done.stderr


@pytest.mark.slow
def test_nf4_on_two_ranks_is_as_close_to_dense_as_one_process(tmp_path, hf_checkpoint):
    """NF4's double quantization normalises each tensor's block scales by their mean, so a rank quantizing
    its slice rounds a little differently from one process quantizing the whole: not the same numbers, the
    same quality (error against the dense model) and the same numbers on every rank."""
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6, ffn=128)
    dense, alone = single(path), single(path, quantize="nf4")
    results = workers(tmp_path, 2, path, "--quantize", "nf4")
    assert all(isinstance(r, dict) for r in results), results

    def err(logits):
        return ((logits - dense["logits"]).abs().max() / dense["logits"].abs().max()).item()

    assert err(results[0]["logits"]) <= 1.5 * err(alone["logits"]) + 0.01
    assert torch.equal(results[0]["logits"], results[1]["logits"])
    assert results[0]["greedy"] == results[1]["greedy"] and results[0]["sampled"] == results[1]["sampled"]


@pytest.mark.slow
def test_serve_on_two_ranks_answers_as_one_process(tmp_path, hf_checkpoint):
    """Rank 0 serves HTTP and schedules, rank 1 replays: greedy and seeded requests, one at a time and at once,
    give the single-process text; a stream abandoned mid-way is cancelled on both ranks (the next request is
    still right); SIGTERM on rank 0 stops both cleanly."""
    import concurrent.futures
    import signal

    from codellama_rt.bench.serve_process import ServeProcess

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    ref = cl.load(path)
    args = ["--model", str(path), "--max-batch-size", "4", "--dist-init", f"file://{tmp_path / 'rendezvous'}"]
    procs = [ServeProcess(args, env=rank_env(r, 2)) for r in range(2)]
    try:
        url = procs[0].wait_ready(TIMEOUT_S)
        assert url.startswith("http://127.0.0.1:")
        prompts = [PROMPT, "import os\n", "class Stack:\n    def push(self, item):", "x = ["]

        def complete(client, prompt, **kw):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, **kw})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
            assert complete(c, prompts[0]) == ref.generate(prompts[0], max_new_tokens=12).text
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                greedy = list(pool.map(lambda p: complete(c, p), prompts))
                sampled = list(pool.map(lambda p: complete(c, p, temperature=0.9, seed=5), prompts))
            assert greedy == [ref.generate(p, max_new_tokens=12).text for p in prompts]
            assert sampled == [ref.generate(p, max_new_tokens=12, temperature=0.9, seed=5).text for p in prompts]
            body = {"prompt": prompts[2], "max_tokens": 300, "temperature": 0, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as s:
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        break
            assert complete(c, prompts[3]) == ref.generate(prompts[3], max_new_tokens=12).text
        procs[0].proc.send_signal(signal.SIGTERM)
        assert [p.proc.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.stop()


@pytest.mark.gpu
def test_one_rank_on_nccl_with_graphs_gives_the_tokens_of_no_parallelism(tmp_path, hf_checkpoint, monkeypatch):
    """World size 1 over NCCL on one GPU: the all-reduces run (as no-ops) inside the captured decode graphs,
    which must give the eager tokens and those of a model without tensor parallelism."""
    import torch.distributed as dist

    path, _ = hf_checkpoint(n_heads=4, n_kv_heads=2, rope_theta=1e6)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    want = cl.load(path, device="cuda").generate(PROMPT, max_new_tokens=64, temperature=0.9, seed=1).token_ids
    try:
        for graphs in (False, True):
            model = cl.load(path, device="cuda", tensor_parallel=True, cuda_graphs=graphs,
                            dist_init=f"file://{tmp_path / 'rendezvous'}")
            got = model.generate(PROMPT, max_new_tokens=64, temperature=0.9, seed=1).token_ids
            assert got == want and model.engine.captures == (1 if graphs else 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
