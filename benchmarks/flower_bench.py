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


def suite_flower(rounds: int, extra: list[str], quick: bool = False) -> tuple[list[dict], str]:
    """The three measurements over ``rounds`` rounds each; ``extra`` overrides the job (engines.py --quick).
    ``quick`` (the test suite's smoke run) keeps the fedfm job on both engines and the echo app's latency floor, and
    leaves out the adapter-sized echo and the secure-aggregation pair (tests/test_flower.py runs secure aggregation
    over Flower)."""
    import torch
    from safetensors.torch import load_file

    from fedfm import config, server
    from fedfm.deploy import LocalFederation
    from fedfm.owner import export_owners

    root = Path(tempfile.mkdtemp(prefix="fedfm-flower-bench-"))
    sets = JOB + [f"rounds={rounds}", f"output_dir={root / 'runs'}", *extra]
    emb_cfg = config.load(None, sets + ["name=embedded"])
    t0 = time.perf_counter()
    emb = server.run(emb_cfg)
    emb_wall = time.perf_counter() - t0
    flower_cfg = config.load(None, sets + ["name=flower", "engine.name=flower", "engine.timeout_s=600"])
    owners = export_owners(flower_cfg, root / "owners")
    echo_dir = root / "echo"
    echo_dir.mkdir()
    (echo_dir / "pyproject.toml").write_text(ECHO_PYPROJECT)
    (echo_dir / "flower_echo.py").write_text(ECHO)
    trainable = json.loads((emb / "summary.json").read_text())["trainable_params"]
    results = {}
    with LocalFederation(root / "fed", owners) as fed:
        from fedfm.deploy import submit_app

        for label, floats in (("tiny", 1),) if quick else (("tiny", 1), ("adapter", trainable)):
            out = root / f"echo-{label}.json"
            status = submit_app(echo_dir, {"rounds": rounds, "floats": floats, "out": str(out)}, fed.home,
                                echo=lambda line: None)
            assert status["status"].startswith("finished:completed"), status
            results[label] = json.loads(out.read_text())
        t0 = time.perf_counter()
        status = fed.submit(flower_cfg.model_dump(mode="json"), root / "flower-run", echo=lambda line: None)
        flower_wall = time.perf_counter() - t0
        assert status["status"].startswith("finished:completed"), status
        # secure aggregation + distributed DP: 4 protocol messages per owner per round besides training
        status = {"status": "finished:completed"} if quick else fed.submit(config.load(None, sets + SECAGG + ["name=sa-flower", "engine.name=flower",
                                                              "engine.timeout_s=600"]).model_dump(mode="json"),
                            root / "sa-flower", echo=lambda line: None)
        assert status["status"].startswith("finished:completed"), status
    if not quick:
        sa_emb = server.run(config.load(None, sets + SECAGG + ["name=sa-embedded"]))
        m_sa = {k: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
                for k, d in (("embedded", sa_emb), ("flower", root / "sa-flower"))}
        sa_same = all(torch.equal(x, y) for x, y in zip(load_file(_latest(sa_emb)).values(),
                                                        load_file(_latest(root / "sa-flower")).values()))
    run = root / "flower-run"
    m_emb = [json.loads(x) for x in (emb / "metrics.jsonl").read_text().splitlines()]
    m_fl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    nodes = json.loads((run / "nodes.json").read_text())
    a, b = load_file(_latest(emb)), load_file(_latest(run))
    same = all(torch.equal(a[k], b[k]) for k in a)

    def mean(xs):
        return sum(xs) / len(xs)

    rows = [
        {"setting": "embedded engine, fedfm job", "round_s": mean([x["round_time_s"] for x in m_emb]),
         "bytes_per_round": mean([x["bytes_up"] + x["bytes_down"] for x in m_emb]), "wall_s": emb_wall},
        {"setting": "flower engine, fedfm job", "round_s": mean([x["round_time_s"] for x in m_fl]),
         "bytes_per_round": mean([x["bytes_up"] + x["bytes_down"] for x in m_fl]), "wall_s": flower_wall,
         "wire_array_bytes": nodes["wire_bytes"]},
        {"setting": "Flower-only echo app, 4-byte array", "round_s": mean(results["tiny"]["round_s"]),
         "bytes_per_round": 2 * 4 * results["tiny"]["nodes"]},
    ]
    if not quick:
        rows += [
        {"setting": f"Flower-only echo app, {trainable:,}-float array (the adapter's size)",
         "round_s": mean(results["adapter"]["round_s"]), "bytes_per_round": 2 * 4 * trainable * results["adapter"]["nodes"]},
        {"setting": "embedded engine, same job with secure aggregation + distributed DP",
         "round_s": mean([x["round_time_s"] for x in m_sa["embedded"]]),
         "bytes_per_round": mean([x["bytes_up"] + x["bytes_down"] for x in m_sa["embedded"]])},
        {"setting": "flower engine, same job with secure aggregation + distributed DP",
         "round_s": mean([x["round_time_s"] for x in m_sa["flower"]]),
         "bytes_per_round": mean([x["bytes_up"] + x["bytes_down"] for x in m_sa["flower"]]),
         "epsilon": m_sa["flower"][-1].get("epsilon"), "equal_to_embedded": sa_same},
        ]
    shutil.rmtree(root, ignore_errors=True)
    floor = rows[2]["round_s"]
    lines = ["| setting | s / round | x embedded | minus Flower floor, s | payload bytes / round |", "|---|---|---|---|---|"]
    for r in rows:
        ref = rows[4]["round_s"] if "secure" in r["setting"] else rows[0]["round_s"]  # same job on embedded
        lines.append(f"| {r['setting']} | {r['round_s']:.2f} | {r['round_s'] / ref:.1f}x | "
                     f"{r['round_s'] - floor:+.2f} | {r['bytes_per_round']:,.0f} |")
    ns = nodes["node_seconds"]
    setup = mean([x["node_setup_s"] for x in ns if x["node_setup_s"] is not None])
    train = mean([x["node_train_s"] for x in ns if x["node_train_s"] is not None])
    rows[1].update(node_setup_s=setup, node_train_s=train)
    lines += ["", f"Inside the Flower engine's round, each training message's ClientApp spent {setup:.2f} s loading the "
              f"owner's App (imports are before that, in the process start) and {train:.2f} s training (means over "
              f"{len(ns)} messages)."]
    lines += ["", f"{rounds} rounds each, {len(owners)} owners (SuperNodes) and the SuperLink on this machine's loopback, TLS and "
              "node authentication on. fedfm's bytes are the serialized update/broadcast messages (the same count "
              f"on every engine); the Flower records' array payload over the whole run was {nodes['wire_bytes']}. "
              f"Flower and embedded final adapters bitwise equal: {same}"
              + ("." if quick else f"; with secure aggregation and distributed DP (epsilon {rows[-1]['epsilon']:.2f} "
                 f"after {rounds} rounds): {sa_same}.")]
    rows[1]["equal_to_embedded"] = same
    return rows, "\n".join(lines)


def _latest(run_dir: Path) -> Path:
    ck = Path(run_dir) / "checkpoints"
    return ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors"
