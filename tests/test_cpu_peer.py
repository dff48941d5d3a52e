"""bench/cpu_peer.py, our CPU rows beside llama.cpp's: the agreement measure, its options, and one tiny run
of our fp32 row in a child (numbers present and sane; llama.cpp is not needed for it). Speed is never
asserted here (see bench/README.md)."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from tool_modules import load_bench, load_tool


@pytest.fixture(scope="module")
def peer():
    return load_bench("cpu_peer")


def test_agreement_is_the_shared_prefix_share(peer):
    assert peer.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert peer.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5  # nothing after the first difference counts
    assert peer.agreement([], [1]) == 0.0


def test_mean_agreement_averages_each_pair(peer):
    assert peer.mean_agreement([[1, 2], [1, 2, 3, 4]], [[1, 2], [1, 9, 3, 4]]) == (1.0 + 0.25) / 2
    with pytest.raises(ValueError, match="as many continuations"):
        peer.mean_agreement([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="as many continuations"):
        peer.mean_agreement([], [])


def test_llama_options_go_together(peer):
    with pytest.raises(SystemExit):
        peer.parse(["--llama-python", sys.executable])


def test_random_shapes_exclude_a_model_and_need_a_tokenizer(peer, tmp_path):
    with pytest.raises(SystemExit):
        peer.parse(["--random", "57m", "--model", str(tmp_path)])
    with pytest.raises(SystemExit):
        peer.parse(["--random", "57m", "--tokenizer", str(tmp_path / "missing.model")])


def test_a_row_is_the_median_of_its_rounds(peer):
    runs = [dict(decode_tok_s=d, prefill_tok_s=p, peak_rss_mb=m, ids=[i]) for i, (d, p, m) in
            enumerate([(100.0, 10.0, 300.0), (300.0, 30.0, 310.0), (200.0, 5.0, 305.0)])]
    row = peer.summarize(runs)
    assert (row["decode_tok_s"], row["prefill_tok_s"], row["peak_rss_mb"], row["ids"]) == (200.0, 10.0, 310.0, [0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_childs_peak_rss_is_its_own(peer):
    """The children report their own peak: not ru_maxrss, which Linux carries over from the spawning process
    (this one, with torch loaded), so every small child would have reported at least the parent's RSS."""
    import subprocess
    parent = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB more in this process, touched
    code = peer.PEAK_RSS + "\nprint(peak_rss_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_mb = float(done.stdout.split()[-1])
    own_mb = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024
    assert 1 < child_mb < 64 < own_mb, (child_mb, own_mb)
    del parent


@pytest.mark.slow
def test_our_fp32_row(peer, tmp_path):
    doc = peer.main(["--ours", "fp32", "--new-tokens", "8", "--prefill-tokens", "64", "--threads", "1",
                     "--repeat", "1", "--out", str(tmp_path / "peer.json")])
    [row] = doc["rows"]
    assert row["runtime"] == "codellama-rt" and row["weights"] == "fp32" and len(row["ids"]) == 8
    assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mb"] > 50
    assert row["agreement_with_our_fp32"] == 1.0 and doc["meta"]["prefill_tokens"] == 64
    from codellama_rt.bench.prompts import CODE_PROMPTS
    assert [len(ids) for ids in row["agree_ids"]] == [peer.AGREEMENT_TOKENS] * len(CODE_PROMPTS)
    assert (tmp_path / "peer.json").is_file()


@pytest.mark.slow
def test_our_lite_row(peer, tmp_path):
    """A lite row: the model exported, run in a child without torch (the child asserts it), the same greedy ids as
    our fp32 row (decode rows are the same step; the prompt's next token within fp32 rounding)."""
    pytest.importorskip("codellama_rt._cpu_lite")
    doc = peer.main(["--ours", "fp32,lite-fp32", "--new-tokens", "8", "--prefill-tokens", "64", "--threads", "1",
                     "--repeat", "1"])
    ours, lite = doc["rows"]
    assert lite["runtime"] == "codellama-rt lite" and lite["weights"] == "fp32" and len(lite["ids"]) == 8
    assert lite["decode_tok_s"] > 0 and lite["prefill_tok_s"] > 0 and 1 < lite["peak_rss_mb"] < ours["peak_rss_mb"]
    assert lite["ids"] == ours["ids"]
    assert lite["agree_ids"] == ours["agree_ids"] and lite["mean_agreement_64_with_own_fp32"] == 1.0


def test_quant_agreement_measures():
    qa = load_bench("quant_agreement")
    assert qa.prefix_share([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert qa.prefix_share([1, 9, 3, 4], [1, 2, 3, 4]) == 0.25
    assert qa.prefix_share([1, 2], [1, 2, 3, 4]) == 0.5  # stopped early: the rest counts as different

    class Echo:  # logits that always predict token 7
        def logits(self, ids):
            out = torch.zeros(1, len(ids), 10)
            out[..., 7] = 1.0
            return out

    assert qa.teacher_forced(Echo(), [1, 2], [7, 3, 7, 7]) == 0.75
    same = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    assert qa.mean_kl(same, same) == 0.0
    # KL((1/2, 1/2) || (1/(1+e), e/(1+e))) = log((1+e) / 2) - 1/2, one row; the other row identical
    kl = math.log((1 + math.e) / 2) - 0.5
    assert qa.mean_kl(torch.zeros(2, 2), torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == pytest.approx(kl / 2, rel=1e-6)
    corpus = load_tool("corpus")
    prompts = qa.held_out_prompts(3)
    assert prompts == qa.held_out_prompts(3) and len(set(prompts)) == 3
    held = [corpus.read_source(f) for f in corpus.corpus_split()[1]]
    assert all(any(p in h for h in held) for p in prompts)  # runs of the held-out files, never trained on
    with pytest.raises(ValueError, match="--held-out 100000"):
        qa.held_out_prompts(100000)
    more = qa.held_out_prompts(3, per_file=4)
    assert len(set(more)) == len(more) and 3 < len(more) <= 12 and all(any(p in h for h in held) for p in more)
    with pytest.raises(ValueError, match="--per-file 0"):
        qa.held_out_prompts(3, per_file=0)
    assert qa.mean_and_error([1.0, 0.0, 1.0, 0.0]) == pytest.approx((0.5, math.sqrt(1 / 3) / 2))
