"""Rows measured in a child process (`python -m codellama_rt.bench.child`) that rebuilds the model from the
seed, with a timeout that ends its whole process group: the peers, and the experiment rows (a kernel path
never run on this GPU cannot take the report's CUDA context down). A timeout or a crash becomes failed
rows for what the child had not finished."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .measure import build, decode_row
from .ours import experiment_provider, experiment_rows
from .peers import missing_peer_rows, peer_rows, peer_unavailable
from .plan import MODELS, PEERS, ModelSpec, Plan, plan_from_json


def peer_rows_isolated(kind: str, spec: ModelSpec, plan: Plan, timeout_s: float) -> list[dict]:
    """`peer_rows` in a child process that rebuilds the model from the seed; a timeout or a crash becomes
    failed rows for what the child had not finished."""
    reason = peer_unavailable(kind)
    if reason:
        return missing_peer_rows(kind, spec, plan, [], reason)
    have, reason = _run_child(["peer", kind, spec.name], plan, timeout_s)
    return missing_peer_rows(kind, spec, plan, have, reason)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.communicate()


def experiment_rows_isolated(spec: ModelSpec, plan: Plan, sets, timeout_s: float) -> list[dict]:
    """`experiment_rows` in a child process that rebuilds the model from the seed, so a kernel path that has
    never run on this GPU cannot take the report's own CUDA context down with it; a timeout or a crash
    becomes failed rows for the sets the child had not finished."""
    have, reason = _run_child(["experiments", spec.name, "--sets", json.dumps([list(n) for n in sets])], plan,
                              timeout_s)
    done = [tuple(r.get("experiments", ())) for r in have]
    missing = [dict(decode_row(spec, experiment_provider(spec, n)[1], 1, plan, status=reason),
                    experiments=list(n)) for n in map(tuple, sets) if n not in done]
    return have + missing


def _run_child(args: list, plan: Plan, timeout_s: float) -> tuple[list, str]:
    """(rows the child `python -m codellama_rt.bench.child ARGS` wrote, the status for rows it did not) with a
    timeout that ends the child's whole process group."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [sys.executable, "-m", "codellama_rt.bench.child", *args,
               "--plan", json.dumps(dataclasses.asdict(plan)), "--out", str(out)]
        # its own session, so a timeout ends the child's compile workers too; run in the scratch folder because
        # `python -m` puts the working directory on sys.path, where a checkout's kernels/ would shadow the
        # PyPI package `kernels` that transformers imports
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=d)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            reason = f"failed: timed out after {timeout_s:g} s"
        else:
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            reason = f"failed: child exited {proc.returncode}: {(lines[-1] if lines else '')[:300]}"
            if proc.returncode == 0:
                reason = "failed: child wrote no rows"
        try:
            have = json.loads(out.read_text()) if out.is_file() else []
        except json.JSONDecodeError:  # killed mid-write
            have = []
    return have, reason


def _child_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m codellama_rt.bench.child",
                                description="one peer, or the experiment rows of one model, in isolation")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("peer")
    q.add_argument("kind", choices=sorted(PEERS))
    e = sub.add_parser("experiments")
    e.add_argument("--sets", required=True, help="JSON list of lists of experiment names")
    for parser in (q, e):
        parser.add_argument("model", choices=sorted(MODELS))
        parser.add_argument("--plan", required=True)
        parser.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    plan = plan_from_json(a.plan)
    spec = MODELS[a.model]
    model = build(spec, plan.kernel_options())

    def emit(rows):  # write-then-rename: a kill leaves the last complete list
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(a.out)

    if a.cmd == "peer":
        emit(peer_rows(a.kind, model, spec, plan, emit))
    else:
        emit(experiment_rows(model, spec, plan, json.loads(a.sets), emit))


if __name__ == "__main__":
    _child_main()
