"""Running methods: start a run, resume one, compare methods. The round loop itself is ``fedfm.round``.

A run directory holds one method (``federated``, ``centralized``, ``local`` or ``server``); ``compare`` runs
several on the same data and model and writes one comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from fedfm import report
from fedfm.app import App
from fedfm.config import RunConfig
from fedfm.engines import close_engine, engine_for
from fedfm.errors import FedFMError
from fedfm.features.server_data import with_server
from fedfm.round.groups import METHODS, Group, expected_sampled, num_sampled, plan_groups, pooled_group, sample
from fedfm.round.runner import Runner
from fedfm.round.screen import validate
from fedfm.rundir import RunDir


def run_method(app: App, method: str, run_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Start a fresh run of ``method`` in ``run_dir`` (which must not exist yet)."""
    engine_for(app)  # Ray actors / a Flower connection first: an engine that cannot start leaves no run directory
    rd = RunDir(run_dir)
    rd.create(app.cfg, method)
    runner = Runner(app, method, rd, console)
    return runner.run(runner.initial_states(), [])


def resume(app: App, run_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Continue an interrupted run from its newest checkpoint; the result equals an uninterrupted run."""
    rd = RunDir(run_dir)
    status = rd.status()
    try:
        runner = Runner(app, status["method"], rd, console)
        loaded = rd.load_checkpoint()
        if loaded is None:
            states, history = runner.initial_states(), rd.truncate_metrics(0)
        else:
            checkpoint, _meta = loaded
            if len(checkpoint) != len(runner.groups):
                raise FedFMError(f"checkpoint in {run_dir} has {len(checkpoint)} groups, the config gives {len(runner.groups)}")
            states, history = runner.restore(checkpoint), rd.truncate_metrics(checkpoint.round)
        rd.set_status("running", status["method"], states.round)
        return runner.run(states, history)
    finally:
        close_engine(app)


def default_run_dir(cfg: RunConfig, method: str | None = None) -> Path:
    base = Path(cfg.output_dir) / cfg.name
    return base if method is None else base / method


def run(cfg: RunConfig, method: str = "federated", run_dir: Path | None = None, console: Console | None = None) -> Path:
    """Python API: ``fedfm.server.run(fedfm.config.load('configs/x.yaml'))`` -> the run directory."""
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FedFMError(f"run directory {run_dir} already exists: pass --resume {run_dir} or choose another name")
    app = App(cfg)  # data and model are checked here, before the run directory is created
    try:
        run_method(app, method, run_dir, console)
    finally:
        close_engine(app)
    return run_dir


def compare(cfg: RunConfig, out_dir: Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run every method in ``cfg.compare.methods`` on the same data and model; write one comparison."""
    out_dir = Path(out_dir) if out_dir else default_run_dir(cfg)
    for m in cfg.compare.methods:
        if (out_dir / m).exists() and any((out_dir / m).iterdir()):
            raise FedFMError(f"{out_dir / m} already exists: choose another name (--set name=...)")
    app = App(cfg)
    try:
        for m in cfg.compare.methods:
            run_method(app, m, out_dir / m, console)
    finally:
        close_engine(app)
    return report.write_comparison(out_dir, list(cfg.compare.methods))


__all__ = ["METHODS", "Group", "Runner", "compare", "default_run_dir", "expected_sampled", "num_sampled",
           "plan_groups", "pooled_group", "resume", "run", "run_method", "sample", "validate", "with_server"]
