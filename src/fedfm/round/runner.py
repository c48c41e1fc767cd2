"""A run of one method: rounds until done (or a privacy budget stops it), then the final evaluation and model.

The run directory is the unit of truth: each round's record is appended to metrics.jsonl first, then the atomic
checkpoint of every group's state is written, so ``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedfm import __version__, report
from fedfm.app import App
from fedfm.card import write_model_card
from fedfm.client import derive_seed
from fedfm.errors import FedFMError
from fedfm.heads import label_skew_hint
from fedfm.models import save_pretrained, set_weights
from fedfm.round.groups import Group, shard_sizes
from fedfm.round.loop import Rounds
from fedfm.round.record import mean_metrics
from fedfm.rundir import RunDir, atomic_write_text
from fedfm.store import GroupStates, StateStore
from fedfm.types import ServerState

log = logging.getLogger("fedfm")


class Runner:
    """Drives one method of one config through its rounds, writing the run directory as it goes."""

    def __init__(self, app: App, method: str, run_dir: RunDir, console: Console | None = None):
        self.app, self.cfg, self.method, self.dir = app, app.cfg, method, run_dir
        self.console = console or Console(stderr=True)
        self.rounds = Rounds(app, method, run_dir)
        self.groups, self.engine = self.rounds.groups, self.rounds.engine
        self.stopped: str | None = None  # why the run ended before cfg.rounds (a privacy budget), if it did
        cfg = self.cfg
        if method == "federated" and cfg.task == "classification" and not cfg.head.active and app.owner is None:
            hint = label_skew_hint([s.train.labels for s in app.client_shards], app.task.num_labels)
            if hint and not cfg.train.logit_adjustment:
                log.warning(hint)

    def new_states(self, round_: int = 0) -> GroupStates:
        budget = self.cfg.engine.state_memory_mb * 2**20
        return GroupStates(StateStore(budget, self.dir.path / "client_states"), len(self.groups), round_)

    def initial_states(self) -> GroupStates:
        states = self.new_states()
        for g in range(len(self.groups)):
            states[g] = self.rounds.initial_state()
        return states

    def restore(self, checkpoint) -> GroupStates:
        states = self.new_states(checkpoint.round)
        for g, st in enumerate(checkpoint):
            states[g] = st
        return states

    def round(self, states: GroupStates, progress: Progress | None) -> dict[str, Any]:
        """One round of every group (``Rounds.next``), with a progress bar of its clients."""
        bar = progress.add_task(f"round {states.round + 1} clients", total=None) if progress else None
        try:
            return self.rounds.next(states, (lambda: progress.advance(bar)) if progress else None)
        finally:
            if progress:
                progress.remove_task(bar)

    # --- the whole run ------------------------------------------------------------------------
    def run(self, states: GroupStates, history: list[dict[str, Any]]) -> dict[str, Any]:
        wall = history[-1]["wall_time_s"] if history else 0.0
        show = self.console.is_terminal
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console) if show else nullcontext() as progress:
            rounds_bar = progress.add_task(f"{self.method} rounds", total=self.cfg.rounds, completed=states.round) if show else None
            while states.round < self.cfg.rounds:
                done = states.round
                self.stopped = next((why for f in self.rounds.features if (why := f.stop_reason(done))), None)
                if self.stopped:
                    log.warning("stopping before round %d: %s", done + 1, self.stopped)
                    self.console.print(f"[yellow]stopped early[/yellow] — {self.stopped}")
                    break
                try:
                    record = self.round(states, progress)
                except Exception as exc:
                    reason = str(exc) if isinstance(exc, FedFMError) else f"{type(exc).__name__}: {exc}"
                    self.dir.set_status("incomplete", self.method, done, reason)
                    raise
                wall += record["round_time_s"]
                record["wall_time_s"] = wall
                # the record first: resume drops records past the checkpoint, but could not restore a lost one
                self.dir.append_metrics(record)
                self.dir.save_checkpoint(states, {"method": self.method, "seed": self.cfg.seed, "fedfm": __version__})
                self.dir.set_status("running", self.method, states.round)
                if show:
                    progress.advance(rounds_bar)
                else:
                    self.console.print(progress_line(record, self.cfg.rounds))
        return self.finish(states, wall)

    def finish(self, states: GroupStates, wall: float) -> dict[str, Any]:
        """Final evaluation (global test in full, each client's own split), final model, summary, report."""
        app = self.app
        n = len(app.split.client_names)
        per_group, own, glob_each, samples = [], [None] * n, [None] * n, []
        for g, group in enumerate(self.groups):
            st = states[g]
            per_group.append(app.server_evaluate(st.weights, full=True))
            # federated/centralized: one model judged on every client's split; local: each client's own model
            clients = group.members if self.method == "local" else self.evaluated_clients(n)
            for i, m in zip(clients, self.engine.evaluate([(i, st.weights) for i in clients])):
                own[i], glob_each[i] = m, per_group[-1]
            self.save_final(group, st)
            if self.cfg.task == "instruction" and self.cfg.eval.samples and len(app.global_test):
                set_weights(app.model, st.weights)
                samples.append({"group": group.name, "samples": app.task.samples(app.model, app.global_test, self.cfg.eval.samples)})
        if samples:  # generated answers of each final model, shown in the run report
            atomic_write_text(self.dir.path / "samples.json", json.dumps(samples, indent=1))
        summary = self.summary(states.round, wall, per_group, own, glob_each)
        for f in self.rounds.features:
            summary.update(f.finished(self, states))
        for group in self.groups:  # over peft's empty template: the run's facts and how to load the model
            write_model_card(self.final_dir(group), app, self.method, group.name, summary)
        atomic_write_text(self.dir.path / "summary.json", json.dumps(summary, indent=1))
        for scratch in ("client_states", "clients", "updates"):
            shutil.rmtree(self.dir.path / scratch, ignore_errors=True)
        self.dir.set_status("complete", self.method, states.round)
        report.write_run_report(self.dir.path)
        return summary

    def summary(self, rounds: int, wall: float, per_group: list, own: list, glob_each: list) -> dict[str, Any]:
        app = self.app
        sizes = [shard_sizes(app, self.engine, i) for i in range(len(own))]
        per_client = [
            {"client": app.shards[i].name, "n_train": sizes[i][0], "n_test": sizes[i][1], "own": own[i], "global": glob_each[i]}
            for i in range(len(own))
        ]
        metrics = self.dir.metrics()
        summary = {
            "method": self.method,
            "rounds": self.cfg.rounds,
            "wall_time_s": wall,
            "global": mean_metrics(per_group),
            "own_mean": mean_metrics([c["own"] for c in per_client if c["n_test"] > 0 and c["own"] is not None]),
            "per_client": per_client,
            "trainable_params": app.trainable_params,
            "total_params": app.total_params,
            "bytes_total": int(sum(m["bytes_down"] + m["bytes_up"] for m in metrics)),
            **({"stopped": self.stopped} if self.stopped else {}),
        }
        for f in self.rounds.features:
            summary.update(f.summary(self, rounds, metrics))
        cs = app.client_states
        if cs is not None and cs.clients():  # error-feedback residuals / control variates the clients kept
            summary["client_states"] = {"clients": cs.clients(), "disk_bytes": cs.disk_bytes()}
        return summary

    def evaluated_clients(self, n: int) -> list[int]:
        """The clients whose own split the final model is evaluated on: all, or a seeded eval.max_clients subset."""
        k = self.cfg.eval.max_clients
        if k is None or k >= n:
            return list(range(n))
        return sorted(np.random.default_rng(derive_seed(self.cfg.seed, 0xE7A1)).choice(n, k, replace=False).tolist())

    def final_dir(self, group: Group) -> Path:
        path = self.dir.path / "final"
        return path / group.name if len(self.groups) > 1 else path

    def save_final(self, group: Group, state: ServerState) -> None:
        set_weights(self.app.model, state.weights)
        save_pretrained(self.app.model, self.app.tokenizer, self.final_dir(group))


def progress_line(record: dict[str, Any], rounds: int) -> str:
    """One line per round when the console is not a terminal (logs, CI)."""
    acc = "" if record["accuracy"] is None else f" acc={record['accuracy']:.3f}"
    if record.get("recall@5") is not None:
        acc = f" recall@5={record['recall@5']:.3f}"
    if record.get("rougeL") is not None:
        acc = f" ppl={record['perplexity']:.2f} rougeL={record['rougeL']:.3f}"
    loss = "" if record["train_loss"] is None else f" loss={record['train_loss']:.4f}"
    eps = "" if record.get("epsilon") is None else f" eps={record['epsilon']:.2f}"
    return f"\\[{record['method']}] round {record['round']}/{rounds}{loss}{acc}{eps}"
