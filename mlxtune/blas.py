"""Use Debian's OpenBLAS under the Linux mlx[cpu] wheel, whose bundled reference BLAS is ~10x slower.

The wheel resolves cblas symbols at load time, so the only reliable switch is LD_PRELOAD, which must be
set before the process starts: the CLI re-executes itself once with it. MLXTUNE_NO_OPENBLAS=1 turns
this off.
"""

from __future__ import annotations

import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
_MARK = "MLXTUNE_BLAS_REEXEC"


def find_openblas() -> str | None:
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            return path
    return None


def preloaded_blas() -> str | None:
    """The OpenBLAS library preloaded into this process, if any."""
    for part in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "openblas" in part:
            return part
    return None


def blas_in_use() -> str:
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    pre = preloaded_blas()
    if pre:
        return f"OpenBLAS ({pre})"
    return "reference BLAS bundled with mlx[cpu] (slow: apt-get install libopenblas0-pthread)"


def maybe_reexec_with_openblas(argv: list[str] | None = None) -> None:
    """Replace this process with one that has OpenBLAS preloaded; return if that is not possible."""
    if not sys.platform.startswith("linux") or os.environ.get("MLXTUNE_NO_OPENBLAS") == "1":
        return
    if os.environ.get(_MARK) or preloaded_blas():
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[_MARK] = "1"
    argv = list(sys.argv if argv is None else argv)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mlxtune", *argv[1:]], env)
    except OSError:
        return
