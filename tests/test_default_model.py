"""The embedded default model (runtime/default_model): what ships, that it loads with no path, that it
beats the unigram baseline on held-out source, and the golden regression: its greedy outputs for a fixed
set of prompts, recorded once by tools/write_golden.py, stay token-identical on the reference backend and
on the Triton backend (interpreter), so any numeric change in a kernel or in the graph shows up here."""
from __future__ import annotations

import json
import math

import pytest
import torch

import codellama_rt as cl
from codellama_rt.cli import main as cli_main
from tool_modules import load_tool

corpus = load_tool("corpus")
evaluation = load_tool("eval_default_model")
tdm = load_tool("train_default_model")
write_golden = load_tool("write_golden")
GOLDEN, run_case, weights_sha256 = write_golden.GOLDEN, write_golden.run_case, write_golden.weights_sha256

SHIPPED = ("config.json", "model.safetensors", "tokenizer.model", "generation_config.json", "training.json",
           "evaluation.json", "README.md")
golden = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def reference():
    return cl.load(backend="reference", dtype=torch.float32, device="cpu")


# Every golden case fits in 128 positions. A cache no longer than one attention tile is one split per sequence
# (`attention_decode.decode_launch`): the interpreter then runs no programs for empty splits nor a combine pass
# that only adds their zero weights (the same sums; the split combine has its own kernel tests), which were
# half of a replay's time in the interpreter.
GOLDEN_SEQ_LEN = 128


@pytest.fixture(scope="module")
def triton_model():
    return cl.load(backend="triton", dtype=torch.float32, device="cpu", max_seq_len=GOLDEN_SEQ_LEN)


def test_shipped_files_fit_the_budget():
    d = cl.default_model_path()
    missing = [f for f in SHIPPED if not (d / f).is_file()]
    assert not missing, f"{d} lacks {missing}"
    total = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert total < 20 * 2 ** 20, f"default model files take {total / 2 ** 20:.1f} MiB (limit 20 MiB)"


def test_architecture_is_codellama_like(reference):
    a, tok = reference.args, reference.tokenizer
    assert a.n_kv_heads < a.n_heads and a.n_heads % a.n_kv_heads == 0  # GQA
    assert a.rope_theta == 1e6 and not a.tie_word_embeddings
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = [tok.prefix_id, tok.suffix_id, tok.middle_id, tok.eot_id]
    assert None not in ids and len(set(ids)) == 4
    assert 1000 <= tok.vocab_size <= 8192 and tok.vocab_size <= a.vocab_size
    assert reference.tokenizer.sp.id_to_piece(ids[0]) == "▁<PRE>"


def test_load_without_path_is_the_default_model(reference):
    model = cl.load()
    assert model.path == cl.default_model_path()
    assert model.generate("def f(x):\n", max_new_tokens=8).token_ids == \
        reference.generate("def f(x):\n", max_new_tokens=8).token_ids


def test_cli_generate_and_infill_without_model(capsys, reference):
    assert cli_main(["generate", "--max-new-tokens", "8", "def f(x):\n"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == reference.generate("def f(x):\n", max_new_tokens=8).text
    assert cli_main(["infill", "--max-new-tokens", "8", "--prefix", "def f(x):\n", "--suffix", "    return y\n"]) == 0
    want = reference.infill("def f(x):\n", "    return y\n", max_new_tokens=8).text
    assert capsys.readouterr().out == want + "\n"


@pytest.mark.slow
def test_held_out_loss_beats_unigram(reference):
    """On one held-out stdlib file: the model's loss is well under the unigram distribution of its own
    training tokens (the full measurement is tools/eval_default_model.py's)."""
    train, held = corpus.corpus_split()
    tok = reference.tokenizer
    data = corpus.rows(corpus.plain_tokens(held[:3], tok, 1500), 511)[:2]
    log_p = evaluation.unigram_log_probs(corpus.plain_tokens(train[:60], tok, 1500), tok.vocab_size)
    logits = reference.logits(data[:, :-1])
    model_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten()).item()
    unigram_loss = -log_p[data[:, 1:]].mean().item()
    assert math.isfinite(model_loss) and model_loss < 0.6 * unigram_loss, (model_loss, unigram_loss)


def test_golden_matches_the_shipped_weights():
    assert golden["weights_sha256"] == weights_sha256(cl.default_model_path()), \
        "the default model's weights changed: re-record the golden outputs with tools/write_golden.py"
    assert len(golden["cases"]) >= 6


@pytest.mark.parametrize("i", range(len(golden["cases"])))
def test_golden_reference(reference, i):
    case = golden["cases"][i]
    c = run_case(reference, case)
    assert (c.token_ids, c.finish_reason) == (case["token_ids"], case["finish_reason"])
    assert c.text == case["text"]
    if case["kind"] == "infill":
        assert c.finish_reason in ("eot", "length")


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(golden["cases"])))
def test_golden_triton_interpreter(triton_model, i):
    case = golden["cases"][i]
    c = run_case(triton_model, case)
    assert (c.token_ids, c.finish_reason) == (case["token_ids"], case["finish_reason"])


def test_infill_cases_remove_one_body_line():
    """The evaluation's infill holes: prefix + line + suffix is the function, the line a body line of >= 3
    characters, the same one for the same case number (PSM, SPM and the prefix-only baseline share them)."""
    function_hole, header = evaluation.function_hole, corpus.header
    src = 'def f(a,\n      b):\n    """Doc."""\n    x = a + b\n\n    return x\n'
    for k in range(20):
        prefix, line, suffix = function_hole(src, k)
        assert prefix + line + suffix == src and function_hole(src, k) == (prefix, line, suffix)
        assert len(line.strip()) >= 3 and prefix.startswith(header(src))
    assert {function_hole(src, k)[1] for k in range(20)} == \
        {'    """Doc."""\n', "    x = a + b\n", "    return x\n"}


def test_in_file_holes_are_the_same_line_in_its_file_cut_to_fit(reference):
    """The evaluation's in-file holes: the function's case-k line, indented as in the file, with the file's
    lines around it (cut at line boundaries) and a prompt within the budget in both orders."""
    function_hole, in_file_hole = evaluation.function_hole, evaluation.in_file_hole
    tok = reference.tokenizer
    head = "".join(f"import mod{i}\n" for i in range(60))
    method = '    def f(self, a):\n        """Doc."""\n        x = a + self.b\n\n        return x\n'
    tail = "".join(f"CONST_{i} = {i}\n" for i in range(60))
    text = head + "class C:\n" + method + tail
    lines = tuple(text.splitlines(keepends=True))
    f = corpus.HeldOutFunction(src='def f(self, a):\n    """Doc."""\n    x = a + self.b\n\n    return x\n',
                        file_lines=lines, first_line=61)
    for k in range(10):
        dedented = function_hole(f.src, k)[1]
        for budget in (1000, 120):
            prefix, line, suffix = in_file_hole(f, k, tok, budget)
            assert line == "    " + dedented
            start = text.index(prefix + line + suffix)  # one contiguous run of the file's lines
            assert (start == 0 or text[start - 1] == "\n") and suffix.endswith("\n")
            assert (start == 0 and text.endswith(suffix)) == (budget == 1000)  # the whole file fits 1000
            for spm in (False, True):
                assert len(tok.encode_infill(prefix, suffix, suffix_first=spm)) <= budget
            assert len(tok.encode(suffix)) > 10  # the small budget still leaves some suffix


def test_model_card_is_what_the_evaluation_writes():
    """The shipped card is tools/eval_default_model.py's rendering of the shipped training.json and
    evaluation.json: no number in it was edited by hand or left stale by a change of the template."""
    d = cl.default_model_path()
    training, ev = (json.loads((d / f).read_text()) for f in ("training.json", "evaluation.json"))
    assert (d / "README.md").read_text() == evaluation.model_card(training, ev)


@pytest.mark.slow
def test_shipped_weights_give_the_training_completion_probe_the_evaluation_share():
    """On the shipped weights, the training log's completion probe (greedy rollouts of the training model,
    tools/train_default_model.py) and the evaluation's completion measure (the runtime's greedy generation,
    tools/eval_default_model.py) give the same share of 8 held-out functions, strictly between 0 and 1.
    A property of these weights: after retraining, a near tie on a greedy path or a share of 0 or 1 on
    these 8 functions fails this test without any code being wrong (pick other functions then)."""
    shipped = cl.load(None, backend="reference", dtype=torch.float32, device="cpu")
    model = tdm.init_model(shipped.args, seed=0)
    model.load_state_dict(tdm.init_weights(cl.default_model_path()))
    _, held = corpus.corpus_split()
    funcs = corpus.held_out_functions(held)[:8]
    want = evaluation.completion_eval(shipped, funcs, len(funcs), max_new_tokens=48)["share"]
    got = tdm.completion_probe(lambda ids, n: tdm.greedy_rollout(model, torch.tensor([ids]), n)[0, len(ids):].tolist(),
                               shipped.tokenizer, [corpus.header(f.src) for f in funcs], new_tokens=48)
    assert 0 < want < 1 and got == want
