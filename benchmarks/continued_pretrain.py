"""Continued pre-training of a pretrained LM across owners: what it learns, what it forgets.

Issue 3: continue pre-training SmolLM2-135M on a federated domain corpus (configs/cpt_smollm2_shakespeare.yaml:
Shakespeare held by 3 owners) and report the perplexity change on each owner's own held-out text and on
general English (a seeded sample of Brown corpus paragraphs, tokenised and packed the same way).

    python benchmarks/continued_pretrain.py
    python benchmarks/continued_pretrain.py --set peft.method=none --name cpt_full   # full fine-tuning
    python benchmarks/continued_pretrain.py --quick --out /tmp/cpt   # 2 owners, 1 round of 1 step (tests)

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
from machine import add_quick_args, machine_info, results_dir  # noqa: E402

from fedfm import config, server  # noqa: E402
from fedfm.app import App  # noqa: E402
from fedfm.data.corpora import load_corpus  # noqa: E402
from fedfm.models import set_weights  # noqa: E402
from fedfm.rundir import RunDir  # noqa: E402
from fedfm.tasks.causal_lm import pack  # noqa: E402

# --quick: the same model, 2 owners of 200 speeches, 1 round of 1 local step, blocks of 32 tokens, 4 global test blocks
QUICK = ["rounds=1", "data.max_examples=200", "data.max_length=32", "federation.num_clients=2", "train.local_steps=1",
         "train.batch_size=2", "eval.max_examples=4"]


def perplexities(app: App, weights, general) -> dict[str, float]:
    set_weights(app.model, weights)
    bs = app.cfg.eval.batch_size
    out = {s.name: app.task.evaluate(app.model, s.test, bs)["perplexity"] for s in app.shards[: len(app.split.client_names)]}
    out["global test (all owners)"] = app.task.evaluate(app.model, app.global_test, bs)["perplexity"]
    out["general English (Brown)"] = app.task.evaluate(app.model, general, bs)["perplexity"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cpt_smollm2_shakespeare.yaml")
    ap.add_argument("--general-docs", type=int, default=None, help="Brown paragraphs in the general-text set (default 200; --quick 4)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="continued_pretrain")
    add_quick_args(ap, "2 owners of 200 speeches, 1 round of 1 local step of 2 blocks of 32 tokens, 4 Brown paragraphs")
    args = ap.parse_args()
    args.general_docs = args.general_docs or (4 if args.quick else 200)
    if args.quick:
        args.overrides = [*QUICK, *args.overrides]
    out = results_dir(args)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(args.config, [f"output_dir={tmp}", *args.overrides])
        app = App(cfg)
        brown = load_corpus("brown")
        pick = np.random.default_rng(cfg.seed).choice(len(brown.documents), args.general_docs, replace=False)
        general = pack(app.tokenizer, [brown.documents[i] for i in sorted(pick)], cfg.data.max_length)
        before = perplexities(app, app.initial_weights, general)
        print("before", json.dumps(before), flush=True)
        summary = server.run_method(app, "federated", Path(tmp) / "run")
        run_dir = Path(tmp) / "run"
        checkpoint, _ = RunDir(run_dir).load_checkpoint()
        after = perplexities(app, checkpoint[0].weights, general)
        print("after", json.dumps(after), flush=True)
        hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = time.perf_counter() - t0
    info = machine_info()
    command = "python benchmarks/continued_pretrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    sizes = {s.name: (len(s.train), len(s.test)) for s in app.shards[: len(app.split.client_names)]}
    lines = [
        "# Continued pre-training of SmolLM2-135M across owners: learned vs forgotten",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {info['summary']}",
        f"- date: {info['date']}",
        f"- setup: `{args.config}` ({cfg.peft.method}, {app.trainable_params:,} of {app.total_params:,} parameters train), "
        f"{cfg.data.source} split over {len(sizes)} owners, {cfg.rounds} rounds x {cfg.train.local_steps} local steps x "
        f"{cfg.train.batch_size} blocks of {cfg.data.max_length} tokens; general English = {args.general_docs} Brown paragraphs "
        f"({len(general)} blocks). Wall time {seconds / 60:.1f} min; {summary['bytes_total'] / 2**20:.1f} MiB communicated.",
        "",
        "| evaluation set | blocks (train / test) | perplexity before | after | change |",
        "|---|---|---|---|---|",
    ]
    for key in before:
        size = sizes.get(key)
        lines.append(f"| {key} | {f'{size[0]} / {size[1]}' if size else '—'} | {before[key]:.2f} | {after[key]:.2f} | "
                     f"{100 * (after[key] / before[key] - 1):+.1f}% |")
    lines += ["", "Per round (global test perplexity): " + ", ".join(f"{r['perplexity']:.2f}" for r in hist), ""]
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text("\n".join(lines))
        (out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info, "before": before, "after": after, "history": hist}, indent=1))


if __name__ == "__main__":
    main()
