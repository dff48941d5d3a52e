"""The benchmark report (codellama_rt.bench): the CPU quick run end to end, the bound arithmetic, the
bars, the charts (with and without matplotlib), random-weight models, and the CLI / script entry points. Speed itself
is never asserted here (see bench/README.md)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from codellama_rt import ModelArgs, SamplingParams, cli
from codellama_rt.api import random_model
from codellama_rt.bench import e2e, ours, report
from codellama_rt.kernels import cpu_native
from codellama_rt.bench.plots import Bar, hbar_chart
from codellama_rt.errors import MissingExtraError
from codellama_rt.plotting import INSTALL_HINT
from codellama_rt.quant.linear import model_weight_bytes, weight_bytes
from tool_modules import load_bench

ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"card", "driver", "cuda", "torch", "triton", "python", "transformers", "git_commit", "source_digest",
             "date", "mode", "pdl", "experiments"}
REPORT_KEYS = {"meta", "plan", "bandwidth_gbps", "bandwidth_method", "models", "decode", "ttft", "kernels",
               "resources", "problems", "bars", "skipped", "timings", "plots"}


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def png_info(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, chunk CRCs and (8-bit RGB) pixel data size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    assert w > 0 and h > 0 and depth in (8, 16) and color in (2, 6)
    if (depth, color) == (8, 2):  # matplotlib writes RGBA
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
        assert len(raw) == h * (1 + 3 * w)
    return w, h


# ---- the quick CPU report, end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """`codellama-rt bench --report DIR --quick --only tiny` (no AOT table: the compile test covers it), with
    kernel options (the tiny model's reference backend ignores them; the report records them)."""
    out = tmp_path_factory.mktemp("bench")
    code = cli.main(["bench", "--report", str(out), "--quick", "--only", "tiny", "--no-resources",
                     "--experiments", "attn_rope", "--no-pdl"])
    return code, out


@pytest.mark.slow
def test_cli_quick_report_writes_everything(quick_report):
    code, out = quick_report
    assert code == 0
    data = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(data)
    assert META_KEYS <= set(data["meta"]) and data["meta"]["mode"] == "quick"
    assert data["meta"]["experiments"] == data["plan"]["experiments"] == ["attn_rope"]
    assert data["meta"]["pdl"] is False and data["plan"]["pdl"] is False
    assert data["meta"]["gpu_run"] is False and data["bandwidth_gbps"] > 0
    assert data["meta"]["card"].startswith("CPU") or torch.cuda.is_available()
    assert [m["model"] for m in data["models"]] == ["tiny"]
    assert data["models"][0]["weights_read_measured"] == data["models"][0]["weights_read_per_token"]
    ours = [r for r in data["decode"] if r["provider"] == e2e.OURS_EAGER]
    assert len(ours) == 1 and ours[0]["status"] == "ok" and ours[0]["batch"] == 1
    assert ours[0]["tok_s"] > 0 and ours[0]["bound_tok_s"] > 0
    assert ours[0]["frac_bound"] == pytest.approx(ours[0]["tok_s"] / ours[0]["bound_tok_s"])
    assert all("tokens0" not in r for r in data["decode"])
    assert [r["prompt_tokens"] for r in data["ttft"] if r["provider"] == e2e.OURS] == [128]
    hf = [r for r in data["decode"] if r["provider"] == e2e.HF]
    if data["meta"]["transformers"]:  # same weights, fp32 greedy: the same tokens
        assert hf[0]["status"] == "ok" and hf[0]["agree_with_ours"] == "16/16"
        assert any(r["provider"] == e2e.HF and r["status"] == "ok" for r in data["ttft"])
    assert [b["status"] for b in data["bars"]] == ["unmeasured"] * len(report.BARS)
    md = (out / "report.md").read_text()
    if HAVE_MATPLOTLIB:
        assert data["plots"] == ["decode_vs_bound.png"] and data["plots_missing"] is None
        assert png_info((out / "decode_vs_bound.png").read_bytes())[0] > 100
    else:  # the tables all the same, and the report says how to get the charts
        assert data["plots"] == [] and INSTALL_HINT in data["plots_missing"] and INSTALL_HINT in md
    for heading in ("## Bars", "## Decode", "## Time to first token", "## Models", "## Plots", "## Timings"):
        assert heading in md
    assert "| tiny | ours (eager) | 1 |" in md and "AOT resources" in md


def test_budget_skips_units_and_still_writes(tmp_path):
    data = report.run(tmp_path, quick=True, only=["tiny"], budget_s=0.01, resources=False, log=lambda s: None)
    assert data["skipped"] and data["skipped"][0]["unit"] == "ours tiny"
    assert "time budget" in data["skipped"][0]["reason"]
    assert data["decode"] == [] and data["plots"] == []
    assert "## Skipped" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["skipped"] == data["skipped"]


@pytest.mark.parametrize("argv, message", [
    (["bench"], "--report"),
    (["bench", "--report", "R", "--only", "nope"], "unknown"),
    (["bench", "--report", "R", "--only", ","], "no names"),
    (["bench", "--report", "R", "--budget-s", "0"], "budget"),
    (["bench", "--report", "R", "--quick", "--bogus"], "--bogus"),
    (["bench", "--report", "R", "--experiments", "bogus"], "bogus"),
])
def test_cli_bench_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "r") if a == "R" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("codellama-rt: error:") and message in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU models are valid with CUDA")
def test_cli_bench_gpu_model_without_cuda_exit_2(tmp_path, capsys):
    assert cli.main(["bench", "--report", str(tmp_path), "--only", "7B-bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs CUDA" in err


def test_report_script_is_a_thin_wrapper():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--report", "x", "--only", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown" in out.stderr


# ---- the bound and the bars ---------------------------------------------------------------------

def test_decode_bound_arithmetic():
    assert e2e.decode_bound(13_000_000_000, 3000.0) == pytest.approx(3000 / 13)
    assert e2e.decode_bound(10 ** 9, 2000.0, batch=8) == pytest.approx(16000.0)
    args = ModelArgs.from_preset("CodeLlama-7b")
    # 7B bf16 read per token: every parameter but the embedding table, 2 bytes each
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    weights = (32 * per_layer + 4096 + 32016 * 4096) * 2
    assert report.model_info(e2e.MODELS["7B-bf16"])["weights_read_per_token"] == weights == 13_214_818_304
    kv = 2 * 32 * 8 * 32 * 128 * 2 * 1024  # K and V, layers, batch, heads, head dim, bytes, tokens
    step = e2e.decode_step_bytes(weights, args, batch=8, context=1024, elem_bytes=2)
    assert step == weights + kv == 13_214_818_304 + 4_294_967_296
    assert e2e.decode_bound(step, 3000.0, batch=8) == pytest.approx(8 * 3e12 / step)
    # int4 g128 read per token: the shape formula less the dense embedding
    int4 = report.model_info(e2e.MODELS["7B-int4"])
    assert int4["weights_read_per_token"] == \
        model_weight_bytes(args, bytes_per_elem=2, method="int4") - 32016 * 4096 * 2


def test_finish_rows_bound_and_agreement():
    row = dict(model="7B-bf16", provider=e2e.OURS_EAGER, batch=1, prompt_tokens=128, new_tokens=128,
               status="ok", tok_s=100.0, tokens0=[5, 6, 7, 8])
    graphs = dict(row, provider=e2e.OURS_GRAPHS, tokens0=[5, 6, 7, 8])
    peer = dict(row, provider=e2e.COMPILE, tokens0=[5, 6, 9, 8])
    data = {"bandwidth_gbps": 3000.0, "models": [], "decode": [graphs, row, peer]}
    report.finish_rows(data)
    assert graphs["agree_with_ours"] == "4/4"
    info = report.model_info(e2e.MODELS["7B-bf16"])
    step = info["weights_read_per_token"] + info["kv_bytes_per_token"] * (128 + 64)
    assert row["step_bytes"] == step and row["bound_tok_s"] == pytest.approx(3e12 / step)
    assert row["frac_bound"] == pytest.approx(100.0 * step / 3e12)
    assert peer["agree_with_ours"] == "2/4" and "agree_with_ours" not in row
    assert "tokens0" not in row and "tokens0" not in peer


def _row(model, provider, tok_s, bound=None, status="ok"):
    r = dict(model=model, provider=provider, batch=1, status=status, tok_s=tok_s)
    if bound:
        r.update(bound_tok_s=bound, frac_bound=tok_s / bound)
    return r


def test_experiment_summary_compares_with_the_default_row(quick_report):
    exp = dict(_row("7B-bf16", e2e.OURS_GRAPHS + " [norm_gemv]", 220.0, 250.0), experiments=["norm_gemv"],
               agree_with_ours="128/128")
    failed = dict(_row("7B-int4", e2e.OURS_GRAPHS + " [int4_mma]", None, status="failed: x"), experiments=["int4_mma"])
    data = {"decode": [_row("7B-bf16", e2e.OURS_GRAPHS, 200.0, 250.0), _row("7B-bf16", e2e.OURS_EAGER, 50.0, 250.0),
                       exp, _row("7B-int4", e2e.OURS_GRAPHS, 300.0, 1000.0), failed]}
    summary = report.experiment_summary(data)
    assert [(e["model"], e["experiments"], e["default_tok_s"]) for e in summary] == [
        ("7B-bf16", ["norm_gemv"], 200.0), ("7B-int4", ["int4_mma"], 300.0)]
    assert summary[0]["speedup"] == pytest.approx(1.1) and summary[0]["frac_bound"] == pytest.approx(0.88)
    assert summary[1]["speedup"] is None and summary[1]["tok_s"] is None
    full = json.loads((quick_report[1] / "report.json").read_text())
    assert "## Experiments" not in report.to_markdown(full, "")  # the CPU subset has none
    full["decode"] += data["decode"]
    md = report.to_markdown(full, "")
    assert "## Experiments" in md and "| 7B-bf16 | norm_gemv | 220.0 | 200.0 | 1.100 | 88% | 128/128 |" in md
    assert "| 7B-int4 | int4_mma |  | 300.0 |  |  |  |" in md


def test_bars_pass_fail_unmeasured():
    decode = [_row("7B-bf16", e2e.OURS_GRAPHS, 180.0, 200.0), _row("7B-bf16", e2e.OURS_EAGER, 120.0, 200.0),
              _row("7B-bf16", e2e.COMPILE, 150.0, 200.0), _row("7B-int4", e2e.OURS_GRAPHS, None, status="failed: x"),
              _row("7B-int4", e2e.OURS_EAGER, 100.0, 200.0), _row("7B-int4", e2e.COMPILE, None, status="failed: y")]
    bars = {b["id"]: b for b in report.evaluate_bars({"decode": decode}, cuda=True)}
    assert bars["bf16-bound"]["status"] == "pass" and bars["bf16-bound"]["value"] == pytest.approx(0.9)
    assert bars["int4-bound"]["status"] == "fail"  # eager stands in for the failed graphs row: 50%
    assert "ours (eager)" in bars["int4-bound"]["detail"]
    assert bars["bf16-vs-compile"]["status"] == "pass" and bars["bf16-vs-compile"]["value"] == pytest.approx(1.2)
    assert bars["int4-vs-compile"]["status"] == "unmeasured" and "failed: y" in bars["int4-vs-compile"]["detail"]
    assert bars["graphs-vs-eager"]["status"] == "pass" and bars["graphs-vs-eager"]["value"] == pytest.approx(1.5)
    decode[1]["tok_s"] = 150.0
    assert {b["id"]: b for b in report.evaluate_bars({"decode": decode}, cuda=True)}["graphs-vs-eager"]["status"] \
        == "fail"
    assert {b["status"] for b in report.evaluate_bars({"decode": decode}, cuda=False)} == {"unmeasured"}


def test_gpu_plan_and_unit_order():
    """The matrix a GPU report runs (constructed without a GPU): kernel rows, then the bars' models and their
    experiments, then the peers."""
    plan = e2e.make_plan(cuda=True, quick=False)
    assert plan.models == ("7B-bf16", "7B-int4", "34B-int4", "7B-nf4") and plan.batches == (1, 8)
    assert plan.ttft_prompts == (512, 2048, 8192) and plan.kernels and plan.isolate_peers
    assert [u[0] for u in report._units(plan, {})] == [
        "kernels", "ours 7B-bf16", "ours 7B-int4", "ours 7B-nf4", "experiments 7B-bf16", "experiments 7B-int4",
        "experiments 7B-nf4", "compile 7B-bf16", "compile 7B-int4", "ours 34B-int4", "hf 7B-bf16"]
    quick = e2e.make_plan(cuda=True, quick=True)
    assert [u[0] for u in report._units(quick, {})] == ["ours 7B-bf16", "ours 7B-int4"]
    only = e2e.make_plan(cuda=True, quick=False, only=["7b-BF16", "kernels"])
    assert only.models == ("7B-bf16",) and only.kernels
    assert [u[0] for u in report._units(only, {})] == ["kernels", "ours 7B-bf16", "experiments 7B-bf16",
                                                       "compile 7B-bf16", "hf 7B-bf16"]
    # the bar model goes first however --only lists the models
    only = e2e.make_plan(cuda=True, quick=False, only=["34B-int4", "7B-int4"])
    assert [u[0] for u in report._units(only, {})][:3] == ["ours 7B-int4", "experiments 7B-int4", "compile 7B-int4"]
    cpu = e2e.make_plan(cuda=False, quick=True)
    assert cpu.models == ("tiny", "100M") and cpu.hf_models == cpu.models and not cpu.isolate_peers
    assert e2e.make_plan(cuda=True, quick=True, only=["tiny"]) == dataclasses.replace(cpu, models=("tiny",))
    assert not e2e.plan_uses_gpu(cpu) and e2e.plan_uses_gpu(quick)
    with pytest.raises(ValueError, match="separate"):
        e2e.make_plan(cuda=True, quick=True, only=["tiny", "7B-int4"])


@pytest.mark.slow
def test_experiment_rows_run_in_a_child_and_time_out_cleanly():
    """The child-process path the experiment rows take on a GPU, here on the tiny CPU model: one row per
    set, named and tagged with its experiments; a timeout leaves a failed row for every set."""
    plan = e2e.make_plan(cuda=False, quick=True, only=["tiny"])
    sets = [("attn_one_pass",), ("attn_one_pass", "int4_one_pass")]
    rows = e2e.experiment_rows_isolated(e2e.MODELS["tiny"], plan, sets, timeout_s=120)
    assert [r["provider"] for r in rows] == [e2e.OURS_EAGER + " [attn_one_pass]",
                                             e2e.OURS_EAGER + " [attn_one_pass+int4_one_pass]"]
    assert [r["experiments"] for r in rows] == [list(n) for n in sets] and {r["status"] for r in rows} == {"ok"}
    rows = e2e.experiment_rows_isolated(e2e.MODELS["tiny"], plan, sets, timeout_s=0.1)
    assert [(r["experiments"], r["status"]) for r in rows] == [(list(n), "failed: timed out after 0.1 s") for n in sets]


def test_experiment_rows_set_the_options_for_their_engine_only(monkeypatch):
    """A GPU plan measures each experiment alone and all together on the bars' models; a row's engine is
    built (with CUDA graphs where the model is on a GPU) on the model's module bound to the plan's kernel
    options plus its experiments, and the module's backend is restored after."""
    from codellama_rt.kernels.options import EXPERIMENTS, KernelOptions

    plan = e2e.make_plan(cuda=True, quick=False)
    assert set(plan.experiment_sets) == {(n,) for n in EXPERIMENTS} | {tuple(EXPERIMENTS)}
    assert report.BAR_MODELS == ("7B-bf16", "7B-int4", "7B-nf4")
    for name, weights in (("7B-bf16", "dense"), ("7B-int4", "int4"), ("7B-nf4", "nf4")):
        sets = report.experiment_sets(e2e.MODELS[name], plan)
        assert sets[-1] == tuple(EXPERIMENTS)
        # a quantized model: the experiments of its own format (those changing the dense model too run there)
        assert [s[0] for s in sets[:-1]] == [n for n, e in EXPERIMENTS.items() if weights in e.weights + e.prefill
                                             and (weights == "dense" or "dense" not in e.weights)]
    assert [s for s in report.experiment_sets(e2e.MODELS["7B-nf4"], plan)[:-1]] == [("nf4_frag",),
                                                                                    ("nf4_dequant_gemm",)]
    assert ("int4_mma",) not in report.experiment_sets(e2e.MODELS["7B-bf16"], plan)
    assert report.experiment_sets(e2e.MODELS["34B-int4"], plan) == []
    assert report.experiment_sets(e2e.MODELS["tiny"], plan) == []
    seen = []

    def spy(model, batch, max_seq_len, cuda_graphs):  # records what the engine would run, builds none
        seen.append((model.module.ops.options, cuda_graphs))
        raise e2e.Unavailable("spied")

    monkeypatch.setattr(ours, "make_engine", spy)
    cpu_plan = e2e.make_plan(cuda=False, quick=True, only=["tiny"],
                             kernel_options=KernelOptions(experiments={"int4_mma"}, pdl=False))
    spec = e2e.MODELS["tiny"]
    args = spec.args()  # the triton backend (the CPU models' default is the reference one, which takes none)
    model = random_model(args, e2e.IdTokenizer(args.vocab_size), backend="triton", device="cpu")
    before = model.module.ops
    rows = e2e.experiment_rows(model, spec, cpu_plan, [("norm_gemv", "attn_one_pass")])
    assert [(r["provider"], r["experiments"], r["status"]) for r in rows] == [
        ("ours (eager) [norm_gemv+attn_one_pass]", ["norm_gemv", "attn_one_pass"], "unavailable: spied")]
    assert seen == [(KernelOptions(experiments={"int4_mma", "norm_gemv", "attn_one_pass"}, pdl=False), False)]
    assert model.module.ops is before and before.options == KernelOptions()
    int4_spec = dataclasses.replace(spec, quantize="int4")  # an experiment changing int4 prefill: TTFT rows only
    rows = e2e.experiment_rows(model, int4_spec, cpu_plan, [("int4_dequant_gemm",)])
    assert rows and all("new_tokens" not in r and r["experiments"] == ["int4_dequant_gemm"]
                        and r["provider"] == "ours (eager) [int4_dequant_gemm]" for r in rows)
    assert [r["prompt_tokens"] for r in rows] == list(cpu_plan.ttft_prompts)
    assert e2e.plan_from_json(json.dumps(dataclasses.asdict(cpu_plan))) == cpu_plan  # as a child gets it
    gpu_spec = e2e.MODELS["7B-bf16"]  # on a GPU, CUDA-graph rows
    assert e2e.experiment_provider(gpu_spec, ("norm_gemv",)) == (e2e.OURS_GRAPHS, "ours (CUDA graphs) [norm_gemv]")


def test_peer_without_transformers_is_skipped_without_a_child(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "transformers" else real(name))
    plan = e2e.make_plan(cuda=True, quick=False)
    rows = e2e.peer_rows_isolated("hf", e2e.MODELS["7B-bf16"], plan, timeout_s=1)
    assert len(rows) == len(plan.ttft_prompts) + len(plan.batches)
    assert {r["status"] for r in rows} == {"skipped: transformers is not installed"}


@pytest.mark.slow
def test_isolated_peer_runs_in_a_child_and_times_out_cleanly():
    """The child-process path the GPU peers take, here with transformers on the tiny model."""
    pytest.importorskip("transformers")
    plan = e2e.make_plan(cuda=False, quick=True, only=["tiny"])
    rows = e2e.peer_rows_isolated("hf", e2e.MODELS["tiny"], plan, timeout_s=120)
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[1]["tokens0"]
    rows = e2e.peer_rows_isolated("hf", e2e.MODELS["tiny"], plan, timeout_s=0.1)
    assert [r["status"] for r in rows] == ["failed: timed out after 0.1 s"] * 2
    assert {("new_tokens" in r) for r in rows} == {True, False}  # one TTFT row, one decode row


# ---- random-weight models ---------------------------------------------------------------------

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=256)


def test_random_model_is_seeded_and_sized_like_the_shapes():
    a, b = random_model(TINY, None, seed=3), random_model(TINY, None, seed=3)
    c = random_model(TINY, None, seed=4)
    for (name, p), q, r in zip(a.module.named_parameters(), b.module.parameters(), c.module.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, r), name
    assert weight_bytes(a.module) == model_weight_bytes(TINY, bytes_per_elem=4)
    w = a.module.layers[0].mlp.w2.weight
    assert w.std().item() == pytest.approx(0.5 / 128 ** 0.5, rel=0.2)
    assert a.engine.max_seq_len == 256 and a.engine.max_batch == 1


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_random_model_quantized(method):
    m = random_model(TINY, e2e.IdTokenizer(TINY.vocab_size), quantize=method, group_size=64, max_batch_size=2,
                     max_seq_len=128)
    assert weight_bytes(m.module) == model_weight_bytes(TINY, bytes_per_elem=4, method=method, group_size=64,
                                                        cpu_layout=cpu_native.available())  # int4 held once
    assert type(m.module.layers[1].attn.wqkv).__name__ == "QuantLinear"
    assert type(m.module.output).__name__ == "Linear"  # the head stays dense unless asked
    ids = e2e.random_prompts(TINY.vocab_size, 2, 5, seed=0)
    run = m.engine.run(ids, SamplingParams(max_new_tokens=3), {})
    for _ in run:
        pass
    assert [len(c.token_ids) for c in run.completions] == [3, 3]


def test_ttft_rows_time_a_cold_prefill():
    """The engine's prefix cache would serve a repeated prompt from cached K/V: each TTFT repeat must not be
    one (no prompt token reused), and still be a prompt of the asked length."""
    m = random_model(TINY, e2e.IdTokenizer(TINY.vocab_size))
    engine = ours.make_engine(m, 1, 64, None)
    run = ours._cold_run(engine)
    prompt = e2e.random_prompts(TINY.vocab_size, 1, 40, seed=0)
    for _ in range(3):
        t0, stamps, ids = run(prompt, 1)
        assert len(stamps) == 1 and stamps[0] >= t0 and len(ids) == 1
    counts = engine.metrics.snapshot()
    assert counts["prefix_reused_tokens"] == 0 and counts["prefilled_tokens"] == 3 * 40


def test_random_model_rejects_bad_options():
    with pytest.raises(ValueError, match="quantize"):
        random_model(TINY, None, quantize="int3")
    with pytest.raises(ValueError, match="max_batch_size"):
        random_model(TINY, None, max_batch_size=0)


# ---- charts ------------------------------------------------------------------------------------

CHART_PANELS = {"7B-bf16": [Bar("b1", 150.0, "ours", bound=200.0, text="150 (75%)"), Bar("b1", 90.0, "peer")],
                "tiny": [Bar("b8", 12000.0, "ours", bound=15000.0)]}


def test_hbar_chart_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image  # matplotlib's own dependency

    path = hbar_chart(tmp_path / "c.png", "Decode", CHART_PANELS, unit="tok/s", ref=180.0, ref_label="copy")
    w, h = png_info(path.read_bytes())
    assert (w, h) == (1210, 330)  # 11 x (1.2 + 0.3 * panel rows) inches at 110 dpi
    with Image.open(path) as img:
        colors = {rgb for _, rgb in img.convert("RGB").getcolors(maxcolors=w * h)}
    assert (31, 119, 180) in colors and (255, 127, 14) in colors  # "ours" and "peer" bars (C0, C1)
    assert (215, 215, 215) in colors  # the bounds behind them
    with pytest.raises(ValueError):
        hbar_chart(tmp_path / "d.png", "x", {"a": []}, unit="u")


def test_charts_without_matplotlib_say_how_to_get_them(tmp_path, quick_report, no_matplotlib):
    """Without the plots extra a chart raises MissingExtraError naming the extra; the report keeps its
    tables and says in report.md why there are no plots."""
    with pytest.raises(MissingExtraError, match=r"needs matplotlib.*pip install 'codellama-rt\[plots\]'"):
        hbar_chart(tmp_path / "c.png", "Decode", CHART_PANELS, unit="tok/s")
    assert not (tmp_path / "c.png").exists()
    data = json.loads((quick_report[1] / "report.json").read_text())
    assert data["decode"]  # rows to plot
    data["plots_missing"] = None
    data["plots"] = report.write_plots(data, tmp_path)
    assert data["plots"] == [] and list(tmp_path.iterdir()) == []
    assert data["plots_missing"] == f"drawing PNG charts needs matplotlib, which is not installed: {INSTALL_HINT}"
    md = report.to_markdown(data, "")
    assert "## Decode" in md and "| tiny | ours (eager) | 1 |" in md
    assert f"## Plots\n\nNot drawn: drawing PNG charts needs matplotlib, which is not installed: {INSTALL_HINT}." in md


def _package(root: Path, layout: str, files: dict) -> tuple[Path, Path]:
    """(package dir, kernels dir) holding `files` ({name inside the package: text}) laid out as a checkout
    (runtime/ and kernels/ side by side) or as an installed package (kernels/ inside codellama_rt/)."""
    pkg = root / ("runtime" if layout == "checkout" else "site-packages/codellama_rt")
    kernels = root / "kernels" if layout == "checkout" else pkg / "kernels"
    for name, text in files.items():
        path = kernels / name[len("kernels/"):] if name.startswith("kernels/") else pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg, kernels


CODE = {"__init__.py": "x = 1\n", "bench/common.py": "y = 2\n", "kernels/__init__.py": "", "kernels/a.py": "z = 3\n"}


def test_source_digest_names_the_code(tmp_path):
    """The same files give the same digest in a checkout and installed; one byte changed in any .py, of the
    package or its kernels, gives another; other files do not count."""
    from codellama_rt.bench import provenance

    checkout = _package(tmp_path / "a", "checkout", CODE)
    installed = _package(tmp_path / "b", "installed", CODE)
    first = provenance.source_digest(*checkout)
    assert len(first) == 12 and int(first, 16) >= 0 and provenance.source_digest(*installed) == first
    assert [n for n, _ in provenance.package_files(*installed)] == sorted(CODE)
    (checkout[0] / "README.md").write_text("not code")
    assert provenance.source_digest(*checkout) == first
    (checkout[1] / "a.py").write_text("z = 4\n")
    assert provenance.source_digest(*checkout) != first


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def git_checkout(tmp_path):
    """A git repository with one commit holding a checkout's runtime/ and kernels/, and a virtualenv-like
    site-packages inside it (untracked) holding the same code installed."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    root = tmp_path / "repo"
    checkout = _package(root, "checkout", CODE)
    _git(root, "init", "-q")
    _git(root, "add", "runtime", "kernels")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    return root, checkout, _package(root / ".venv", "installed", CODE)


def test_provenance_of_a_git_checkout(git_checkout):
    from codellama_rt import __version__
    from codellama_rt.bench import provenance

    root, checkout, _ = git_checkout
    head = _git(root, "rev-parse", "HEAD")
    got = provenance.provenance(*checkout)
    assert got == {"codellama_rt": __version__, "package": str(checkout[0]), "git_commit": head,
                   "source_digest": provenance.source_digest(*checkout)}
    (checkout[1] / "a.py").write_text("z = 5\n")  # a tracked file changed
    assert provenance.git_commit(checkout[0]) == head + "+dirty"


def test_provenance_of_an_installed_package_says_the_commit_is_unknown(git_checkout, tmp_path):
    """Installed (even in a virtualenv inside a checkout, whose HEAD is not the package's): version and
    digest known, the commit explicitly unknown; a source tree without git says so too."""
    from codellama_rt import __version__
    from codellama_rt.bench import provenance

    _, checkout, installed = git_checkout
    got = provenance.provenance(*installed)
    assert got["git_commit"] == f"unknown (installed package at {installed[0]}, not a git checkout)"
    assert got["codellama_rt"] == __version__ and got["source_digest"] == provenance.source_digest(*checkout)
    loose = _package(tmp_path / "tarball", "checkout", CODE)
    assert provenance.git_commit(loose[0]) == f"unknown (source tree at {loose[0].parent}, not a git checkout)"


def test_this_run_records_its_provenance(quick_report):
    """The report names the code it ran: this package's version and digest, and a commit or why not."""
    from codellama_rt import __version__
    from codellama_rt.bench import provenance

    meta = json.loads((quick_report[1] / "report.json").read_text())["meta"]
    assert meta["codellama_rt"] == __version__ and meta["source_digest"] == provenance.source_digest()
    assert meta["package"] == str(provenance.PACKAGE_DIR)
    commit = meta["git_commit"]
    assert commit.startswith("unknown (") or len(commit.removesuffix("+dirty")) == 40
    assert f"commit {commit} (source digest {meta['source_digest']})" in (quick_report[1] / "report.md").read_text()


# ---- pytest-benchmark micro-benchmarks (bench/) ---------------------------------------------------

BENCHMARKS = {"test_rms_norm", "test_rotary", "test_attention_prefill", "test_attention_decode",
              "test_linear_decode", "test_linear_swiglu_decode", "test_int4_linear_decode",
              "test_nf4_linear_decode", "test_decode", "test_prefill"}


@pytest.mark.slow
def test_pytest_benchmark_suite_saves_a_json_named_after_the_card(tmp_path):
    """`pytest bench --benchmark-only` from the repository root, in a child with the fewest rounds, run by
    the pytest script (`python -m pytest` would put the root, whose kernels/ shadows a PyPI package, on
    sys.path): one JSON in the storage, named after the card, with every benchmark and the provenance."""
    from codellama_rt.bench.common import card_name, card_slug
    from codellama_rt.bench.provenance import provenance

    script = Path(sys.executable).with_name("pytest")
    if not script.is_file():
        pytest.skip(f"no pytest script beside {sys.executable}")
    cmd = [str(script), "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider", "--benchmark-min-rounds=1",
           "--benchmark-max-time=0", "--benchmark-warmup=off", f"--benchmark-storage=file://{tmp_path}"]
    # not as an xdist worker (the suite runs under xdist): pytest-benchmark reads PYTEST_XDIST_WORKER and then
    # refuses --benchmark-only
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    saved = list(tmp_path.rglob("*.json"))
    slug = card_slug({"card": card_name()})
    assert len(saved) == 1 and saved[0].name.startswith(f"0001_{slug}_"), saved
    data = json.loads(saved[0].read_text())
    names = {b["name"].split("[")[0] for b in data["benchmarks"]}
    assert names == BENCHMARKS
    assert all(b["stats"]["rounds"] >= 1 and b["stats"]["median"] > 0 for b in data["benchmarks"])
    assert data["machine_info"]["card"] == card_name()
    assert data["commit_info"]["codellama_rt"] == provenance()  # the package this test imports: the same code


@pytest.mark.slow
def test_gemv_sweep_int4_candidates_compute_the_product():
    """The sweep's int4 candidates (tensor-core tiles and FMA tiles, through `int4_linear` with a launch
    override) compute x @ W^T here in the interpreter, for every tile it would try at these widths."""
    from codellama_rt.kernels.int4 import dequantize_int4, quantize_int4

    sweep = load_bench("gemv_sweep")
    g = torch.Generator().manual_seed(0)
    N, K = 264, 512
    w = quantize_int4(torch.randn(N, K, generator=g).bfloat16() / K ** 0.5, group_size=128)
    x = torch.randn(1, K, generator=g).bfloat16()
    exact = x.double() @ dequantize_int4(w, torch.float64).t()
    configs = sweep.int4_mma_configs(N, K)
    assert len(configs) >= 4 and all(1 <= split <= 16 for _, split, _ in configs)
    for bn, split, warps in configs:
        y = sweep.int4_mma_variant(x, w, bn, split, warps)
        torch.testing.assert_close(y.double(), exact, rtol=0.02, atol=0.02)
    bn, bk, split, warps = sweep.int4_configs(N, K)[0]
    torch.testing.assert_close(sweep.int4_variant(x, w, bn, split, warps).double(), exact, rtol=0.02, atol=0.02)
    r = subprocess.run([sys.executable, str(Path(sweep.__file__)), "--out", "unused", "--kinds", "int4,bogus"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bogus" in r.stderr


def test_tensor_parallel_paper_model_arithmetic():
    from codellama_rt.bench import tp_model

    args = ModelArgs.from_preset("CodeLlama-70b")
    card = {"X": {"hbm_gbps": 1000.0, "nvlink_gbps": 100.0}}
    one, eight = tp_model.rows(args, (1, 8), latency_us=10.0, cards=card)
    blocks = 80 * (8192 * (8192 + 2 * 1024) + 8192 * 8192 + 2 * 28672 * 8192 + 8192 * 28672)
    assert one.weight_gb_per_gpu * 1e9 == pytest.approx((blocks + 32016 * 8192 + 8192) * 2)
    assert eight.weight_gb_per_gpu * 1e9 == pytest.approx((blocks / 8 + 32016 * 8192 + 8192) * 2)
    assert one.allreduces == 0 and one.comm_ms == 0 and eight.allreduces == 160 and eight.allreduce_kib == 16
    assert eight.comm_ms == pytest.approx(160 * (10e-6 + 2 * 7 / 8 * 16384 / 100e9) * 1e3)
    assert eight.step_ms == pytest.approx(eight.weight_gb_per_gpu / 1000.0 * 1e3)
    assert eight.tok_s_with_comm == pytest.approx(1e3 / (eight.step_ms + eight.comm_ms))
    assert "gpt-fast" in tp_model.table("CodeLlama-70b", [one, eight])
