"""Cheap and robust updates, measured: compression codecs, LoRA aggregation, attacks and defences, faults.

Every variant is one federated run of configs/bench_updates_bbc.yaml (MiniLM + LoRA r=8 on BBC News, 10
owners, Dirichlet label skew) with a few overrides; two runs at a time, one torch thread each.

    OMP_NUM_THREADS=1 python benchmarks/updates.py --suite compression      # bytes per round vs accuracy
    OMP_NUM_THREADS=1 python benchmarks/updates.py --suite attacks          # 20% Byzantine clients vs defences
    OMP_NUM_THREADS=1 python benchmarks/updates.py --suite lora             # exact / heterogeneous-rank LoRA
    OMP_NUM_THREADS=1 python benchmarks/updates.py --suite faults           # dropouts, stragglers, SCAFFOLD
    ... --only NAME [--only NAME]   run some variants of a suite (rows are merged into the existing results)
    ... --render                    rewrite the .md from the .json
    python benchmarks/updates.py --suite attacks --quick --out /tmp/updates   # 2 variants on a sliver (tests)

Writes benchmarks/results/updates_<suite>.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, add_quick_args, result_header, results_dir  # noqa: E402

CONFIG = "configs/bench_updates_bbc.yaml"
# --quick: 2 rounds over 5 owners (one of them Byzantine in the attacks suite) on a sliver of BBC
QUICK = [*QUICK_SETS, "rounds=2", "federation.num_clients=5"]
EF = "compression.error_feedback"

SUITES: dict[str, dict[str, list[str]]] = {
    "compression": {
        "full fine-tuning": ["peft.method=none", "train.lr=1e-4"],
        "LoRA": [],
        "LoRA + fp16": ["compression.up=[fp16]"],
        "LoRA + int8": ["compression.up=[int8]"],
        "LoRA + int4": ["compression.up=[int4]"],
        "LoRA + top-k 10% + EF": ["compression.up=[topk]", "compression.topk_fraction=0.1"],
        "LoRA + top-k 1% + EF": ["compression.up=[topk]", "compression.topk_fraction=0.01"],
        "LoRA + top-k 1%, no EF": ["compression.up=[topk]", "compression.topk_fraction=0.01", f"{EF}=false"],
        "LoRA + top-k 1% + int8 + EF": ["compression.up=[topk,int8]", "compression.topk_fraction=0.01"],
        "LoRA + top-k 1% + int4 + EF": ["compression.up=[topk,int4]", "compression.topk_fraction=0.01"],
        "LoRA + top-k 3% + int4 + EF": ["compression.up=[topk,int4]", "compression.topk_fraction=0.03"],
        "LoRA + int8, bf16 broadcast": ["compression.up=[int8]", "compression.down=bf16"],
        "LoRA + sign + EF": ["compression.up=[sign]"],
        "LoRA + sign, no EF": ["compression.up=[sign]", f"{EF}=false"],
        "LoRA + random 25% + sign + EF": ["compression.up=[randk,sign]", "compression.topk_fraction=0.25"],
        "LoRA + random 10% + sign + EF": ["compression.up=[randk,sign]", "compression.topk_fraction=0.1"],
        "LoRA rank 2": ["peft.options.r=2", "peft.options.lora_alpha=4"],
        "LoRA rank 2 + sign + EF": ["peft.options.r=2", "peft.options.lora_alpha=4", "compression.up=[sign]",
                                    "compression.block_size=1024"],
    },
    "attacks": {
        "clean / fedavg": [],
        "clean / median": ["strategy.name=median"],
        "clean / trimmed_mean": ["strategy.name=trimmed_mean"],
        "clean / krum": ["strategy.name=krum"],
        "clean / multi-krum": ["strategy.name=krum", "strategy.multikrum_m=null"],
        "clean / normbound": ["strategy.name=normbound"],
        "sign_flip / fedavg": ["attack.kind=sign_flip"],
        "sign_flip / median": ["attack.kind=sign_flip", "strategy.name=median"],
        "sign_flip / trimmed_mean": ["attack.kind=sign_flip", "strategy.name=trimmed_mean"],
        "sign_flip / krum": ["attack.kind=sign_flip", "strategy.name=krum"],
        "sign_flip / multi-krum": ["attack.kind=sign_flip", "strategy.name=krum", "strategy.multikrum_m=null"],
        "scaling / fedavg": ["attack.kind=scaling"],
        "scaling / median": ["attack.kind=scaling", "strategy.name=median"],
        "scaling / trimmed_mean": ["attack.kind=scaling", "strategy.name=trimmed_mean"],
        "scaling / krum": ["attack.kind=scaling", "strategy.name=krum"],
        "scaling / multi-krum": ["attack.kind=scaling", "strategy.name=krum", "strategy.multikrum_m=null"],
        "scaling / normbound": ["attack.kind=scaling", "strategy.name=normbound"],
        "scaling / fedavg + norm screening": ["attack.kind=scaling", "federation.max_norm_ratio=5"],
        "scaling x1000 / fedavg": ["attack.kind=scaling", "attack.scale=1000"],
        "scaling x1000 / median": ["attack.kind=scaling", "attack.scale=1000", "strategy.name=median"],
        "scaling x1000 / trimmed_mean": ["attack.kind=scaling", "attack.scale=1000", "strategy.name=trimmed_mean"],
        "scaling x1000 / krum": ["attack.kind=scaling", "attack.scale=1000", "strategy.name=krum"],
        "scaling x1000 / multi-krum": ["attack.kind=scaling", "attack.scale=1000", "strategy.name=krum",
                                       "strategy.multikrum_m=null"],
        "scaling x1000 / normbound": ["attack.kind=scaling", "attack.scale=1000", "strategy.name=normbound"],
        "noise / fedavg": ["attack.kind=noise"],
        "noise / median": ["attack.kind=noise", "strategy.name=median"],
        "label_flip / fedavg": ["attack.kind=label_flip"],
        "label_flip / trimmed_mean": ["attack.kind=label_flip", "strategy.name=trimmed_mean"],
        "backdoor, no attackers / fedavg": ["attack.kind=backdoor", "attack.fraction=0"],
        "backdoor / fedavg": ["attack.kind=backdoor"],
        "backdoor / median": ["attack.kind=backdoor", "strategy.name=median"],
        "backdoor / trimmed_mean": ["attack.kind=backdoor", "strategy.name=trimmed_mean"],
        "backdoor / multi-krum": ["attack.kind=backdoor", "strategy.name=krum", "strategy.multikrum_m=null"],
        "backdoor / normbound": ["attack.kind=backdoor", "strategy.name=normbound"],
        "backdoor boosted x10 / fedavg": ["attack.kind=backdoor", "attack.scale=10"],
        "backdoor boosted x10 / median": ["attack.kind=backdoor", "attack.scale=10", "strategy.name=median"],
        "backdoor boosted x10 / trimmed_mean": ["attack.kind=backdoor", "attack.scale=10", "strategy.name=trimmed_mean"],
        "backdoor boosted x10 / normbound": ["attack.kind=backdoor", "attack.scale=10", "strategy.name=normbound"],
    },
    "lora": {
        "rank 8, separate A/B mean": [],
        "rank 8, exact (SVD)": ["strategy.lora_aggregation=exact"],
        "rank 2 everywhere": ["peft.options.r=2", "peft.options.lora_alpha=4"],
        "ranks 2/4/8, hetlora (padding)": ["federation.lora_ranks=[2,4,8]", "strategy.lora_aggregation=hetlora"],
        "ranks 2/4/8, flexlora (SVD)": ["federation.lora_ranks=[2,4,8]", "strategy.lora_aggregation=flexlora"],
    },
    "faults": {
        "no faults": [],
        "30% dropout": ["federation.dropout=0.3", "federation.min_clients=3"],
        "30% dropout + stragglers (deadline)": [
            "federation.dropout=0.3", "federation.min_clients=3", "federation.slowness_spread=0.5",
            "federation.deadline=1.5",
        ],
        "fedavg, alpha=0.1": ["data.alpha=0.1"],
        "scaffold, alpha=0.1": ["data.alpha=0.1", "strategy.name=scaffold"],
        "fedavg, alpha=0.1, 8 rounds x 5 steps": ["data.alpha=0.1", "rounds=8", "train.local_steps=5"],
        "scaffold, alpha=0.1, 8 rounds x 5 steps": ["data.alpha=0.1", "rounds=8", "train.local_steps=5",
                                                    "strategy.name=scaffold"],
    },
}


def run_variant(args: tuple[str, list[str], str, list[str]]) -> dict:
    """One federated run in a fresh process (one torch thread); the row of the table."""
    name, overrides, config_path, common = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fedfm import config, server

    out = Path(tempfile.mkdtemp(prefix="fedfm-updates-"))
    cfg = config.load(config_path, [*common, *overrides, f"output_dir={out}", "name=run", "engine.threads=1"])
    t0 = time.perf_counter()
    run_dir = server.run(cfg)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = sum(len(r["clients"]) for r in records)
    row = {
        "variant": name,
        "overrides": overrides,
        "rounds": len(records),
        "accuracy": summary["global"]["accuracy"],
        "macro_f1": summary["global"]["macro_f1"],
        "bytes_up_per_update": sum(r["bytes_up"] for r in records) / max(1, updates),
        "bytes_up_per_round": sum(r["bytes_up"] for r in records) / len(records),
        "bytes_down_per_round": sum(r["bytes_down"] for r in records) / len(records),
        "updates": updates,
        "rejected": sum(len(r["rejected"]) for r in records),
        "dropped": sum(len(r.get("dropped", [])) for r in records),
        "stragglers": sum(len(r.get("stragglers", [])) for r in records),
        "rejected_reasons": sorted({x["reason"].split(" is ")[0][:60] for r in records for x in r["rejected"]})[:3],
        "wall_s": wall,
    }
    if "backdoor_success" in summary["global"]:
        row["backdoor_success"] = summary["global"]["backdoor_success"]
    gaps = [r[k] for r in records for k in ("lora_product_gap", "lora_truncation_error") if r.get(k) is not None]
    if gaps:
        row["lora_gap_mean"] = sum(gaps) / len(gaps)
    if "client_states" in summary:
        row["client_states"] = summary["client_states"]
    return row


def check_variants(config_path: str, common: list[str]) -> None:
    """Load every variant of every suite as a config: a renamed key or value fails before anything runs."""
    from fedfm import config

    for variants in SUITES.values():
        for overrides in variants.values():
            config.load(config_path, [*common, *overrides])


def render(suite: str, header: list[str], rows: list[dict]) -> str:
    lines = list(header)
    by = {r["variant"]: r for r in rows}
    if suite == "compression":
        ref = by.get("LoRA")
        lines += [
            "", "Bytes are the lengths of the serialized messages (safetensors), counted by the engine; 'uplink / update' "
            "is one client's message, 'x fewer' compares it with uncompressed LoRA's. Accuracy: global test split "
            "(445 articles), final model.", "",
            "| variant | accuracy | macro-F1 | Δ acc vs LoRA (points) | uplink / update (bytes) | x fewer than LoRA | "
            "downlink / round | wall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            d = (r["accuracy"] - ref["accuracy"]) * 100 if ref else float("nan")
            x = ref["bytes_up_per_update"] / r["bytes_up_per_update"] if ref else float("nan")
            lines.append(
                f"| {r['variant']} | {r['accuracy']:.1%} | {r['macro_f1']:.1%} | {d:+.1f} | {r['bytes_up_per_update']:,.0f} | "
                f"{x:.1f} | {r['bytes_down_per_round']:,.0f} | {r['wall_s']:.0f} s |"
            )
    elif suite == "attacks":
        lines += [
            "", "20% of the 10 owners are Byzantine (the same 2 in every run); every owner takes part in every round. "
            "'vs clean' compares with the clean run of the same aggregator; backdoor success: share of triggered "
            "test articles of other classes classified as the target class.", "",
            "| attack / aggregator | accuracy | vs clean fedavg (points) | vs clean, same aggregator | backdoor success | "
            "rejected updates |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            attack, agg = r["variant"].split(" / ")
            clean = by.get("clean / fedavg")
            same = by.get(f"clean / {agg.split(' + ')[0]}")
            d = (r["accuracy"] - clean["accuracy"]) * 100 if clean else float("nan")
            ds = (r["accuracy"] - same["accuracy"]) * 100 if same else float("nan")
            bd = f"{r['backdoor_success']:.1%}" if "backdoor_success" in r else "—"
            lines.append(f"| {r['variant']} | {r['accuracy']:.1%} | {d:+.1f} | {ds:+.1f} | {bd} | {r['rejected']} |")
    else:
        lines += [
            "", "| variant | accuracy | macro-F1 | uplink / update (bytes) | updates aggregated | dropped | stragglers | "
            "LoRA gap or truncation (mean) | wall |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            gap = f"{r['lora_gap_mean']:.3f}" if "lora_gap_mean" in r else "—"
            lines.append(
                f"| {r['variant']} | {r['accuracy']:.1%} | {r['macro_f1']:.1%} | {r['bytes_up_per_update']:,.0f} | "
                f"{r['updates']} | {r['dropped']} | {r['stragglers']} | {gap} | {r['wall_s']:.0f} s |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", dest="common", action="append", default=[], help="override for every variant")
    ap.add_argument("--only", action="append", default=[], help="run only these variants (merged into the results)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--name", help="results file name (default updates_<suite>)")
    add_quick_args(ap, "the suite's first 2 variants (every suite's variants are still loaded as configs), "
                   "240 articles over 5 owners, 2 rounds of 1 local step")
    args = ap.parse_args()
    if args.quick:
        args.common = [*QUICK, *args.common]
        check_variants(args.config, args.common)
    out = results_dir(args)
    path = out / f"{args.name or 'updates_' + args.suite}.json" if out else None
    old = json.loads(path.read_text()) if path and path.exists() else {"rows": []}
    if args.render:
        path.with_suffix(".md").write_text(render(args.suite, old["header"], old["rows"]))
        return
    variants = SUITES[args.suite]
    unknown = [v for v in args.only if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(variants)}")
    chosen = args.only or list(variants)[: 2 if args.quick else None]
    command, info, header = result_header(f"Cheap and robust updates: {args.suite}", "benchmarks/updates.py")
    header += [f"- config: `{args.config}`" + (f" with {' '.join(args.common)}" if args.common else ""),
               "- two runs at a time, one torch thread each (wall times are for comparison within this table only)"]
    if args.only and old.get("header"):  # rows added to an existing table: keep its header, record this command
        header = [*old["header"], f"- rows {', '.join(chosen)} added on {info['date']} by `{command}`"]
    jobs = [(v, variants[v], args.config, args.common) for v in chosen]
    rows = {r["variant"]: r for r in old["rows"]}
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        for row in pool.map(run_variant, jobs):
            rows[row["variant"]] = row
            print(f"{row['variant']}: acc {row['accuracy']:.3f} up/update {row['bytes_up_per_update']:,.0f} B "
                  f"wall {row['wall_s']:.0f}s", flush=True)
            ordered = [rows[v] for v in variants if v in rows]
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": header, "machine": info, "rows": ordered}, indent=1))
            path.with_suffix(".md").write_text(render(args.suite, header, ordered))


if __name__ == "__main__":
    main()
