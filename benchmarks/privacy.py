"""Privacy benchmark: privacy-utility table of client-level DP-FedAvg, and a membership-inference audit.

    python benchmarks/privacy.py                                   # everything (about an hour on 2 CPU cores)
    python benchmarks/privacy.py --noise 1.0 --shadows 0           # quicker: one DP level, loss-threshold audit
    python benchmarks/privacy.py --work /tmp/privacy               # keep run directories (reruns reuse finished ones)
    python benchmarks/privacy.py --quick --out /tmp/privacy        # 10 owners, 240 tweets, 1 round, z=1 (tests)

1. Privacy-utility: configs/dp_tweets.yaml (300 tweet owners, Poisson sampling q=0.2, 20 rounds, adaptive
   clipping) without DP and with each noise multiplier in --noise; epsilon (delta 1e-5, dp-accounting RDP)
   against global test accuracy.
2. Audit: `fedfm audit` (loss-threshold and offline LiRA with --shadows shadow federations) on the no-DP
   run and on the run with --audit-noise. Target (issue 4): AUC <= 0.55 at client-level epsilon <= 8.

Writes benchmarks/results/privacy.md and privacy.json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, add_quick_args, result_header, results_dir  # noqa: E402

from fedfm import config, server  # noqa: E402
from fedfm.privacy.audit import audit_membership  # noqa: E402

# --quick: 10 owners sampled with q=0.5, 1 round (a round needs 2 reports); the adaptive clip's count noise is set,
# its default (expected clients / 20) is too small for z=1 with 5 expected clients
QUICK = [*QUICK_SETS, "rounds=1", "federation.num_clients=10", "federation.fraction=0.5", "federation.min_clients=2",
         "dp.clip_count_stddev=1.0"]


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("status") == "complete"


def train(cfg_path: str, z: float | None, work: Path, extra: list[str]) -> tuple[Path, float]:
    """One federated run (z=None: no DP); reuses a finished run directory of the same name."""
    name = "no-dp" if z is None else f"z{z:g}"
    run_dir = work / name
    overrides = [*extra, "dp.mode=off"] if z is None else [*extra, f"dp.noise_multiplier={z}"]
    t0 = time.perf_counter()
    if not finished(run_dir):
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        server.run(config.load(cfg_path, overrides), "federated", run_dir)
    return run_dir, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/dp_tweets.yaml")
    ap.add_argument("--noise", nargs="*", type=float, default=None, help="noise multipliers (default 1.0 1.5; --quick 1.0)")
    ap.add_argument("--audit-noise", type=float, default=1.0, help="DP run audited beside the no-DP run")
    ap.add_argument("--shadows", type=int, default=1)
    ap.add_argument("--per-side", type=int, default=None, help="audited members and non-members (default 1000; --quick 40)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", type=Path, default=None, help="keep run directories here")
    add_quick_args(ap, "240 tweets over 10 owners, 1 round, z in {none, 1.0}, 40 + 40 audited examples")
    args = ap.parse_args()
    args.noise = args.noise if args.noise is not None else ([1.0] if args.quick else [1.0, 1.5])
    args.per_side = args.per_side or (40 if args.quick else 1000)
    if args.quick:
        args.overrides = [*QUICK, *args.overrides]
    args.out = results_dir(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="fedfm-privacy-"))
    rows, audits = [], []
    for z in [None, *args.noise]:
        run_dir, seconds = train(args.config, z, work, args.overrides)
        summary = json.loads((run_dir / "summary.json").read_text())
        dp = summary.get("client_dp", {})
        rows.append(
            {
                "noise_multiplier": z,
                "epsilon": dp.get("epsilon"),
                "delta": dp.get("delta"),
                "rounds": summary["rounds"],
                "accuracy": summary["global"]["accuracy"],
                "macro_f1": summary["global"]["macro_f1"],
                "seconds": seconds,
                "run_dir": str(run_dir),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        write(rows, audits, args)
    for z in (None, args.audit_noise):
        run_dir = work / ("no-dp" if z is None else f"z{z:g}")
        result = audit_membership(run_dir, shadows=args.shadows, per_side=args.per_side)
        audits.append({"noise_multiplier": z, **result})
        print(json.dumps(audits[-1]), flush=True)
        write(rows, audits, args)


def write(rows: list[dict], audits: list[dict], args) -> None:
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    command, info, lines = result_header("Privacy: client-level DP-FedAvg, privacy-utility and membership inference", "benchmarks/privacy.py")
    cfg = config.load(args.config, args.overrides)
    eps = lambda e: "∞ (no DP)" if e is None else f"{e:.2f}"  # noqa: E731
    lines += [
        f"- setup: `{args.config}`: {cfg.data.source}, {cfg.data.max_examples} examples, {cfg.federation.num_clients} clients "
        f"(Dirichlet alpha={cfg.data.alpha}), Poisson client sampling q={cfg.federation.fraction}, {cfg.rounds} rounds x "
        f"{cfg.train.local_steps} local steps, MiniLM + LoRA r={cfg.peft.options.get('r')}; DP: central noise, adaptive "
        f"clipping (initial C={cfg.dp.clip_norm}, target quantile {cfg.dp.target_quantile}); epsilon at delta={cfg.dp.delta} "
        "from dp-accounting's RDP accountant (client-level: protects each owner's whole data).",
        "",
        "## Privacy-utility",
        "",
        "| noise multiplier z | epsilon | accuracy (global test) | macro-F1 | wall time |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -1 if r["epsilon"] is None else 1 / max(r["epsilon"], 1e-9)):  # most private last
        z = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        lines.append(f"| {z} | {eps(r['epsilon'])} | {100 * r['accuracy']:.1f}% | {100 * r['macro_f1']:.1f}% | {r['seconds']:.0f} s |")
    if audits:
        lines += [
            "",
            "## Membership inference (members: clients' training examples; non-members: the global test split)",
            "",
            "| run | epsilon | attack | ROC AUC | TPR @ 1% FPR | audited |",
            "|---|---|---|---|---|---|",
        ]
        for a in audits:
            run = "no DP" if a["noise_multiplier"] is None else f"DP z={a['noise_multiplier']:g}"
            for att in a["attacks"]:
                lines.append(
                    f"| {run} | {eps(a['epsilon'])} | {att['attack']} | {att['auc']:.3f} | {100 * att['tpr_at_1pct_fpr']:.1f}% | "
                    f"{a['members']} + {a['nonmembers']} |"
                )
        dp_aucs = [att["auc"] for a in audits if a["epsilon"] is not None and a["epsilon"] <= 8 for att in a["attacks"]]
        if dp_aucs:
            worst = max(dp_aucs)
            lines += ["", f"Target: AUC <= 0.55 at epsilon <= 8 — worst attack AUC {worst:.3f}: {'met' if worst <= 0.55 else 'MISSED'}."]
    (args.out / "privacy.md").write_text("\n".join(lines) + "\n")
    (args.out / "privacy.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows, "audits": audits}, indent=1))


if __name__ == "__main__":
    main()
