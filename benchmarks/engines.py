"""Engines compared on the same job: embedded vs Ray (parallel actors) vs Flower (SuperLink + SuperNodes on loopback).

    python benchmarks/engines.py --suite ray      # speedup of 2 Ray workers over the embedded engine
    python benchmarks/engines.py --suite flower   # round latency and bytes over Flower vs embedded
    python benchmarks/engines.py --suite ray --quick --out /tmp/engines   # 240 articles, 2 owners, 1 round (tests)

Ray: configs/bench_bbc_lora.yaml (MiniLM + LoRA, 10 BBC owners, every owner trains every round), 3 rounds.
Each setting runs in a fresh subprocess; round time is the mean of the rounds without a global evaluation
(rounds 1-2), setup the time to the first round (loading data and models, starting Ray and its actors).

Writes benchmarks/results/engines_<suite>.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, add_quick_args, result_header, results_dir  # noqa: E402

ROOT = Path(__file__).parent.parent

# --quick: the job on a sliver of BBC over 2 owners, one local step of 8 short articles
QUICK = [*QUICK_SETS, "federation.num_clients=2"]

ONE = r"""
import json, sys, time
t0 = time.perf_counter()
from fedfm import config, server
cfg = config.load(sys.argv[1], json.loads(sys.argv[2]))
run_dir = server.run(cfg)
wall = time.perf_counter() - t0
m = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
s = json.loads((run_dir / "summary.json").read_text())
print("RESULT " + json.dumps({"wall_s": wall, "round_s": [x["round_time_s"] for x in m], "run_dir": str(run_dir),
                             "accuracy": s["global"]["accuracy"], "bytes_total": s["bytes_total"]}))
"""


def one(config: Path, sets: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", ONE, str(config), json.dumps(sets)], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"run failed ({sets}):\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def final(run_dir: str) -> dict:
    from safetensors.torch import load_file

    ck = Path(run_dir) / "checkpoints"
    return load_file(ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors")


def suite_ray(rounds: int, quick: bool) -> tuple[list[dict], str]:
    import torch

    config = ROOT / "configs" / "bench_bbc_lora.yaml"
    out = tempfile.mkdtemp(prefix="fedfm-engines-")
    base = [f"rounds={rounds}", f"output_dir={out}", "eval.every=1000", *(QUICK if quick else [])]
    settings = [
        ("embedded, 1 process x 2 threads", ["engine.threads=2"], 2),
        ("embedded, 1 process x 1 thread", ["engine.threads=1"], 1),
        ("ray, 2 actors x 1 thread", ["engine.name=ray", "engine.workers=2", "engine.threads=1"], 1),
        ("ray, 1 actor x 2 threads", ["engine.name=ray", "engine.workers=1", "engine.threads=2"], 2),
    ]
    if quick:  # the pair whose final adapters must be bitwise equal (each setting is the same function)
        settings = settings[1:3]
    rows = []
    for i, (label, sets, threads) in enumerate(settings):
        r = one(config, base + [f"name=s{i}"] + sets, threads)
        timed = r["round_s"][:-1] or r["round_s"]  # the last round also evaluates on the global test set
        rows.append({"setting": label, "round_s": sum(timed) / len(timed), "setup_s": r["wall_s"] - sum(r["round_s"]),
                     "wall_s": r["wall_s"], "accuracy": r["accuracy"], "run_dir": r["run_dir"]})
        print(f"{label}: {rows[-1]['round_s']:.1f} s/round, setup {rows[-1]['setup_s']:.1f} s", flush=True)
    emb, ray = (rows[0], rows[1]) if quick else (rows[1], rows[2])
    a, b = final(emb["run_dir"]), final(ray["run_dir"])
    same = all(torch.equal(a[k], b[k]) for k in a)
    ref = rows[0]["round_s"]
    lines = [f"| setting | s / round | speedup vs {rows[0]['setting']} | setup s | final accuracy |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['round_s']:.1f} | {ref / r['round_s']:.2f}x | {r['setup_s']:.1f} | "
                     f"{100 * r['accuracy']:.1f}% |")
    lines.append("")
    lines.append(f"Ray (2 x 1 thread) and embedded (1 thread) final adapters bitwise equal: {same}.")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["ray", "flower"], required=True)
    ap.add_argument("--rounds", type=int, default=None, help="default 3; --quick 1")
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm",
                    help="flower suite: MiniLM + LoRA on BBC, or SmolLM2-135M + LoRA on Shakespeare")
    add_quick_args(ap, "240 articles over 2 owners, 1 round of 1 local step of 8")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    out = results_dir(args)
    t0 = time.time()
    if args.suite == "ray":
        rows, table = suite_ray(args.rounds, args.quick)
    else:
        from flower_bench import suite_flower

        rows, table = suite_flower(args.rounds, QUICK if args.quick else [], args.quick, args.model)
    name = f"engines_{args.suite}" + ("_smollm2" if args.model == "smollm2" else "")
    command, info, head = result_header(f"Engines: {args.suite}" + (f" ({args.model})" if args.model != "minilm" else ""),
                                        "benchmarks/engines.py")
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))
        (out / f"{name}.md").write_text("\n".join(head) + "\n\n" + table + "\n")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
