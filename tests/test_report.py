"""Tests for fedfm.report: plots, run report, comparison, rich tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fedfm import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(name: str = "demo") -> dict:
    return {
        "name": name, "seed": 0, "rounds": 3,
        "data": {"source": "tweets", "partition": "dirichlet", "alpha": 0.5},
        "model": {"source": "minilm"}, "peft": {"method": "lora", "options": {"r": 8}},
        "strategy": {"name": "fedavg"}, "federation": {"num_clients": 2, "fraction": 1.0},
        "train": {"lr": 0.0004},
    }


def _rounds(method: str, accs: list, bytes_per_round: int = 1_048_576) -> list[dict]:
    out = []
    for i, acc in enumerate(accs, start=1):
        out.append({
            "method": method, "round": i, "clients": ["client_0", "client_1"],
            "train_loss": 1.0 / i, "eval_loss": None if acc is None else 0.9 / i,
            "accuracy": acc, "macro_f1": None if acc is None else acc - 0.1,
            "bytes_down": bytes_per_round, "bytes_up": bytes_per_round, "examples": 3200,
            "lr": 0.0004, "round_time_s": 1.5, "wall_time_s": 1.5 * i,
        })
    return out


def _summary(method: str, acc: float, own_acc: float) -> dict:
    def m(a):
        return {"loss": 0.5, "accuracy": a, "macro_f1": a - 0.1}
    return {
        "method": method, "rounds": 3, "wall_time_s": 4.5,
        "global": m(acc), "own_mean": m(own_acc),
        "per_client": [
            {"client": f"client_{i}", "n_train": 100, "n_test": 25, "own": m(own_acc), "global": m(acc)}
            for i in range(2)
        ],
        "trainable_params": 1000, "total_params": 22_000_000, "bytes_total": 6 * 1_048_576,
    }


def make_run(run_dir: Path, method: str, accs: list, summary: dict | None, name: str = "demo",
             status: str = "complete", bytes_per_round: int = 1_048_576) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_config(name)))
    (run_dir / "status.json").write_text(json.dumps(
        {"status": status, "reason": None if status == "complete" else "loss diverged (NaN)",
         "round": len(accs), "method": method}))
    lines = [json.dumps(r) for r in _rounds(method, accs, bytes_per_round)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", "federated", [None, 0.5, 0.64], _summary("federated", 0.64, 0.72))


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cmp"
    make_run(d / "centralized", "centralized", [0.6, 0.8], _summary("centralized", 0.8, 0.82), bytes_per_round=0)
    make_run(d / "federated", "federated", [0.5, 0.6, 0.64], _summary("federated", 0.64, 0.7))
    make_run(d / "local", "local", [0.4, 0.45, 0.48], _summary("local", 0.48, 0.9), bytes_per_round=0)
    return d


def test_read_metrics(run_dir: Path, tmp_path: Path) -> None:
    assert [r["round"] for r in report.read_metrics(run_dir)] == [1, 2, 3]
    assert report.read_metrics(tmp_path / "nowhere") == []
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('\n{"round": 4, "trunc')  # half-written line after a crash
    assert len(report.read_metrics(run_dir)) == 3


def test_formatting() -> None:
    assert report.fmt_pct(0.64) == "64.0%"
    assert report.fmt_pct(None) == "—"
    assert report.fmt_bytes(512) == "512 B"
    assert report.fmt_bytes(2048) == "2.0 KiB"
    assert report.fmt_bytes(3 * 2**20) == "3.0 MiB"
    assert report.fmt_bytes(5 * 2**30) == "5.0 GiB"


def test_plot_rounds_writes_pngs(run_dir: Path, tmp_path: Path) -> None:
    hist = report.read_metrics(run_dir)
    paths = report.plot_rounds({"federated": hist, "centralized": _rounds("centralized", [0.7], 0)},
                               tmp_path / "plots")
    assert {p.name for p in paths} == {"accuracy.png", "macro_f1.png", "train_loss.png", "bytes.png"}
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_run_report(run_dir: Path) -> None:
    out = report.write_run_report(run_dir)
    assert out == run_dir / "report.html"
    text = out.read_text()
    for png in ("accuracy", "macro_f1", "train_loss", "bytes"):
        assert (run_dir / "plots" / f"{png}.png").read_bytes()[:8] == PNG_MAGIC
    assert "64.0%" in text and "72.0%" in text  # final global / own accuracy
    assert "50.0%" in text  # round 2 accuracy in the per-round table
    assert "client_1" in text and "minilm" in text and "lora" in text and "fedavg" in text
    assert "dirichlet (alpha=0.5)" in text
    assert "6.0 MiB" in text
    assert text.count('src="data:image/png;base64,') == 4
    assert 'src="http' not in text and "<link" not in text and "<script" not in text
    assert "complete" in text
    assert not list(run_dir.glob(".*tmp"))  # atomic write left no temp file


def test_incomplete_run_without_summary(tmp_path: Path) -> None:
    d = make_run(tmp_path / "inc", "federated", [0.3, 0.41], None, status="incomplete")
    text = report.write_run_report(d).read_text()
    assert "incomplete" in text
    assert "loss diverged (NaN)" in text
    assert "41.0%" in text  # final metrics fall back to the last evaluated round


def test_html_escaping(tmp_path: Path) -> None:
    d = make_run(tmp_path / "esc", "federated", [0.5], _summary("federated", 0.5, 0.5), name="<b>x</b>")
    text = report.write_run_report(d).read_text()
    assert "<b>x</b>" not in text
    assert "&lt;b&gt;x&lt;/b&gt;" in text


def test_comparison(compare_dir: Path) -> None:
    comp = report.write_comparison(compare_dir)
    assert [r["method"] for r in comp["rows"]] == ["centralized", "federated", "local"]
    rel = comp["relative_to_centralized"]
    assert rel["federated"] == pytest.approx(0.64 / 0.8)
    assert rel["local"] == pytest.approx(0.48 / 0.8)
    assert "centralized" not in rel
    on_disk = json.loads((compare_dir / "comparison.json").read_text())
    assert on_disk == comp
    row = {r["method"]: r for r in comp["rows"]}["local"]
    assert row["own_accuracy"] == 0.9 and row["rounds"] == 3 and row["bytes_total"] == 6 * 1_048_576

    md = (compare_dir / "comparison.md").read_text()
    assert md.startswith("| Method |") and "| federated | 64.0% |" in md

    for p in (compare_dir / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert (compare_dir / "plots" / "accuracy.png").exists()

    html = (compare_dir / "report.html").read_text()
    assert "80.0%" in html and "64.0%" in html and "48.0%" in html
    assert "local own acc" in html and "90.0%" in html  # per-client side-by-side
    assert 'src="http' not in html and 'src="data:image/png;base64,' in html


def test_comparison_subset_and_empty(compare_dir: Path, tmp_path: Path) -> None:
    comp = report.write_comparison(compare_dir, methods=["federated", "local", "missing"])
    assert [r["method"] for r in comp["rows"]] == ["federated", "local"]
    assert comp["relative_to_centralized"] == {}
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.FedFMError):
        report.write_comparison(tmp_path / "empty")


def test_rich_tables(compare_dir: Path) -> None:
    comp = report.write_comparison(compare_dir)
    console = Console(record=True, width=160)
    console.print(report.comparison_table(comp))
    summary = json.loads((compare_dir / "federated" / "summary.json").read_text())
    console.print(report.run_table(summary))
    out = console.export_text()
    assert "federated" in out and "64.0%" in out and "80.0%" in out and "70.0%" in out
