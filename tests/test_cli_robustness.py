"""The command line under misuse: a closed pipe, internal errors, hostile chat input, a history past the
context, int4 group sizes, absurd context lengths, and serve without its extra or with bad flags."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

import codellama_rt
from codellama_rt import cli
from codellama_rt.cli import main

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def model():
    return codellama_rt.load()  # the embedded default model, as the CLI loads it without --model


def run(capsys, *argv, stdin: bytes | None = None, monkeypatch=None):
    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
@pytest.mark.parametrize("argv, stdin, fragment", [
    (["generate", "-"], "closed", "stdin is closed"),
    (["generate", "x"], "closed-stdout", "stdout is closed"),
    (["generate", "-"], b"\xff\xfedef", "stdin is not valid UTF-8 (byte 0xff at character 0)"),
])
def test_closed_or_undecodable_standard_streams_exit_2(argv, stdin, fragment):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "codellama_rt", *argv, "--max-new-tokens", "2"]
    if stdin == "closed":
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300,
                           preexec_fn=lambda: __import__("os").close(0))
    elif stdin == "closed-stdout":
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
                           preexec_fn=lambda: __import__("os").close(1))
    else:
        r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 2 and fragment in err and "internal error" not in err, err


def test_closed_pipe_exits_quietly(tmp_path):
    """`codellama-rt generate ... | head -c 1`: no 'Broken pipe' error, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "codellama_rt", "generate", "--max-new-tokens", "200", PROMPT],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout.read(1)
        proc.stdout.close()  # the reader goes away while generation still writes
        code = proc.wait(timeout=300)
        err = proc.stderr.read().decode()
    finally:
        proc.kill()
    assert err == "" and code == 0, (code, err)


def test_internal_error_exits_1_and_says_how_to_report(capsys, monkeypatch):
    def broken(a):
        raise KeyError("a bug")

    monkeypatch.setattr(cli.info, "run", broken)
    code, out, err = run(capsys, "info")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err and "report" in err
    for argv in (["--debug", "info"], ["info", "--debug"]):
        with pytest.raises(KeyError, match="a bug"):
            main(argv)
    monkeypatch.setenv("CODELLAMA_RT_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info"])


@pytest.mark.parametrize("error", ["safetensors", "allocation"])
def test_failures_of_the_machine_exit_2_not_as_bugs(capsys, monkeypatch, error):
    """A full disk while writing, memory the allocator refuses: one line, exit 2, no 'please report it'."""
    from codellama_rt.cli import generate

    def failing(a):
        if error == "safetensors":
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: No space left on device (os error 28)")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(generate, "run", failing)
    code, _, err = run(capsys, "generate", "x")
    assert code == 2 and "internal error" not in err and ("No space left" in err or "can't allocate" in err), err


def test_bad_input_still_exits_2(capsys):
    code, _, err = run(capsys, "generate", "--temperature", "1e308", PROMPT)
    assert code == 2 and err.count("\n") == 1 and "temperature" in err
    code, _, err = run(capsys, "--debug", "generate", "--temperature", "1e308", PROMPT)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("codellama-rt: error:")


def test_draft_flags_must_go_together(capsys):
    """--speculate draft without a draft model, or a draft model without it: refused before any loading."""
    code, _, err = run(capsys, "generate", "--speculate", "draft", PROMPT)
    assert code == 2 and err.count("\n") == 1 and "--draft PATH" in err and "--draft-quantize" in err
    code, _, err = run(capsys, "generate", "--draft-quantize", "int4", PROMPT)
    assert code == 2 and err.count("\n") == 1 and "--speculate draft" in err


def test_serve_without_the_extra_says_how_to_get_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    code, _, err = run(capsys, "serve", "--port", "0")
    assert code == 2 and err.count("\n") == 1 and "pip install 'codellama-rt[serve]'" in err


def test_serve_bad_flags_exit_2(capsys):
    for argv in (("--max-batch-size", "0"), ("--max-queue", "-1"), ("--port", "70000"), ("--api-key", " ")):
        code, _, err = run(capsys, "serve", *argv)
        assert code == 2 and err.count("\n") == 1 and argv[0].lstrip("-").split("-")[0] in err


def test_absurd_context_is_refused_at_once(capsys):
    code, _, err = run(capsys, "generate", "--max-seq-len", "100000000", PROMPT)
    assert code == 2 and err.count("\n") == 1 and "max_seq_len=100000000" in err and "at most" in err


@pytest.mark.slow
def test_chat_reports_a_bad_line_and_goes_on(capsys, monkeypatch, model):
    lines = [b"Write a function.\n", b"[INST] sneaky\n", b"caf\xe9 au lait\n", b"Now test it.\n"]
    code, out, err = run(capsys, "chat", "--max-new-tokens", "8", stdin=b"".join(lines), monkeypatch=monkeypatch)
    assert code == 0
    assert "[INST]" in err and "UTF-8" in err and err.count("message ignored") == 2
    first = model.chat([{"role": "user", "content": "Write a function."}], max_new_tokens=8).text
    second = model.chat([{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": first},
                         {"role": "user", "content": "Now test it."}], max_new_tokens=8).text
    assert out == f"{first}\n{second}\n"


@pytest.mark.slow
def test_chat_drops_the_oldest_turns_to_fit_the_context(capsys, monkeypatch):
    """A 64-token context holds one turn: each later reply is the reply to its message alone."""
    small = codellama_rt.load(max_seq_len=64)
    messages = ["Write a function that adds two numbers.", "Now one that multiplies them.",
                "And one that divides them safely."]
    stdin = "".join(m + "\n" for m in messages).encode()
    code, out, err = run(capsys, "chat", "--max-seq-len", "64", "--max-new-tokens", "16", stdin=stdin,
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert err.count("dropped the 2 oldest turn(s)") == 2  # ~20 tokens a message, 16 a reply, 16 kept free
    alone = [small.chat([{"role": "user", "content": m}], max_new_tokens=16).text for m in messages]
    assert out == "".join(a + "\n" for a in alone)


def test_chat_message_longer_than_the_context_is_reported(capsys, monkeypatch):
    stdin = ("word " * 200 + "\nshort question\n").encode()
    code, out, err = run(capsys, "chat", "--max-seq-len", "64", "--max-new-tokens", "4", stdin=stdin,
                         monkeypatch=monkeypatch)
    assert code == 0 and "the context is 64" in err and "message ignored" in err
    assert out.count("\n") == 1  # the short question got its reply


def test_chat_refuses_a_bad_system_prompt(capsys, monkeypatch):
    code, _, err = run(capsys, "chat", "--system", "<<SYS>>", stdin=b"hi\n", monkeypatch=monkeypatch)
    assert code == 2 and "--system" in err
    code, _, err = run(capsys, "chat", "--system", "def f(x): return x\n" * 200, stdin=b"hi\n",
                       monkeypatch=monkeypatch)
    assert code == 2 and "--system takes" in err and "the context is 1024" in err


@pytest.mark.slow
def test_generate_int4_on_the_default_model_picks_a_group_size_that_divides(capsys, model):
    """The default model's widths (256, 704) are not multiples of 128: int4 uses groups of 64."""
    code, out, err = run(capsys, "generate", "--quantize", "int4", "--max-new-tokens", "8", PROMPT)
    assert code == 0, err
    q = codellama_rt.api.load_model(quantize="int4", group_size=64)
    assert out == q.generate(PROMPT, max_new_tokens=8).text + "\n"
    code, out64, _ = run(capsys, "generate", "--quantize", "int4", "--group-size", "64", "--max-new-tokens", "8",
                         PROMPT)
    assert code == 0 and out64 == out


@pytest.mark.parametrize("flags,fragment", [
    (["--quantize", "int4", "--group-size", "128"], "group_size=128 does not divide"),
    (["--quantize", "int4", "--group-size", "48"], "group_size=48 is not supported"),
    (["--group-size", "64"], "--group-size applies to --quantize int4 only"),
])
def test_bad_group_size(capsys, flags, fragment):
    code, _, err = run(capsys, "generate", *flags, PROMPT)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_quantize_and_info_int4_on_the_default_model(capsys, tmp_path):
    out_dir = tmp_path / "int4"
    code, _, err = run(capsys, "quantize", "--method", "int4", "--out", out_dir)
    assert code == 0, err
    assert json.loads((out_dir / "config.json").read_text())["quantization_config"]["group_size"] == 64
    code, out, err = run(capsys, "info", "--quantize", "int4")
    assert code == 0 and "int4 g64" in out, err


@pytest.mark.slow
def test_python_optimize_keeps_the_cli_checks(tmp_path):
    """Under `python -O` bad input is still refused (no check is an assert)."""
    proc = subprocess.run([sys.executable, "-O", "-m", "codellama_rt", "generate", "--top-p", "2", PROMPT],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and "top_p=2.0" in proc.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["info", "--quantize", "int4", "--group-size", "16"], "--group-size=16 is not supported"),
    (["info", "--group-size", "64"], "--group-size applies to --quantize int4"),
    (["info", "--quantize-head"], "--quantize-head applies with --quantize"),
    (["info", "--model", "CodeLlama-9b"], "nor a preset (one of CodeLlama-13b"),
    (["quantize", "--method", "nf4", "--group-size", "64", "--out", "unused"], "--group-size applies to --method int4"),
    (["quantize", "--method", "nf4", "--out", "/proc/codellama-rt-out"], "--out /proc/codellama-rt-out: cannot create"),
    (["generate", "--quantize", "int4", "--group-size", "16", PROMPT], "group_size=16 is not supported"),
    (["generate", "--threads", "1000000000", PROMPT], "threads=1000000000 is invalid"),
    (["generate", "--model", "", PROMPT], "path='' is invalid"),
    (["export-lite", "--group-size", "64", "--out", "unused"], "--group-size applies to --quantize int4 only"),
    (["mask", "--png", "/nonexistent-dir/m.png", PROMPT], "--png /nonexistent-dir/m.png: its directory"),
])
def test_flags_that_do_not_apply_or_cannot_work_are_refused(capsys, monkeypatch, tmp_path, argv, fragment):
    """Refused with one line naming the flag, before any weights load (no flag silently ignored)."""
    monkeypatch.chdir(tmp_path)
    if "--png" in argv:
        pytest.importorskip("matplotlib")
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "unused").exists()
