"""Machine description recorded with every benchmark result (noisy shared machines: compare ratios)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# --quick runs of MiniLM configs: a sliver of the data, short texts, one local step of 8, a small evaluation
QUICK_SETS = ["data.max_examples=240", "data.max_length=32", "train.local_steps=1", "train.batch_size=8",
              "eval.max_examples=48"]
# --quick runs of configs/pretrain_austen.yaml: a 2-layer Llama of width 32 on 300 Shakespeare speeches over 3 owners
# (Shakespeare is in the default `fedfm data fetch`, Austen is not), batches of 4, 8 evaluation blocks
QUICK_LM_SETS = ["data.source=shakespeare", "data.owner=play", "data.partition=dirichlet", "data.alpha=0.5",
                 "data.max_examples=300", "federation.num_clients=3", "model.vocab_size=512",
                 "model.arch={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}",
                 "train.batch_size=4", "eval.max_examples=8"]


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


def add_quick_args(ap: argparse.ArgumentParser, shrinks: str) -> None:
    """--quick (the test suite's run: ``shrinks`` says to what) and --out, the results directory."""
    ap.add_argument("--quick", action="store_true", help=f"smoke version for the test suite: {shrinks}; "
                    "writes nothing unless --out is given")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results; --quick writes nothing unless given)")


def results_dir(args: argparse.Namespace) -> Path | None:
    """Where the results files go: --out, else benchmarks/results; None (write nothing) for --quick without --out."""
    if args.out is not None:
        return args.out
    return None if args.quick else RESULTS


def write_results(out: Path | None, stem: str, md: str, data: dict) -> None:
    """``<stem>.md`` and ``<stem>.json`` into ``out`` (None: write nothing)."""
    import json

    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
