"""The environment a result was produced in: code version, library versions, hardware.

Collected once per process (git and package metadata do not change during a run);
only the device part depends on the job.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Distribution names (mmseg is published as "mmsegmentation").
_PACKAGES = {"torch": "torch", "timm": "timm", "mmdet": "mmdet", "mmseg": "mmsegmentation", "numpy": "numpy"}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _pkg_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@functools.cache
def _static_environment() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    # results/ is excluded: the run itself writes records there and must not mark the code dirty.
    status = _git("status", "--porcelain", "--", ".", ":(exclude)results") if commit else None
    versions = {name: _pkg_version(dist) for name, dist in _PACKAGES.items()}
    versions["torch"] = torch.__version__  # the imported one, with its local tag (+cpu, +cu130)
    return {
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        **versions,
        "vitq_bench": _pkg_version("vitq-bench"),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to know to reproduce (or distrust) a record."""
    env = dict(_static_environment())
    env["device"] = str(device)
    env["device_name"] = device_name(device)
    env["torch_threads"] = torch.get_num_threads()
    # the CPU kernel path (ATEN_CPU_CAPABILITY=default|avx2|avx512 selects one): metrics of methods that
    # optimise images are bit-identical only for the same path and thread count
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["aten_cpu_capability_env"] = os.environ.get("ATEN_CPU_CAPABILITY")
    env["cuda"] = torch.version.cuda if device.type == "cuda" else None
    return env
