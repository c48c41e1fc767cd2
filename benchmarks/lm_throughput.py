"""Client training throughput (tokens/s) of fedfm's client loop versus a bare PyTorch loop.

Target (issue 3): fedfm's client loop >= 95% of the tokens/s of a hand-written loop on the same model,
batch and data. Both paths train the pre-training config's from-scratch Llama on the same packed
Austen/Shakespeare blocks with AdamW, gradient clipping and the same batches; the bare loop is what a
user would write (set the LR, forward, backward, clip, step). They alternate, order rotated every
repetition after an untimed warm-up of each; the reported ratio is the median of the per-repetition
ratios (speed as a ratio taken in one run, on a shared machine).

    python benchmarks/lm_throughput.py                 # writes results/lm_throughput.{md,json}
    python benchmarks/lm_throughput.py --config configs/pretrain_austen.yaml --steps 20 --reps 5
    python benchmarks/lm_throughput.py --quick --out /tmp/lm   # a tiny Llama, 2 repetitions of 2 steps (tests)

Writes benchmarks/results/<name>.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_LM_SETS, add_quick_args, machine_info, results_dir  # noqa: E402

from fedfm import client as client_loop  # noqa: E402
from fedfm import config  # noqa: E402
from fedfm.app import App  # noqa: E402
from fedfm.client import batch_order, derive_seed, lr_at  # noqa: E402
from fedfm.models import set_weights, trainable_params  # noqa: E402
from fedfm.types import ClientTask  # noqa: E402


def bare(app: App, index: int, steps: int, round_: int) -> int:
    """The same steps as fedfm.client.train, written directly; returns tokens processed."""
    cfg, data, model = app.cfg.train, app.shards[index].train, app.model
    set_weights(model, app.initial_weights)
    params = list(trainable_params(model).values())
    s = derive_seed(app.cfg.seed, round_, index)
    torch.manual_seed(s)
    batches = batch_order(len(data), steps * cfg.batch_size, cfg.batch_size, torch.Generator().manual_seed(s))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    tokens = 0
    for k, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at((round_ - 1 + k / len(batches)) / app.cfg.rounds, cfg)
        lengths = data.lengths[idx]
        width = int(lengths.max())
        ids = data.input_ids[idx, :width]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(lengths.sum())
    return tokens  # the fedfm path counts the same tokens through tokens_of


def fedfm_loop(app: App, index: int, steps: int, round_: int) -> None:
    task = ClientTask(round_, app.initial_weights, steps * app.cfg.train.batch_size)
    client_loop.train(app.model, app.shards[index].train, app.task, task, app.cfg.train, app.cfg.rounds, app.cfg.seed, index, "c")


def tokens_of(app: App, index: int, steps: int, round_: int) -> int:
    data, bs = app.shards[index].train, app.cfg.train.batch_size
    s = derive_seed(app.cfg.seed, round_, index)
    return int(sum(int(data.lengths[idx].sum()) for idx in batch_order(len(data), steps * bs, bs, torch.Generator().manual_seed(s))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pretrain_austen.yaml")
    ap.add_argument("--steps", type=int, default=None, help="steps per repetition (default 20; --quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each path (default 5; --quick 2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="lm_throughput")
    add_quick_args(ap, "a 2-layer Llama on 300 Shakespeare speeches, 2 repetitions of 2 steps")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.quick else 20)
    args.reps = args.reps or (2 if args.quick else 5)
    if args.quick:
        args.overrides = [*QUICK_LM_SETS, *args.overrides]
    out = results_dir(args)
    app = App(config.load(args.config, args.overrides))
    paths = {"fedfm": fedfm_loop, "bare": bare}
    for fn in paths.values():  # untimed warm-up
        fn(app, 0, 2, 1)
    times: dict[str, list[float]] = {k: [] for k in paths}
    reps_tokens = []
    order = list(paths)
    for rep in range(args.reps):
        index = rep % len(app.split.client_names)
        reps_tokens.append(tokens_of(app, index, args.steps, rep + 1))
        for name in order[rep % 2:] + order[: rep % 2]:
            t0 = time.perf_counter()
            paths[name](app, index, args.steps, rep + 1)
            times[name].append(time.perf_counter() - t0)
    # both paths process the same batches (same seeds), so the same tokens per repetition
    ratios = [b / f for f, b in zip(times["fedfm"], times["bare"])]  # fedfm tokens/s over bare tokens/s
    ratio = statistics.median(ratios)
    info = machine_info()
    command = "python benchmarks/lm_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    tok_per_rep = statistics.median(reps_tokens)
    lines = [
        "# Client training throughput: fedfm client loop vs bare PyTorch loop (causal LM)",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {info['summary']}",
        f"- date: {info['date']}",
        f"- setup: `{args.config}` model ({app.trainable_params / 1e6:.1f}M parameters), batch {app.cfg.train.batch_size} x "
        f"{app.cfg.data.max_length} tokens, {args.steps} steps per repetition, {args.reps} repetitions alternating.",
        "",
        "| path | median tokens/s | per-repetition seconds |",
        "|---|---|---|",
        f"| fedfm client loop | {tok_per_rep / statistics.median(times['fedfm']):,.0f} | {', '.join(f'{t:.2f}' for t in times['fedfm'])} |",
        f"| bare PyTorch loop | {tok_per_rep / statistics.median(times['bare']):,.0f} | {', '.join(f'{t:.2f}' for t in times['bare'])} |",
        "",
        f"**throughput ratio fedfm / bare (median of per-repetition ratios): {ratio:.3f}** "
        f"(target >= 0.95: {'meets' if ratio >= 0.95 else 'MISSES'}); per repetition: {', '.join(f'{r:.3f}' for r in ratios)}",
        "",
    ]
    print("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.md").write_text("\n".join(lines))
        (out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info, "times": times, "ratios": ratios, "ratio": ratio, "tokens_per_rep": tok_per_rep}, indent=1))


if __name__ == "__main__":
    main()
