"""Flower engine vs embedded engine on one job, and Flower's own round-latency floor (used by engines.py).

One SuperLink and 3 SuperNodes on loopback, TLS and node authentication on, each node on its own owner
directory (exported from the config's split). Three measurements in one run:

1. embedded engine, the job below (1 torch thread, like each node);
2. the same job on the Flower engine (fedfm's ServerApp/ClientApp);
3. a minimal Flower app written only with Flower's API, the pattern of Flower's quickstart examples (the
   ServerApp sends an ArrayRecord to every node with ``grid.send_and_receive``, the ClientApp returns it):
   once with a tiny array (the runtime's latency floor) and once with an array of the adapter's size.

Job: MiniLM + LoRA r=8 on BBC (600 articles, 3 owners, Dirichlet alpha=1), 5 local steps of batch 16 per round.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

ECHO_PYPROJECT = """[project]
name = "flower-echo"
version = "0.1.0"
description = "Flower's quickstart pattern with no training: the runtime's round latency"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedfm-bench"

[tool.flwr.app.components]
serverapp = "flower_echo:server"
clientapp = "flower_echo:client"

[tool.flwr.app.config]
rounds = 3
floats = 1
out = ""
"""

ECHO = '''"""A Flower app with no fedfm code: each round the ServerApp sends an ArrayRecord to every node, which returns it."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@client.train()
def train(msg, context):
    return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


@server.main()
def main(grid, context):
    rc = context.run_config
    ids = sorted(grid.get_node_ids())
    arrays = ArrayRecord({"w": Array(np.zeros(int(rc["floats"]), np.float32))})
    times, replies = [], 0
    for _ in range(int(rc["rounds"])):
        t = time.perf_counter()
        got = list(grid.send_and_receive([Message(RecordDict({"arrays": arrays}), i, "train") for i in ids],
                                         timeout=300))
        times.append(time.perf_counter() - t)
        replies = sum(not m.has_error() for m in got)
    Path(str(rc["out"])).write_text(json.dumps({"round_s": times, "replies": replies, "nodes": len(ids)}))
'''

JOB = ["seed=0", "data.source=bbc", "data.max_examples=600", "data.partition=dirichlet", "data.alpha=1.0",
       "data.max_length=64", "federation.num_clients=3", "model.source=minilm", "peft.method=lora",
       "peft.options={r: 8, lora_alpha: 16, target_modules: [query, value]}", "train.local_steps=5",
       "train.batch_size=16", "train.lr=0.003", "eval.max_examples=100", "engine.threads=1"]


# seeded noise: the Flower run must repeat the embedded run bit for bit (owners' secret noise would differ)
SECAGG = ["secagg.enabled=true", "dp.mode=distributed", "dp.seeded_noise=true", "dp.noise_multiplier=0.5",
          "dp.clip_norm=0.5", "federation.min_clients=2", "compare.methods=[federated]"]


SMOLLM2 = ["seed=0", "task=causal_lm", "data.source=shakespeare", "data.owner=play", "data.max_examples=600",
           "data.partition=dirichlet", "data.alpha=1.0", "data.max_length=64", "federation.num_clients=3",
           "model.source=smollm2", "peft.method=lora",
           "peft.options={r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}", "train.local_steps=5",
           "train.batch_size=4", "train.lr=0.001", "eval.max_examples=16", "engine.threads=1"]


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def _same(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(_latest(a)), load_file(_latest(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _node_seconds(run: Path) -> dict:
    ns = json.loads((Path(run) / "nodes.json").read_text())["node_seconds"]
    return {k: _mean(x[k] for x in ns if x.get(k) is not None) for k in ("node_setup_s", "node_train_s")} | {
        "messages": len(ns), "first_setup_s": ns[0]["node_setup_s"] if ns else None}


def suite_flower(rounds: int, extra: list[str], quick: bool = False, model: str = "minilm") -> tuple[list[dict], str]:
    """Over ``rounds`` rounds each: the job on the embedded engine, on Flower with the owners' workers (after) and
    with a ClientApp that loads the owner's App for every message (before), the same pair under secure aggregation
    + distributed DP, and Flower's own latency floor (an echo app). ``extra`` overrides the job (--quick).
    ``quick`` (the test suite's smoke run) keeps the fedfm job on the embedded engine and Flower with workers, and
    the echo app's floor."""
    from fedfm import config, server
    from fedfm.deploy import LocalFederation, submit_app
    from fedfm.owner import export_owners

    root = Path(tempfile.mkdtemp(prefix="fedfm-flower-bench-"))
    job = SMOLLM2 if model == "smollm2" else JOB
    sets = job + [f"rounds={rounds}", f"output_dir={root / 'runs'}", *extra]
    flower = ["engine.name=flower", "engine.timeout_s=900"]
    runs: dict[str, Path] = {"embedded": server.run(config.load(None, sets + ["name=embedded"]))}
    if not quick:
        runs["sa-embedded"] = server.run(config.load(None, sets + SECAGG + ["name=sa-embedded"]))
    owners = export_owners(config.load(None, sets), root / "owners")
    echo_dir = root / "echo"
    echo_dir.mkdir()
    (echo_dir / "pyproject.toml").write_text(ECHO_PYPROJECT)
    (echo_dir / "flower_echo.py").write_text(ECHO)
    trainable = json.loads((runs["embedded"] / "summary.json").read_text())["trainable_params"]
    echo, walls = {}, {}
    for worker in (True,) if quick else (True, False):
        tag = "worker" if worker else "no-worker"
        with LocalFederation(root / f"fed-{tag}", owners, worker=worker) as fed:
            if worker:
                for label, floats in (("tiny", 1),) if quick else (("tiny", 1), ("adapter", trainable)):
                    out = root / f"echo-{label}.json"
                    status = submit_app(echo_dir, {"rounds": rounds, "floats": floats, "out": str(out)}, fed.home,
                                        echo=lambda line: None)
                    assert status["status"].startswith("finished:completed"), status
                    echo[label] = json.loads(out.read_text())
            for prefix, more in (("", []),) if quick else (("", []), ("sa-", SECAGG)):
                name = f"{prefix}flower-{tag}"
                t0 = time.perf_counter()
                status = fed.submit(config.load(None, sets + more + flower + [f"name={name}"]).model_dump(mode="json"),
                                    root / name, echo=lambda line: None)
                walls[name] = time.perf_counter() - t0
                assert status["status"].startswith("finished:completed"), (name, status)
                runs[name] = root / name
    floor = _mean(echo["tiny"]["round_s"])
    settings = [("embedded", "embedded engine, fedfm job", "embedded"),
                ("flower-worker", "flower engine, owners' workers (after)", "embedded"),
                ("flower-no-worker", "flower engine, App loaded per message (before)", "embedded"),
                ("sa-embedded", "embedded engine, secure aggregation + distributed DP", "sa-embedded"),
                ("sa-flower-worker", "flower engine, secure aggregation + distributed DP, owners' workers (after)",
                 "sa-embedded"),
                ("sa-flower-no-worker", "flower engine, secure aggregation + distributed DP, App loaded per message "
                 "(before)", "sa-embedded")]
    rows = []
    for key, label, ref in settings:
        if key not in runs:
            continue
        m = _rounds(runs[key])
        row = {"setting": label, "round_s": _mean(x["round_time_s"] for x in m),
               "bytes_per_round": _mean(x["bytes_up"] + x["bytes_down"] for x in m), "wall_s": walls.get(key)}
        if key != ref:
            row["equal_to_embedded"] = _same(runs[ref], runs[key])
            row.update(_node_seconds(runs[key]))
            ref_s = _mean(x["round_time_s"] for x in _rounds(runs[ref]))
            row["target_s"] = 1.1 * (ref_s + floor)  # the embedded round plus Flower's floor, plus 10%
        if key.startswith("sa-"):
            row["epsilon"] = m[-1].get("epsilon")
        # sequential message exchanges per round: training, plus secure aggregation's 4 protocol steps
        row["exchanges"] = 5 if key.startswith("sa-") else 1
        if "target_s" in row:
            row["target_exchanges_s"] = 1.1 * (ref_s + row["exchanges"] * floor)
        rows.append(row)
    rows.append({"setting": "Flower-only echo app, 4-byte array", "round_s": floor,
                 "bytes_per_round": 2 * 4 * echo["tiny"]["nodes"]})
    if "adapter" in echo:
        rows.append({"setting": f"Flower-only echo app, {trainable:,}-float array (the adapter's size)",
                     "round_s": _mean(echo["adapter"]["round_s"]),
                     "bytes_per_round": 2 * 4 * trainable * echo["adapter"]["nodes"]})
    shutil.rmtree(root, ignore_errors=True)
    return rows, _table(rows, rounds, len(owners), model, floor)


def _table(rows: list[dict], rounds: int, owners: int, model: str, floor: float) -> str:
    ref = {r["setting"]: r["round_s"] for r in rows}
    lines = ["| setting | s / round | x embedded | target: embedded + floor + 10% | embedded + floor per exchange "
             "+ 10% | App loading per message, s | equal to embedded | payload bytes / round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ref["embedded engine, secure aggregation + distributed DP" if "secure" in r["setting"] else
                   "embedded engine, fedfm job"] if "echo" not in r["setting"] else ref["embedded engine, fedfm job"]
        target = f"{r['target_s']:.2f} ({'met' if r['round_s'] <= r['target_s'] else 'missed'})" if "target_s" in r else ""
        per_exchange = (f"{r['target_exchanges_s']:.2f} ({r['exchanges']} exchanges: "
                        f"{'met' if r['round_s'] <= r['target_exchanges_s'] else 'missed'})"
                        if "target_exchanges_s" in r else "")
        setup = f"{r['node_setup_s']:.2f} (first {r['first_setup_s']:.2f})" if r.get("node_setup_s") is not None else ""
        same = {True: "bitwise", False: "no"}.get(r.get("equal_to_embedded"), "")
        lines.append(f"| {r['setting']} | {r['round_s']:.2f} | {r['round_s'] / base:.1f}x | {target} | {per_exchange} | "
                     f"{setup} | {same} | {r['bytes_per_round']:,.0f} |")
    job = ("SmolLM2-135M-Instruct + LoRA r=8 (q_proj, v_proj), causal LM on Shakespeare (600 speeches), batch 4"
           if model == "smollm2" else "MiniLM + LoRA r=8 on BBC (600 articles), batch 16")
    lines += ["", f"Job: {job}; 3 owners (Dirichlet alpha=1), 5 local steps per round; {rounds} rounds each, the "
              f"SuperLink and {owners} SuperNodes on this machine's loopback, TLS and node authentication on, 1 torch "
              f"thread per node. Flower's floor (the echo app's round) is {floor:.2f} s. 'App loading per message' is "
              "what a training message waited for the owner's App on the node (mean; the first message of the run in "
              "brackets): with workers the App is loaded once per run, while the server gathers the owners, so the "
              "first training message finds it ready or nearly so. Under secure aggregation a round is 5 sequential "
              "exchanges (4 protocol steps and training), each paying Flower's floor."]
    return "\n".join(lines)


def _latest(run_dir: Path) -> Path:
    ck = Path(run_dir) / "checkpoints"
    return ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors"
