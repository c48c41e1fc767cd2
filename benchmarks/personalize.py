"""Personalization (issue 23): does each owner's own model beat what it can do alone, and does the shared model?

For each setting and seed: local-only (every owner trains alone), then federated training with each personalization
method (fedper: the head stays at the owner; ditto; finetune: a local pass on the final global model). Each owner's
model is scored on the owner's own test split: the mean over owners and the worst owner. The shared global model is
scored on the global test set beside local-only's models.

    python benchmarks/personalize.py                                     # README demo split + two classes per owner
    python benchmarks/personalize.py --settings lm-novels --personal finetune --name personalize_lm
    python benchmarks/personalize.py --quick --out /tmp/p                # the test suite's run

Writes benchmarks/results/<name>.md and .json (command, machine, date, every run), after every setting.
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

# setting -> (config, overrides, the figure owners compare on, whether higher is better)
SETTINGS = {
    "demo (Dirichlet 0.5)": ("configs/demo_tweets_lora.yaml", [], "accuracy", True),
    "two classes per owner": ("configs/label_pure_tweets.yaml", ["data.classes_per_client=2", "recipe=label_skew"],
                              "accuracy", True),
    "label-pure": ("configs/label_pure_tweets.yaml", ["recipe=label_skew"], "accuracy", True),
    # language models, one owner per novel (Jane Austen's six): the from-scratch pre-training config with FedAvg outer
    # steps (501 against DiLoCo's 592 in pretrain.md) and a fine-tuning pass of one round's local steps (50)
    "lm-novels": ("configs/pretrain_austen.yaml", ["strategy.name=fedavg", "strategy.server_lr=1.0",
                                                   "personal.finetune_steps=50"], "perplexity", False),
}
PERSONAL = ["finetune", "fedper", "ditto"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["demo (Dirichlet 0.5)", "two classes per owner", "label-pure"],
                    choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--personal", nargs="+", default=PERSONAL, choices=PERSONAL)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--name", default="personalize", help="result file stem")
    add_quick_args(ap, "the two-class tweets split on 240 tweets, 1 round, finetune only")
    args = ap.parse_args()
    if args.quick:
        args.settings, args.seeds, args.personal = ["two classes per owner"], [0], ["finetune"]
        args.overrides = [*QUICK_SETS, "rounds=1", "personal.finetune_steps=2", *args.overrides]
    out = results_dir(args)
    command, info, header = result_header("Personalization: each owner's model on its own test split",
                                          "benchmarks/personalize.py")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            for seed in args.seeds:
                runs += setting_runs(setting, seed, args, Path(tmp))
                write(runs, args, out, command, info, header)


def setting_runs(setting: str, seed: int, args, tmp: Path) -> list[dict]:
    """Local-only, then one federated run per personalization method, on one App (same data and model)."""
    path, sets, key, _ = SETTINGS[setting]
    out, app = [], None
    for method in ["local", *args.personal]:
        extra = ["personal.method=none"] if method == "local" else [f"personal.method={method}"]
        if method == "fedper" and "recipe=label_skew" in sets:  # FedETF fixes the head: the owner keeps its adapter
            extra.append("personal.keep=[lora_]")
        name = f"r{len(list(tmp.iterdir()))}"
        cfg = config.load(path, [*sets, f"seed={seed}", *args.overrides, *extra, f"output_dir={tmp}", f"name={name}",
                                 f"compare.methods=[{'local' if method == 'local' else 'federated'}]"])
        if app is None:
            app = App(cfg)
        app.cfg = cfg
        t0 = time.perf_counter()
        run_dir = tmp / name / ("local" if method == "local" else "federated")
        summary = server.run_method(app, "local" if method == "local" else "federated", run_dir)
        own = [c["own"][key] for c in summary["per_client"] if c["n_test"] and c["own"] is not None]
        row = {"setting": setting, "seed": seed, "method": method, "key": key, "global": summary["global"][key],
               "own_mean": float(np.mean(own)), "own_each": own, "seconds": time.perf_counter() - t0}
        if method != "local":
            mine = [c[key] for c in summary["personal"]["per_client"] if np.isfinite(c.get(key, np.nan))]
            row.update(personal_mean=float(np.mean(mine)), personal_each=mine)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def write(runs: list[dict], args, out, command: str, info: dict, header: list[str]) -> None:
    seeds = sorted({r["seed"] for r in runs})
    lines = [*header, "- setup: each setting's config (all-MiniLM-L6-v2 + LoRA r=8 on tweets; for lm-novels "
             "configs/pretrain_austen.yaml, a 5.8M-parameter Llama pre-trained from scratch, one owner per novel). "
             "`own` = each owner's model on the owner's own test split: mean over owners / worst owner (lowest "
             "accuracy, highest perplexity); `global` = the model on the global test set "
             "(local-only: the mean of the owners' models). Numbers are means over seeds.", ""]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        sel = [r for r in runs if r["setting"] == setting]
        key, higher = SETTINGS[setting][2], SETTINGS[setting][3]
        fmt = (lambda x: f"{100 * x:.1f}%") if key == "accuracy" else (lambda x: f"{x:.2f}")
        worst = min if higher else max
        lines += [f"## {setting} ({key}, seeds {', '.join(map(str, seeds))})", "",
                  "| model | own (mean) | own (worst owner) | global test |", "|---|---|---|---|"]

        def row(label: str, rs: list[dict], own: str, each: str, glob: bool) -> str:
            mean = np.mean([r[own] for r in rs])
            w = np.mean([worst(r[each]) for r in rs])
            g = fmt(np.mean([r["global"] for r in rs])) if glob else "—"
            return f"| {label} | {fmt(mean)} | {fmt(w)} | {g} |"

        local = [r for r in sel if r["method"] == "local"]
        fed = [r for r in sel if r["method"] != "local"]
        lines.append(row("local-only", local, "own_mean", "own_each", True))
        for m in dict.fromkeys(r["method"] for r in fed):
            rs = [r for r in fed if r["method"] == m]
            lines.append(row(f"global model (federated, trained with {m})", rs, "own_mean", "own_each", True))
            lines.append(row(f"**personalized: {m}**", rs, "personal_mean", "personal_each", False))
        lines.append("")
    md = "\n".join(lines) + "\n"
    print(md, flush=True)
    write_results(out, args.name, md, {"command": command, "machine": info, "runs": runs})


if __name__ == "__main__":
    main()
