"""Reduced precision on the CPU: client-loop throughput of SmolLM2-135M + LoRA in float32, over a bfloat16 base
(``model.dtype=bfloat16``) and with bf16 autocast (``train.mixed_precision=bf16``), and fedfm's client loop against
a bare loop in each.

Three Apps, one per precision, are built side by side on the same Shakespeare data (the same shards, so the same
batches and tokens); six paths (fedfm's ``App.client_train`` and the bare loop of ``benchmarks/gpu.py``, in each
precision) then alternate in every repetition, order rotated, after an untimed warm-up of each that doubles as the
same-work check (fedfm's update against the bare loop's). Every ratio is the median of per-repetition ratios taken
inside this one run (the machine is shared and noisy): (a) tokens/s of bf16 weights and of bf16 autocast over
float32, for each loop; (b) fedfm / bare tokens/s in each precision, target >= 0.95.

    python benchmarks/precision.py                      # ~5-8 min on 2 cores -> results/precision.{md,json}
    python benchmarks/precision.py --quick --out /tmp/p   # 2 repetitions of 2 steps of 2 x 16 tokens (~30 s)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import bare_round, fedfm_round, interleaved, lm_config, max_diff, median_ratio, tokens_of  # noqa: E402
from machine import add_quick_args, result_header, results_dir, write_results  # noqa: E402

from fedfm.app import App  # noqa: E402
from fedfm.types import ClientTask  # noqa: E402

TARGET_RATIO = 0.95
# name -> (label, model section extras, train section extras); LoRA r=8 on q,v in all three
PRECISIONS: dict[str, tuple[str, dict, dict]] = {
    "fp32": ("float32 weights, no autocast", {}, {}),
    "bf16_weights": ("model.dtype=bfloat16 (LoRA tensors float32, forward autocast to bf16)", {"dtype": "bfloat16"}, {}),
    "bf16_autocast": ("float32 weights, train.mixed_precision=bf16", {}, {"mixed_precision": "bf16"}),
}
SIZES = {"full": {"batch": 4, "length": 64, "examples": 1000, "steps": 8, "reps": 5},
         "quick": {"batch": 2, "length": 16, "examples": 200, "steps": 2, "reps": 2}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def markdown(res: dict[str, Any], header: list[str]) -> str:
    s = res["sizes"]
    lines = header + [
        f"- setup: `{res['model']}` + LoRA r=8 on q_proj/v_proj ({res['trainable_params']:,} trainable of "
        f"{res['total_params']:,} parameters), causal LM on Shakespeare speeches packed into blocks; each repetition "
        f"client 0 trains {s['steps']} steps of batch {s['batch']} x {s['length']} tokens "
        f"({statistics.median(res['tokens_per_rep']):.0f} tokens), {s['reps']} repetitions of each of the 6 paths, "
        f"alternating, after an untimed warm-up of each; {res['threads']} torch thread(s) for every path; "
        f"CPU capability {res['cpu_capability']}.",
        "",
        "| target | result | wanted | |", "|---|---|---|---|",
        *[f"| {t['measure']} | {t['result']:.3f} | >= {TARGET_RATIO} | {'PASS' if t['pass'] else 'FAIL'} |"
          for t in res["targets"]],
        "",
        "## (a) Reduced precision against float32 (tokens/s ratio, median of per-repetition ratios)",
        "",
        "| precision | fedfm loop | bare loop | per repetition (fedfm) |", "|---|---|---|---|",
    ]
    for name, sp in res["speedup_vs_fp32"].items():
        lines.append(f"| {PRECISIONS[name][0]} | {sp['fedfm']:.3f}x | {sp['bare']:.3f}x | "
                     f"{', '.join(f'{r:.3f}' for r in sp['per_rep_fedfm'])} |")
    lines += ["", "## (b) fedfm client loop against the bare loop in each precision", "",
              "| precision | placement | fedfm tokens/s | bare tokens/s | fedfm / bare (median) | per repetition | "
              "max abs delta diff | round-1 train loss |", "|---|---|---|---|---|---|---|---|"]
    for row in res["precisions"].values():
        lines.append(f"| {row['label']} | `{row['placement']}` | {row['tokens_per_s']['fedfm']:,.0f} | "
                     f"{row['tokens_per_s']['bare']:,.0f} | {row['ratio']:.3f} | "
                     f"{', '.join(f'{r:.3f}' for r in row['ratios'])} | {row['max_abs_delta_diff']:.1e} | "
                     f"{row['train_loss']:.4f} |")
    lines += ["", "*bare*: the same client round written by hand on the same model object (`benchmarks/gpu.py` "
              "`bare_round`: the global trainable tensors copied in, the same seeded batches, a fresh AdamW, forward "
              "under the same autocast, backward, clip, step, the change back as float32). *max abs delta diff*: "
              "fedfm's round-1 update against the bare loop's (the same work). Times per repetition (s): "
              + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in res["times_s"].items()) + ".",
              "", f"Total time: {res['total_s']:.0f} s. Raw numbers: `precision.json` next to this file.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="causal LM: packaged name or local Hugging Face directory")
    ap.add_argument("--steps", type=int, default=None, help="steps per repetition (default 8; --quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each path (default 5; --quick 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every path (default 1: on a shared 2-core machine two OpenMP threads "
                         "per process make step times swing by 10x)")
    add_quick_args(ap, "2 repetitions of 2 steps of 2 x 16 tokens")
    args = ap.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    size["steps"] = args.steps or size["steps"]
    size["reps"] = args.reps or size["reps"]
    out = results_dir(args)
    torch.set_num_threads(args.threads)
    command, info, header = result_header("Reduced precision on the CPU: LoRA client-loop throughput",
                                          "benchmarks/precision.py")
    t_start = time.perf_counter()
    apps: dict[str, App] = {}
    for name, (_label, model_extra, train_extra) in PRECISIONS.items():
        cfg = lm_config(args.model, "cpu", clients=2, batch=size["batch"], length=size["length"],
                        examples=size["examples"], threads=args.threads, model_extra=model_extra,
                        train_extra=train_extra, name=f"precision-{name}")
        t0 = time.perf_counter()
        apps[name] = App(cfg)
        log(f"[{name}] App built in {time.perf_counter() - t0:.1f}s: {apps[name].placement}")
    index, steps = 0, size["steps"]
    tokens = [tokens_of(apps["fp32"], index, steps, r + 2) for r in range(size["reps"])]
    for name, app in apps.items():  # the same shards in every precision, so the same batches and tokens
        assert [tokens_of(app, index, steps, r + 2) for r in range(size["reps"])] == tokens, name
    # untimed warm-up of each path in round 1; fedfm's update against the bare loop's
    warm: dict[str, dict[str, Any]] = {}
    for name, app in apps.items():
        update = app.client_train(index, ClientTask(1, app.initial_weights, steps * size["batch"]))
        bare = bare_round(app, index, steps, 1)
        warm[name] = {"max_abs_delta_diff": max_diff(update.delta, bare), "train_loss": update.metrics["train_loss"]}
        log(f"[{name}] warm-up: {warm[name]}")
        del update, bare
    gc.collect()
    paths = {}
    for name, app in apps.items():
        paths[f"{name}.fedfm"] = lambda r, app=app: fedfm_round(app, index, steps, r + 2)
        paths[f"{name}.bare"] = lambda r, app=app: bare_round(app, index, steps, r + 2)
    times = interleaved(paths, size["reps"], torch.device("cpu"))
    precisions, speedup = {}, {}
    for name, app in apps.items():
        f, b = times[f"{name}.fedfm"], times[f"{name}.bare"]
        ratios = [tb / tf for tf, tb in zip(f, b)]  # the same tokens: fedfm tokens/s over bare tokens/s
        precisions[name] = {
            "label": PRECISIONS[name][0], "placement": str(app.placement), "config": {
                "model": app.cfg.model.model_dump(), "train": app.cfg.train.model_dump()},
            "tokens_per_s": {"fedfm": statistics.median(t / s for t, s in zip(tokens, f)),
                             "bare": statistics.median(t / s for t, s in zip(tokens, b))},
            "ratios": ratios, "ratio": statistics.median(ratios), **warm[name]}
        if name != "fp32":  # tokens/s over float32's = float32's time over this one's
            speedup[name] = {
                "fedfm": median_ratio(times["fp32.fedfm"], f), "bare": median_ratio(times["fp32.bare"], b),
                "per_rep_fedfm": [a / c for a, c in zip(times["fp32.fedfm"], f)],
                "per_rep_bare": [a / c for a, c in zip(times["fp32.bare"], b)]}
    first = apps["fp32"]
    res = {
        "command": command, "machine": info, "date": info["date"], "model": args.model, "quick": args.quick,
        "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "sizes": size,
        "trainable_params": first.trainable_params, "total_params": first.total_params, "tokens_per_rep": tokens,
        "times_s": times, "precisions": precisions, "speedup_vs_fp32": speedup,
        "targets": [{"measure": f"fedfm / bare tokens/s, {PRECISIONS[n][0]}", "result": p["ratio"],
                     "target": TARGET_RATIO, "pass": p["ratio"] >= TARGET_RATIO} for n, p in precisions.items()],
        "total_s": time.perf_counter() - t_start,
    }
    md = markdown(res, header)
    print(md)
    write_results(out, "precision", md, res)


if __name__ == "__main__":
    main()
