"""Reports for finished (or interrupted) runs: plots, self-contained HTML, comparison tables.

Everything here only *reads* what the round loop wrote into a run directory
(``config.yaml``, ``status.json``, ``metrics.jsonl``, ``summary.json``) and writes derived
artefacts next to it:

* ``write_run_report(run_dir)``   -> ``run_dir/plots/*.png`` and ``run_dir/report.html``
* ``write_comparison(compare_dir)`` -> ``comparison.json``, ``comparison.md``, ``plots/*.png``
  and ``report.html`` for a directory holding one run dir per method
  (``centralized/``, ``federated/``, ``local/`` — any subset).

The HTML files are self-contained: inline CSS, PNGs embedded as base64 data URIs, no external
resources. Every string that comes from a file is HTML-escaped. Plots are drawn with
matplotlib's Agg canvas through the object-oriented API (no pyplot, so no global backend
switch and no figure leaks in long-lived processes).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml
from rich import box
from rich.table import Table

from fedfm.errors import FedFMError

KNOWN_METHODS = ("centralized", "federated", "local", "server")
_RUN_FILES = ("status.json", "metrics.jsonl", "summary.json", "config.yaml")
_DASH = "—"

# (file stem, metric key, y label, title, as percentage)
_ROUND_PLOTS = (
    ("accuracy", "accuracy", "Accuracy (%)", "Global test accuracy", True),
    ("macro_f1", "macro_f1", "Macro-F1 (%)", "Global test macro-F1", True),
    ("train_loss", "train_loss", "Train loss", "Training loss", False),
    ("perplexity", "perplexity", "Perplexity", "Global test perplexity", False),
    ("recall_at_5", "recall@5", "Recall@5 (%)", "Global test recall@5", True),
    ("mrr", "mrr", "MRR", "Global test mean reciprocal rank", False),
    ("rouge_l", "rougeL", "ROUGE-L F1 (%)", "Global test ROUGE-L of generated answers", True),
)

# Retrieval runs (task=retrieval) report recall@1, recall@5 and MRR where classification reports accuracy and
# macro-F1; recall@5 is their headline (the "vs centralized" ratio, the final bar plot).
RETRIEVAL_KEYS = ("recall@1", "recall@5", "mrr")
# Instruction tuning (task=instruction): ROUGE-L F1 and exact match of greedy answers, with the response perplexity;
# ROUGE-L is the headline.
INSTRUCTION_KEYS = ("rougeL", "exact_match")


# --------------------------------------------------------------------------- formatting


def _num(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not a number."""
    if x is None or isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _finite(x: Any) -> float | None:
    """``x`` as a finite float, or None."""
    v = _num(x)
    return v if v is not None and math.isfinite(v) else None


def fmt_pct(x: Any) -> str:
    """A 0..1 fraction as a percentage with one decimal (``0.64`` -> ``'64.0%'``)."""
    v = _num(x)
    if v is None:
        return _DASH
    return f"{v * 100:.1f}%" if math.isfinite(v) else str(v)


def fmt_bytes(x: Any) -> str:
    """A byte count in human units (B, KiB, MiB, GiB, TiB)."""
    v = _num(x)
    if v is None:
        return _DASH
    if not math.isfinite(v):
        return str(v)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024:
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


def fmt_num(x: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; integers stay integers."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    v = _num(x)
    if v is None:
        return _DASH if x is None else str(x)
    return f"{v:.{digits}g}"


def fmt_duration(x: Any) -> str:
    """Seconds as ``'12.3 s'``, ``'4m 05s'`` or ``'2h 03m'``."""
    v = _finite(x)
    if v is None:
        return _DASH
    if v < 60:
        return f"{v:.1f} s"
    minutes, seconds = divmod(int(round(v)), 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _natural_key(name: str) -> list:
    """Sort key so that client_2 comes before client_10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(name))]


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when missing/unreadable/not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_config(run_dir: Path) -> dict:
    """The resolved ``config.yaml`` as a mapping ({} when missing or malformed)."""
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-round records from ``run_dir/metrics.jsonl``, in file order.

    A missing file gives ``[]``. Blank lines and lines that are not JSON objects (e.g. a
    half-written last line after a crash) are skipped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _load_run(run_dir: Path) -> dict:
    """Everything a report needs from one run dir, with the method and status resolved."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    status = _read_json(run_dir / "status.json") or {}
    summary = _read_json(run_dir / "summary.json")
    metrics = read_metrics(run_dir)
    method = (
        status.get("method")
        or (summary or {}).get("method")
        or (metrics[0].get("method") if metrics else None)
        or run_dir.name
    )
    state = status.get("status") or ("complete" if summary else "incomplete")
    return {"dir": run_dir, "config": config, "status": status, "state": str(state),
            "summary": summary, "metrics": metrics, "method": str(method)}


def _last_value(metrics: list[dict], key: str) -> Any:
    """The last non-null value of ``key`` over the rounds (None if never set)."""
    for rec in reversed(metrics):
        if rec.get(key) is not None:
            return rec[key]
    return None


def _total_bytes(metrics: list[dict]) -> int:
    """Sum of bytes_down + bytes_up over all rounds."""
    return int(sum((_finite(r.get("bytes_down")) or 0) + (_finite(r.get("bytes_up")) or 0) for r in metrics))


def _final_metrics(run: dict) -> dict:
    """Final global/own metrics: from summary.json, else from the last evaluated round."""
    summary, metrics = run["summary"] or {}, run["metrics"]
    glob = summary.get("global") or {}
    own = summary.get("own_mean") or {}
    from_summary = bool(summary)
    return {
        "accuracy": glob.get("accuracy") if from_summary else _last_value(metrics, "accuracy"),
        "macro_f1": glob.get("macro_f1") if from_summary else _last_value(metrics, "macro_f1"),
        "loss": glob.get("loss") if from_summary else _last_value(metrics, "eval_loss"),
        "perplexity": glob.get("perplexity") if from_summary else _last_value(metrics, "perplexity"),
        "own_accuracy": own.get("accuracy"),
        "own_perplexity": own.get("perplexity"),
        "own_macro_f1": own.get("macro_f1"),
        "own_loss": own.get("loss"),
        **{k: glob.get(k) if from_summary else _last_value(metrics, k) for k in RETRIEVAL_KEYS},
        **{f"own_{k}": own.get(k) for k in RETRIEVAL_KEYS},
        **{k: glob.get(k) if from_summary else _last_value(metrics, k) for k in INSTRUCTION_KEYS},
        **{f"own_{k}": own.get(k) for k in INSTRUCTION_KEYS},
        "bytes_total": summary.get("bytes_total", _total_bytes(metrics)),
        "wall_time_s": summary.get("wall_time_s", _last_value(metrics, "wall_time_s")),
        "rounds": summary.get("rounds", _last_value(metrics, "round") or len(metrics)),
    }


# --------------------------------------------------------------------------- plotting


def _new_figure():
    """A fresh Agg-backed figure and axes (no pyplot state involved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG atomically and return the path."""
    fig.tight_layout()
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png"), binary=True)
    return path


def _series(history: list[dict], key: str, scale: float) -> tuple[list, list]:
    """(rounds, values) of ``key``, skipping null and non-finite points."""
    xs, ys = [], []
    for i, rec in enumerate(history, start=1):
        y = _finite(rec.get(key))
        if y is not None:
            xs.append(_finite(rec.get("round")) or i)
            ys.append(y * scale)
    return xs, ys


def _cumulative_bytes(history: list[dict]) -> tuple[list, list]:
    """(rounds, cumulative MiB down+up)."""
    xs, ys, total = [], [], 0.0
    for i, rec in enumerate(history, start=1):
        total += (_finite(rec.get("bytes_down")) or 0) + (_finite(rec.get("bytes_up")) or 0)
        xs.append(_finite(rec.get("round")) or i)
        ys.append(total / 2**20)
    return xs, ys


def _line_plot(series: dict[str, tuple[list, list]], ylabel: str, title: str, path: Path) -> Path | None:
    """One line per method; None (nothing written) when no method has a point."""
    series = {m: xy for m, xy in series.items() if xy[0]}
    if not series:
        return None
    fig, ax = _new_figure()
    for method, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=4, label=method)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


def plot_rounds(histories: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Per-round line plots, one line per method (key of ``histories``).

    Writes ``accuracy.png``, ``macro_f1.png``, ``train_loss.png``, ``perplexity.png``, ``recall_at_5.png``,
    ``mrr.png`` and ``bytes.png`` (cumulative bytes down+up) into ``out_dir``; null points are skipped and a
    plot with no points at all is not written. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, key, ylabel, title, pct in _ROUND_PLOTS:
        series = {m: _series(h, key, 100.0 if pct else 1.0) for m, h in histories.items()}
        written.append(_line_plot(series, ylabel, title, out_dir / f"{stem}.png"))
    series = {m: _cumulative_bytes(h) for m, h in histories.items()}
    written.append(_line_plot(series, "Cumulative MiB (down + up)", "Communication", out_dir / "bytes.png"))
    return [p for p in written if p is not None]


def _plot_final_accuracy(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars: final global and own-split accuracy (retrieval: recall@5) per method."""
    key, name = ("rougeL", "ROUGE-L") if _is_instruction(rows) else ("recall@5", "Recall@5") if _is_retrieval(rows) else ("accuracy", "Accuracy")
    if not any(_finite(r.get(k)) is not None for r in rows for k in (key, f"own_{key}")):
        return None
    fig, ax = _new_figure()
    xs = list(range(len(rows)))
    for offset, k, label in ((-0.2, key, "global test"), (0.2, f"own_{key}", "own split (mean)")):
        ys = [(_finite(r.get(k)) or 0.0) * 100 for r in rows]
        ax.bar([x + offset for x in xs], ys, width=0.4, label=label)
    ax.set_xticks(xs, [str(r["method"]) for r in rows])
    ax.set_ylabel(f"{name} (%)")
    ax.set_title(f"Final {name.lower()} by method")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em}th{background:#f4f4f4;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.status{display:inline-block;padding:.1em .6em;border-radius:.8em;font-weight:600}
.complete{background:#d9f2dc;color:#185c23}.incomplete{background:#fbe0e0;color:#8a1c1c}
.running{background:#fff2cc;color:#7a5b00}.note{color:#666;font-size:.9em}
.plots img{max-width:48%;min-width:320px;margin:.3em;border:1px solid #eee}
"""


def _e(x: Any) -> str:
    """HTML-escape ``str(x)``."""
    return html.escape(str(x), quote=True)


def _html_table(headers: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table; every cell is escaped, all but the first column right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = [f"<td>{_e(c)}</td>" if i == 0 else f'<td class="n">{_e(c)}</td>' for i, c in enumerate(row)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_images(paths: list[Path]) -> str:
    """The PNGs as ``<img>`` tags with base64 data URIs."""
    if not paths:
        return '<p class="note">No plots (no per-round data).</p>'
    imgs = []
    for p in paths:
        data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
        imgs.append(f'<img alt="{_e(Path(p).stem)}" src="data:image/png;base64,{data}">')
    return '<div class="plots">' + "".join(imgs) + "</div>"


def _html_page(title: str, body: str) -> str:
    """A complete HTML document with inline CSS; ``title`` is escaped, ``body`` is trusted HTML."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _status_badge(state: str) -> str:
    """A coloured status pill."""
    cls = state if state in ("complete", "incomplete", "running") else "incomplete"
    return f'<span class="status {cls}">{_e(state)}</span>'


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically and return ``path``."""
    _atomic_write(path, lambda fh: fh.write(text))
    return path


# --------------------------------------------------------------------------- run report


def _key_config_rows(config: dict) -> list[tuple[str, Any]]:
    """(label, value) pairs for the key settings of a run."""
    def get(section: str, key: str) -> Any:
        sec = config.get(section)
        return sec.get(key, _DASH) if isinstance(sec, dict) else _DASH

    partition = get("data", "partition")
    if partition in ("dirichlet", "quantity"):
        partition = f"{partition} (alpha={get('data', 'alpha')})"
    fed = f"{get('federation', 'num_clients')} (fraction {get('federation', 'fraction')})"
    return [
        ("Model", get("model", "source")), ("PEFT method", get("peft", "method")),
        ("Strategy", get("strategy", "name")), ("Data source", get("data", "source")),
        ("Partition", partition), ("Clients", fed),
        ("Rounds", config.get("rounds", _DASH)), ("Seed", config.get("seed", _DASH)),
        *((("Update compression", " -> ".join(get("compression", "up"))),) if get("compression", "up") not in (_DASH, []) else ()),
        *((("Simulated attack", f"{get('attack', 'kind')} ({get('attack', 'fraction')} of clients)"),)
          if get("attack", "kind") not in (_DASH, "none") else ()),
    ]


def _final_section(run: dict) -> str:
    """The final-metrics table (from summary.json, else from the last evaluated round)."""
    fm = _final_metrics(run)
    scope = "mean over clients' own models" if run["method"] == "local" else "global model"
    cols = _metric_columns(_is_retrieval([fm]), _is_instruction([fm]))
    rows = [
        (f"Global test set ({scope})", fmt_num(fm["loss"]), *(f(fm[k]) for k, _, _, f in cols)),
        ("Own test splits (mean over clients)", fmt_num(fm["own_loss"]), *(f(fm[f"own_{k}"]) for k, _, _, f in cols)),
    ]
    out = _html_table(["Evaluation", "Loss", *(label for _, label, _, _ in cols)], rows)
    summary = run["summary"]
    if summary is None:
        out = ('<p class="note">No summary.json: the run did not finish; values are from the last '
               "evaluated round.</p>" + out)
    extra = [("Communication (total)", fmt_bytes(fm["bytes_total"])),
             ("Wall time", fmt_duration(fm["wall_time_s"])), ("Rounds completed", fmt_num(fm["rounds"]))]
    if summary:
        extra += [("Trainable parameters", fmt_num(summary.get("trainable_params"))),
                  ("Total parameters", fmt_num(summary.get("total_params")))]
        extra += _privacy_rows(summary)
    return out + _html_table(["Quantity", "Value"], extra)


def _privacy_rows(summary: dict) -> list[tuple[str, str]]:
    """What the run can claim about privacy (summary.json's client_dp / example_dp / secure_aggregation)."""
    rows = []
    cdp = summary.get("client_dp")
    if cdp:
        rows.append(("Client-level DP (ε, δ)", f"({fmt_num(cdp.get('epsilon'), 3)}, {cdp.get('delta'):g}) — {cdp.get('mode')} noise, "
                     f"z={cdp.get('noise_multiplier'):g}, {cdp.get('sampling')} sampling of ~{fmt_num(cdp.get('expected_clients'))} "
                     f"clients, {cdp.get('rounds')} rounds, {cdp.get('accountant')} accountant"))
    edp = summary.get("example_dp")
    if edp:
        rows.append(("Example-level DP-SGD (ε, δ)", f"({fmt_num(edp.get('example_epsilon'), 3)}, {edp.get('delta'):g}) — upper bound over clients"))
    if summary.get("secure_aggregation"):
        rows.append(("Secure aggregation", f"the server saw only sums ({summary['secure_aggregation'].get('graph')})"))
    if summary.get("stopped"):
        rows.append(("Stopped early", summary["stopped"]))
    return rows


def _rounds_section(metrics: list[dict]) -> str:
    """The per-round table."""
    if not metrics:
        return '<p class="note">No rounds recorded.</p>'
    rows, cum = [], 0.0
    private = any(rec.get("epsilon") is not None for rec in metrics)
    cols = _metric_columns(_is_retrieval(metrics), _is_instruction(metrics))
    for rec in metrics:
        cum += (_finite(rec.get("bytes_down")) or 0) + (_finite(rec.get("bytes_up")) or 0)
        clients = rec.get("clients")
        rows.append((
            rec.get("round", _DASH), len(clients) if isinstance(clients, list) else _DASH,
            fmt_num(rec.get("train_loss")), fmt_num(rec.get("eval_loss")), *(f(rec.get(k)) for k, _, _, f in cols),
            fmt_bytes(rec.get("bytes_down")), fmt_bytes(rec.get("bytes_up")),
            fmt_bytes(cum), fmt_num(rec.get("examples")), fmt_num(rec.get("lr"), 3),
            fmt_duration(rec.get("round_time_s")),
            *((fmt_num(rec.get("epsilon"), 3),) if private else ()),
        ))
    headers = ["Round", "Clients", "Train loss", "Eval loss", *(label for _, label, _, _ in cols), "Bytes down",
               "Bytes up", "Cumulative", "Examples", "LR", "Round time", *(("ε (client-level)",) if private else ())]
    return _html_table(headers, rows)


def _updates_section(metrics: list[dict]) -> str:
    """Rounds in which updates were rejected (with the reason), clients vanished or missed the deadline, or
    Byzantine clients took part; empty when nothing of the kind happened."""
    rows = []
    for rec in metrics:
        rejected = rec.get("rejected") or []
        dropped, late = rec.get("dropped") or [], rec.get("stragglers") or []
        byz = rec.get("byzantine_sampled")
        if not (rejected or dropped or late or byz or rec.get("backdoor_success") is not None):
            continue
        rows.append((
            rec.get("round", _DASH),
            "; ".join(f"{x.get('client')}: {x.get('reason')}" for x in rejected) or _DASH,
            ", ".join(dropped) or _DASH,
            ", ".join(f"{x.get('client')} ({fmt_num(x.get('seconds'), 3)} s)" for x in late) or _DASH,
            fmt_num(byz) if byz is not None else _DASH,
            fmt_pct(rec.get("backdoor_success")),
        ))
    if not rows:
        return ""
    headers = ["Round", "Rejected updates (reason)", "Vanished", "Stragglers (simulated time)", "Byzantine sampled",
               "Backdoor success"]
    return "<h2>Updates: screening, faults, attacks</h2>" + _html_table(headers, rows)


def _clients_section(summary: dict | None) -> str:
    """The per-client table (own split and global test set)."""
    clients = (summary or {}).get("per_client") or []
    if not clients:
        return '<p class="note">No per-client results.</p>'
    rows = []
    glob_m = summary.get("global") or {}
    cols = _metric_columns(_is_retrieval([glob_m]), _is_instruction([glob_m]))
    for c in sorted(clients, key=lambda c: _natural_key(c.get("client", ""))):
        own, glob = c.get("own") or {}, c.get("global") or {}
        rows.append((c.get("client", _DASH), fmt_num(c.get("n_train")), fmt_num(c.get("n_test")),
                     *(f(own.get(k)) for k, _, _, f in cols), fmt_num(own.get("loss")),
                     *(f(glob.get(k)) for k, _, _, f in cols), fmt_num(glob.get("loss"))))
    headers = ["Client", "Train n", "Test n", *(f"Own {short}" for _, _, short, _ in cols), "Own loss",
               *(f"Global {short}" for _, _, short, _ in cols), "Global loss"]
    return _html_table(headers, rows)


def _samples_section(run_dir: Path) -> str:
    """Generated answers of the final model(s) beside their references (task=instruction's samples.json)."""
    try:
        groups = json.loads((Path(run_dir) / "samples.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return ""
    out = ["<h2>Generated samples</h2>"]
    for g in groups:
        if len(groups) > 1:
            out.append(f"<h3>{_e(g.get('group', _DASH))}</h3>")
        rows = [(s.get("instruction", ""), s.get("reference", ""), s.get("answer", ""), fmt_pct(s.get("rougeL")))
                for s in g.get("samples") or []]
        out.append(_html_table(["Instruction", "Reference", "Generated (greedy)", "ROUGE-L"], rows))
    return "\n".join(out)


def _plot_matrix(matrix: list[list[float]], names: list[str], path: Path) -> Path:
    """The continual-learning accuracy matrix as an annotated heat map (rows: after stage i; columns: stage j)."""
    fig, ax = _new_figure()
    pct = [[(_finite(x) or 0.0) * 100 for x in row] for row in matrix]
    im = ax.imshow(pct, vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(pct):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black")
    ticks = [f"{k + 1}: {n}" if n else str(k + 1) for k, n in enumerate(names)]
    ax.set_xticks(range(len(pct[0])), ticks[: len(pct[0])], rotation=15, fontsize=8)
    ax.set_yticks(range(len(pct)), ticks[: len(pct)], fontsize=8)
    ax.set_xlabel("Evaluated on the test set of stage")
    ax.set_ylabel("After training stage")
    ax.set_title("Accuracy matrix (%)")
    fig.colorbar(im, ax=ax)
    return _save_figure(fig, path)


def _continual_section(run: dict) -> str:
    """Continual learning (summary.json's ``continual``): the accuracy matrix as a heat map, ACC / BWT / FWT."""
    cl = (run["summary"] or {}).get("continual")
    if not isinstance(cl, dict) or not cl.get("matrix"):
        return ""
    stages = [st if isinstance(st, dict) else {} for st in cl.get("stages") or []]
    names = [", ".join(map(str, st.get("labels") or st.get("keys") or [])) for st in stages]

    def pts(x: Any) -> str:
        v = _finite(x)
        return _DASH if v is None else f"{v * 100:+.1f} points"

    rows = [
        ("Method", cl.get("method", _DASH)),
        ("ACC: final accuracy, mean over stages' test sets", fmt_pct(cl.get("acc"))),
        ("BWT: backward transfer (negative = forgetting)", pts(cl.get("bwt"))),
        ("FWT: forward transfer (vs the untrained model)", pts(cl.get("fwt"))),
    ]
    if cl.get("penalty") is not None:
        rows.append(("Penalty coefficient", fmt_num(cl["penalty"])))
    replay = cl.get("replay") or {}
    if replay:
        memory = (f"{fmt_num(replay.get('examples_total'))} examples over all owners (at most "
                  f"{fmt_num(replay.get('examples_max_per_owner'))} each), {fmt_bytes(replay.get('text_bytes_total'))} of text")
        rows.append(("Replay memory", memory))
    if cl.get("bytes_down") or cl.get("bytes_up"):
        rows.append(("Extra communication (anchor, Fisher)", f"{fmt_bytes(cl.get('bytes_down'))} down, {fmt_bytes(cl.get('bytes_up'))} up"))
    matrix = cl["matrix"]
    plot = _plot_matrix(matrix, names, run["dir"] / "plots" / "continual_matrix.png")
    head = ["After stage \\ test of stage", *(f"{j + 1}" for j in range(len(matrix[0])))]
    body = [(f"{i + 1}" + (f" ({names[i]})" if i < len(names) and names[i] else ""), *map(fmt_pct, row)) for i, row in enumerate(matrix)]
    if cl.get("initial"):
        body.append(("untrained model (b)", *map(fmt_pct, cl["initial"])))
    return "\n".join([
        "<h2>Continual learning</h2>", _html_table(["Quantity", "Value"], rows), _html_table(head, body), _html_images([plot]),
    ])


def _status_line(run: dict) -> str:
    """Status badge plus round and reason."""
    status = run["status"]
    parts = [f"<p>Status: {_status_badge(run['state'])} &nbsp; method: <b>{_e(run['method'])}</b>"]
    if status.get("round") is not None:
        parts.append(f" &nbsp; last round: {_e(status['round'])}")
    if status.get("reason"):
        parts.append(f" &nbsp; reason: {_e(status['reason'])}")
    return "".join(parts) + "</p>"


def write_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/plots/*.png`` and a self-contained ``run_dir/report.html``; return the HTML path.

    Works for incomplete runs too (no summary.json): the final table then shows the last
    evaluated round and the status says why the run stopped.
    """
    run = _load_run(run_dir)
    plots = plot_rounds({run["method"]: run["metrics"]}, run["dir"] / "plots")
    name = run["config"].get("name") or run["dir"].name
    body = "\n".join([
        f"<h1>fedfm run report: {_e(name)}</h1>", _status_line(run),
        "<h2>Configuration</h2>", _html_table(["Setting", "Value"], _key_config_rows(run["config"])),
        "<h2>Final metrics</h2>", _final_section(run),
        _continual_section(run),
        "<h2>Plots</h2>", _html_images(plots),
        "<h2>Per round</h2>", _rounds_section(run["metrics"]),
        _updates_section(run["metrics"]),
        "<h2>Per client</h2>", _clients_section(run["summary"]),
        _samples_section(run["dir"]),
    ])
    return _write_text(run["dir"] / "report.html", _html_page(f"fedfm report: {name}", body))


# --------------------------------------------------------------------------- comparison


def _present_methods(compare_dir: Path, methods: list[str] | None) -> list[str]:
    """Method subdirectories that exist (known methods first, then any other run dir)."""
    def is_run(d: Path) -> bool:
        return d.is_dir() and any((d / f).exists() for f in _RUN_FILES)

    if methods is not None:
        return [m for m in methods if is_run(compare_dir / m)]
    others = sorted(d.name for d in compare_dir.iterdir() if d.name not in KNOWN_METHODS and is_run(d)) \
        if compare_dir.is_dir() else []
    return [m for m in KNOWN_METHODS if is_run(compare_dir / m)] + others


def _json_safe(x: Any) -> Any:
    """Replace non-finite floats (invalid in JSON) with None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _comparison_row(run: dict) -> dict:
    """One row of comparison.json."""
    fm = _final_metrics(run)
    keys = ("accuracy", "macro_f1", "loss", "perplexity", "own_accuracy", "own_perplexity", "bytes_total", "wall_time_s", "rounds")
    retrieval = {k: fm[k] for k in (*RETRIEVAL_KEYS, "own_recall@5")} if _is_retrieval([fm]) else {}
    instruction = {k: fm[k] for k in (*INSTRUCTION_KEYS, "own_rougeL")} if _is_instruction([fm]) else {}
    per_client = (run["summary"] or {}).get("per_client") or []
    worst = {"own_worst_accuracy": _own_worst(per_client, "accuracy", False),
             "own_worst_perplexity": _own_worst(per_client, "perplexity", True)}
    return {"method": run["method"], **{k: fm[k] for k in keys}, **worst, **retrieval, **instruction,
            "status": run["state"]}


def _own_worst(per_client: list[dict], key: str, lower_is_better: bool) -> float | None:
    """The worst owner's own-split figure (lowest accuracy, highest perplexity)."""
    values = [v for c in per_client if (v := _finite((c.get("own") or c).get(key))) is not None]
    return (max if lower_is_better else min)(values) if values else None


def _personal_row(run: dict) -> dict | None:
    """The 'personalized' row: each owner's personal model on its own test split (mean and worst); the personal
    models have no single global figure."""
    personal = (run["summary"] or {}).get("personal")
    if not personal:
        return None
    own, per_client = personal.get("own_mean") or {}, personal.get("per_client") or []
    return {"method": "personalized", "accuracy": None, "macro_f1": None, "loss": None, "perplexity": None,
            "own_accuracy": own.get("accuracy"), "own_perplexity": own.get("perplexity"),
            "own_worst_accuracy": _own_worst(per_client, "accuracy", False),
            "own_worst_perplexity": _own_worst(per_client, "perplexity", True),
            "bytes_total": None, "wall_time_s": None, "rounds": run["summary"].get("rounds"),
            "personal_method": personal.get("method"), "status": run["state"]}


def _is_lm(rows: list[dict]) -> bool:
    return any(_finite(r.get("perplexity")) is not None for r in rows)


def _is_retrieval(rows: list[dict]) -> bool:
    return any(_finite(r.get("recall@5")) is not None for r in rows)


def _is_instruction(rows: list[dict]) -> bool:
    return any(_finite(r.get("rougeL")) is not None for r in rows)


def _metric_columns(retrieval: bool, instruction: bool = False) -> list[tuple[str, str, str, Any]]:
    """The quality columns of the HTML tables: (metric key, label, short label, formatter)."""
    if instruction:
        return [("rougeL", "ROUGE-L", "R-L", fmt_pct), ("exact_match", "Exact match", "EM", fmt_pct),
                ("perplexity", "Perplexity", "PPL", fmt_num)]
    if retrieval:
        return [("recall@1", "Recall@1", "R@1", fmt_pct), ("recall@5", "Recall@5", "R@5", fmt_pct), ("mrr", "MRR", "MRR", fmt_num)]
    return [("accuracy", "Accuracy", "acc", fmt_pct), ("macro_f1", "Macro-F1", "F1", fmt_pct)]


def _relative(rows: list[dict]) -> dict[str, float]:
    """Accuracy (language models: perplexity; retrieval: recall@5) of each method divided by centralized's,
    when both are known."""
    key = "rougeL" if _is_instruction(rows) else "perplexity" if _is_lm(rows) else "recall@5" if _is_retrieval(rows) else "accuracy"
    cent = next((_finite(r.get(key)) for r in rows if r["method"] == "centralized"), None)
    if not cent:
        return {}
    return {r["method"]: _finite(r.get(key)) / cent for r in rows
            if r["method"] != "centralized" and _finite(r.get(key)) is not None}


def _comparison_cells(comparison: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the comparison table (comparison.md and report.html)."""
    rel = comparison.get("relative_to_centralized", {})
    if _is_instruction(comparison["rows"]):
        headers = ["Method", "ROUGE-L", "Exact match", "Loss", "Perplexity", "Own-split ROUGE-L"]
        quality = [lambda r: fmt_pct(r.get("rougeL")), lambda r: fmt_pct(r.get("exact_match")), lambda r: fmt_num(r["loss"]),
                   lambda r: fmt_num(r.get("perplexity")), lambda r: fmt_pct(r.get("own_rougeL"))]
    elif _is_retrieval(comparison["rows"]):
        headers = ["Method", "Recall@1", "Recall@5", "MRR", "Loss", "Own-split R@5"]
        quality = [lambda r: fmt_pct(r.get("recall@1")), lambda r: fmt_pct(r.get("recall@5")),
                   lambda r: fmt_num(r.get("mrr")), lambda r: fmt_num(r["loss"]), lambda r: fmt_pct(r.get("own_recall@5"))]
    else:
        headers = ["Method", "Accuracy", "Macro-F1", "Loss", "Perplexity", "Own-split acc", "Worst owner acc",
                   "Own-split PPL", "Worst owner PPL"]
        quality = [lambda r: fmt_pct(r["accuracy"]), lambda r: fmt_pct(r["macro_f1"]), lambda r: fmt_num(r["loss"]),
                   lambda r: fmt_num(r.get("perplexity")), lambda r: fmt_pct(r["own_accuracy"]),
                   lambda r: fmt_pct(r.get("own_worst_accuracy")), lambda r: fmt_num(r.get("own_perplexity")),
                   lambda r: fmt_num(r.get("own_worst_perplexity"))]
    headers += ["Communication", "Wall time", "Rounds", "vs centralized", "Status"]
    rows = [[r["method"], *(f(r) for f in quality), fmt_bytes(r["bytes_total"]), fmt_duration(r["wall_time_s"]),
             fmt_num(r["rounds"]), fmt_pct(rel.get(r["method"])), r.get("status", _DASH)] for r in comparison["rows"]]
    return headers, rows


def _markdown(comparison: dict) -> str:
    """comparison.md: one markdown table."""
    headers, rows = _comparison_cells(comparison)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for cells in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _comparison_html_table(comparison: dict) -> str:
    """The comparison table as HTML."""
    return _html_table(*_comparison_cells(comparison))


def _per_client_comparison(runs: list[dict]) -> str:
    """Clients as rows; each method's own-split and global accuracy side by side."""
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        for c in (run["summary"] or {}).get("per_client") or []:
            table.setdefault(str(c.get("client", _DASH)), {})[run["method"]] = c
    if not table:
        return '<p class="note">No per-client results.</p>'
    methods = [r["method"] for r in runs]
    globs = [(r["summary"] or {}).get("global") or {} for r in runs]
    key, short = ("rougeL", "ROUGE-L") if _is_instruction(globs) else ("recall@5", "R@5") if _is_retrieval(globs) else ("accuracy", "acc")
    headers = ["Client"] + [f"{m} {kind} {short}" for m in methods for kind in ("own", "global")]
    rows = []
    for client in sorted(table, key=_natural_key):
        row = [client]
        for m in methods:
            c = table[client].get(m, {})
            row += [fmt_pct((c.get("own") or {}).get(key)), fmt_pct((c.get("global") or {}).get(key))]
        rows.append(row)
    return _html_table(headers, rows)


def write_comparison(compare_dir: Path, methods: list[str] | None = None) -> dict:
    """Compare the method runs under ``compare_dir`` and write comparison.json/.md, plots and report.html.

    ``methods`` restricts/orders the subdirectories read (default: centralized, federated,
    local, then any other run dir present). Returns the comparison.json dict:
    ``{"rows": [...], "relative_to_centralized": {method: acc / centralized acc}}``.
    Raises ``FedFMError`` when no run directory is found.
    """
    compare_dir = Path(compare_dir)
    names = _present_methods(compare_dir, methods)
    if not names:
        raise FedFMError(f"no run directories ({', '.join(methods or KNOWN_METHODS)}) found in {compare_dir}")
    runs = [_load_run(compare_dir / m) for m in names]
    for run, name in zip(runs, names):
        run["method"] = name  # the directory name is the label in a comparison
    rows = [_comparison_row(r) for r in runs]
    rows += [row for r in runs if (row := _personal_row(r)) is not None]
    comparison = _json_safe({"rows": rows, "relative_to_centralized": _relative(rows)})
    _write_text(compare_dir / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    _write_text(compare_dir / "comparison.md", _markdown(comparison))
    plots = plot_rounds({r["method"]: r["metrics"] for r in runs}, compare_dir / "plots")
    bar = _plot_final_accuracy(rows, compare_dir / "plots" / "final_accuracy.png")
    plots = ([bar] if bar else []) + plots
    headline = "ROUGE-L" if _is_instruction(rows) else "Recall@5" if _is_retrieval(rows) else "Accuracy"
    body = "\n".join([
        f"<h1>fedfm comparison: {_e(compare_dir.name)}</h1>",
        "<h2>Methods</h2>", _comparison_html_table(comparison),
        f'<p class="note">{headline} is on the global test set (for local: mean over clients\' own models); '
        f"own-split {headline.lower()} is the mean over clients of each client's own test split.</p>",
        "<h2>Plots</h2>", _html_images(plots),
        "<h2>Per client</h2>", _per_client_comparison(runs),
    ])
    _write_text(compare_dir / "report.html", _html_page(f"fedfm comparison: {compare_dir.name}", body))
    return comparison


# --------------------------------------------------------------------------- rich tables


def comparison_table(comparison: dict) -> Table:
    """A rich table of a comparison.json dict, for console printing (fits an 80-column terminal)."""
    rel = comparison.get("relative_to_centralized") or {}
    rows = comparison.get("rows", [])

    def ratio(r: dict) -> str:
        return fmt_pct(rel.get(r.get("method")))

    if _is_instruction(rows):
        title = "Instruction tuning: generated answers on the global test set"
        cols = ("ROUGE-L", "EM", "PPL", "Own R-L")
        cells = lambda r: (fmt_pct(r.get("rougeL")), fmt_pct(r.get("exact_match")), fmt_num(r.get("perplexity")),  # noqa: E731
                           fmt_pct(r.get("own_rougeL")))
    elif _is_lm(rows):
        title = "Language modelling: perplexity on the global test set"
        cols = ("PPL", "Tok acc", "Own PPL", "Worst")
        cells = lambda r: (fmt_num(r.get("perplexity")), fmt_pct(r.get("accuracy")), fmt_num(r.get("own_perplexity")),  # noqa: E731
                           fmt_num(r.get("own_worst_perplexity")))

        def ratio(r: dict) -> str:  # perplexity: lower is better, shown as a plain ratio
            x = rel.get(r.get("method"))
            return _DASH if x is None else f"{x:.3f}"
    elif _is_retrieval(rows):
        title = "Retrieval: held-out questions ranked against the global test passages"
        cols = ("R@1", "R@5", "MRR", "Own R@5")
        cells = lambda r: (fmt_pct(r.get("recall@1")), fmt_pct(r.get("recall@5")), fmt_num(r.get("mrr"), 3),  # noqa: E731
                           fmt_pct(r.get("own_recall@5")))
    else:
        title = "Federated vs centralized vs local (global test set)"
        cols = ("Acc", "F1", "Own acc", "Worst")
        cells = lambda r: (fmt_pct(r.get("accuracy")), fmt_pct(r.get("macro_f1")), fmt_pct(r.get("own_accuracy")),  # noqa: E731
                           fmt_pct(r.get("own_worst_accuracy")))
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("Method", no_wrap=True)
    for col in (*cols, "Sent", "Time", "/ cent."):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r.get("method", _DASH)), *cells(r), fmt_bytes(r.get("bytes_total")),
                      fmt_duration(r.get("wall_time_s")), ratio(r))
    return table


def run_table(summary: dict) -> Table:
    """A rich table of one run's final metrics (a summary.json dict)."""
    summary = summary or {}
    table = Table(title=f"Final metrics: {summary.get('method', 'run')}")
    table.add_column("Evaluation")
    lm = "perplexity" in (summary.get("global") or {})
    instruction = "rougeL" in (summary.get("global") or {})
    if instruction:
        for col in ("Loss", "Perplexity", "ROUGE-L", "Exact match"):
            table.add_column(col, justify="right")
    elif "recall@5" in (summary.get("global") or {}):
        for col in ("Loss", "Recall@1", "Recall@5", "MRR"):
            table.add_column(col, justify="right")
    else:
        for col in ("Loss", "Perplexity", "Token acc") if lm else ("Loss", "Accuracy", "Macro-F1"):
            table.add_column(col, justify="right")
    for label, key in (("Global test set", "global"), ("Own splits (mean)", "own_mean")):
        m = summary.get(key) or {}
        if instruction:
            table.add_row(label, fmt_num(m.get("loss")), fmt_num(m.get("perplexity")), fmt_pct(m.get("rougeL")), fmt_pct(m.get("exact_match")))
            continue
        if "recall@5" in (summary.get("global") or {}):
            table.add_row(label, fmt_num(m.get("loss")), fmt_pct(m.get("recall@1")), fmt_pct(m.get("recall@5")), fmt_num(m.get("mrr"), 3))
            continue
        third = fmt_num(m.get("perplexity")) if lm else fmt_pct(m.get("accuracy"))
        fourth = fmt_pct(m.get("accuracy")) if lm else fmt_pct(m.get("macro_f1"))
        table.add_row(label, fmt_num(m.get("loss")), third, fourth)
    table.caption = (f"rounds {fmt_num(summary.get('rounds'))} · communication {fmt_bytes(summary.get('bytes_total'))}"
                     f" · wall {fmt_duration(summary.get('wall_time_s'))} · trainable "
                     f"{fmt_num(summary.get('trainable_params'))} / {fmt_num(summary.get('total_params'))} params")
    return table
