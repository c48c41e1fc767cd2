"""Machine description recorded with every benchmark result (noisy shared machines: compare ratios)."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def _load() -> str:
    """1, 5 and 15-minute load averages: how busy the shared machine was when the benchmark started."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


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
        "load_avg_at_start": _load(),
    }
    info["summary"] = f"{info['cores']} cores ({cpu}), {info['mem_gib']} GiB RAM, torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}"
    return info


def result_header(title: str, script: str) -> tuple[str, dict, list[str]]:
    """The command that was run, the machine, and the first lines every results file starts with."""
    import shlex
    import sys

    command = f"python {script} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = machine_info()
    lines = [f"# {title}", "", f"- command: `{command.strip()}`", f"- machine: {info['summary']}", f"- date: {info['date']}"]
    return command.strip(), info, lines
