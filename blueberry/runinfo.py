"""Where a number came from: git commit (and dirty flag), library versions and hardware, for every run."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


@lru_cache(maxsize=1)
def git_state() -> tuple[str, bool]:
    commit = _git("rev-parse", "HEAD") or "unknown"
    # Dirty means the code differs from the commit; reports are outputs the harness itself writes.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports")
    return commit, bool(status)


def run_info(device: torch.device | str | None = None) -> dict[str, str]:
    """Tags recorded on every run and in every report header."""
    import blueberry

    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "python_version": platform.python_version(),
        "device": device_name(device),
        "blueberry_version": getattr(blueberry, "__version__", "0.1.0"),
        "hostname": platform.node(),
    }
