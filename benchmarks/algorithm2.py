"""Algorithm 2: server-held data mixed with federated rounds, under strongly non-IID clients.

Issue 3: with about 2% of the training data on the server and Dirichlet alpha=0.1 label skew over
10 clients, compare plain FedAvg, FedAvg + server steps (Algorithm 2, before and after aggregation)
and training on the server's data alone; several seeds, mean and spread. Every variant of one seed
shares one split: the same clients' data, the same 2% on the server (unused by plain FedAvg).

    python benchmarks/algorithm2.py                   # seeds 0 1 2
    python benchmarks/algorithm2.py --seeds 0 --name algorithm2_seed0
    python benchmarks/algorithm2.py --quick --out /tmp/algorithm2   # seed 0, 240 articles, 1 round (tests)

Writes benchmarks/results/<name>.md and .json, or under --out.
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
from fedfm.app import App  # noqa: E402

QUICK = [*QUICK_SETS, "rounds=1", "federation.num_clients=4", "server_data.steps=1"]
# name -> (method, overrides)
VARIANTS = {
    "fedavg": ("federated", ["server_data.steps=0"]),
    # weight null: the config's weight (1.0) would make the server's update the whole aggregate
    "alg2-before (pseudo-client)": ("federated", ["server_data.when=before", "server_data.weight=null"]),
    "alg2-after (weight 1)": ("federated", ["server_data.when=after", "server_data.weight=1.0"]),
    "server-only": ("server", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/algorithm2_bbc.yaml")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2; --quick: 0")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="algorithm2")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="run only these; rows of the other variants are kept from an earlier <name>.json")
    add_quick_args(ap, "seed 0, 240 articles over 4 clients, 1 round of 1 local step and 1 server step")
    args = ap.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.quick:
        args.overrides = [*QUICK, *args.overrides]
    args.out = results_dir(args)
    rows = []
    earlier = args.out / f"{args.name}.json" if args.out else None
    if set(args.variants) != set(VARIANTS) and earlier and earlier.is_file():
        rows = [r for r in json.loads(earlier.read_text())["rows"] if r["variant"] not in args.variants]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base = [f"seed={seed}", f"output_dir={tmp}", *args.overrides]
            app = App(config.load(args.config, base))
            for name, (method, extra) in VARIANTS.items():
                if name not in args.variants:
                    continue
                app.cfg = cfg = config.load(args.config, [*base, *extra])
                t0 = time.perf_counter()
                summary = server.run_method(app, method, Path(tmp) / f"{seed}-{name.split()[0]}")
                rows.append({
                    "seed": seed,
                    "variant": name,
                    "accuracy": summary["global"]["accuracy"],
                    "macro_f1": summary["global"]["macro_f1"],
                    "server_examples": len(app.split.server),
                    "client_examples": int(sum(len(t) for t in app.split.client_train)),
                    "server_steps": cfg.server_data.steps if method == "server" or name != "fedavg" else 0,
                    "seconds": time.perf_counter() - t0,
                })
                print(json.dumps(rows[-1]), flush=True)
                write(rows, args)


def write(rows: list[dict], args) -> None:
    command = "python benchmarks/algorithm2.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if set(args.variants) != set(VARIANTS):
        command = "python benchmarks/algorithm2.py --seeds 0 1 2 (all variants), then " + command
    info = machine_info()
    cfg = config.load(args.config, args.overrides)
    r0 = rows[0]
    lines = [
        "# Algorithm 2: server data + federated rounds, Dirichlet alpha=0.1",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {info['summary']}",
        f"- date: {info['date']}",
        f"- setup: `{args.config}`: {cfg.data.source}, {cfg.federation.num_clients} clients, Dirichlet alpha={cfg.data.alpha}, "
        f"{cfg.rounds} rounds x {cfg.train.local_steps} local steps, LoRA on {cfg.model.source}; the server holds "
        f"{r0['server_examples']} training examples ({100 * r0['server_examples'] / (r0['server_examples'] + r0['client_examples']):.1f}% "
        f"of the training pool, uniform random) and takes {cfg.server_data.steps} steps per round in Algorithm 2 and server-only runs.",
        "- variants: fedavg ignores the server's data; alg2-before: the server trains from the round's global model and joins the "
        "aggregate as a pseudo-client weighted by its examples; alg2-after: the server trains from the aggregated model and its "
        "whole update is kept (weight 1); server-only: the server's data alone, same rounds and steps.",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in sorted({r['seed'] for r in rows})) + " | mean ± sd |",
        "|---|" + "---|" * (len({r['seed'] for r in rows}) + 1),
    ]
    for name in VARIANTS:
        sel = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seed"])
        if not sel:
            continue
        acc = np.array([r["accuracy"] for r in sel]) * 100
        spread = f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}" if len(acc) > 1 else f"{acc.mean():.1f}"
        lines.append(f"| {name} | " + " | ".join(f"{a:.1f}%" for a in acc) + f" | {spread} |")
    lines += ["", "Accuracy on the global test split (20% of the corpus, never trained on).", ""]
    print("\n".join(lines), flush=True)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
