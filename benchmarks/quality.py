"""Quality benchmark: federated LoRA vs centralized vs local-only, 10 owners, Dirichlet alpha=0.3.

Target (issue 2): federated test accuracy >= 95% of centralized, and clearly above the local-only
average, on BBC News and on the CrowdFlower tweets.

    python benchmarks/quality.py                      # both datasets, seed 0
    python benchmarks/quality.py --seeds 0 1 2        # spread over seeds
    python benchmarks/quality.py --configs configs/bench_bbc_lora.yaml
    python benchmarks/quality.py --quick --out /tmp/quality   # configs/smoke.yaml, 1 round (the test suite's run)

Writes benchmarks/results/quality.md and quality.json (command, machine, date, table), or under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, add_quick_args, machine_info, results_dir  # noqa: E402

from fedfm import config, server  # noqa: E402

DEFAULT = ["configs/bench_bbc_lora.yaml", "configs/bench_tweets_lora.yaml"]
SMOKE = "configs/smoke.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=None, help=f"default {' '.join(DEFAULT)}; --quick: {SMOKE}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    add_quick_args(ap, f"{SMOKE} on 240 articles, 1 round of 1 local step")
    ap.add_argument("--name", default="quality", help="result file stem under --out")
    args = ap.parse_args()
    args.configs = args.configs or ([SMOKE] if args.quick else DEFAULT)
    if args.quick:
        args.overrides = [*QUICK_SETS, "rounds=1", *args.overrides]
    args.out = results_dir(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.configs:
            for seed in args.seeds:
                cfg = config.load(path, [f"seed={seed}", f"output_dir={tmp}", *args.overrides])
                t0 = time.perf_counter()
                comparison = server.compare(cfg)
                by = {r["method"]: r for r in comparison["rows"]}
                rows.append(
                    {
                        "config": path,
                        "dataset": cfg.data.source,
                        "seed": seed,
                        "rounds": cfg.rounds,
                        "federated": by["federated"]["accuracy"],
                        "centralized": by["centralized"]["accuracy"],
                        "local_global": by["local"]["accuracy"],
                        "local_own": by["local"]["own_accuracy"],
                        "federated_own": by["federated"]["own_accuracy"],
                        "fed_over_central": by["federated"]["accuracy"] / by["centralized"]["accuracy"],
                        "federated_macro_f1": by["federated"]["macro_f1"],
                        "centralized_macro_f1": by["centralized"]["macro_f1"],
                        "bytes_federated": by["federated"]["bytes_total"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                write(rows, args)


def write(rows: list[dict], args) -> None:
    command = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = machine_info()
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "# Quality: federated LoRA vs centralized vs local-only",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {info['summary']}",
        f"- date: {info['date']}",
        "- setup: all-MiniLM-L6-v2 + LoRA r=8 (query, value), 10 clients, Dirichlet alpha=0.3 label skew, "
        "FedAvg with the rounds and local epochs of each config (configs/bench_*.yaml); centralized sees the same number of examples per round; "
        "accuracy on the global test split (20% of the corpus, never seen by any client).",
        "- target: federated >= 95% of centralized accuracy, and clearly above local-only.",
        "- time: wall time of the three methods on a machine shared with other benchmarks (not a speed figure).",
        "",
        "| dataset | seed | rounds | federated | centralized | fed / central | local-only (global test) | "
        "local-only (own test) | federated (own test) | fed macro-F1 | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['rounds']} | {pct(r['federated'])} | {pct(r['centralized'])} | "
            f"{r['fed_over_central']:.3f} | {pct(r['local_global'])} | {pct(r['local_own'])} | {pct(r['federated_own'])} | "
            f"{pct(r['federated_macro_f1'])} | {r['seconds']:.0f} s |"
        )
    for ds in sorted({r["dataset"] for r in rows}):
        sel = [r for r in rows if r["dataset"] == ds]
        if len(sel) > 1:
            ratio = np.array([r["fed_over_central"] for r in sel])
            lines.append(f"| {ds} | mean ± sd over {len(sel)} seeds | | | | {ratio.mean():.3f} ± {ratio.std(ddof=1):.3f} | | | | | |")
    verdicts = [f"{r['dataset']} seed {r['seed']}: fed/central {r['fed_over_central']:.3f} "
                f"({'meets' if r['fed_over_central'] >= 0.95 else 'MISSES'} 0.95); "
                f"federated - local-only = {100 * (r['federated'] - r['local_global']):+.1f} points" for r in rows]
    lines += ["", "## Verdict", "", *[f"- {v}" for v in verdicts], ""]
    print("\n".join(lines), flush=True)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
