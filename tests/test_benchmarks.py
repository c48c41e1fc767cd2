"""Every benchmark script's --quick run: a refactor that breaks a benchmark fails here, not months later.

Each case runs one script as a user would (a subprocess from the repository root, offline), with its results
directed to tmp_path, then checks what it wrote (the result files and the rows or keys they must hold) and that
the committed benchmarks/results were left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROWN_FIXTURE = ROOT / "tests" / "fixtures" / "corpora" / "brown"
RESULTS = ROOT / "benchmarks" / "results"

pytestmark = pytest.mark.slow


def written(out: Path, stem: str) -> dict:
    """The results a script wrote as ``<stem>.md`` (a titled markdown report) and ``<stem>.json``."""
    assert (out / f"{stem}.md").read_text().startswith("# ")
    return json.loads((out / f"{stem}.json").read_text())


def column(rows: list[dict], key: str) -> list:
    """One field of every row."""
    return [r[key] for r in rows]


def check_algorithm2(out: Path) -> None:
    rows = written(out, "algorithm2")["rows"]
    assert column(rows, "variant") == ["fedavg", "alg2-before (pseudo-client)", "alg2-after (weight 1)", "server-only"]
    assert all(0 <= r["accuracy"] <= 1 and r["server_examples"] > 0 for r in rows)


def check_continual(out: Path) -> None:
    rows = written(out, "continual")["rows"]
    assert [v.split()[0] for v in column(rows, "variant")] == ["naive", "replay", "ewc", "l2sp", "merge"]
    assert all(len(r["matrix"]) == 3 and len(r["matrix"][0]) == 3 for r in rows)  # 3 stages x 3 test sets


def check_continued_pretrain(out: Path) -> None:
    res = written(out, "continued_pretrain")
    assert res["before"].keys() == res["after"].keys() >= {"global test (all owners)", "general English (Brown)"}
    assert len(res["history"]) == 1


def check_engines_ray(out: Path) -> None:
    rows = written(out, "engines_ray")["rows"]
    assert [s.split(",")[0] for s in column(rows, "setting")] == ["embedded", "ray"]  # quick: the bitwise pair
    assert "final adapters bitwise equal: True" in (out / "engines_ray.md").read_text()


def check_engines_flower(out: Path) -> None:
    rows = written(out, "engines_flower")["rows"]
    # quick: the fedfm job on both engines and Flower's own latency floor
    assert len(rows) == 3 and all(r["round_s"] > 0 for r in rows)
    assert rows[1]["equal_to_embedded"] is True  # the job over Flower == embedded, bit for bit


def check_lm_throughput(out: Path) -> None:
    res = written(out, "lm_throughput")
    assert len(res["times"]["fedfm"]) == len(res["times"]["bare"]) == 2
    assert res["ratio"] > 0 and res["tokens_per_rep"] > 0


def check_peft_methods(out: Path) -> None:
    rows = written(out, "peft_methods")["rows"]
    assert column(rows, "method") == ["lora", "prompt_tuning", "prefix_tuning", "p_tuning", "none"]
    assert rows[0]["per_owner"] and all(r["bytes_up_per_client_round"] > 0 for r in rows)


def check_pretrain(out: Path) -> None:
    runs = written(out, "pretrain")["runs"]
    assert column(runs, "method") == ["centralized"] + ["federated"] * 4
    assert column(runs, "outer")[1:] == ["diloco", "fedavg", "fedavgm", "fedadam"]
    assert (out / "pretrain_curve.png").stat().st_size > 0


def check_privacy(out: Path) -> None:
    res = written(out, "privacy")
    assert column(res["rows"], "noise_multiplier") == [None, 1.0]
    assert res["rows"][0]["epsilon"] is None and res["rows"][1]["epsilon"] > 0
    assert [len(a["attacks"]) for a in res["audits"]] == [2, 2]  # loss threshold and LiRA, both runs


def check_quality(out: Path) -> None:
    rows = written(out, "quality")["rows"]
    assert len(rows) == 1 and rows[0]["dataset"] == "bbc"
    assert all(0 <= rows[0][k] <= 1 for k in ("federated", "centralized", "local_global"))


def check_rag(out: Path) -> None:
    res = written(out, "rag")
    assert set(res["elements"]["text"]["answers"]) == {"closed_book", "centralized", "passages", "owner_answers", "guarded"}
    assert res["foldoc"]["retrieval"]["metrics"]["federated_exact"]["recall@5"] >= 0
    assert {"base MiniLM", "federated-trained"} <= res["retriever"].keys()


def check_scale(out: Path) -> None:
    rows = written(out, "scale")["rows"]
    assert column(rows, "clients") == [20, 40] and all(r["rounds"] == 2 for r in rows)


def check_secagg(out: Path) -> None:
    res = written(out, "secagg")
    assert {r["n"] for r in res["rows"]} == {10, 30, 100} and all(r["sum_checked"] for r in res["rows"])
    assert res["scaling"]


def check_secagg_round(out: Path) -> None:
    rows = written(out, "secagg_round")["rows"]
    assert [v.split()[0] for v in column(rows, "variant")] == ["plain", "SecAgg", "SecAgg+"]
    assert rows[0]["secagg_time_s"] == 0 < rows[1]["secagg_time_s"]


def check_updates(out: Path) -> None:
    rows = written(out, "updates_attacks")["rows"]
    assert column(rows, "variant") == ["clean / fedavg", "clean / median"]
    assert all(r["rounds"] == 2 and r["updates"] > 0 for r in rows)


def check_memory_scale(out: Path) -> None:
    runs = written(out, "memory_scale")["runs"]
    assert runs and all("error" not in r and r["round_peak_gib"] > 0 for r in runs)


def check_memory_levers(out: Path) -> None:
    runs = written(out, "memory_levers")["levers"]
    assert len(runs) == 2 and all(r["round_peak_gib"] > 0 and r["estimate_gib"] > 0 for r in runs)
    assert [r["gradient_checkpointing"] for r in runs] == [False, True]
    # recomputing the activations changes no number: the same step, the same loss
    assert runs[1]["train_loss"] == runs[0]["train_loss"]


def check_flower_large(out: Path) -> None:
    res = written(out, "flower_large")
    assert res["equal"] is True and res["bytes_sent"] == res["bytes_back"] > 0  # every element came back, +1


def check_label_skew(out: Path) -> None:
    runs = written(out, "label_skew")["runs"]
    assert [r["method"] for r in runs] == ["centralized", "fedavg", "ccvr"]
    assert all(r["split"] == "label-pure" and 0 <= r["accuracy"] <= 1 for r in runs)


def check_personalize(out: Path) -> None:
    runs = written(out, "personalize")["runs"]
    assert [r["method"] for r in runs] == ["local", "finetune"]
    assert 0 <= runs[1]["personal_mean"] <= 1 and len(runs[1]["personal_each"]) == len(runs[0]["own_each"])


def check_overhead(out: Path) -> None:
    res = written(out, "overhead")
    assert {"memory", "wall", "clients", "verdicts"} <= res.keys() and res["verdicts"]


def check_equivalence(out: Path) -> None:
    # without --against nothing is compared or written: the final states kept by --save are what it produced
    from safetensors.torch import load_file

    states = sorted((out / "states").glob("*.federated.safetensors"))
    assert states and all(load_file(p) for p in states)


# id -> (arguments after the script, where OUT is the results directory, check of what it wrote)
CASES: dict[str, tuple[list[str], Callable[[Path], None]]] = {
    "algorithm2": (["algorithm2.py", "--quick", "--out", "OUT"], check_algorithm2),
    "continual": (["continual.py", "--quick", "--out", "OUT"], check_continual),
    "continued_pretrain": (["continued_pretrain.py", "--quick", "--out", "OUT"], check_continued_pretrain),
    "engines_ray": (["engines.py", "--suite", "ray", "--quick", "--out", "OUT"], check_engines_ray),
    "engines_flower": (["engines.py", "--suite", "flower", "--quick", "--out", "OUT"], check_engines_flower),
    "label_skew": (["label_skew.py", "--quick", "--out", "OUT"], check_label_skew),
    "lm_throughput": (["lm_throughput.py", "--quick", "--out", "OUT"], check_lm_throughput),
    "memory_scale": (["memory_scale.py", "--quick", "--out", "OUT"], check_memory_scale),
    "memory_levers": (["memory_scale.py", "--levers", "--quick", "--out", "OUT"], check_memory_levers),
    "flower_large": (["flower_large.py", "--gib", "0.01", "--out", "OUT"], check_flower_large),
    "peft_methods": (["peft_methods.py", "--quick", "--out", "OUT"], check_peft_methods),
    "personalize": (["personalize.py", "--quick", "--out", "OUT"], check_personalize),
    "pretrain": (["pretrain.py", "--quick", "--out", "OUT"], check_pretrain),
    "privacy": (["privacy.py", "--quick", "--out", "OUT"], check_privacy),
    "quality": (["quality.py", "--quick", "--out", "OUT"], check_quality),
    "rag": (["rag.py", "--quick", "--out", "OUT"], check_rag),
    "scale": (["scale.py", "--quick", "--out", "OUT"], check_scale),
    "secagg": (["secagg.py", "--quick", "--out", "OUT/secagg"], check_secagg),
    "secagg_round": (["secagg_round.py", "--quick", "--out", "OUT"], check_secagg_round),
    "updates": (["updates.py", "--suite", "attacks", "--quick", "--out", "OUT"], check_updates),
    "overhead": (["overhead.py", "--quick", "--out", "OUT/overhead"], check_overhead),
    "equivalence": (["equivalence.py", "--quick", "--save", "OUT/states", "--out", "OUT/equivalence.md"],
                    check_equivalence),
}


def offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a benchmark run: no model hub, one torch thread, and a cache that has the Brown corpus.

    One thread: the runs are tiny, and scripts that start workers or nodes must not oversubscribe the CI's 2 cores.

    continued_pretrain.py measures forgetting on Brown, which the default `fedfm data fetch` (CI's) leaves out:
    when it is not in the cache, the run gets a cache of links to the real entries plus the committed Brown fixture.
    """
    from fedfm.data.corpora import is_fetched
    from fedfm.data.fetch import cache_dir

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not is_fetched("brown"):
        cache = tmp_path / "cache"
        cache.mkdir()
        for entry in cache_dir().iterdir():
            (cache / entry.name).symlink_to(entry)
        shutil.copytree(BROWN_FIXTURE, cache / "brown")
        env["FEDFM_CACHE"] = str(cache)
    return env


def committed_results() -> dict[str, int]:
    """benchmarks/results as it is now: file name -> modification time."""
    return {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()}


# Ray clusters and Flower federations run one at a time, on one test worker (pytest-xdist's loadgroup)
SERVICES = pytest.mark.xdist_group("services")


@pytest.mark.parametrize("case", [pytest.param(c, marks=SERVICES) if c.startswith(("engines", "flower")) else c
                                  for c in CASES])
def test_benchmark_quick_mode(case, tmp_path):
    args, check = CASES[case]
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "benchmarks" / args[0]), *(a.replace("OUT", str(out)) for a in args[1:])]
    before = committed_results()
    p = subprocess.run(argv, cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=900, check=False)
    assert p.returncode == 0, f"{' '.join(argv)} exited with {p.returncode}:\n{p.stderr[-4000:]}"
    check(out)
    assert committed_results() == before, "a quick run wrote into benchmarks/results"
