"""DiLoCo federated pre-training vs per-step synchronous training at an equal number of tokens.

Target (issue 3): federated pre-training reaches perplexity within 10% of centralized training at
equal tokens while synchronising at least 50x less often than per-step synchronous training.

Every run trains the same from-scratch Llama (configs/pretrain_austen.yaml: one owner per Austen novel)
for the same number of inner steps per owner (--steps). Federated runs synchronise every H inner steps
(H = train.local_steps, swept by --inner); "centralized" is data-parallel training synchronised every
step: one step of (owners x batch) blocks per inner step, i.e. exactly the tokens of the federation.
Per-step synchronous training would exchange the model 2 x owners times per step; its bytes are
computed from the model size, not run.

    python benchmarks/pretrain.py                        # H in 10 25 50 150, 150 steps per owner
    python benchmarks/pretrain.py --inner 50 --steps 150 --name pretrain_quick
    python benchmarks/pretrain.py --jobs 2 --set engine.threads=1 ...   # two runs at a time, one process each
    python benchmarks/pretrain.py --quick --out /tmp/pretrain   # a tiny Llama, 10 steps per owner (tests)

Writes benchmarks/results/<name>.md, .json and a perplexity-vs-bytes plot, or under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import QUICK_LM_SETS, add_quick_args, machine_info, results_dir  # noqa: E402

from fedfm import config, server  # noqa: E402
from fedfm.app import App  # noqa: E402



def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


_APPS: dict = {}  # per process: one App (data, tokenizer, model) for every run; runs differ in rounds and steps


def run_plan(config_path: str, base: list[str], plan: tuple, run_dir: Path) -> tuple[dict, dict]:
    """One run of the sweep (in this process or a worker): its row, and the setup facts every row shares."""
    method, h, rounds, outer = plan
    cfg = config.load(config_path, [*base, f"rounds={rounds}", f"train.local_steps={h}",
                                    f"strategy.name={outer}", f"strategy.server_lr={OUTER_LR[outer]}"])
    if "app" not in _APPS:
        app = _APPS["app"] = App(cfg)
        _APPS["setup"] = {"model_bytes": 4 * app.trainable_params, "owners": len(app.split.client_names),
                          "start": app.server_evaluate(app.initial_weights)}
    app = _APPS["app"]
    app.cfg = cfg
    t0 = time.perf_counter()
    summary = server.run_method(app, method, run_dir)
    hist = history(run_dir)
    row = {
        "method": method,
        "outer": outer if method == "federated" else "—",
        "outer_lr": OUTER_LR[outer],
        "inner_steps": h if method == "federated" else 1,
        "rounds": len(hist),
        "perplexity": summary["global"]["perplexity"],
        "own_perplexity": summary["own_mean"].get("perplexity"),
        "tokens": int(sum(r["examples"] for r in hist)) * cfg.data.max_length,
        "bytes": int(sum(r["bytes_down"] + r["bytes_up"] for r in hist)),
        "curve": [
            {"round": r["round"], "perplexity": r["perplexity"], "bytes": int(sum(x["bytes_down"] + x["bytes_up"] for x in hist[: i + 1]))}
            for i, r in enumerate(hist)
        ],
        "seconds": time.perf_counter() - t0,
    }
    return row, _APPS["setup"]


OUTER_LR = {"diloco": 0.7, "fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pretrain_austen.yaml")
    ap.add_argument("--inner", nargs="+", type=int, default=None, help="inner steps H per round (default 10 25 50 150; --quick 5)")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per owner over the whole run (default 150; --quick 10)")
    ap.add_argument("--outer", nargs="*", default=["fedavg", "fedavgm", "fedadam"],
                    help="other outer optimisers, each run once at the largest H that gives >= 2 rounds")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each in its own process (with --set engine.threads=1 on a 2-core machine)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="pretrain")
    add_quick_args(ap, "a 2-layer Llama on 300 Shakespeare speeches over 3 owners, 10 steps per owner, H = 5")
    args = ap.parse_args()
    args.inner = args.inner or ([5] if args.quick else [10, 25, 50, 150])
    args.steps = args.steps or (10 if args.quick else 150)
    if args.quick:
        args.overrides = [*QUICK_LM_SETS, *args.overrides]
    args.out = results_dir(args)
    for h in [*args.inner, 10]:
        if args.steps % h:
            ap.error(f"--steps {args.steps} is not a multiple of inner steps {h}")
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    multi = [h for h in args.inner if args.steps // h >= 2]  # outer optimisers need >= 2 rounds to differ
    if args.outer and not multi:
        ap.error("--outer needs an inner step count that gives at least 2 rounds")

    # centralized synchronous: rounds only set the evaluation cadence (10 points), every step is a sync
    plans = [("centralized", args.steps // 10, 10, "diloco")] + [("federated", h, args.steps // h, "diloco") for h in args.inner]
    plans += [("federated", max(multi), args.steps // max(multi), name) for name in args.outer]
    done: dict[int, dict] = {}

    def finished(i: int, row: dict, setup: dict) -> None:
        """Record run ``i`` and rewrite the result files with every run done so far, in plan order."""
        done[i] = row
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        write([done[j] for j in sorted(done)], args, setup)

    with tempfile.TemporaryDirectory() as tmp:
        base = [f"output_dir={tmp}", "compare.centralized=synchronous", "eval.every=1", *args.overrides]
        dirs = [Path(tmp) / f"{i}-{m}-{o}-{h}" for i, (m, h, _, o) in enumerate(plans)]
        if args.jobs == 1:
            results = (run_plan(args.config, base, plan, d) for plan, d in zip(plans, dirs))
            for i, (row, setup) in enumerate(results):
                finished(i, row, setup)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(run_plan, args.config, base, plan, d): i for i, (plan, d) in enumerate(zip(plans, dirs))}
                for f in as_completed(futures):
                    try:
                        row, setup = f.result()
                    except BaseException:  # stop now, not after every queued run; the finished ones are written
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    finished(futures[f], row, setup)


def write(runs: list[dict], args, setup: dict) -> None:
    model_bytes, owners, start = setup["model_bytes"], setup["owners"], setup["start"]
    command = "python benchmarks/pretrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = machine_info()
    cent = next((r for r in runs if r["method"] == "centralized"), None)
    per_step_bytes = args.steps * 2 * owners * model_bytes  # every owner down + up after every step
    source = config.load(args.config, args.overrides).model.source
    start_from = ("a Llama from scratch, byte-level BPE trained on the training pool" if source == "scratch"
                  else f"warm start: every method starts from the pretrained model `{source}` and its tokenizer")
    lines = [
        "# Federated pre-training: DiLoCo vs per-step synchronous training at equal tokens",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {info['summary']}",
        f"- date: {info['date']}",
        f"- setup: `{args.config}` ({owners} owners, one per novel; {start_from}; {model_bytes / 4 / 1e6:.1f}M parameters), "
        f"{args.steps} inner AdamW steps per owner in every run; "
        "DiLoCo outer Nesterov step (lr 0.7, momentum 0.9). Centralized = data-parallel training synchronised every step "
        "(one step of owners x batch blocks), the same tokens. Perplexity on the global held-out paragraphs "
        f"(starting model: {start['perplexity']:.0f}).",
        f"- per-step synchronous training would move {per_step_bytes / 2**20:,.0f} MiB ({args.steps} syncs x 2 x {owners} owners x "
        f"{model_bytes / 2**20:.1f} MiB).",
        "- target: perplexity within 10% of centralized while synchronising >= 50x less often than per-step.",
        "",
        "| method | outer optimiser | inner steps H | syncs | sync reduction vs per-step | perplexity | / centralized | own-split ppl | communicated | tokens | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = r["perplexity"] / cent["perplexity"] if cent else float("nan")
        fed = r["method"] == "federated"
        lines.append(
            f"| {r['method']} | {r['outer'] + (' lr ' + str(r['outer_lr']) if fed else '')} | {r['inner_steps'] if fed else '1 (data-parallel)'} | {r['rounds'] if fed else args.steps} | "
            f"{(str(r['inner_steps']) + 'x') if fed else '1x'} | {r['perplexity']:.1f} | {ratio:.3f} | "
            f"{r['own_perplexity']:.1f} | {(r['bytes'] / 2**20 if fed else per_step_bytes / 2**20):,.0f} MiB{'' if fed else ' (if distributed)'} | "
            f"{r['tokens']:,} | {r['seconds']:.0f} s |"
        )
    verdicts = []
    for r in runs:
        if r["method"] == "federated" and cent:
            ratio = r["perplexity"] / cent["perplexity"]
            ok = ratio <= 1.10 and r["inner_steps"] >= 50
            verdicts.append(f"{r['outer']} H={r['inner_steps']}: perplexity {ratio:.3f}x centralized, {r['inner_steps']}x fewer syncs "
                            f"-> {'meets' if ok else 'does not meet'} the target")
    lines += ["", "## Verdict", "", *[f"- {v}" for v in verdicts], "", f"![perplexity vs bytes]({args.name}_curve.png)", ""]
    print("\n".join(lines), flush=True)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "machine": info, "start": start, "runs": runs}, indent=1))
    plot(runs, args.out / f"{args.name}_curve.png", per_step_bytes, cent)


def plot(runs: list[dict], path: Path, per_step_bytes: int, cent: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r["method"] != "federated":
            continue
        xs = [c["bytes"] / 2**20 for c in r["curve"]]
        ax.plot(xs, [c["perplexity"] for c in r["curve"]], marker="o", label=f"{r['outer']} H={r['inner_steps']}",
                ls="-" if r["outer"] == "diloco" else "--")
    if cent:
        ax.axhline(cent["perplexity"], color="k", ls="--", label="per-step synchronous (final)")
        ax.axvline(per_step_bytes / 2**20, color="k", ls=":", label="per-step synchronous bytes")
    ax.set_xscale("log")
    ax.set_xlabel("MiB communicated (down + up, all owners)")
    ax.set_ylabel("global test perplexity")
    ax.set_title("Perplexity against communication at equal tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
