"""tools/train_default_model.py: the corpus split, the infilling objective's layout (the exact prompt
format the runtime builds at inference), the HF export (loads back through `codellama_rt.load` with the
trained model's logits), checkpoint/resume (an interrupted run ends with the weights of an
uninterrupted one), and the unlikelihood objective's parts (greedy rollouts equal the runtime's greedy
generation; repeated n-grams and the loss against known answers), the logged completion probe
(the evaluation's cut and parse), and the copy/edit examples and their probe (tools/copy_edit.py). The
corpus (tools/corpus.py) and the infill probe (tools/probes.py) are the evaluation's too; the probe's agreement
with the evaluation on the shipped weights is in test_default_model.py."""
from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import codellama_rt as cl
from codellama_rt.model.config import ModelArgs
from codellama_rt.model.transformer import Prefill
from tool_modules import load_tool

corpus = load_tool("corpus")
probes = load_tool("probes")
tdm = load_tool("train_default_model")

SOURCE = (
    "import os\n\n\n"
    "def read(path):\n"
    "    with open(path) as f:\n"
    "        return f.read()\n\n\n"
    "class Box:\n"
    "    def __init__(self, x):\n"
    "        self.x = x  # café\n"
)


def test_corpus_split_is_disjoint_and_stable():
    train, held = corpus.corpus_split()
    assert train and held and not set(train) & set(held)
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.10
    root = corpus.stdlib_root()
    for f in train + held:
        assert not corpus.EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1])
    assert corpus.corpus_split() == (train, held)


@pytest.mark.slow
def test_test_suite_files_parse_and_leave_the_held_out_set_alone(tmp_path):
    """--with-tests adds only files under the test directories that parse, none the held-out hash picks;
    a deliberately broken file is left out."""
    root = tmp_path / "lib"
    for rel, text in {"a.py": "x = 1\n", "test/test_ok.py": "def test(): pass\n",
                      "test/badsyntax_x.py": "def (:\n", "pkg/tests/t.py": "y = 2\n",
                      "idlelib/idle_test/h.py": "z = 3\n", "site-packages/test/s.py": "w = 4\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    extra = [f.relative_to(root).as_posix() for f in corpus.test_suite_files(root)]
    held_by_hash = {r for r in ("test/test_ok.py", "pkg/tests/t.py", "idlelib/idle_test/h.py")
                    if int(hashlib.sha1(r.encode()).hexdigest(), 16) % 1000 < corpus.HELD_OUT_PER_MILLE}
    want = {"test/test_ok.py", "pkg/tests/t.py", "idlelib/idle_test/h.py"} - held_by_hash
    assert set(extra) == want and extra == sorted(extra)
    real_train, real_held = corpus.corpus_split()
    real_extra = corpus.test_suite_files()
    assert not set(real_extra) & (set(real_train) | set(real_held))


@pytest.mark.parametrize("trim", [False, True])
def test_chunks_are_whole_lines_covering_the_text(trim):
    train, _ = corpus.corpus_split()
    for f in train[:40]:
        text = corpus.read_source(f)
        pos = 0
        for part in corpus.chunks(text, 1500, trim):
            assert not (trim and part.startswith("\n"))
            start = text.index(part, pos)
            assert text[pos:start].strip() == "", "only blank lines are left out"
            assert start == 0 or text[start - 1] == "\n", "a chunk starts at a line start"
            assert part.strip()
            pos = start + len(part)
        assert text[pos:].strip() == ""


@pytest.mark.parametrize("seed", range(40))
def test_fim_example_is_the_runtime_infill_prompt_plus_middle(tiny, seed):
    ids = tdm.encode_example(tiny, SOURCE, random.Random(seed), fim_rate=1.0, last=False)
    rng = random.Random(seed)
    rng.random()  # the FIM decision
    prefix, middle, suffix = tdm.split_fim(SOURCE, rng)
    assert prefix + middle + suffix == SOURCE
    suffix_first = rng.random() < 0.5
    prompt = tiny.encode_infill(prefix, suffix, suffix_first=suffix_first)
    assert ids[:len(prompt)] == prompt
    assert ids[-1] == tiny.eot_id
    assert tiny.decode_infill(ids[len(prompt):-1]) == middle


def test_plain_example_is_bos_text_eos(tiny):
    ids = tdm.encode_example(tiny, SOURCE, random.Random(0), fim_rate=0.0, last=True)
    assert ids == tiny.encode(SOURCE, add_bos=True, add_eos=True)


def test_rows_start_at_examples_and_hold_whole_examples_then_a_head():
    examples = [[1, 10 + k] + [7] * n for k, n in enumerate([3, 8, 1, 2, 20, 4, 0, 5])]
    rows = tdm.pack_rows(examples, seq_len=9)
    assert rows.shape[1] == 10 and rows.dtype == torch.int64
    pos = 0  # the rows, in order, are whole examples, each row's last one possibly cut at the row's end
    for row in rows.tolist():
        k = 0
        while k < len(row):
            ex = examples[pos]
            assert row[k:k + len(ex)] == ex[:len(row) - k]
            k, pos = k + len(ex), pos + 1
        assert row[0] == 1
    assert pos >= len(examples) - 2  # only a final partial row is left out


def test_infill_probe_cases_are_psm_and_spm_prompts_with_their_plain_twins(tiny):
    _, held = corpus.corpus_split()
    cases = probes.infill_probe_cases(held[:2], tiny, 1500, max_len=4000, n=5)
    assert len(cases) == 5
    for prompt, middle, plain_pre, plain, n_chars, spm_prompt in cases:
        assert prompt[:2] == [tiny.bos_id, tiny.prefix_id] and prompt[-1] == tiny.middle_id
        assert plain[:len(plain_pre)] == plain_pre and len(tiny.decode_infill(middle)) == n_chars
        # SPM: the suffix's ids, then the prefix's (those of the plain twin after BOS)
        suffix_ids = prompt[prompt.index(tiny.suffix_id) + 1:-1]
        assert spm_prompt == [tiny.bos_id, tiny.prefix_id, tiny.suffix_id] + suffix_ids + [tiny.middle_id] \
            + prompt[2:prompt.index(tiny.suffix_id)]


def test_infill_probe_of_a_uniform_model_is_log_vocab_per_token(tiny):
    _, held = corpus.corpus_split()
    cases = probes.infill_probe_cases(held[:2], tiny, 1500, max_len=1024, n=4)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=tiny.vocab_size,
                     rope_theta=1e6, max_seq_len=1024)
    model = tdm.init_model(args, seed=0)
    with torch.no_grad():
        model.output.weight.zero_()  # every next-token distribution is uniform
    got = probes.infill_probe(lambda ids: tdm.forward(model, torch.tensor([ids]))[0], cases, tiny.eot_id)
    log_v, chars = math.log(tiny.vocab_size), sum(c[4] for c in cases)
    assert got["psm_nats_per_char"] == pytest.approx(log_v * sum(len(c[1]) for c in cases) / chars, rel=1e-4)
    assert got["prefix_only_nats_per_char"] == pytest.approx(
        log_v * sum(len(c[3]) - len(c[2]) for c in cases) / chars, rel=1e-4)
    assert got["eot_nats"] == pytest.approx(log_v, rel=1e-4)
    assert got["spm_nats_per_char"] == pytest.approx(got["psm_nats_per_char"], rel=1e-4)
    assert got["spm_eot_nats"] == pytest.approx(log_v, rel=1e-4)
    assert probes.infill_probe(lambda ids: 1 / 0, [], tiny.eot_id) is None


def test_export_loads_back_with_the_trained_logits(tiny_tokenizer, tiny, tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=tiny.vocab_size,
                     rope_theta=1e6, max_seq_len=128)
    model = tdm.init_model(args, seed=0)
    tdm.export_hf(model, tiny_tokenizer, tmp_path, {"note": "test"})
    with torch.no_grad():  # what the export stores: bf16-rounded weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    loaded = cl.load(tmp_path, backend="reference", dtype=torch.float32, device="cpu")
    tokens = torch.tensor([tiny.encode(SOURCE)[:100]])
    with torch.no_grad():
        want = model(tokens, Prefill(0))
    torch.testing.assert_close(loaded.logits(tokens), want, rtol=0, atol=1e-5)
    assert loaded.tokenizer.eot_id == tiny.eot_id


def _run(work, out, *extra):
    tdm.main(["--work", str(work), "--out", str(out), "--vocab", "600", "--dim", "32", "--layers", "1",
              "--heads", "4", "--kv-heads", "2", "--ffn", "64", "--seq-len", "64", "--batch", "2",
              "--steps", "3", "--warmup", "1", "--max-seq-len", "64", "--save-every", "1", "--eval-every", "2",
              "--threads", "2", "--max-files", "30", *extra])


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    _run(tmp_path / "w1", tmp_path / "once")
    _run(tmp_path / "w2", tmp_path / "unused", "--max-minutes", "0.000001")  # stops after step 1
    assert not (tmp_path / "unused").exists()
    _run(tmp_path / "w2", tmp_path / "resumed")
    a, b = load_file(tmp_path / "once" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    record = json.loads((tmp_path / "resumed" / "training.json").read_text())
    assert record["steps"] == 3 and record["sessions"] == 2 and record["tokens"] == 3 * 2 * 64


def test_repeated_ngrams_marks_the_tokens_of_each_later_occurrence_from_start():
    ids = torch.tensor([[5, 1, 2, 3, 1, 2, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8], [7, 7, 7, 7, 7, 0, 0, 0]])
    got = tdm.repeated_ngrams(ids, start=0, n=3)
    assert got[0].tolist() == [False] * 4 + [True] * 3 + [False]  # (1, 2, 3) again at 4..6
    assert not got[1].any()
    assert got[2].tolist() == [False, True, True, True, True, False, False, False]  # (7, 7, 7) at 1 and 2
    assert tdm.repeated_ngrams(ids, start=5, n=3)[0].tolist() == [False] * 5 + [True] * 2 + [False]
    assert not tdm.repeated_ngrams(ids, start=0, n=4)[0].any()


def _tiny_model(tiny, seed=0):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=tiny.vocab_size,
                     rope_theta=1e6, max_seq_len=128)
    model = tdm.init_model(args, seed=seed)
    with torch.no_grad():  # what an export stores, so a loaded copy computes the same logits
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float() * 8)  # sharper logits than the init's: clear argmaxes
    return model


def test_rollout_prompts_are_bos_then_dedented_training_source(tiny):
    train, _ = corpus.corpus_split()
    prompts = tdm.rollout_prompts(train[:30], tiny, random.Random(0), n=12, length=20)
    assert prompts.shape == (12, 20) and prompts.dtype == torch.int64
    assert (prompts[:, 0] == tiny.bos_id).all()
    texts = [tiny.decode(p[1:].tolist()) for p in prompts]
    assert all(t.strip() and not t[0].isspace() for t in texts)  # a line start with its indent removed
    assert sum(t.startswith(("def ", "async def ")) for t in texts) >= 3


def test_greedy_rollout_is_the_runtime_greedy_generation(tiny_tokenizer, tiny, tmp_path):
    model = _tiny_model(tiny)
    tdm.export_hf(model, tiny_tokenizer, tmp_path, {"note": "test"})
    loaded = cl.load(tmp_path, backend="reference", dtype=torch.float32, device="cpu")
    for text in ("def read(path):\n", SOURCE):
        ids = tiny.encode(text, add_bos=True)
        got = tdm.greedy_rollout(model, torch.tensor([ids]), new_tokens=20)[0].tolist()
        want = loaded.generate(text, max_new_tokens=20)
        assert got[:len(ids)] == ids and len(got) == len(ids) + 20
        assert got[len(ids):len(ids) + len(want.token_ids)] == want.token_ids and len(want.token_ids) > 3
    prompts = torch.tensor([tiny.encode(SOURCE, add_bos=True)[:8], tiny.encode(SOURCE[40:], add_bos=True)[:8]])
    batched = tdm.greedy_rollout(model, prompts, new_tokens=16)
    for b in range(2):  # each row of a batch is the row's own rollout
        assert torch.equal(batched[b], tdm.greedy_rollout(model, prompts[b:b + 1], new_tokens=16)[0])


def test_unlikelihood_loss_of_a_uniform_model_is_log_of_one_minus_one_over_vocab(tiny):
    model = _tiny_model(tiny)
    with torch.no_grad():
        model.output.weight.zero_()  # p = 1 / V for every token
    seqs = torch.tensor([[1, 5, 6, 7, 5, 6, 7, 8, 9, 5, 6, 7]])
    loss, share = tdm.unlikelihood_loss(model, seqs, start=3, n=3)
    marked = 6  # positions 4..6 and 9..11
    assert share == pytest.approx(marked / 9)
    assert loss.item() == pytest.approx(-math.log1p(-1 / tiny.vocab_size) * marked / 9, rel=1e-3)


def test_unlikelihood_step_lowers_the_probability_of_the_repeats(tiny):
    model = tdm.init_model(_tiny_model(tiny).args, seed=1)
    seqs = torch.tensor([tiny.encode(SOURCE, add_bos=True)[:8] + [40, 41, 42] * 6])  # a loop after a prompt
    mask = tdm.repeated_ngrams(seqs, 8, 2)[:, 1:]
    assert mask.sum() == 15  # all but the first [40, 41, 42]

    def p_marked():
        with torch.no_grad():
            p = tdm.forward(model, seqs[:, :-1]).float().softmax(-1).gather(-1, seqs[:, 1:, None])[..., 0]
        return p[mask].mean().item()

    before = p_marked()
    loss, _ = tdm.unlikelihood_loss(model, seqs, 8, 2)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    with torch.no_grad():  # a step of length 0.5 against the gradient
        for p in model.parameters():
            p -= 0.5 * p.grad / norm
    assert p_marked() < 0.9 * before


@pytest.mark.slow
def test_a_phase_can_start_from_an_export_and_train_with_unlikelihood(tmp_path):
    _run(tmp_path / "w1", tmp_path / "first")
    start = tdm.init_weights(tmp_path / "first")
    exported = load_file(tmp_path / "first" / "model.safetensors")
    assert torch.equal(start["tok_embeddings"], exported["model.embed_tokens.weight"].float())
    _run(tmp_path / "w2", tmp_path / "second", "--init-from", str(tmp_path / "first"), "--unlikelihood", "1",
         "--ul-batch", "2", "--ul-prompt", "8", "--ul-new", "8", "--ul-ngram", "2")
    record = json.loads((tmp_path / "second" / "training.json").read_text())
    assert record["continues"] == json.loads((tmp_path / "first" / "training.json").read_text())
    assert record["objective"]["unlikelihood"]["ngram"] == 2
    assert all(0 <= e["greedy_repeated_ngram_share"] <= 1 for e in record["log"])
    assert all(0 <= e["completion_parse_share"] <= 1 for e in record["log"])
    tokenizers = [(tmp_path / d / "tokenizer.model").read_bytes() for d in ("first", "second")]
    assert tokenizers[0] == tokenizers[1]


def test_completion_probe_cuts_and_parses_as_the_evaluation_does(tiny):
    """Known continuations: a finished function then the next top-level line parses; an unclosed bracket
    at the token limit does not; text after EOS is ignored."""
    def scripted(text, eos=False):
        def continue_ids(ids, n):
            new = tiny.encode(tiny.decode(ids) + text, add_bos=True)[len(ids):]
            return (new + [tiny.eos_id] + tiny.encode("(((", add_bos=False) if eos else new)[:n]
        return continue_ids

    headers = ["def f(x):\n", "def g(a, b):\n"]
    assert tdm.completion_probe(scripted("    return x + 1\n\n\ndef h(:\n"), tiny, headers, 64) == 1.0
    assert tdm.completion_probe(scripted("    return (x +\n    1,"), tiny, headers, 64) == 0.0
    assert tdm.completion_probe(scripted("    return x\n", eos=True), tiny, headers, 64) == 1.0
    assert tdm.completion_probe(scripted("    return x\n"), tiny, [], 64) is None



# ---- the copy/edit objective (tools/copy_edit.py) -------------------------------------------------

copy_edit = load_tool("copy_edit")

EDIT_SOURCE = (
    "import os\n\n\n"
    "def join_all(parts, sep=', '):\n"
    "    out = []\n"
    "    for part in parts:\n"
    "        out.append(str(part))\n"
    "    return sep.join(out)\n\n\n"
    "def other():\n"
    "    pass\n"
)


def _edit_function(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(EDIT_SOURCE)
    [fn] = [f for f in corpus.held_out_functions([path]) if f.src.startswith("def join_all")]
    return fn


@pytest.mark.parametrize("kind, first, body_has", [
    ("rename", "def join_all_v2(parts, sep=', '):", "for part in parts"),
    ("param", "def join_all(parts_v2, sep=', '):", "for part in parts_v2"),
    ("same", "def join_all(parts, sep=', '):", "for part in parts"),
])
def test_edit_case_is_the_file_the_request_and_the_edited_function(tmp_path, kind, first, body_has):
    """The prompt is the file up to the function's end, two blank lines, the request, the edited first line;
    the target the rest of the edited function (a rename touches the def line only, a parameter every use)."""
    fn = _edit_function(tmp_path)
    rng = random.Random(0)
    rng.choice = lambda seq: seq[0]  # the first parameter
    case = copy_edit.edit_case(fn, rng, kind, "# {name} -> {new} ({old}):\n", 10_000, suffix="_v2")
    file_part = EDIT_SOURCE[:EDIT_SOURCE.index("\n\n\ndef other")]
    request = {"rename": "# join_all -> join_all_v2 (join_all):\n", "param": "# join_all -> parts_v2 (parts):\n",
               "same": "# join_all -> join_all (join_all):\n"}[kind]
    assert case.prompt == file_part + "\n\n\n" + request + first + "\n"
    assert body_has in case.target and case.target.endswith("return sep.join(out)\n")
    assert ("parts_v2" in case.target) == (kind == "param") and "join_all" not in case.target
    short = copy_edit.edit_case(fn, rng, kind, "", 60, suffix="_v2")  # the context cut at a line start
    assert short.prompt.startswith("    ") and len(short.prompt) <= 60 + len(first) + 4


def test_training_texts_and_probe(tmp_path, tiny):
    """training_texts gives n prompt + target texts; the probe scores an oracle continuation 1.0 (whole), one
    wrong from the start 0.0, one wrong halfway about 0.5."""
    fn = _edit_function(tmp_path)
    texts = copy_edit.training_texts([fn], 12, random.Random(3), 10_000)
    assert len(texts) == 12 and all(t.startswith("import os") for t in texts)
    tok = tiny
    case = copy_edit.edit_case(fn, random.Random(0), "rename", copy_edit.PROBE_REQUEST, 10_000, suffix="_v2")
    want = tok.encode(case.prompt + case.target, add_bos=True)[len(tok.encode(case.prompt, add_bos=True)):]

    def probe(continue_ids):
        return copy_edit.copy_probe(continue_ids, tok, [fn], copy_edit.PROBE_REQUEST, 10_000)

    oracle = probe(lambda ids, n: want[:n])
    assert oracle["functions"] == 1 and oracle["reemitted_share"] == 1.0 and oracle["whole_functions"] == 1
    assert probe(lambda ids, n: [w + 1 for w in want[:n]])["reemitted_share"] == 0.0
    half = len(want) // 2
    got = probe(lambda ids, n: want[:half] + [want[half] + 1] + want[half + 1:n])
    assert got["reemitted_share"] == pytest.approx(half / len(want)) and got["whole_functions"] == 0


def test_repeat_examples_are_a_random_run_written_twice():
    """BOS, then a run of 32..256 random ids (none a control id or below 3), then the same run again."""
    out = copy_edit.repeat_examples(50, random.Random(4), 100, skip={10, 11})
    assert len(out) == 50
    for ex in out:
        run = ex[1:1 + (len(ex) - 1) // 2]
        assert ex[0] == 1 and ex == [1] + run + run and 32 <= len(run) <= 256
        assert all(3 <= t < 100 and t not in (10, 11) for t in run)
    assert len({tuple(ex) for ex in out}) == 50
