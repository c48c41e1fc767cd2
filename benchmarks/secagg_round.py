"""Secure aggregation inside real rounds: its share of round time and bytes on the MiniLM-LoRA task.

    python benchmarks/secagg_round.py                 # configs/secagg_tweets.yaml, 3 rounds per variant
    python benchmarks/secagg_round.py --quick --out /tmp/secagg_round   # 8 owners, 240 tweets, 1 round (tests)

Variants of the same config and seed (DP off, so only secure aggregation differs): plain FedAvg, SecAgg
(complete graph) and SecAgg+ (neighbours 'auto'), each with the config's 30% of sampled owners vanishing
after the key exchange. Secure-aggregation time is the key exchange, the clients' encoding and masking, the
unmasking and the server's reconstruction, as measured by the round loop. Writes benchmarks/results/secagg_round.md
and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, add_quick_args, result_header, results_dir  # noqa: E402

from fedfm import config, server  # noqa: E402

# every sampled owner (Poisson, q=1): the round keeps enough reporters after the 30% that vanish
QUICK = [*QUICK_SETS, "federation.num_clients=8", "federation.fraction=1.0", "federation.min_clients=3"]
VARIANTS = {
    "plain FedAvg": ["secagg.enabled=false"],
    "SecAgg (complete graph)": ["secagg.enabled=true", "secagg.neighbours=null"],
    "SecAgg+ (neighbours auto)": ["secagg.enabled=true", "secagg.neighbours=auto"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/secagg_tweets.yaml")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per variant (default 3; --quick 1)")
    add_quick_args(ap, "1 round, 8 owners, 240 tweets, 1 local step")
    args = ap.parse_args()
    args.out = results_dir(args)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.overrides = QUICK if args.quick else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            overrides = [f"rounds={args.rounds}", "dp.mode=off", "dp.target_epsilon=null", f"output_dir={tmp}", f"name=v{len(rows)}", *args.overrides, *extra]
            cfg = config.load(args.config, overrides)
            run_dir = server.run(cfg)
            recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            summary = json.loads((run_dir / "summary.json").read_text())
            round_s = np.mean([r["round_time_s"] for r in recs])
            secagg_s = np.mean([r.get("secagg_time_s", 0.0) for r in recs])
            reporters = np.mean([r.get("reporters", len(r["clients"])) for r in recs])
            rows.append(
                {
                    "variant": name,
                    "round_time_s": float(round_s),
                    "secagg_time_s": float(secagg_s),
                    "secagg_share": float(secagg_s / round_s),
                    "bytes_up_per_round": float(np.mean([r["bytes_up"] for r in recs])),
                    "secagg_bytes_per_round": float(np.mean([r.get("secagg_bytes", 0) for r in recs])),
                    "reporters": float(reporters),
                    "vanished": float(np.mean([r["sampled"] - len(r["clients"]) for r in recs])),
                    "accuracy": summary["global"]["accuracy"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    command, info, lines = result_header("Secure aggregation in real rounds: share of round time (MiniLM + LoRA, tweets)", "benchmarks/secagg_round.py")
    cfg = config.load(args.config, args.overrides)
    plain = rows[0]["round_time_s"]
    lines += [
        f"- setup: `{args.config}` with DP off: {cfg.federation.num_clients} owners, Poisson sampling q={cfg.federation.fraction}, "
        f"{100 * cfg.federation.dropout:.0f}% of sampled owners vanish after the key exchange, {args.rounds} rounds, "
        f"LoRA r={cfg.peft.options.get('r')} (update vector of the trainable tensors + 2 tail coordinates).",
        "- secure-aggregation time: key exchange, every client's fixed-point encoding and masking, unmasking and the "
        "server's reconstruction, measured in the round loop (the embedded engine runs clients one after another, so "
        "all clients' protocol work is on this clock); round times are taken one variant after another on a shared "
        "machine, so the ratio to plain is noisier than the share, which is measured within each round.",
        "",
        "| variant | round time | secure-aggregation time | share of round | round time vs plain | updates up / round | protocol bytes / round | reporters | vanished |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['round_time_s']:.1f} s | {r['secagg_time_s']:.2f} s | {100 * r['secagg_share']:.1f}% | "
            f"{r['round_time_s'] / plain:.2f}x | {r['bytes_up_per_round'] / 2**20:.2f} MiB | {r['secagg_bytes_per_round'] / 2**20:.2f} MiB | "
            f"{r['reporters']:.1f} | {r['vanished']:.1f} |"
        )
    print("\n".join(lines))
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg_round.md").write_text("\n".join(lines) + "\n")
    (args.out / "secagg_round.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
