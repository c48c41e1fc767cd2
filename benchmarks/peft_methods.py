"""Bytes per round and quality of the tuning methods on one task: prompt tuning, prefix tuning, P-tuning, LoRA,
(IA3) and full fine-tuning, each trained federated with the same config, rounds and local steps.

With ``--local`` the first method is also trained by each owner alone (same steps) and every owner's held-out
split is scored three ways: the untuned model (the LoRA run's starting point, B = 0, is exactly the pretrained
model), local-only tuning, and the federated model.

    python benchmarks/peft_methods.py --config configs/instruct_foldoc.yaml --local --name instruction
    python benchmarks/peft_methods.py --config configs/prompt_tweets.yaml --name prompt_tuning_classification
    python benchmarks/peft_methods.py --quick --out /tmp/peft   # configs/smoke.yaml, 2 clients, 1 round, --local (tests)

Bytes are the serialized messages the embedded engine carried (safetensors of the trainable tensors), per
client and round, each way. Writes benchmarks/results/<name>.md and .json (or under --out); rows are saved after
every run, and ``--methods`` re-runs only those (the other rows are kept from an earlier <name>.json).
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
from fedfm.app import App  # noqa: E402

SMOKE = "configs/smoke.yaml"
METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning", "lora", "ia3", "none")
LABEL = {"prompt_tuning": "prompt tuning", "prefix_tuning": "prefix tuning", "p_tuning": "P-tuning", "lora": "LoRA",
         "ia3": "IA3", "none": "full fine-tuning"}


def quality_keys(task: str) -> list[tuple[str, str, bool]]:
    """(metric key, column label, as percentage) of the task's headline metrics."""
    if task == "instruction":
        return [("rougeL", "ROUGE-L", True), ("exact_match", "exact match", True), ("perplexity", "response perplexity", False)]
    return [("accuracy", "accuracy", True), ("macro_f1", "macro-F1", True)]


def fmt(x, pct: bool) -> str:
    return "—" if x is None else f"{100 * x:.1f}%" if pct else f"{x:.2f}"


def run_method(args, method: str, tmp: Path) -> dict:
    extra = [o.split(":", 1)[1] for o in args.method_overrides if o.split(":", 1)[0] == method]
    if config.load(args.config, args.overrides).peft.method != method:  # the config's options belong to its own method
        extra.insert(0, "peft.options={}")
    cfg = config.load(args.config, [*args.overrides, f"peft.method={method}", *extra, f"output_dir={tmp}", f"name={method}"])
    t0 = time.perf_counter()
    app = App(cfg)
    summary = server.run_method(app, "federated", tmp / method)
    metrics = [json.loads(line) for line in (tmp / method / "metrics.jsonl").read_text().splitlines()]
    per_client = metrics[0]["bytes_up"] / max(1, metrics[0]["sampled"])
    row = {
        "method": method,
        "trainable_params": app.trainable_params,
        "bytes_up_per_client_round": per_client,
        "bytes_down_per_client_round": metrics[0]["bytes_down"] / max(1, metrics[0]["sampled"]),
        "bytes_total": summary["bytes_total"],
        "global": summary["global"],
        "own_mean": summary["own_mean"],
        "lr": cfg.train.lr,
        "seconds": time.perf_counter() - t0,
    }
    if args.local and method == args.methods[0]:
        row["per_owner"] = per_owner(app, tmp)
    return row


def per_owner(app: App, tmp: Path) -> list[dict]:
    """Each owner's held-out split: untuned model, local-only tuning, federated model."""
    fed = json.loads((tmp / app.cfg.peft.method / "summary.json").read_text())
    local = server.run_method(app, "local", tmp / f"{app.cfg.peft.method}-local")
    n = len(app.split.client_names)
    untuned = [app.client_evaluate(i, app.initial_weights) for i in range(n)]
    return [
        {"owner": app.shards[i].name, "n_train": len(app.shards[i].train), "n_test": len(app.shards[i].test),
         "untuned": untuned[i], "local": local["per_client"][i]["own"], "federated": fed["per_client"][i]["own"]}
        for i in range(n)
    ]


def write(rows: list[dict], args, earlier_commands: list[str], recorded: dict | None = None) -> None:
    """The results files; ``recorded`` (a <name>.json read back) keeps its command, machine and date (--render)."""
    command, info, lines = result_header(f"Tuning methods: bytes per round and quality ({args.config})", "benchmarks/peft_methods.py")
    if recorded is not None:
        command, info = recorded["command"], recorded["machine"]
        lines[2:5] = [f"- command: `{command}`", f"- machine: {info['summary']}", f"- date: {info['date']}"]
    if earlier_commands:  # rows kept from earlier runs of this benchmark: every command that produced a row
        lines[2] = "- commands: " + ", then ".join(f"`{c}`" for c in [*earlier_commands, command])
    cfg = config.load(args.config, args.overrides)
    keys = quality_keys(cfg.task)
    lines += [
        f"- setup: `{args.config}`: task {cfg.task}, model {cfg.model.source}, data {cfg.data.source} "
        f"({cfg.data.partition} partition), {cfg.rounds} rounds x {cfg.train.local_steps or cfg.train.local_epochs} "
        f"local {'steps' if cfg.train.local_steps else 'epochs'} of batch {cfg.train.batch_size}, every client every round; "
        "peft options are fedfm's defaults (LoRA r=8, alpha 16 on the attention query/value projections; 20 virtual "
        "tokens for prompt, prefix and P-tuning, P-tuning's MLP encoder of width 128; the classifier head, if any, "
        "trains and travels with every method); "
        f"soft prompts initialised from text: {cfg.peft.init_text!r}.",
        "",
        "| method | trainable params | bytes up per client per round | vs LoRA | "
        + " | ".join(f"global {label}" for _, label, _ in keys) + " | own-split " + keys[0][1] + " | lr | wall time |",
        "|---|---:|---:|---:|" + "---:|" * (len(keys) + 3),
    ]
    lora = next((r["bytes_up_per_client_round"] for r in rows if r["method"] == "lora"), None)
    for r in sorted(rows, key=lambda r: METHODS.index(r["method"])):
        ratio = f"{lora / r['bytes_up_per_client_round']:.1f}x fewer" if lora and r["method"] != "lora" else "—"
        if lora and r["bytes_up_per_client_round"] > lora:
            ratio = f"{r['bytes_up_per_client_round'] / lora:.1f}x more"
        lines.append(
            f"| {LABEL[r['method']]} | {r['trainable_params']:,} | {r['bytes_up_per_client_round']:,.0f} | {ratio} | "
            + " | ".join(fmt(r["global"].get(k), pct) for k, _, pct in keys)
            + f" | {fmt(r['own_mean'].get(keys[0][0]), keys[0][2])} | {r['lr']:g} | {r['seconds'] / 60:.1f} min |"
        )
    lines += ["", "Bytes down per client per round equal bytes up (the same tensors travel both ways).", ""]
    owners = next((r for r in rows if "per_owner" in r), None)
    if owners:
        lines += [
            f"## Per owner ({LABEL[owners['method']]}): untuned vs local-only vs federated, on each owner's held-out split",
            "",
            "| owner | train / test | " + " | ".join(f"{label}: untuned / local / federated" for _, label, _ in keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for o in owners["per_owner"]:
            cells = [" / ".join(fmt(o[m].get(k), pct) for m in ("untuned", "local", "federated")) for k, _, pct in keys]
            lines.append(f"| {o['owner']} | {o['n_train']} / {o['n_test']} | " + " | ".join(cells) + " |")
        mean = {m: {k: sum(o[m][k] for o in owners["per_owner"]) / len(owners["per_owner"]) for k, _, _ in keys}
                for m in ("untuned", "local", "federated")}
        lines.append("| **mean** | | " + " | ".join(
            " / ".join(fmt(mean[m][k], pct) for m in ("untuned", "local", "federated")) for k, _, pct in keys) + " |")
        lines.append("")
    print("\n".join(lines), flush=True)
    if args.out is None:
        return
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"command": command, "earlier_commands": earlier_commands, "machine": info, "rows": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help=f"run config (required; --quick: {SMOKE})")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=["lora", "prompt_tuning", "prefix_tuning", "p_tuning", "none"],
                    help="the first one also gets the per-owner comparison with --local")
    ap.add_argument("--local", action="store_true", help="per-owner table: untuned vs local-only vs federated")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--method-set", dest="method_overrides", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="an override for one method only, e.g. prompt_tuning:train.lr=0.03 (each method's learning rate)")
    ap.add_argument("--name", help="results file stem (required; --quick: peft_methods)")
    ap.add_argument("--render", action="store_true", help="only rewrite <name>.md from <name>.json (no training)")
    add_quick_args(ap, f"{SMOKE} on 240 articles over 2 clients, 1 round of 1 local step, with --local")
    args = ap.parse_args()
    if args.quick:
        args.config, args.name, args.local = args.config or SMOKE, args.name or "peft_methods", True
        args.overrides = [*QUICK_SETS, "rounds=1", "federation.num_clients=2", *args.overrides]
    if not (args.config and args.name):
        ap.error("--config and --name are required (unless --quick)")
    args.out = results_dir(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    earlier = args.out / f"{args.name}.json" if args.out else None
    old = json.loads(earlier.read_text()) if earlier and earlier.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["method"] not in args.methods]
    earlier_commands = [*old.get("earlier_commands", []), old["command"]] if rows else []
    if args.render:
        return write(old["rows"], args, old.get("earlier_commands", []), old)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows.append(run_method(args, method, Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_owner"}), flush=True)
            write(rows, args, earlier_commands)


if __name__ == "__main__":
    main()
