"""GPU check: fedfm's client loop against a bare loop on one GPU, peak memory of full / LoRA / QLoRA, and a
20-client federated LoRA run repeated bit for bit.

On SmolLM2-135M-Instruct (or any local Hugging Face causal LM, ``--model``), causal LM on Shakespeare:

1. **Throughput.** tokens/s of ``App.client_train`` (fedfm's client loop with every hook of the round, as an
   engine calls it) against a bare loop written by hand on the same model object: the same global trainable
   tensors copied in, the same batches (``fedfm.client.batch_order`` with the same seed, ``task.batch``), a
   fresh AdamW with the same hyper-parameters, the same autocast, forward, backward, clip, step, and the change
   copied back to the CPU as float32 (what any federated client hands back). The two alternate, order rotated
   every repetition after an untimed warm-up of each (which doubles as the same-work check); the reported ratio
   is the median of the per-repetition ratios. Rows: full fine-tuning (float32 weights, bf16 autocast), LoRA over
   a bfloat16 base (``model.dtype=bfloat16``), QLoRA (``model.quantization=4bit``: NF4 base, bf16 compute).
2. **Peak memory** of each row: ``torch.cuda.max_memory_allocated`` over one client round of each path, reset
   before it (so the resident model counts, the previous row's is freed). On the CPU (dry run) the process's
   RSS high-water mark instead (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), which also
   counts Python and everything else resident: reported as such, not as the GPU target's measure.
3. **Federated run.** 20 clients, LoRA over a bf16 base, every client every round, FedAvg, through
   ``fedfm.server.Runner.round`` on the embedded engine (one GPU, clients one after another); rounds/min; then the
   same run again from a freshly built App with the same seed, and the final global weights compared bitwise.

Targets: client loop >= 0.95x bare tokens/s (each row); QLoRA peak memory below LoRA bf16's; the rerun bitwise
equal.

    python benchmarks/gpu.py                                   # one CUDA GPU (sized for < 8 min on an H100) -> results/gpu.{md,json}
    python benchmarks/gpu.py --device cpu --steps 2 --out /tmp/gpu   # CPU dry run, tiny sizes (~1 min on 2 cores)

A GPU machine needs a CUDA build of torch and bitsandbytes (``pip install -c constraints.txt -e .`` with the
CUDA torch wheel) and the SmolLM2 + Shakespeare cache (``fedfm data fetch``). ``--deterministic`` additionally
switches on ``torch.use_deterministic_algorithms(True, warn_only=True)`` (and ``CUBLAS_WORKSPACE_CONFIG``) for the
federated run, to tell fedfm's own reproducibility from the GPU kernels' (torch warns about each kernel that has no
deterministic version).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, result_header, write_results  # noqa: E402

from fedfm.app import App  # noqa: E402
from fedfm.client import batch_order, derive_seed, lr_at  # noqa: E402
from fedfm.config import RunConfig, from_dict  # noqa: E402
from fedfm.models import trainable_params  # noqa: E402
from fedfm.rundir import RunDir  # noqa: E402
from fedfm.server import Runner  # noqa: E402
from fedfm.types import ClientTask, Weights  # noqa: E402

TARGET_RATIO = 0.95
NO_EVAL = 1_000_000  # rounds / eval.every: Runner.round evaluates only when r % every == 0 or r == rounds
LORA = {"method": "lora", "options": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}}
MIB = 2**20

# name -> (label, peft section, model section extras, train section extras)
ROWS: dict[str, tuple[str, dict, dict, dict]] = {
    "full_bf16_autocast": ("full fine-tuning, float32 weights, bf16 autocast", {"method": "none"}, {},
                           {"mixed_precision": "bf16"}),
    "lora_bf16": ("LoRA r=8 (q,v), model.dtype=bfloat16", LORA, {"dtype": "bfloat16"}, {}),
    "qlora_4bit": ("QLoRA r=8 (q,v), model.quantization=4bit (NF4), model.dtype=bfloat16", LORA,
                   {"quantization": "4bit", "dtype": "bfloat16"}, {}),
}

# sizes: the GPU run, and the CPU dry run (tiny: it checks the script, not the targets)
SIZES = {
    "gpu": {"batch": 8, "length": 256, "examples": 3000, "reps": 5, "steps": 50,
            "fed_clients": 20, "fed_rounds": 5, "fed_steps": 10, "fed_batch": 8, "fed_length": 128, "fed_examples": 8000},
    "dry": {"batch": 2, "length": 16, "examples": 200, "reps": 2, "steps": 2,
            "fed_clients": 4, "fed_rounds": 2, "fed_steps": 1, "fed_batch": 2, "fed_length": 16, "fed_examples": 200},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- configuration --------------------------------------------------------------------------------------------
def lm_config(model: str, device: str, *, clients: int, batch: int, length: int, examples: int, steps: int = 1,
              threads: int | None = None, peft: dict | None = None, model_extra: dict | None = None,
              train_extra: dict | None = None, name: str = "gpu-check") -> RunConfig:
    """Causal LM on Shakespeare speeches (iid over ``clients``), ``model`` + ``peft`` (LoRA r=8 on q,v by default),
    constant LR, no evaluation."""
    return from_dict({
        "name": name, "seed": 0, "task": "causal_lm", "rounds": NO_EVAL,
        "data": {"source": "shakespeare", "owner": "play", "max_examples": examples, "partition": "iid",
                 "test_fraction": 0.1, "client_test_fraction": 0.0, "max_length": length},
        "model": {"source": model, **(model_extra or {})},
        "peft": peft or LORA,
        "train": {"local_steps": steps, "batch_size": batch, "lr": 1e-4, "schedule": "constant",
                  "max_grad_norm": 1.0, "device": device, **(train_extra or {})},
        "strategy": {"name": "fedavg"},
        "federation": {"num_clients": clients, "fraction": 1.0},
        "engine": {"threads": threads},
        "eval": {"every": NO_EVAL, "max_examples": 8},
    })


# --- the two client loops -------------------------------------------------------------------------------------
def fedfm_round(app: App, index: int, steps: int, round_: int) -> Weights:
    """fedfm's client loop as an engine calls it: ``steps`` batches from the global (initial) weights."""
    task = ClientTask(round_, app.initial_weights, steps * app.cfg.train.batch_size)
    return app.client_train(index, task).delta


def bare_round(app: App, index: int, steps: int, round_: int) -> Weights:
    """The same client round written by hand on the same model object: the global trainable tensors copied in,
    the same seeded batches, a fresh AdamW, forward under the same autocast, backward, clip, step; the change
    back on the CPU as float32."""
    cfg, data, model, where = app.cfg.train, app.shards[index].train, app.model, app.placement
    start = app.initial_weights
    params = trainable_params(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
    s = derive_seed(app.cfg.seed, round_, index)
    torch.manual_seed(s)
    batches = batch_order(len(data), steps * cfg.batch_size, cfg.batch_size, torch.Generator().manual_seed(s))
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    model.train()
    for k, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at((round_ - 1 + k / len(batches)) / app.cfg.rounds, cfg)
        batch = where.move(app.task.batch(data, idx))
        with where.autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().float().cpu() - start[n] for n, p in params.items()}


def tokens_of(app: App, index: int, steps: int, round_: int) -> int:
    """Tokens in the batches both loops take for (client, round): the same seeded order."""
    data, bs = app.shards[index].train, app.cfg.train.batch_size
    s = derive_seed(app.cfg.seed, round_, index)
    return int(sum(int(data.lengths[idx].sum())
                   for idx in batch_order(len(data), steps * bs, bs, torch.Generator().manual_seed(s))))


def max_diff(a: Weights, b: Weights) -> float:
    return max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)


# --- timing and memory ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(paths: dict[str, Callable[[int], Any]], reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each path in each of ``reps`` repetitions (``path(rep)``), the order rotated every repetition (and,
    past two paths, reversed every other cycle of rotations) so each path runs first, and after each other, equally
    often."""
    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order[::-1] if len(names) > 2 and (r // len(names)) % 2 else order:
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            paths[n](r)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """Peak memory (MiB) of what runs between ``reset()`` and ``read()``: the CUDA caching allocator's peak of
    allocated bytes, or on the CPU the process's RSS high-water mark (None where the kernel will not reset it)."""

    def __init__(self, device: torch.device):
        self.device, self.cpu_ok = device, True
        self.kind = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                     "process RSS high-water mark (VmHWM, reset through /proc/self/clear_refs)")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.cpu_ok = False

    def read(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        try:
            return status_kb("VmHWM") / 1024 if self.cpu_ok else None
        except (OSError, KeyError):
            return None

    def resident(self) -> float | None:
        """What is held now: allocated CUDA memory, or the process's RSS."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MIB
        try:
            return status_kb("VmRSS") / 1024
        except (OSError, KeyError):
            return None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- part 1 and 2: one row ------------------------------------------------------------------------------------
def measure_row(args, size: dict, name: str, device: torch.device, peak: Peak) -> dict[str, Any]:
    label, peft, model_extra, train_extra = ROWS[name]
    cfg = lm_config(args.model, args.device, clients=2, batch=size["batch"], length=size["length"],
                    examples=size["examples"], threads=args.threads, peft=peft, model_extra=model_extra,
                    train_extra=train_extra)
    release(device)
    t0 = time.perf_counter()
    app = App(cfg)
    build_s = time.perf_counter() - t0
    after_build = peak.resident()
    log(f"[{name}] App built in {build_s:.1f}s: {app.trainable_params:,} trainable / {app.total_params:,} params, "
        f"{app.placement}")
    steps, index = args.steps, 0
    # untimed warm-up of each path in round 1, each alone for its peak memory; their deltas: the same-work check
    peak.reset()
    d_fedfm = fedfm_round(app, index, steps, 1)
    sync(device)
    peak_fedfm = peak.read()
    peak.reset()
    d_bare = bare_round(app, index, steps, 1)
    sync(device)
    peak_bare = peak.read()
    diff = max_diff(d_fedfm, d_bare)
    del d_fedfm, d_bare
    log(f"[{name}] max |delta fedfm - delta bare| = {diff:.2e}; peak {peak_fedfm} / {peak_bare} MiB")
    # repetition r: both paths train client 0 in round r + 2 (the same batches, so the same tokens)
    times = interleaved({
        "fedfm": lambda r, app=app: fedfm_round(app, index, steps, r + 2),
        "bare": lambda r, app=app: bare_round(app, index, steps, r + 2),
    }, size["reps"], device)
    tokens = [tokens_of(app, index, steps, r + 2) for r in range(size["reps"])]
    ratios = [b / f for f, b in zip(times["fedfm"], times["bare"])]  # same tokens: tokens/s ratio = time ratio^-1
    out = {
        "label": label, "config": {"model": cfg.model.model_dump(), "peft": cfg.peft.model_dump(),
                                   "train": cfg.train.model_dump()},
        "placement": str(app.placement), "trainable_params": app.trainable_params, "total_params": app.total_params,
        "build_s": build_s, "steps": steps, "batch": size["batch"], "max_length": size["length"],
        "tokens_per_rep": tokens, "times_s": times,
        "tokens_per_s": {k: statistics.median(t / s for t, s in zip(tokens, v)) for k, v in times.items()},
        "ratios": ratios, "ratio": statistics.median(ratios), "max_abs_delta_diff": diff,
        "memory_mib": {"after_build": after_build, "peak_fedfm": peak_fedfm, "peak_bare": peak_bare},
    }
    del app
    release(device)
    return out


# --- part 3: the federated run, twice -------------------------------------------------------------------------
def federated_once(args, size: dict, device: torch.device, peak: Peak) -> dict[str, Any]:
    cfg = lm_config(args.model, args.device, clients=size["fed_clients"], batch=size["fed_batch"],
                    length=size["fed_length"], examples=size["fed_examples"], steps=size["fed_steps"],
                    threads=args.threads, model_extra={"dtype": "bfloat16"}, name="gpu-check-federated")
    release(device)
    t0 = time.perf_counter()
    app = App(cfg)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="fedfm-gpu-") as tmp:
        runner = Runner(app, "federated", RunDir(Path(tmp) / "run"))
        states = runner.initial_states()
        peak.reset()
        times, losses, clients = [], [], []
        for _ in range(size["fed_rounds"]):
            sync(device)
            t1 = time.perf_counter()
            record = runner.round(states, None)
            sync(device)
            times.append(time.perf_counter() - t1)
            losses.append(record["train_loss"])
            clients.append(len(record["clients"]))
        weights = {k: v.detach().clone() for k, v in states[0].weights.items()}
        mem = peak.read()
        del runner, states
    out = {"build_s": build_s, "round_s": times, "train_loss": losses, "clients_per_round": clients,
           "rounds_per_min": 60 * len(times) / sum(times), "peak_mib": mem,
           "trainable_params": app.trainable_params, "placement": str(app.placement)}
    del app
    release(device)
    return {**out, "weights": weights}


def measure_federated(args, size: dict, device: torch.device, peak: Peak) -> dict[str, Any]:
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    runs = []
    for k in range(2):
        runs.append(federated_once(args, size, device, peak))
        log(f"[federated run {k + 1}] {runs[-1]['rounds_per_min']:.2f} rounds/min, losses {runs[-1]['train_loss']}")
    a, b = runs[0].pop("weights"), runs[1].pop("weights")
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"clients": size["fed_clients"], "rounds": size["fed_rounds"], "local_steps": size["fed_steps"],
            "batch": size["fed_batch"], "max_length": size["fed_length"], "deterministic_algorithms": args.deterministic,
            "runs": runs, "rounds_per_min": runs[0]["rounds_per_min"], "bitwise_equal": bool(equal),
            "max_abs_weight_diff": max_diff(a, b) if a.keys() == b.keys() else None}


# --- report ---------------------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f} MiB"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, row in res["rows"].items():
        r = row.get("ratio")
        out.append({"measure": f"client loop / bare tokens/s, {name}", "result": None if r is None else round(r, 4),
                    "target": f">= {TARGET_RATIO}", "pass": None if r is None else r >= TARGET_RATIO})
    lo, q = res["rows"].get("lora_bf16", {}), res["rows"].get("qlora_4bit", {})
    lo_m, q_m = (lo.get("memory_mib") or {}).get("peak_fedfm"), (q.get("memory_mib") or {}).get("peak_fedfm")
    ok = None if lo_m is None or q_m is None else q_m < lo_m
    result = None if ok is None else f"{q_m:,.0f} vs {lo_m:,.0f} MiB"
    if res["dry_run"] and ok is not None:
        # process RSS keeps what earlier rows freed (the C allocator need not return it): not comparable across rows
        ok, result = None, f"{result} (CPU RSS: not compared)"
    out.append({"measure": "peak memory (client loop), qlora_4bit < lora_bf16", "result": result,
                "target": "QLoRA below LoRA bf16", "pass": ok})
    fed = res.get("federated") or {}
    eq = fed.get("bitwise_equal")
    out.append({"measure": f"{fed.get('clients', '?')}-client federated LoRA run == its rerun (same seed), bitwise",
                "result": eq, "target": "equal", "pass": eq})
    return out


def markdown(res: dict[str, Any], header: list[str]) -> str:
    lines = header + [f"- device: {res['device']}", ""]
    if res["dry_run"]:
        lines += ["**Dry run on the CPU**: tiny sizes (below), one torch thread; it checks that the script runs end to "
                  "end. Its timings are a noisy shared CPU's and its memory is the process's RSS, not the GPU targets' "
                  "measure.", ""]
    lines += ["| target | result | wanted | |", "|---|---|---|---|"]
    lines += [f"| {t['measure']} | {t['result']} | {t['target']} | {verdict(t['pass'])} |" for t in res["targets"]]
    lines += ["", f"## Client loop vs bare loop ({res['model']})", "",
              "| setting | trainable / total params | fedfm tokens/s | bare tokens/s | fedfm / bare (median) | "
              "per repetition | max abs delta diff | peak fedfm | peak bare | after build |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in res["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | not run: {row['error']} | | | | | | | | |")
            continue
        m = row["memory_mib"]
        lines.append(f"| {row['label']} | {row['trainable_params']:,} / {row['total_params']:,} | "
                     f"{row['tokens_per_s']['fedfm']:,.0f} | {row['tokens_per_s']['bare']:,.0f} | "
                     f"{row['ratio']:.3f} | {', '.join(f'{r:.3f}' for r in row['ratios'])} | "
                     f"{row['max_abs_delta_diff']:.1e} | {mib(m['peak_fedfm'])} | {mib(m['peak_bare'])} | "
                     f"{mib(m['after_build'])} |")
    first = next((r for r in res["rows"].values() if "error" not in r), None)
    if first:
        lines += ["", f"Each repetition: client 0 trains {first['steps']} steps of batch {first['batch']} x "
                  f"{first['max_length']} tokens (Shakespeare speeches packed into blocks), {res['reps']} repetitions "
                  "per path after an untimed warm-up of each, order rotated. *bare*: the same round by hand on the same "
                  "model object (global tensors copied in, same seeded batches and `task.batch`, fresh AdamW, same "
                  "autocast, forward / backward / clip / step, the change back to the CPU as float32). *max abs delta "
                  "diff*: the two paths' round-1 updates compared (the same work). Peak memory: "
                  f"{res['memory_kind']}, over one client round of each path, reset before it."]
    fed = res.get("federated")
    if fed and "error" not in fed:
        r1, r2 = fed["runs"]
        lines += ["", "## Federated LoRA run", "",
                  f"{fed['clients']} clients (Shakespeare, iid), LoRA r=8 on q,v over a bfloat16 base, every client "
                  f"every round, {fed['local_steps']} local steps of batch {fed['batch']} x {fed['max_length']} tokens, "
                  f"FedAvg, {fed['rounds']} rounds of `Runner.round` on the embedded engine (no evaluation); then the "
                  "same again from a freshly built App."
                  + (" `torch.use_deterministic_algorithms(True, warn_only=True)` was on." if fed["deterministic_algorithms"] else ""),
                  "",
                  "| run | rounds/min | round seconds | train loss per round | peak memory |", "|---|---|---|---|---|",
                  *[f"| {k} | {r['rounds_per_min']:.2f} | {', '.join(f'{t:.2f}' for t in r['round_s'])} | "
                    f"{', '.join(f'{x:.4f}' for x in r['train_loss'])} | {mib(r['peak_mib'])} |"
                    for k, r in (("first", r1), ("rerun", r2))],
                  "",
                  f"Final global weights bitwise equal: **{fed['bitwise_equal']}** (max abs difference "
                  f"{fed['max_abs_weight_diff']:.1e})."]
    elif fed:
        lines += ["", f"## Federated LoRA run: not run: {fed['error']}"]
    lines += ["", f"Total time: {res['total_s']:.0f} s. Raw numbers: `gpu.json` next to this file.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run at tiny sizes (default cuda)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"steps per timed client round (default {SIZES['gpu']['steps']} on a GPU, "
                         f"{SIZES['dry']['steps']} on the CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per path (default 5; CPU 2)")
    ap.add_argument("--model", default="smollm2",
                    help="causal LM: a packaged name (smollm2, from the cache) or a local Hugging Face model directory")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which throughput rows")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on the CPU, torch's on CUDA)")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True, warn_only=True) for the federated run")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results; the CPU dry run writes nothing unless given)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dry = device.type == "cpu"
    size = dict(SIZES["dry" if dry else "gpu"])
    args.steps = args.steps or size["steps"]
    size["reps"] = args.reps or size["reps"]
    if args.threads is None and dry:
        args.threads = 1  # a shared 2-core machine: two OpenMP threads per process make step times swing by 10x
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out if args.out is not None else (None if dry else RESULTS)
    command, info, header = result_header("GPU check: client loop vs bare loop, memory, federated rerun",
                                          "benchmarks/gpu.py")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            log(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU (use --device cpu for a dry run)")
            return 2
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}
        header.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    versions = {}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[pkg] = __import__(pkg).__version__
        except ImportError:
            versions[pkg] = None
    info["packages"] = versions
    header.append("- packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    peak = Peak(device)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"command": command, "machine": info, "date": info["date"], "device": str(device),
                           "dry_run": dry, "model": args.model, "steps": args.steps, "reps": size["reps"],
                           "sizes": size, "memory_kind": peak.kind, "target_ratio": TARGET_RATIO, "rows": {}}
    for name in args.rows:
        try:
            res["rows"][name] = measure_row(args, size, name, device, peak)
        except Exception as exc:  # noqa: BLE001  (one row failing must not lose the others' numbers)
            log(traceback.format_exc())
            res["rows"][name] = {"label": ROWS[name][0], "error": f"{type(exc).__name__}: {exc}"}
            release(device)
    try:
        res["federated"] = measure_federated(args, size, device, peak)
    except Exception as exc:  # noqa: BLE001
        log(traceback.format_exc())
        res["federated"] = {"clients": size["fed_clients"], "error": f"{type(exc).__name__}: {exc}"}
    res["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["total_s"] = time.perf_counter() - t_start
    res["targets"] = targets(res)
    md = markdown(res, header)
    print(md)
    write_results(out_dir, "gpu", md, res)
    failed = any(t["pass"] is False for t in res["targets"])
    errors = any("error" in r for r in res["rows"].values()) or "error" in res["federated"]
    for t in res["targets"]:
        log(f"{verdict(t['pass']):>4}  {t['measure']}: {t['result']} (target {t['target']})")
    return 1 if errors or (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
