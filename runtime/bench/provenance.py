"""What code a benchmark ran: the package version, a digest of its .py files, and the git commit when the
package is a git checkout's runtime/; an installed package has no commit to read, and says so."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Optional

from .. import __version__
from .. import kernels as _kernels

PACKAGE_DIR = Path(__file__).resolve().parents[1]      # codellama_rt: a checkout's runtime/, or site-packages/...
KERNELS_DIR = Path(_kernels.__file__).resolve().parent  # codellama_rt.kernels: a checkout's kernels/ (beside it)


def package_files(package_dir: Path = PACKAGE_DIR, kernels_dir: Path = KERNELS_DIR) -> list:
    """(name inside the package, path) of every .py file of codellama_rt, sorted by name; the names are the
    same installed (kernels/ inside the package) and in a checkout (kernels/ beside runtime/)."""
    files = {p.relative_to(package_dir).as_posix(): p for p in package_dir.rglob("*.py")
             if p.relative_to(package_dir).parts[0] != "kernels"}
    files.update({f"kernels/{p.relative_to(kernels_dir).as_posix()}": p for p in kernels_dir.rglob("*.py")})
    return sorted(files.items())


def source_digest(package_dir: Path = PACKAGE_DIR, kernels_dir: Path = KERNELS_DIR) -> str:
    """sha256 (first 12 hex digits) of `package_files` by name and content: names the code that ran, installed
    or not, even where a checkout's git metadata is stale (a copied working tree)."""
    h = hashlib.sha256()
    for name, path in package_files(package_dir, kernels_dir):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def run_command(cmd: list, cwd=None) -> Optional[str]:
    """`cmd`'s stripped stdout, or None when it cannot run, fails or takes over 20 s."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git(args: list, cwd: Path) -> Optional[str]:
    return run_command(["git", *args], cwd)


def git_commit(package_dir: Path = PACKAGE_DIR) -> str:
    """HEAD of the checkout whose runtime/ the package is, with "+dirty" when tracked files differ from it;
    else "unknown (...)" saying why (an installed package is not a git checkout, even inside one)."""
    root = package_dir.parent
    if package_dir.name != "runtime":
        return f"unknown (installed package at {package_dir}, not a git checkout)"
    top = _git(["rev-parse", "--show-toplevel"], root)
    head = _git(["rev-parse", "HEAD"], root) if top and Path(top).resolve() == root.resolve() else None
    if head is None:
        return f"unknown (source tree at {root}, not a git checkout)"
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return head + ("+dirty" if dirty else "")


def provenance(package_dir: Path = PACKAGE_DIR, kernels_dir: Path = KERNELS_DIR) -> dict:
    """codellama_rt (version), package (where it was imported from), source_digest, git_commit."""
    return {"codellama_rt": __version__, "package": str(package_dir),
            "source_digest": source_digest(package_dir, kernels_dir), "git_commit": git_commit(package_dir)}
