"""Label skew (issue 23): every method for owners that hold one or a few classes, in one run per table.

For each corpus config and split, every seed runs the centralized reference once, then each method as a federated
run on the same data and model; the table gives each method's global test accuracy per seed, the mean, and the mean
as a share of centralized. Methods that did not work stay in the table.

    python benchmarks/label_skew.py                                   # label-pure owners, tweets and BBC, seeds 0 1
    python benchmarks/label_skew.py --split two-classes dirichlet-0.1 --name label_skew_mild
    python benchmarks/label_skew.py --quick --out /tmp/ls             # the test suite's run: 2 methods, tiny

Writes benchmarks/results/<name>.md and .json (command, machine, date, every run), after every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, add_quick_args, result_header, results_dir, write_results  # noqa: E402

from fedfm import config, server  # noqa: E402
from fedfm.app import App  # noqa: E402

CONFIGS = ["configs/label_pure_tweets.yaml", "configs/label_pure_bbc.yaml"]
SPLITS = {
    "label-pure": ["data.partition=pathological", "data.classes_per_client=1"],
    "two-classes": ["data.partition=pathological", "data.classes_per_client=2"],
    "dirichlet-0.1": ["data.partition=dirichlet", "data.alpha=0.1"],
}
# method -> overrides of the corpus config (the literature's answers to label skew, issue 23's list)
METHODS = {
    "fedavg": [],
    "logit adjustment": ["train.logit_adjustment=true"],
    "fedrs (alpha 0.5)": ["head.loss=fedrs"],
    "fedaws": ["head.loss=fedaws"],
    "fedetf": ["head.loss=fedetf"],
    "fedavgm (server momentum)": ["strategy.name=fedavgm"],
    "fedadam": ["strategy.name=fedadam"],
    "scaffold": ["strategy.name=scaffold"],
    "fewer local steps (2)": ["train.local_steps=2"],
    "algorithm 2 (server 2%)": ["server_data.fraction=0.02", "server_data.steps=5", "server_data.when=after",
                                "server_data.weight=1.0"],
    "ccvr": ["head.calibrate=ccvr"],
    "fedrs + ccvr": ["head.loss=fedrs", "head.calibrate=ccvr"],
    "recipe: label_skew (fedetf + ccvr)": ["recipe=label_skew"],
}
REBUILD = ("head.loss=fedetf", "server_data.fraction", "recipe=")  # change the model or the split: a fresh App


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--split", nargs="+", default=["label-pure"], choices=list(SPLITS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--name", default="label_skew", help="result file stem")
    add_quick_args(ap, "configs/label_pure_bbc.yaml on 240 articles, 1 round, fedavg and ccvr")
    args = ap.parse_args()
    if args.quick:
        args.configs, args.seeds, args.methods = ["configs/label_pure_bbc.yaml"], [0], ["fedavg", "ccvr"]
        args.overrides = [*QUICK_SETS, "rounds=1", "federation.num_clients=5", *args.overrides]
    out = results_dir(args)
    command, info, header = result_header("Label skew: every method, one run per table", "benchmarks/label_skew.py")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.configs:
            for split in args.split:
                for seed in args.seeds:
                    runs += table_runs(path, split, seed, args, Path(tmp))
                    write(runs, args, out, command, info, header)


def table_runs(path: str, split: str, seed: int, args, tmp: Path) -> list[dict]:
    """Centralized, then every method, on one corpus, split and seed (the App reused where the data and model
    are the same)."""
    base = [*SPLITS[split], f"seed={seed}", *args.overrides]
    out, shared = [], None
    for method in ["centralized", *args.methods]:
        sets = [] if method == "centralized" else METHODS[method]
        cfg = config.load(path, [*base, *sets, f"output_dir={tmp}", f"name=n{len(list(tmp.iterdir()))}",
                                 f"compare.methods=[{'centralized' if method == 'centralized' else 'federated'}]"])
        fresh = any(s.startswith(REBUILD) for s in sets)
        if fresh:
            app = App(cfg)
        else:
            shared = shared or App(cfg)
            shared.cfg, app = cfg, shared
        t0 = time.perf_counter()
        run_dir = tmp / cfg.name / ("centralized" if method == "centralized" else "federated")
        summary = server.run_method(app, "centralized" if method == "centralized" else "federated", run_dir)
        out.append({"config": path, "dataset": cfg.data.source, "split": split, "seed": seed, "method": method,
                    "accuracy": summary["global"]["accuracy"], "macro_f1": summary["global"]["macro_f1"],
                    "own_accuracy": (summary.get("own_mean") or {}).get("accuracy"),
                    "bytes_total": summary["bytes_total"], "seconds": time.perf_counter() - t0})
        print(json.dumps(out[-1]), flush=True)
    return out


def write(runs: list[dict], args, out, command: str, info: dict, header: list[str]) -> None:
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    seeds = sorted({r["seed"] for r in runs})
    lines = [*header, "- setup: all-MiniLM-L6-v2 + LoRA r=8 (query, value); each config's owners, rounds and local "
             "epochs; accuracy on the global test split (never trained on). Centralized trains on the pooled data with "
             "the same examples per round. `/ central` is the mean over seeds divided by centralized's mean.", ""]
    for (ds, split) in sorted({(r["dataset"], r["split"]) for r in runs}):
        sel = [r for r in runs if r["dataset"] == ds and r["split"] == split]
        cent = np.mean([r["accuracy"] for r in sel if r["method"] == "centralized"])
        lines += [f"## {ds}, {split}", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) +
                  " | mean | / central | macro-F1 (mean) |", "|---|" + "---|" * (len(seeds) + 3)]
        for method in dict.fromkeys(r["method"] for r in sel):
            rs = {r["seed"]: r for r in sel if r["method"] == method}
            accs = [r["accuracy"] for r in rs.values()]
            mean = float(np.mean(accs))
            f1 = float(np.mean([r["macro_f1"] for r in rs.values()]))
            cells = " | ".join(pct(rs[s]["accuracy"]) if s in rs else "—" for s in seeds)
            lines.append(f"| {method} | {cells} | {pct(mean)} | {mean / cent:.3f} | {pct(f1)} |")
        lines.append("")
    md = "\n".join(lines) + "\n"
    print(md, flush=True)
    write_results(out, args.name, md, {"command": command, "machine": info, "runs": runs})


if __name__ == "__main__":
    main()
