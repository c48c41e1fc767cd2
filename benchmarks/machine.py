"""Machine description recorded with every benchmark result (noisy shared machines: compare ratios)."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    info["summary"] = f"{info['cores']} cores ({cpu}), {info['mem_gib']} GiB RAM, torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}"
    return info
