"""`mlxtune doctor`: what this machine gives mlxtune (backend, BLAS, versions, memory, torch).

It also says what `--backend auto` picks here and why (`mlxtune.backends.select_backend`).

The one thing to know: on Linux the BLAS line says which library this very process has loaded (read
from /proc/self/maps), so it shows whether the CLI's OpenBLAS re-exec really happened.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx

from . import __version__
from .backends import select_backend
from .blas import blas_in_use, find_openblas
from .files import proc_field_bytes


@dataclass
class DoctorReport:
    mlxtune: str
    python: str
    platform: str
    backend: str             # "Metal GPU", "CUDA GPU" or "CPU"
    device: str              # mlx's default device
    blas: str
    mlx: str
    mlx_lm: str
    memory_total_gb: float | None
    memory_available_gb: float | None
    torch: str               # version, or "not installed"
    torch_cuda: bool
    auto_backend: str = ""   # what --backend auto picks, and why
    tips: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        mem = "unknown"
        if self.memory_total_gb is not None:
            mem = f"{self.memory_total_gb:.1f} GB total"
            if self.memory_available_gb is not None:
                mem += f", {self.memory_available_gb:.1f} GB available"
        rows = [
            ("mlxtune", self.mlxtune),
            ("Python", self.python),
            ("Platform", self.platform),
            ("Backend", f"{self.backend} (default device {self.device})"),
            ("BLAS", self.blas),
            ("MLX", self.mlx),
            ("mlx-lm", self.mlx_lm),
            ("Memory", mem),
            ("torch", self.torch + (" (CUDA available)" if self.torch_cuda else "")),
            ("--backend auto", self.auto_backend),
        ]
        out = [f"{k + ':':<10} {v}" for k, v in rows]
        out += [f"tip: {t}" for t in self.tips]
        return out


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def backend() -> tuple[str, str]:
    if mx.metal.is_available():
        name = "Metal GPU"
    elif getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        name = "CUDA GPU"
    else:
        name = "CPU"
    device = mx.default_device()
    return name, getattr(device.type, "name", str(device))


def loaded_libraries(pattern: str) -> list[str]:
    """Shared libraries whose path contains `pattern`, as mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if pattern in line and "/" in line})
    except OSError:
        return []


def blas() -> str:
    """The BLAS this process uses (mlx is imported at module level, so its BLAS is mapped by now)."""
    claimed = blas_in_use()
    if sys.platform.startswith("linux") and claimed.startswith("OpenBLAS"):
        mapped = loaded_libraries("openblas")
        if not mapped:
            return "reference BLAS bundled with mlx[cpu] (LD_PRELOAD names OpenBLAS but it is not loaded)"
        return f"OpenBLAS ({mapped[0]})"
    if claimed.startswith("reference"):
        return "reference BLAS bundled with mlx[cpu] (slow)"
    return claimed


def memory_gb() -> tuple[float | None, float | None]:
    """(total, available) system memory in GB."""
    gb = 1024 ** 3
    total = proc_field_bytes("/proc/meminfo", "MemTotal")
    if total is not None:
        available = proc_field_bytes("/proc/meminfo", "MemAvailable")
        if available is None:
            available = proc_field_bytes("/proc/meminfo", "MemFree") or 0
        return total / gb, available / gb
    total = available = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / gb
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        available = _darwin_available() / gb if _darwin_available() else None
    return total, available


def _darwin_available() -> int | None:
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page = 16384 if "page size of 16384" in out else 4096
    pages = 0
    for line in out.splitlines():
        if line.startswith(("Pages free", "Pages inactive", "Pages speculative")):
            pages += int(line.split(":")[1].strip().rstrip("."))
    return pages * page or None


def torch_status() -> tuple[str, bool]:
    version = _version("torch")
    if version == "not installed":
        return version, False
    try:
        import torch  # optional and heavy: only when installed

        return version, bool(torch.cuda.is_available())
    except (ImportError, OSError) as e:  # a broken torch install (missing libraries) should not break the report
        return f"{version} (cannot import: {type(e).__name__})", False


def doctor() -> DoctorReport:
    """Collect the report (imports mlx and, if installed, torch)."""
    name, device = backend()
    total, available = memory_gb()
    torch_version, torch_cuda = torch_status()
    report = DoctorReport(
        mlxtune=__version__,
        python=f"{platform.python_version()} ({sys.executable})",
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        backend=name,
        device=device,
        blas=blas(),
        mlx=_version("mlx"),
        mlx_lm=_version("mlx-lm"),
        memory_total_gb=total,
        memory_available_gb=available,
        torch=torch_version,
        torch_cuda=torch_cuda,
    )
    picked = select_backend("auto")
    report.auto_backend = f"{picked.name} ({picked.device}): {picked.reason}"
    if report.blas.startswith("reference"):
        if find_openblas() is None:
            report.tips.append("install OpenBLAS (apt-get install libopenblas0-pthread) for ~10x faster CPU training")
        elif os.environ.get("MLXTUNE_NO_OPENBLAS") == "1":
            report.tips.append("MLXTUNE_NO_OPENBLAS=1 keeps the slow reference BLAS; unset it to use OpenBLAS")
    if name == "CPU" and sys.platform == "darwin":
        report.tips.append("MLX sees no Metal GPU: use a native arm64 Python on Apple Silicon")
    return report
