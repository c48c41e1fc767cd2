"""10,000 simulated clients on one machine: peak memory, rounds per minute, per-client orchestration cost.

configs/scale_tweets_10k.yaml: all 38k CrowdFlower tweets split IID over N clients (about 3 training tweets each
at N = 10,000), 100 sampled per round, MiniLM + LoRA r=8, 2 local steps each, 1-bit sign compression with
error feedback, so every client that ever trained keeps a residual (its private state) on disk. Run with N = 1,000 and N = 10,000 to show that
memory does not grow with the number of clients.

    OMP_NUM_THREADS=2 python benchmarks/scale.py --clients 1000 10000
    python benchmarks/scale.py --quick --out /tmp/scale      # 20 and 40 clients of 480 tweets, 2 rounds (tests)

Orchestration cost per client = (round wall time - time inside client training - server evaluation) / sampled
clients: the round loop's own work (sampling, task building, message encode/decode, screening, aggregation,
client-state I/O). Writes benchmarks/results/scale.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import add_quick_args, result_header, results_dir  # noqa: E402

CONFIG = Path(__file__).parent.parent / "configs" / "scale_tweets_10k.yaml"
# --quick: 480 tweets (a few per client), short texts, small evaluations
QUICK = ["data.max_examples=480", "data.max_length=32", "eval.max_examples=48", "eval.max_clients=8"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(clients: int, rounds: int, sampled: int, threads: int, extra: list[str]) -> dict:
    """One run in this process; returns its row (peak RSS is of the whole process so far: run small N first)."""
    from fedfm import config, server
    from fedfm.app import App

    out = Path(tempfile.mkdtemp(prefix="fedfm-scale-"))
    cfg = config.load(CONFIG, [f"federation.num_clients={clients}", f"federation.fraction={sampled / clients}",
                             f"federation.min_clients={sampled}", f"rounds={rounds}", f"output_dir={out}", "name=run",
                             f"engine.threads={threads}", "seed=0", *extra])
    t0 = time.perf_counter()
    app = App(cfg)
    setup_s = time.perf_counter() - t0
    rss_app = rss_mib()
    spent = {"train": 0.0, "eval": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    app.client_train = timed(app.client_train, "train")
    app.server_evaluate = timed(app.server_evaluate, "eval")
    rd = out / "run"
    t1 = time.perf_counter()
    per_round = []
    original = server.Runner.round

    def round_(self, states, progress):
        before = dict(spent)
        t = time.perf_counter()
        rec = original(self, states, progress)
        wall = time.perf_counter() - t
        train, ev = spent["train"] - before["train"], spent["eval"] - before["eval"]
        per_round.append({"wall_s": wall, "train_s": train, "eval_s": ev, "clients": len(rec["clients"]),
                          "rss_mib": rss_mib()})
        return rec

    server.Runner.round = round_
    try:
        server.run_method(app, "federated", rd)
    finally:
        server.Runner.round = original
    total = time.perf_counter() - t1
    summary = json.loads((rd / "summary.json").read_text())
    walls = [r["wall_s"] for r in per_round]
    orchestration = [(r["wall_s"] - r["train_s"] - r["eval_s"]) / max(1, r["clients"]) for r in per_round]
    return {
        "clients": clients,
        "sampled_per_round": sampled,
        "rounds": len(per_round),
        "setup_s": setup_s,
        "rss_after_setup_mib": rss_app,
        "peak_rss_mib": rss_mib(),
        "round_wall_s": walls,
        "rounds_per_minute": 60 * len(walls) / sum(walls),
        "train_share": sum(r["train_s"] for r in per_round) / sum(walls),
        "orchestration_ms_per_client": 1000 * sum(orchestration) / len(orchestration),
        "client_states": summary.get("client_states"),
        "accuracy": summary["global"]["accuracy"],
        "run_total_s": total,
        "finish_s": total - sum(walls),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", nargs="+", type=int, default=None, help="default 1000 10000; --quick 20 40")
    ap.add_argument("--rounds", type=int, default=None, help="default 5; --quick 2")
    ap.add_argument("--sampled", type=int, default=None, help="clients per round (default 100; --quick 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --quick 1)")
    ap.add_argument("--name", default="scale")
    add_quick_args(ap, "20 and 40 clients of 480 tweets, 4 sampled per round, 2 rounds, 1 thread")
    args = ap.parse_args()
    args.clients = args.clients or ([20, 40] if args.quick else [1000, 10000])
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.sampled = args.sampled or (4 if args.quick else 100)
    args.threads = args.threads or (1 if args.quick else 2)
    out = results_dir(args)
    _, info, header = result_header("10,000 simulated clients", "benchmarks/scale.py")
    rows = []
    for n in sorted(args.clients):  # smallest first: ru_maxrss is a high-water mark of the whole process
        rows.append(run(n, args.rounds, args.sampled, args.threads, QUICK if args.quick else []))
        print(json.dumps(rows[-1]), flush=True)
    lines = header + [
        f"- setup: CrowdFlower tweets (38k, IID over N clients), {args.sampled} sampled per round, MiniLM + LoRA r=8, "
        "2 local steps of 8, 1-bit sign compression with error feedback (each client's residual on disk), "
        f"{args.rounds} rounds, {args.threads} torch threads; runs in one process, smallest N first (peak RSS is the "
        "process's high-water mark, so the larger N's figure includes the smaller's)",
        "- target: 10,000 clients complete with peak memory under 8 GiB",
        "",
        "| clients | sampled / round | peak RSS | RSS after setup | setup | rounds / min | training share of round time | "
        "orchestration / sampled client | clients with state on disk | state on disk | final-eval + save | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cs = r["client_states"] or {"clients": 0, "disk_bytes": 0}
        lines.append(
            f"| {r['clients']:,} | {r['sampled_per_round']} | {r['peak_rss_mib'] / 1024:.2f} GiB | "
            f"{r['rss_after_setup_mib'] / 1024:.2f} GiB | {r['setup_s']:.0f} s | {r['rounds_per_minute']:.2f} | "
            f"{r['train_share']:.0%} | {r['orchestration_ms_per_client']:.1f} ms | {cs['clients']:,} | "
            f"{cs['disk_bytes'] / 2**20:.0f} MiB | {r['finish_s']:.0f} s | {r['accuracy']:.1%} |"
        )
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
        (out / f"{args.name}.json").write_text(json.dumps({"header": header, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
