"""Federated continual learning: does replay or regularisation reduce forgetting, and at what cost?

Runs configs/continual_bbc.yaml (class-incremental BBC News: {business, entertainment} -> {politics, sports} ->
{tech}, an owner joining and one leaving) with each method over several seeds. Every method of one seed shares
one App (the same split, owners and initial model); reports ACC, BWT, FWT (mean ± sd over seeds), the replay
buffers' memory and the penalty's extra communication.

    OMP_NUM_THREADS=1 python benchmarks/continual.py                       # seeds 0 1 2, every variant
    OMP_NUM_THREADS=1 python benchmarks/continual.py --seeds 0 --name continual_tuning \\
        --variant ewc-1e4=continual.method=ewc,continual.penalty=1e4        # try another setting
    python benchmarks/continual.py --quick --out /tmp/continual      # seed 0, 3 owners, 1 round a stage (tests)

Writes benchmarks/results/<name>.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_SETS, RESULTS, add_quick_args, result_header, results_dir  # noqa: E402

from fedfm import config, server  # noqa: E402
from fedfm.app import App  # noqa: E402

TITLE = "Federated continual learning: class-incremental BBC News"
# name -> overrides of the config; the penalties are the best ACC of a sweep on seed 0 (results/continual_tuning.md)
VARIANTS = {
    "naive": ["continual.method=naive"],
    "replay (32/owner)": ["continual.method=replay", "continual.replay_size=32"],
    "ewc (1e4)": ["continual.method=ewc", "continual.penalty=1e4"],
    "l2sp (3)": ["continual.method=l2sp", "continual.penalty=3"],
    # merge settings: the best ACC of a sweep on seed 0 (results/continual_merge_tuning.md)
    "merge (mean, from the merged model)": ["continual.method=merge", "continual.merge=mean", "continual.stage_start=merged"],
}
# --quick: the same three stages, one round each, over 3 owners (client_2 joins at stage 2, client_0 leaves at 3)
QUICK_STAGES = ("continual.stages=[{rounds: 1, labels: [business, entertainment], clients: [0, 1]}, "
                "{rounds: 1, labels: [politics, sports]}, {rounds: 1, labels: [tech], clients: [1, 2]}]")
QUICK = [*QUICK_SETS, "federation.num_clients=3", "continual.fisher_examples=16", QUICK_STAGES]


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not overrides:
        raise SystemExit(f"--variant {text!r}: expected NAME=key=value[,key=value...]")
    return name, overrides.split(",")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/continual_bbc.yaml")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2; --quick: 0")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every variant")
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value,...: run these instead of the defaults")
    ap.add_argument("--name", default="continual")
    ap.add_argument("--render", action="store_true", help="only rewrite <name>.md from the rows of <name>.json")
    add_quick_args(ap, "seed 0, 240 articles over 3 owners, 1 round of 1 local step per stage")
    args = ap.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.quick:
        args.overrides = [*QUICK, *args.overrides]
    args.out = results_dir(args)
    if args.render:
        return render(args)
    variants = dict(parse_variant(v) for v in args.variant) if args.variant else VARIANTS
    command, info, header = result_header(TITLE, "benchmarks/continual.py")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:  # part of how it was run: the shared 2-core machine's torch jobs each take one thread
        command = f"OMP_NUM_THREADS={threads} {command}"
        header = [f"- command: `{command}`" if line.startswith("- command:") else line for line in header]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base = [f"seed={seed}", f"output_dir={tmp}", *args.overrides]
            app = App(config.load(args.config, base))
            for name, extra in variants.items():
                app.cfg = config.load(args.config, [*base, *extra])
                t0 = time.perf_counter()
                summary = server.run_method(app, "federated", Path(tmp) / f"{seed}-{len(rows)}")
                cl = summary["continual"]
                rows.append({
                    "seed": seed, "variant": name, "overrides": extra,
                    **{k: cl[k] for k in ("acc", "bwt", "fwt", "matrix", "initial")},
                    "global_accuracy": summary["global"]["accuracy"],
                    "replay": cl.get("replay"),
                    "extra_bytes_down": cl["bytes_down"], "extra_bytes_up": cl["bytes_up"],
                    "bytes_total": summary["bytes_total"],
                    "seconds": time.perf_counter() - t0,
                })
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("matrix", "initial")}), flush=True)
                write(rows, variants, args, command, info, header)


def render(args) -> None:
    """Rewrite the markdown of an earlier run (its command, machine and rows come from the JSON)."""
    saved = json.loads(((args.out or RESULTS) / f"{args.name}.json").read_text())
    rows, command, info = saved["rows"], saved["command"], saved["machine"]
    variants = {r["variant"]: r["overrides"] for r in rows}
    header = [f"# {TITLE}", "", f"- command: `{command}`", f"- machine: {info['summary']}", f"- date: {info['date']}"]
    write(rows, variants, args, command, info, header)


def _mean_sd(xs: list[float], scale: float = 100.0, signed: bool = False) -> str:
    a = np.asarray(xs, dtype=float) * scale
    f = "+.1f" if signed else ".1f"
    return f"{a.mean():{f}} ± {a.std(ddof=1):.1f}" if len(a) > 1 else f"{a.mean():{f}}"


def write(rows: list[dict], variants: dict, args, command: str, info: dict, header: list[str]) -> None:
    cfg = config.load(args.config, args.overrides)
    stages = " -> ".join("{" + ", ".join(st.labels or st.keys or []) + "}" for st in cfg.continual.stages)
    seeds = sorted({r["seed"] for r in rows})
    who = ", ".join(str(st.clients or "all") for st in cfg.continual.stages)
    setup = (
        f"- setup: `{args.config}`: {cfg.data.source}, stages {stages} of {[st.rounds for st in cfg.continual.stages]} "
        f"rounds, {cfg.federation.num_clients} owners ({cfg.data.partition} partition; who takes part: {who}), "
        f"{cfg.train.local_steps} local steps x batch {cfg.train.batch_size}, lr {cfg.train.lr} ({cfg.train.schedule}), "
        f"LoRA r={cfg.peft.options.get('r')} on {cfg.model.source}, max_length {cfg.data.max_length}; "
        f"seeds {' '.join(map(str, seeds))}."
    )
    lines = [
        *header,
        f"- load average at start (1, 5, 15 min): {info['load_avg_at_start']} (the machine is shared)",
        setup,
        "- variants: " + "; ".join(f"{n}: `{' '.join(o)}`" for n, o in variants.items()),
        "",
        "| variant | ACC (%) | BWT (points) | FWT (points) | learning acc. (%) | replay memory per owner | extra communication | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in variants:
        sel = [r for r in rows if r["variant"] == name]
        if not sel:
            continue
        mem = [r["replay"] for r in sel if r["replay"]]
        memory = (f"≤ {max(m['examples_max_per_owner'] for m in mem)} examples, ≤ "
                  f"{max(m['text_bytes_max_per_owner'] for m in mem) / 1024:.0f} KiB of text" if mem else "0")
        extra = np.mean([r["extra_bytes_down"] + r["extra_bytes_up"] for r in sel])
        share = extra / np.mean([r["bytes_total"] for r in sel])
        comm = f"{extra / 2**20:.1f} MiB (+{100 * share / (1 - share):.0f}%)" if extra else "0"
        lines.append(
            f"| {name} | {_mean_sd([r['acc'] for r in sel])} | {_mean_sd([r['bwt'] for r in sel], signed=True)} | "
            f"{_mean_sd([r['fwt'] for r in sel], signed=True)} | {_mean_sd([np.diag(r['matrix']).mean() for r in sel])} | "
            f"{memory} | {comm} | {np.mean([r['seconds'] for r in sel]):.0f} s |"
        )
    legend = (
        "ACC: mean over the 3 stages' test sets of the final model's accuracy; BWT: mean over the first two stages of "
        "(final accuracy - accuracy right after training that stage), negative = forgetting; FWT: mean over stages 2-3 "
        "of (accuracy before training the stage - the untrained model's), which class-incremental learning cannot make "
        "positive (a class never seen is never predicted); learning accuracy: mean over stages of the accuracy right "
        "after training the stage (the diagonal: what a method costs in plasticity). Mean ± sample sd over seeds. "
        "Extra communication: the "
        "Fisher exchange (the model down, a Fisher up, per owner) and the anchor/precision broadcast at stage starts, "
        "and its share of the run's other traffic."
    )
    lines += ["", legend, "", f"Accuracy matrices (row i: after stage i; column j: stage j's test set), seed {seeds[0]}:", ""]
    for name in variants:
        r = next((r for r in rows if r["variant"] == name and r["seed"] == seeds[0]), None)
        if r:
            lines.append(f"- {name}: " + " / ".join("[" + " ".join(f"{100 * x:.0f}" for x in row) + "]" for row in r["matrix"]))
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
