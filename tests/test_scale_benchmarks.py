"""The GPU check's CPU dry run and the precision benchmark's --quick run, as a user runs them.

Each runs its script as a subprocess from the repository root (offline, one torch thread) with its results directed
to tmp_path, then checks what it wrote: both result files, the keys the JSON must hold, every ratio a positive
finite number, the federated rerun bitwise equal to the first run, and benchmarks/results left alone.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

pytestmark = pytest.mark.slow


def run_script(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()}
    argv = [sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, f"{' '.join(argv)} exited with {p.returncode}:\n{p.stderr[-4000:]}"
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()} == before, "a test run wrote into benchmarks/results"


def written(out: Path, stem: str) -> dict:
    md = (out / f"{stem}.md").read_text()
    assert md.startswith("# ") and "- command: `python benchmarks/" in md and "- machine: " in md and "- date: " in md
    return json.loads((out / f"{stem}.json").read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_check_cpu_dry_run(tmp_path):
    out = tmp_path / "gpu"
    run_script(["gpu.py", "--device", "cpu", "--steps", "2", "--out", str(out)], tmp_path)
    res = written(out, "gpu")
    assert {"command", "machine", "date", "device", "dry_run", "rows", "federated", "targets"} <= res.keys()
    assert res["dry_run"] is True and res["device"] == "cpu" and res["command"].startswith("python benchmarks/gpu.py")
    assert list(res["rows"]) == ["full_bf16_autocast", "lora_bf16", "qlora_4bit"]
    for name, row in res["rows"].items():
        assert "error" not in row, (name, row.get("error"))
        assert positive(row["ratio"]) and all(positive(r) for r in row["ratios"]), name
        assert all(positive(row["tokens_per_s"][k]) for k in ("fedfm", "bare")), name
        assert row["max_abs_delta_diff"] == 0.0, name  # on the CPU the two loops do bit-identical work
        assert row["memory_mib"]["peak_fedfm"] is None or positive(row["memory_mib"]["peak_fedfm"])
    assert res["rows"]["qlora_4bit"]["total_params"] < res["rows"]["lora_bf16"]["total_params"]  # 4-bit packed
    fed = res["federated"]
    assert "error" not in fed, fed.get("error")
    assert fed["bitwise_equal"] is True and fed["max_abs_weight_diff"] == 0.0
    assert positive(fed["rounds_per_min"]) and len(fed["runs"]) == 2
    assert fed["runs"][0]["train_loss"] == fed["runs"][1]["train_loss"]
    assert all(n == fed["clients"] for r in fed["runs"] for n in r["clients_per_round"])
    assert len(res["targets"]) == 5 and res["targets"][-1]["pass"] is True


def test_precision_quick(tmp_path):
    out = tmp_path / "precision"
    run_script(["precision.py", "--quick", "--out", str(out)], tmp_path)
    res = written(out, "precision")
    assert {"command", "machine", "date", "precisions", "speedup_vs_fp32", "targets", "times_s"} <= res.keys()
    assert list(res["precisions"]) == ["fp32", "bf16_weights", "bf16_autocast"]
    for name, p in res["precisions"].items():
        assert positive(p["ratio"]) and all(positive(r) for r in p["ratios"]), name
        assert positive(p["tokens_per_s"]["fedfm"]) and positive(p["tokens_per_s"]["bare"]), name
        assert p["max_abs_delta_diff"] == 0.0 and math.isfinite(p["train_loss"]), name
    assert list(res["speedup_vs_fp32"]) == ["bf16_weights", "bf16_autocast"]
    assert all(positive(s["fedfm"]) and positive(s["bare"]) for s in res["speedup_vs_fp32"].values())
    assert len(res["targets"]) == 3 and all(positive(t["result"]) for t in res["targets"])
