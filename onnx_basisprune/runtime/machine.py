"""What timings depend on, read from the machine: the CPU (``/proc/cpuinfo``, read in one
place), its usable physical cores, and the GPU's name."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpuinfo() -> str:
    """The text of ``/proc/cpuinfo``; empty where there is none (not Linux)."""
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags (those of the first processor listed)."""
    for line in cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_vector_extension() -> str:
    """The widest x86 vector extension onnxruntime's CPU kernels can use: "AVX-512", "AVX2",
    or "" (neither, or not x86)."""
    flags = cpu_flags()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension (one model name covers machines
    with and without AVX-512), e.g. "AMD EPYC (AVX2)"."""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine() or "unknown")
    extension = cpu_vector_extension()
    return f"{name} ({extension})" if extension else name


def physical_cores() -> int:
    """Physical cores (from /proc/cpuinfo) capped by the CPUs this process may use."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = set()
    for block in cpuinfo().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return max(1, min(len(cores), usable)) if cores else usable


def gpu_name(device_id: int = 0) -> str:
    """The name of CUDA device ``device_id``, from nvidia-smi."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [nvidia_smi, "--query-gpu=name", "--format=csv,noheader", "-i", str(device_id)],
                capture_output=True, text=True, timeout=10, check=True,
            )
            if out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
    return f"CUDA device {device_id} (name unknown: nvidia-smi unavailable)"
