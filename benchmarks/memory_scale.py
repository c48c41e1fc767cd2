"""Peak memory of one federated round of full fine-tuning at foundation-model size, against what it must hold.

A ~0.5B-parameter Llama (hidden 1024, 24 layers, MLP 4096, untied 49,152-token SmolLM2 vocabulary: 503M
parameters) is built from a config with random weights (``model.source: scratch``; no pretrained weights of this
size install here, and random weights cost the same memory). 8 clients x 1 local step (batch 1 x 64 tokens of the
Shakespeare corpus), full fine-tuning in float32, FedAvg, one round through ``Runner.round`` of the embedded engine.
The same with 12 layers (302M parameters) is where the old path still fits. ``--levers`` measures one client's
step of the 0.5B model with gradient checkpointing, micro-batches and bf16 weights on and off.

Each measurement is a fresh child process (``--child``): it builds the App, resets the kernel's RSS high-water mark
(VmHWM, ``/proc/self/clear_refs``), runs the round and reports the high-water mark of the round alone and of the
whole process. The same child runs on an older fedfm when ``--old-python`` names that install's interpreter (it
uses only ``App``, ``Runner`` and ``RunDir``, which both versions have), where the old path fits in this
machine's memory: it held every update of the round, so it is run only when this fedfm's peak plus
(clients - 1) updates is under 90% of the memory available.

The reference is what a round cannot do without, from the parameter count P and b = 4 bytes per weight:
the model (P b), its gradients (P b), AdamW's two moments (2 P b), and one update in flight (P b), plus the
interpreter with fedfm imported (measured in a child that only imports it). The server also
keeps the global weights the round started from (P b) and the running sum of the mean (P b, float32); those are
listed beside the reference. A third child, the *bare loop*, runs the same round by hand in plain PyTorch on the
same App (``bare_round``): the floor any implementation meets, AdamW's temporaries and the allocator included.

    python benchmarks/memory_scale.py --old-python /tmp/old-venv/bin/python   # full (~40 min on 2 cores)
    python benchmarks/memory_scale.py --quick --out /tmp/ms                     # tiny Llama, same code (~20 s)
    python benchmarks/memory_scale.py --levers     # checkpointing / micro-batches / bf16 at 0.5B (~10 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIB = 2**30

# ~0.5B parameters with the SmolLM2 tokenizer's 49,152 tokens (untied head): 503,382,016
ARCH_05B = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
            "intermediate_size": 4096, "tie_word_embeddings": False, "max_position_embeddings": 256}
# the same with 12 layers (302M parameters): where the old path, holding all 8 updates, still fits in 23 GiB
ARCH_03B = {**ARCH_05B, "num_hidden_layers": 12}
ARCH_QUICK = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
              "tie_word_embeddings": False, "max_position_embeddings": 256}
NO_EVAL = 1_000_000  # rounds / eval.every: Runner.round evaluates only when r % every == 0 or r == rounds


def config(arch: dict, dtype: str, clients: int, out: str) -> dict[str, Any]:  # noqa: D103
    """The run: a scratch Llama of ``arch``, full fine-tuning, ``clients`` owners x 1 step, no evaluation."""
    return {
        "name": "memory-scale", "seed": 0, "task": "causal_lm", "rounds": NO_EVAL, "output_dir": out,
        "data": {"source": "shakespeare", "owner": "play", "max_examples": 100 * clients, "partition": "iid",
                 "test_fraction": 0.1, "client_test_fraction": 0.0, "max_length": 64},
        "model": {"source": "scratch", "tokenizer": "smollm2", "arch": arch, "dtype": dtype},
        "peft": {"method": "none"},
        "train": {"local_steps": 1, "batch_size": 1, "lr": 1e-4, "schedule": "constant", "max_grad_norm": 1.0},
        "strategy": {"name": "fedavg"},
        "federation": {"num_clients": clients, "fraction": 1.0},
        "engine": {"threads": 2},
        "eval": {"every": NO_EVAL, "max_examples": 8},
    }


# --- the child: one round, its peak memory ----------------------------------------------------------------------
def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(cfg_path: Path) -> None:
    """Print, as JSON, the RSS high-water marks of setup and of one round (imports only with cfg_path 'imports')."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import fedfm.app  # noqa: F401  (and with it peft, datasets, ...)

    if str(cfg_path) == "imports":
        print(json.dumps({"imports_hwm_kb": status_kb("VmHWM")}))
        return
    from fedfm.app import App
    from fedfm.config import from_dict
    from fedfm.rundir import RunDir
    from fedfm.server import Runner

    raw = json.loads(cfg_path.read_text())
    bare, client_only = raw.pop("bare", False), raw.pop("client_only", False)
    app = App(from_dict(raw))
    if client_only:  # --levers: one client's training alone (its update as it leaves the client)
        from fedfm.types import ClientTask

        round_ = lambda: {"train_loss": app.client_train(0, ClientTask(1, app.initial_weights)).metrics["train_loss"]}  # noqa: E731
    elif bare:
        round_ = lambda: bare_round(app)  # noqa: E731
    else:
        runner = Runner(app, "federated", RunDir(Path(raw["output_dir"]) / "run"))
        states = runner.initial_states()
        round_ = lambda: runner.round(states, None)  # noqa: E731
    setup_kb = status_kb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark from here on is the round's alone
    before_kb = status_kb("VmRSS")
    record = round_() or {}
    print(json.dumps({"setup_hwm_kb": setup_kb, "rss_before_round_kb": before_kb, "round_hwm_kb": status_kb("VmHWM"),
                      "params": app.total_params, "trainable": app.trainable_params,
                      "clients": len(record.get("clients", app.shards[: raw["federation"]["num_clients"]])),
                      "train_loss": record.get("train_loss")}))


def bare_round(app) -> None:
    """The floor: a hand-written PyTorch round on the same model and shards. Per client: the global weights
    copied in, a fresh AdamW, the client's steps (``Task.batch`` + ``Task.loss``), its delta folded into an
    example-weighted running sum; then the new global weights."""
    import torch

    from fedfm.client import batch_order, derive_seed

    model, cfg = app.model, app.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    glob = [p.detach().clone() for p in params]
    total = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    n_all = 0
    model.train()
    for i, shard in enumerate(app.shards[: cfg.federation.num_clients]):
        data = shard.train
        with torch.no_grad():
            for p, g in zip(params, glob):
                p.copy_(g)
        s = derive_seed(cfg.seed, 1, i)
        batches = batch_order(len(data), cfg.train.local_steps * cfg.train.batch_size, cfg.train.batch_size,
                              torch.Generator().manual_seed(s))
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        for idx in batches:
            app.task.loss(model, app.task.batch(data, idx)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        del opt
        with torch.no_grad():
            for t, p, g in zip(total, params, glob):
                t.add_((p - g).float(), alpha=len(data))
        n_all += len(data)
    with torch.no_grad():
        for t, g in zip(total, glob):
            g.add_((t / n_all).to(g.dtype))


def run_child(python: str, cfg: dict[str, Any] | None, src: Path | None) -> dict[str, Any]:
    """This script's --child under ``python`` (with ``src`` first on its path); its JSON line."""
    with tempfile.TemporaryDirectory(prefix="fedfm-memscale-") as tmp:
        arg = "imports"
        if cfg is not None:
            arg = str(Path(tmp) / "cfg.json")
            Path(arg).write_text(json.dumps({**cfg, "output_dir": tmp}))
        env = {**os.environ, "PYTHONPATH": str(src)} if src else dict(os.environ)
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", arg], capture_output=True, text=True,
                              env=env, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the parent: runs, reference, report --------------------------------------------------------------------------
def reference(params: int, imports_kb: int) -> dict[str, float]:
    """GiB a full fine-tuning round cannot do without (see the module docstring), float32 weights."""
    copy = params * 4 / GIB
    parts = {"imports": imports_kb * 1024 / GIB, "model": copy, "gradients": copy, "adamw": 2 * copy, "one_update": copy}
    return {**parts, "total": sum(parts.values()), "global_weights": copy, "running_sum": copy}


def available_kb() -> int:
    return int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable:")))


def measure_size(args, name: str, arch: dict, clients: int, imports_kb: int) -> list[dict[str, Any]]:
    """The bare loop, this fedfm and (where it fits) the old one, on one model size."""
    runs: list[dict[str, Any]] = []
    paths = [("bare", sys.executable), ("this", sys.executable)] + ([("old", args.old_python)] if args.old_python else [])
    for code, python in paths:
        row: dict[str, Any] = {"size": name, "code": code}
        this = next((r for r in runs if r["code"] == "this" and "round_hwm_kb" in r), None)
        if code == "old" and this is not None:
            # the old path held every update of the round until the last one arrived: clients - 1 more than this one
            estimate = this["round_hwm_kb"] + (clients - 1) * this["params"] * 4 / 1024
            if estimate > 0.9 * available_kb():
                runs.append({**row, "skipped": f"holds all {clients} updates: about {estimate / 2**20:.1f} GiB, more "
                             f"than the {available_kb() / 2**20:.1f} GiB available"})
                continue
        res = run_child(python, {**config(arch, "float32", clients, ""), "bare": code == "bare"}, None)
        runs.append({**row, **res})
        print(f"[{name} {code}] {res}", file=sys.stderr, flush=True)
    bare = next((r["round_hwm_kb"] for r in runs if r["code"] == "bare" and "round_hwm_kb" in r), None)
    for r in runs:
        if "round_hwm_kb" in r:
            ref = reference(r["params"], imports_kb)
            r.update(reference_gib=ref, round_peak_gib=r["round_hwm_kb"] * 1024 / GIB,
                     setup_peak_gib=r["setup_hwm_kb"] * 1024 / GIB, ratio=r["round_hwm_kb"] * 1024 / GIB / ref["total"],
                     ratio_bare=r["round_hwm_kb"] / bare if bare else None)
    return runs


def fmt(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def markdown(res: dict[str, Any], header: list[str]) -> str:
    sizes = "; ".join(f"{n}: {a} = {p:,} parameters" for n, (a, p) in res["sizes"].items())
    lines = header + [
        "",
        f"Scratch Llamas (random weights; SmolLM2 tokenizer, untied head) — {sizes}. Full fine-tuning in float32, "
        f"{res['clients']} clients x 1 step (batch 1 x 64 tokens), FedAvg, one round of `Runner.round` on the "
        "embedded engine. Peak = the round's RSS high-water mark (VmHWM reset after setup). Reference = interpreter "
        "with fedfm imported + model + gradients + AdamW moments + one update in flight. Bare loop = a hand-written "
        "PyTorch round on the same App (global weights copied in, fresh AdamW, the steps, the delta into a running "
        "sum): what any implementation needs, the allocator's and AdamW's temporaries included. *old* = the same "
        "child on fedfm before the round pipeline (every update of the round held until the last one arrived), run "
        "where it fits in this machine's memory.",
        "",
        "| model | code | round peak RSS | reference | peak / reference | peak / bare loop | setup peak | "
        "model+grads+AdamW+update | global weights + running sum |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        if "ratio" not in r:
            lines.append(f"| {r['size']} | {r['code']} | not run: {r.get('skipped') or r.get('error')} | | | | | | |")
            continue
        ref = r["reference_gib"]
        lines.append(f"| {r['size']} | {r['code']} | {r['round_peak_gib']:.2f} GiB | {ref['total']:.2f} GiB | "
                     f"{r['ratio']:.2f}x | {fmt(r['ratio_bare'])} | {r['setup_peak_gib']:.2f} GiB | "
                     f"{ref['model'] + ref['gradients'] + ref['adamw'] + ref['one_update']:.2f} GiB | "
                     f"{ref['global_weights'] + ref['running_sum']:.2f} GiB |")
    return "\n".join(lines) + "\n"


# --levers: one client's step of full fine-tuning with the memory levers on and off (batch 8 x 256 tokens)
LEVERS = [("float32", {}), ("float32", {"gradient_checkpointing": True}), ("float32", {"micro_batch_size": 2}),
          ("float32", {"gradient_checkpointing": True, "micro_batch_size": 2}),
          ("bfloat16", {"gradient_checkpointing": True, "micro_batch_size": 2})]


def lever_config(arch: dict, dtype: str, train: dict[str, Any], quick: bool) -> dict[str, Any]:
    raw = config(arch, dtype, 1, "")
    raw["data"].update(max_length=64 if quick else 256, max_examples=200)
    raw["train"].update(batch_size=8, **train)
    return {**raw, "client_only": True}


def levers(args) -> tuple[dict[str, Any], str]:
    """Peak memory of one client's round under each lever, beside fedfm.sizing's estimate of the same config."""
    from fedfm.config import from_dict
    from fedfm.sizing import estimate

    arch = ARCH_QUICK if args.quick else ARCH_05B
    interpreter = run_child(sys.executable, None, None)["imports_hwm_kb"] * 1024 / GIB  # python + fedfm imported
    runs = []
    for dtype, train in LEVERS[:2] if args.quick else LEVERS:
        raw = lever_config(arch, dtype, train, args.quick)
        res = run_child(sys.executable, raw, None)
        est = estimate(from_dict({**{k: v for k, v in raw.items() if k != "client_only"}, "output_dir": "/tmp"}))
        row = {"dtype": dtype, **{"gradient_checkpointing": False, "micro_batch_size": None}, **train, **res,
               "estimate_gib": est.peak_bytes / GIB, "estimate_activations_gib": est.activation_bytes / GIB}
        if "round_hwm_kb" in res:
            row["round_peak_gib"] = res["round_hwm_kb"] * 1024 / GIB
        runs.append(row)
        print(f"[levers] {row}", file=sys.stderr, flush=True)
    base = runs[0].get("round_peak_gib")
    lines = ["", f"One client's round alone (`App.client_train`: weights copied in, one step, the update out as float32), full fine-tuning of the scratch Llama ({runs[0].get('params', 0):,} "
             f"parameters, random weights), batch 8 x {lever_config(arch, 'float32', {}, args.quick)['data']['max_length']} "
             "tokens, AdamW; peak = the client round's RSS high-water mark in a fresh process, which includes the "
             "server's float32 copy of the weights the App keeps and the interpreter with fedfm imported ({interpreter:.2f} GiB, measured alone). Estimate = `fedfm info` (fedfm.sizing's "
             "formula, without the interpreter) for the same config.", "",
             "| model.dtype | gradient checkpointing | micro-batch | round peak RSS | vs first row | peak - interpreter "
             "| estimate (fedfm info) | train loss |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        peak = r.get("round_peak_gib")
        lines.append(f"| {r['dtype']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['micro_batch_size'] or 'off (8)'} | "
                     + (f"{peak:.2f} GiB | {peak / base:.2f}x | {peak - interpreter:.2f} GiB" if peak and base
                        else f"not run: {r.get('error')} | |")
                     + f" | {r['estimate_gib']:.2f} GiB | {r.get('train_loss') or float('nan'):.4f} |")
    return {"levers": runs, "interpreter_gib": interpreter}, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2-layer hidden-64 Llama, 2 clients")
    ap.add_argument("--old-python", default=None, help="interpreter of an older fedfm install to run the same child")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; quick: none)")
    ap.add_argument("--levers", action="store_true", help="only the memory levers (gradient checkpointing, "
                    "micro-batches, bf16) on one client: writes memory_levers.{md,json}")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.levers:
        return main_levers(args)
    sizes = {"tiny": ARCH_QUICK} if args.quick else {"0.5B": ARCH_05B, "0.3B": ARCH_03B}
    clients = 2 if args.quick else 8
    imports = run_child(sys.executable, None, None)
    print(f"[imports] {imports}", file=sys.stderr, flush=True)
    runs = [r for name, arch in sizes.items() for r in measure_size(args, name, arch, clients, imports["imports_hwm_kb"])]
    params = {r["size"]: r["params"] for r in runs if "params" in r}
    res = {"sizes": {n: (a, params.get(n, 0)) for n, a in sizes.items()}, "clients": clients, "imports": imports,
           "runs": runs}
    sys.path.insert(0, str(HERE))
    from machine import result_header

    command, info, header = result_header("Memory at scale: one round of full fine-tuning", "benchmarks/memory_scale.py")
    md = markdown(res, header)
    print(md)
    out = args.out if args.out or args.quick else HERE / "results"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_scale.md").write_text(md)
        (out / "memory_scale.json").write_text(json.dumps({"command": command, "machine": info, **res}, indent=1))
    if any("error" in r for r in runs):
        sys.exit(1)


def main_levers(args) -> None:
    sys.path.insert(0, str(HERE))
    from machine import result_header, write_results

    res, table = levers(args)
    command, info, header = result_header("Memory levers: gradient checkpointing, micro-batches, bf16",
                                          "benchmarks/memory_scale.py")
    md = "\n".join(header) + "\n" + table + "\n"
    print(md)
    write_results(args.out if args.out or args.quick else HERE / "results", "memory_levers", md,
                  {"command": command, "machine": info, **res})
    if any("error" in r for r in res["levers"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
