"""Cost of one secure-aggregation round (fedfm.privacy.secagg) against the number of clients.

For every n in --ns, graph in {complete (SecAgg), sparse (SecAgg+)} and dropout rate in --dropouts, one
full round is simulated in this process with ``fedfm.privacy.secagg.simulate``: real X25519 / HKDF /
ChaCha20-Poly1305 / ChaCha20 work, every message serialised to bytes and parsed again. Random field
vectors of --length elements; a seeded random set of round(dropout * n) clients drops after the key
exchange (they never send a masked vector, so the server must rebuild their keys and remove their
pairwise masks). Every round's output is checked to equal the plain sum of the survivors' vectors.

Measured per round:
  client time per client   wall time inside one surviving client's own protocol steps (key generation,
                           advertise, share_keys, receive_shares, mask, unmask), mean over the survivors;
                           plus the mean per stage over the clients that ran that stage
  server time              wall time inside SecAggServer (validation, routing, unmask: Shamir
                           reconstruction, verification, PRG expansion of every mask to remove)
  bytes per client         the real message lengths a surviving client sends / receives, mean
The sparse degree is k = secagg_plus_neighbours(n, dropout, threshold): the smallest even
k >= 2*ceil(log2 n) for which n * P[a client keeps fewer than t of its k neighbours] <= 2**-20.

Everything runs sequentially in one process on a shared machine (absolute times are noisy; in a
deployment clients work in parallel, so a round's latency is about one client's time plus the server's).

    python benchmarks/secagg.py            # full run (~8 min on 2 busy cores), writes results/secagg.{md,json}
    python benchmarks/secagg.py --quick    # n in {10, 30, 100}, writes nothing unless --out is given
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfm.privacy.secagg import (
    P,
    SecAggParams,
    SimStats,
    field_add,
    secagg_plus_neighbours,
    simulate,
    threshold_count,
)

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[secagg-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import cryptography
    from machine import machine_info  # benchmarks/machine.py, shared by the benchmarks

    return {**machine_info(), "numpy": np.__version__, "cryptography": cryptography.__version__}


def one_round(n: int, graph: str, dropout: float, length: int, threshold: float, seed: int) -> dict[str, Any]:
    """Simulate one round and return its costs (checked: the output equals the survivors' plain sum)."""
    k = None if graph == "complete" else secagg_plus_neighbours(n, dropout, threshold)
    params = SecAggParams(neighbours=k, threshold=threshold)
    rng = np.random.default_rng([seed, n, length, int(dropout * 1000), graph == "complete"])
    vectors = {i: rng.integers(0, P, length, dtype=np.uint64) for i in range(n)}
    drop = set(rng.choice(n, round(dropout * n), replace=False).tolist())
    session = hashlib.sha256(f"secagg-bench|{seed}|{n}|{graph}|{dropout}|{length}".encode()).digest()
    stats = SimStats()
    gc.collect()
    t0 = time.perf_counter()
    total, server = simulate(vectors, params, session=session, drop_after_keys=drop, stats=stats)
    wall = time.perf_counter() - t0
    expect = np.zeros(length, dtype=np.uint64)
    for i in server.survivors:
        expect = field_add(expect, vectors[i])
    if not np.array_equal(total, expect) or sorted(server.survivors) != sorted(set(range(n)) - drop):
        raise AssertionError(f"wrong result for n={n} {graph} dropout={dropout}")
    surv = server.survivors
    degree = (n - 1) if k is None or k >= n - 1 else k
    counts = {"advert": n, "shares": n, "inbox": n - len(drop), "masked": len(surv), "unmask": len(surv)}
    return {
        "n": n, "graph": graph, "k": k, "degree": degree, "t": threshold_count(degree, threshold),
        "dropout": dropout, "dropped": len(drop), "survivors": len(surv), "length": length,
        "client_s_mean": float(np.mean([stats.client_seconds[i] for i in surv])),
        "client_s_max": float(np.max([stats.client_seconds[i] for i in surv])),
        "client_stage_s_mean": {s: stats.stage_seconds.get(s, 0.0) / c for s, c in counts.items() if c},
        "server_s": stats.server_seconds,
        "bytes_sent_mean": float(np.mean([stats.bytes_sent[i] for i in surv])),
        "bytes_received_mean": float(np.mean([stats.bytes_received[i] for i in surv])),
        "wall_s": wall,
        "sum_checked": True,
    }


def grid(args) -> tuple[list[dict[str, Any]], list[str]]:
    rows, skipped = [], []
    for dropout in args.dropouts:
        for graph in ("complete", "sparse"):
            for n in args.ns:
                key = f"{graph}:{n}:{dropout:g}"
                if key in args.skip:
                    skipped.append(key)
                    log(f"skip {key} (--skip)")
                    continue
                row = one_round(n, graph, dropout, args.length, args.threshold, args.seed)
                rows.append(row)
                log(f"{key}: degree {row['degree']}, client {row['client_s_mean']:.3f} s, server "
                    f"{row['server_s']:.2f} s, wall {row['wall_s']:.1f} s")
    return rows, skipped


def scaling(args) -> list[dict[str, Any]]:
    """Per-element cost: the same round at several vector lengths."""
    out = []
    for length in args.scaling_lengths:
        row = one_round(args.scaling_n, "complete", args.dropouts[0], length, args.threshold, args.seed)
        out.append(row)
        log(f"scaling length {length}: client {row['client_s_mean']:.3f} s, server {row['server_s']:.2f} s")
    return out


def kb(b: float) -> str:
    return f"{b / 1024:,.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| graph | n | degree k | t | dropped | client s / client (mean) | keys + shares | masking | unmask "
            "| server s | KiB sent / client | KiB received / client | round wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        st = r["client_stage_s_mean"]
        keys = st.get("advert", 0) + st.get("shares", 0) + st.get("inbox", 0)
        lines.append(
            f"| {'SecAgg (complete)' if r['graph'] == 'complete' else 'SecAgg+ (sparse)'} | {r['n']} | {r['degree']} "
            f"| {r['t']} | {r['dropped']} ({r['dropout']:.0%}) | {r['client_s_mean']:.4f} | {keys:.4f} "
            f"| {st.get('masked', 0):.4f} | {st.get('unmask', 0):.5f} | {r['server_s']:.3f} "
            f"| {kb(r['bytes_sent_mean'])} | {kb(r['bytes_received_mean'])} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| length | client s / client | server s | KiB sent / client | KiB received / client |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['length']:,} | {r['client_s_mean']:.4f} | {r['server_s']:.3f} "
                     f"| {kb(r['bytes_sent_mean'])} | {kb(r['bytes_received_mean'])} |")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        dl = b["length"] - a["length"]
        lines += ["", (f"Marginal cost per element (from the two longest vectors, n={b['n']}, degree {b['degree']}): "
                       f"client {1e9 * (b['client_s_mean'] - a['client_s_mean']) / dl:.1f} ns per element "
                       f"({1e9 * (b['client_s_mean'] - a['client_s_mean']) / dl / b['degree']:.2f} ns per element per "
                       f"neighbour), server {1e9 * (b['server_s'] - a['server_s']) / dl:.0f} ns per element, "
                       f"{(b['bytes_sent_mean'] - a['bytes_sent_mean']) / dl:.2f} bytes sent per element per client.")]
    return "\n".join(lines)


def degrees_note(rows: list[dict[str, Any]]) -> str:
    """The sparse degrees chosen, per dropout rate (a SecAgg+ row with degree n - 1 is a complete graph)."""
    parts = []
    for d in sorted({r["dropout"] for r in rows}, reverse=True):
        ks = ", ".join(f"n={r['n']}: {r['degree']}" for r in rows if r["graph"] == "sparse" and r["dropout"] == d)
        parts.append(f"{d:.0%} dropouts: {ks}")
    return ("Sparse degrees chosen (" + "; ".join(parts) + "). Where the degree is n - 1 the SecAgg+ row is a "
            "complete graph. The server's time with dropouts is dominated by re-expanding the masks between each "
            "dropped client and each of its surviving neighbours (one X25519 agreement and one PRG expansion of "
            "the whole vector per pair).")


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    skipped = res["skipped"]
    out = [
        "# Secure aggregation (SecAgg / SecAgg+) cost per round", "",
        f"Command: `{res['command']}`  ",
        f"Date (UTC): {res['date_utc']}  ",
        (f"Machine: {m['summary']}; numpy {m['numpy']}, cryptography {m['cryptography']}; load average at start "
         f"{m['load_avg_at_start']} (machine shared with a training job: absolute times are noisy)  "),
        f"Total benchmark time: {res['total_s']:.0f} s", "",
        (f"Vector length {res['length']:,} field elements (uint64, 8 bytes each), threshold fraction "
         f"{res['threshold']} (t = floor({res['threshold']} * degree) + 1). One round per row. Every row's output was "
         "checked to equal the plain sum of the survivors' vectors mod p. Times in seconds."), "",
        table(res["rows"]), "",
        degrees_note(res["rows"]), "",
    ]
    if skipped:
        ref = next((r for r in res["rows"] if r["graph"] == "complete" and r["n"] == 1000), None)
        took = f" (the complete-graph round of 1,000 clients above took {ref['wall_s']:.0f} s)" if ref else ""
        out += [(f"Not run (capped with `--skip`, the default): {', '.join(skipped)}, to keep the benchmark under "
                 f"10 minutes{took}. Without dropouts each client of a complete graph does the same work as in the "
                 "row with dropouts (its key exchange and masks involve all its neighbours either way, since clients "
                 "drop only after the key exchange); the server does less (no keys to rebuild, no masks of dropped "
                 "clients to remove)."), ""]
    out += [
        "## Per-element scaling", "",
        (f"SecAgg, complete graph, n = {res['scaling'][0]['n']}, dropout {res['scaling'][0]['dropout']:.0%}, "
         "at several vector lengths:") if res["scaling"] else "", "",
        scaling_table(res["scaling"]) if res["scaling"] else "", "",
        "## How it was measured", "",
        ("`fedfm.privacy.secagg.simulate` runs the four stages for all n clients and the server in this one "
         "process, sequentially, every message as bytes (`to_bytes` / `from_bytes`). *Client time* is the wall "
         "time spent inside one client's own calls (key generation and `advertise`, `share_keys`, "
         "`receive_shares`, `mask`, `unmask`), averaged over the clients that survived (they do all the work); "
         "the stage columns are the mean over the clients that ran that stage (*keys + shares*: key generation, "
         "two X25519 agreements, an HKDF and an AEAD operation per neighbour, Shamir split; *masking*: one X25519 "
         "agreement, HKDF and PRG expansion of the whole vector per neighbour plus the self mask). *Server time* is "
         "the wall time inside `SecAggServer` methods: validation, routing, and in the unmask stage the Shamir "
         "reconstruction and verification of every survivor's self-mask seed and every dropped client's key, "
         "and the PRG expansion of every mask it removes (one per survivor plus one per pair of a dropped client "
         "and a surviving neighbour). *Bytes* are the lengths of the real messages a surviving client sends "
         "(advert, shares, masked vector, unmask response) and receives (roster, inbox, unmask request); no "
         "transport framing. Costs grow with the degree: per client O(degree) key agreements and PRG expansions "
         "(O(n) complete, O(log n) sparse), for the whole round O(n^2) vs O(n log n)."),
        "",
        ("Sparse degree: `secagg_plus_neighbours(n, dropout, threshold)`, our rule (not Bell et al.'s full "
         "parameter selection, which also budgets for corrupt clients): the smallest even k >= 2*ceil(log2 n) with "
         "n * P[Binomial(k, 1 - dropout) < t] <= 2**-20, i.e. a round fails for lack of surviving share holders "
         "with probability at most about one in a million. With 30 % dropouts and t above half the neighbourhood "
         "this needs k around 200 (growing like log n), so SecAgg+ only saves work from a few hundred clients on; "
         "without dropouts k = 2*ceil(log2 n) suffices."),
        "",
        "Raw numbers: `secagg.json` next to this file.", "",
    ]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n in {10, 30, 100} only, short scaling run")
    ap.add_argument("--ns", type=int, nargs="+", default=None, help="client counts (default 10 30 100 300 1000)")
    ap.add_argument("--length", type=int, default=10_000, help="vector length in field elements (default 10,000)")
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.3, 0.0],
                    help="dropout rates after the key exchange (default 0.3 0)")
    ap.add_argument("--threshold", type=float, default=0.5, help="SecAggParams.threshold (default 0.5)")
    ap.add_argument("--skip", nargs="*", default=["complete:1000:0"],
                    help="graph:n:dropout runs to leave out (default complete:1000:0, see the output)")
    ap.add_argument("--scaling-n", type=int, default=100, help="clients of the per-element scaling runs")
    ap.add_argument("--scaling-lengths", type=int, nargs="*", default=None,
                    help="vector lengths of the scaling runs (default 1000 10000 100000; quick 1000 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="output prefix (default benchmarks/results/secagg; --quick writes nothing unless given)")
    args = ap.parse_args()
    args.ns = args.ns or ([10, 30, 100] if args.quick else [10, 30, 100, 300, 1000])
    args.scaling_lengths = args.scaling_lengths if args.scaling_lengths is not None else (
        [1000, 10_000] if args.quick else [1000, 10_000, 100_000])
    args.skip = set(args.skip)

    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "command": " ".join(["python benchmarks/secagg.py", *sys.argv[1:]]),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "length": args.length, "threshold": args.threshold, "seed": args.seed,
    }
    res["rows"], res["skipped"] = grid(args)
    res["scaling"] = scaling(args)
    res["total_s"] = time.perf_counter() - t_start

    print(table(res["rows"]))
    print()
    print(scaling_table(res["scaling"]))
    out = args.out if args.out is not None else (None if args.quick else HERE / "results" / "secagg")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.md").write_text(markdown(res))
        Path(f"{out}.json").write_text(json.dumps(res, indent=1))
        log(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
