"""Flower's own simulation runtime (`flwr run`, Ray) vs fedfm's embedded engine on the same job (issue #24).

    python benchmarks/flower_simulation.py                       # the full job, 4-5 min on 2 cores
    python benchmarks/flower_simulation.py --quick --out /tmp/fs # 2 clients, 1 round, 1 step (the test suite's)

Job: all-MiniLM-L6-v2 + LoRA (r=8, alpha 16, query/value) sequence classification on BBC News (5 classes,
2,225 articles, 444 held out as the global test set), 10 owners (Dirichlet alpha=1), every owner every round,
3 rounds of 5 local AdamW steps of batch 16 at length 64, lr 3e-3 (constant), gradient norm clipped at 1,
FedAvg weighted by training examples, 1 torch thread per process.

Two sides, each one command measured from process start to exit:

1. fedfm: ``fedfm.server.run(cfg)`` (the embedded engine: one process trains the owners in turn) in a fresh
   Python subprocess, ``cfg`` built by ``fedfm.config.load(None, JOB)``.
2. Flower: the same split written with ``fedfm.owner.export_owners`` (one owner directory per partition) and a
   Flower app written only with Flower + transformers + peft + torch in the pattern of Flower's quickstart-
   huggingface / FlowerTune examples (``APP`` below: a ClientApp that builds the model and tokenizer, reads its
   partition, trains and returns the LoRA weights as an ArrayRecord; a ServerApp running
   ``flwr.serverapp.strategy.FedAvg`` with a centralized evaluation on the global test set after the last round),
   generated into a temporary directory and run with ``flwr run APPDIR local --stream`` against Flower's managed
   local SuperLink in simulation mode (10 SuperNodes, Ray backend with 2 CPUs, 1 CPU per client), from a private
   FLWR_HOME. ``flwr run`` starts that SuperLink detached and leaves it running; this script stops it (and any
   process of its own run still alive) by PID afterwards.

Memory is the peak of the summed RSS of the launched process and every descendant (Ray's GCS, raylet and workers
included), sampled every 0.2 s. RSS counts pages shared between processes once per process (torch's libraries in
every Ray worker, Ray's shared object store in every process that maps it), so a tree of processes reads higher
than the memory it takes from the machine.

Writes benchmarks/results/flower_simulation.md and .json, or under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from machine import QUICK_SETS, add_quick_args, result_header, results_dir, write_results  # noqa: E402

JOB = ["seed=0", "data.source=bbc", "data.partition=dirichlet", "data.alpha=1.0", "data.max_length=64",
       "federation.num_clients=10", "model.source=minilm", "peft.method=lora",
       "peft.options={r: 8, lora_alpha: 16, lora_dropout: 0.0, target_modules: [query, value]}",
       "train.local_steps=5", "train.batch_size=16", "train.lr=0.003", "train.schedule=constant",
       "train.max_grad_norm=1.0", "train.weight_decay=0.0", "rounds=3",
       "eval.every=1000",  # the global test set once, after the last round (as the Flower side)
       "engine.threads=1"]
# --quick: 240 articles (48 in the global test set) cut to 32 tokens, 2 owners, 1 round of 1 local step of 8
QUICK = [*QUICK_SETS, "federation.num_clients=2", "rounds=1"]

SAMPLE_S = 0.2

PYPROJECT = """[project]
name = "flower-minilm-lora"
version = "1.0.0"
description = "MiniLM + LoRA text classification with Flower (the quickstart-huggingface pattern)"
license = "Apache-2.0"
dependencies = []  # flwr, torch, transformers, peft are installed already: nothing installs at run time

[tool.flwr.app]
publisher = "fedfm-bench"

[tool.flwr.app.components]
serverapp = "minilm_lora:server"
clientapp = "minilm_lora:client"

[tool.flwr.app.config]
{config}
"""

APP = '''"""MiniLM + LoRA text classification, written only with Flower, transformers, peft and torch.

The pattern of Flower's quickstart-huggingface and FlowerTune examples: every train message builds the model and
tokenizer, loads the global LoRA weights, trains a few AdamW steps on the node's partition and returns the LoRA
weights; the ServerApp runs Flower's FedAvg and evaluates the global model on a held-out test set at the end.
"""
import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
client = ClientApp()
server = ServerApp()


def load_model(rc, num_labels):
    """Tokenizer and LoRA-wrapped classifier; the new head is seeded so every process starts from one model."""
    torch.set_num_threads(int(rc["threads"]))
    torch.manual_seed(int(rc["seed"]))
    tokenizer = AutoTokenizer.from_pretrained(rc["model-path"])
    model = AutoModelForSequenceClassification.from_pretrained(rc["model-path"], num_labels=num_labels)
    lora = LoraConfig(task_type="SEQ_CLS", r=int(rc["lora-r"]), lora_alpha=int(rc["lora-alpha"]), lora_dropout=0.0,
                      target_modules=["query", "value"])
    return tokenizer, get_peft_model(model, lora)


def read_jsonl(path, label_names):
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], torch.tensor([label_names.index(r["label"]) for r in rows])


@client.train()
def train(msg: Message, context: Context):
    rc, t0 = context.run_config, time.perf_counter()
    pid = int(context.node_config["partition-id"])
    owner = sorted(Path(rc["data-dir"]).glob("owner-*"))[pid]
    label_names = json.loads((owner / "owner.json").read_text())["label_names"]
    tokenizer, model = load_model(rc, len(label_names))
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    t_load = time.perf_counter()
    texts, labels = read_jsonl(owner / "train.jsonl", label_names)
    steps, bs = int(rc["local-steps"]), int(rc["batch-size"])
    server_round = int(msg.content["config"]["server-round"])
    g = torch.Generator().manual_seed(int(rc["seed"]) * 1_000_003 + server_round * 1_009 + pid)
    reps = -(-steps * bs // len(texts))
    order = torch.cat([torch.randperm(len(texts), generator=g) for _ in range(reps)])[: steps * bs]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(msg.content["config"]["lr"]), weight_decay=0.0)
    model.train()
    loss_sum = 0.0
    for idx in order.split(bs):
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=int(rc["max-length"]), padding=True,
                        return_tensors="pt")
        loss = model(**enc, labels=labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        loss_sum += loss.item()
    t_end = time.perf_counter()
    metrics = MetricRecord({"train_loss": loss_sum / steps, "num-examples": len(texts), "partition-id": pid,
                            "server-round": server_round, "load-s": t_load - t0, "train-s": t_end - t_load,
                            "start-epoch": time.time() - (t_end - t0)})
    arrays = ArrayRecord(get_peft_model_state_dict(model))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@torch.no_grad()
def accuracy(rc, arrays):
    label_names = json.loads(Path(rc["label-names"]).read_text())
    tokenizer, model = load_model(rc, len(label_names))
    set_peft_model_state_dict(model, arrays.to_torch_state_dict())
    model.eval()
    texts, labels = read_jsonl(rc["test-file"], label_names)
    right = 0
    for i in range(0, len(texts), 128):
        enc = tokenizer(texts[i:i + 128], truncation=True, max_length=int(rc["max-length"]), padding=True,
                        return_tensors="pt")
        right += int((model(**enc).logits.argmax(-1) == labels[i:i + 128]).sum())
    return right / len(texts), len(texts)


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc, t_main = context.run_config, time.time()
    rounds, n = int(rc["num-server-rounds"]), int(rc["num-supernodes"])
    label_names = json.loads(Path(rc["label-names"]).read_text())
    _, model = load_model(rc, len(label_names))
    initial = ArrayRecord(get_peft_model_state_dict(model))
    replies, evaluation = [], {}

    def collect(records, weight_key):
        """Keep every client's metrics (timings) and return the example-weighted mean training loss."""
        rows = [dict(r["metrics"]) for r in records]
        for row in rows:
            row["received-epoch"] = time.time()
        replies.extend(rows)
        total = sum(row[weight_key] for row in rows)
        return MetricRecord({"train_loss": sum(row["train_loss"] * row[weight_key] for row in rows) / total})

    def evaluate(server_round, arrays):
        if server_round != rounds:  # the global model only after the last round (FedAvg also calls this at 0)
            return None
        t = time.perf_counter()
        acc, count = accuracy(rc, arrays)
        evaluation.update(accuracy=acc, examples=count, seconds=time.perf_counter() - t)
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                      train_metrics_aggr_fn=collect)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord({"lr": rc["lr"]}),
                   evaluate_fn=evaluate)
    out = {"main-start-epoch": t_main, "main-end-epoch": time.time(), "replies": replies, "evaluation": evaluation}
    Path(rc["out"]).write_text(json.dumps(out))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tree:
    """Processes of one measured command: the launched one, its descendants, and anything carrying its marker.

    Flower's managed SuperLink is started detached (its own session) and outlives ``flwr run``; a process whose parent
    exits is re-parented away from the tree. The marker (an environment variable every descendant inherits) keeps
    both in view and tells this script's processes from anyone else's when it stops them."""

    def __init__(self, marker: str):
        import psutil

        self.psutil, self.marker, self.seen, self.cpu = psutil, marker, {}, {}

    def members(self, root) -> list:
        ps = self.psutil
        procs = {}
        try:
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except ps.Error:
            pass
        for pid, p in list(self.seen.items()):  # re-parented members already seen
            if pid not in procs and p.is_running():
                procs[pid] = p
        for p in ps.process_iter(["environ"]):  # a member started by one that has since exited
            if p.pid not in procs and (p.info.get("environ") or {}).get("FEDFM_BENCH_MARK") == self.marker:
                procs[p.pid] = p
        self.seen.update(procs)
        return list(procs.values())

    def sample(self, root) -> list[tuple[str, int, int]]:
        """(label, RSS, PSS) of every member now; PSS splits each shared page among the processes mapping it."""
        out = []
        for p in self.members(root):
            try:
                m = p.memory_full_info()
                out.append((label(p), m.rss, m.pss))
                c = p.cpu_times()  # the last reading of each process: the CPU seconds it used (to 0.2 s)
                self.cpu[(p.pid, p.create_time())] = c.user + c.system
            except self.psutil.Error:
                pass
        return out

    def stop_leftovers(self, root) -> list[str]:
        """Terminate (then kill) every member still running: the names of those that were."""
        ps = self.psutil
        alive = []
        for p in self.members(root):
            try:
                if p.status() != ps.STATUS_ZOMBIE:
                    alive.append(p)
            except ps.Error:
                pass
        names = []
        for p in alive:
            try:
                names.append(label(p))
                p.terminate()
            except ps.Error:
                pass
        _, still = ps.wait_procs(alive, timeout=10)
        for p in still:
            try:
                p.kill()
            except ps.Error:
                pass
        ps.wait_procs(still, timeout=5)
        return sorted(names)


def measure(argv: list[str], env: dict, log: Path, cwd: Path) -> dict:
    """Run ``argv`` to its end: wall seconds, peak summed RSS of its process tree, the leftovers stopped after it."""
    import psutil

    marker = uuid.uuid4().hex
    tree = Tree(marker)
    me = psutil.Process()
    busy0, me0 = busy_s(), sum(me.cpu_times()[:2])
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = psutil.Popen(argv, env={**env, "FEDFM_BENCH_MARK": marker}, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        start_epoch, peak, peak_pss, at_peak = time.time(), 0, 0, []
        while p.poll() is None:
            now = tree.sample(p)
            if sum(x[1] for x in now) > peak:
                peak, at_peak = sum(x[1] for x in now), sorted(now, key=lambda x: -x[1])
            peak_pss = max(peak_pss, sum(x[2] for x in now))
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - t0
    others = busy_s() - busy0 - sum(tree.cpu.values()) - (sum(me.cpu_times()[:2]) - me0)
    leftovers = tree.stop_leftovers(p)
    return {"wall_s": wall, "peak_rss_bytes": peak, "peak_pss_bytes": peak_pss, "returncode": p.returncode,
            "start_epoch": start_epoch, "processes_seen": len(tree.seen), "stopped_after": leftovers,
            "cpu_s": sum(tree.cpu.values()), "others_cpu_s": max(0.0, others),
            "at_peak": [{"process": a, "rss_bytes": b, "pss_bytes": c} for a, b, c in at_peak],
            "log_tail": log.read_text()[-3000:]}


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every process, anyone's) since boot."""
    import psutil

    c = psutil.cpu_times()
    return c.user + c.nice + c.system + c.irq + c.softirq + getattr(c, "steal", 0.0)


def label(p) -> str:
    """A short name for a process: its command and, for Python, the script or module it runs."""
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - gone or unreadable: its short name will do
        cmd = []
    if not cmd:
        return p.name()
    head = Path(cmd[0]).name
    if not head.startswith("python"):
        return head if head.startswith("ray::") else f"{head} (Ray)" if head in ("raylet", "gcs_server") else head
    args = iter(cmd[1:])
    for a in args:
        if a in ("-c", "-m"):
            return f"python {a} {next(args, '') if a == '-m' else ''}".strip()
        if not a.startswith("-"):
            return f"python {Path(a).name}"
    return "python"


ONE = r"""
import json, sys
from fedfm import config, server
run_dir = server.run(config.load(None, json.loads(sys.argv[1])))
m = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
s = json.loads((run_dir / "summary.json").read_text())
print("RESULT " + json.dumps({"round_s": [x["round_time_s"] for x in m], "accuracy": s["global"]["accuracy"]}))
"""


def run_fedfm(sets: list[str], root: Path, env: dict) -> dict:
    res = measure([sys.executable, "-c", ONE, json.dumps(sets)], env, root / "fedfm.log", ROOT)
    line = next((x for x in res["log_tail"].splitlines() if x.startswith("RESULT ")), None)
    if res["returncode"] or line is None:
        raise SystemExit(f"fedfm run failed (exit {res['returncode']}):\n{res['log_tail']}")
    return {**res, **json.loads(line[len("RESULT "):])}


def write_app(cfg, owners: Path, root: Path, rounds: int, local_steps: int) -> tuple[Path, Path]:
    """The Flower app directory (pyproject.toml + one module) and the global test set it evaluates on."""
    from fedfm.data import load_dataset, split
    from fedfm.models import resolve_model_path

    ds = load_dataset(cfg.data, cfg.seed, cfg.task)
    sp = split(ds, cfg.data, cfg.federation.num_clients, cfg.seed, cfg.server_data.fraction)
    test = root / "global_test.jsonl"
    test.write_text("".join(json.dumps({"text": ds.texts[i], "label": ds.label_names[int(ds.labels[i])]}) + "\n"
                            for i in sp.global_test))
    labels = root / "label_names.json"
    labels.write_text(json.dumps(list(ds.label_names)))
    out = root / "flower-result.json"
    values = {"num-server-rounds": rounds, "num-supernodes": cfg.federation.num_clients, "local-steps": local_steps,
              "batch-size": cfg.train.batch_size, "max-length": cfg.data.max_length, "lr": cfg.train.lr,
              "lora-r": 8, "lora-alpha": 16, "seed": cfg.seed, "threads": 1,
              "model-path": str(resolve_model_path(cfg.model.source)), "data-dir": str(owners),
              "test-file": str(test), "label-names": str(labels), "out": str(out)}
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT.format(config="\n".join(f"{k} = {json.dumps(v)}"
                                                                          for k, v in values.items())))
    (app / "minilm_lora.py").write_text(APP)
    return app, out


def run_flower(cfg, root: Path, env: dict, rounds: int, local_steps: int) -> dict:
    from fedfm.owner import export_owners

    owners = root / "owners"
    export_owners(cfg, owners)
    app, out = write_app(cfg, owners, root, rounds, local_steps)
    home = root / "flwr-home"
    home.mkdir()
    # Flower's own default connection: `:local:` is the SuperLink `flwr run` starts on demand (simulation mode)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsim-", dir="/tmp"))  # Ray's sockets need a short path
    fenv = {**env, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            # a private SuperLink: its own ports (the defaults may be taken by someone else's)
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "RAY_TMPDIR": str(ray_tmp)}
    federation = (f"num-supernodes={cfg.federation.num_clients} backend='ray' client-resources-num-cpus=1 "
                  "client-resources-num-gpus=0.0 init-args-num-cpus=2 init-args-num-gpus=0")
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    argv = [flwr, "run", str(app), "local", "--stream", "--federation-config", federation]
    try:
        res = measure(argv, fenv, root / "flower.log", root)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    res["command"] = " ".join(["flwr", "run", "APPDIR", "local", "--stream", "--federation-config", repr(federation)])
    if not out.is_file():
        raise SystemExit(f"the Flower run wrote no result (exit {res['returncode']}):\n{res['log_tail']}\n"
                         f"SuperLink log:\n{_tail(home / 'local-superlink' / 'superlink.log')}")
    return {**res, **json.loads(out.read_text())}


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} does not exist)"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def report(emb: dict, fl: dict, clients: int, rounds: int, steps: int, ray: dict | None = None
           ) -> tuple[list[dict], str]:
    gib = 2**30
    fl_acc = fl["evaluation"].get("accuracy")
    sides = [("fedfm embedded engine", emb, emb["accuracy"]), ("Flower simulation (flwr run)", fl, fl_acc)]
    if ray is not None:  # the same cores as Flower's two actors
        sides.append(("fedfm Ray engine, 2 workers x 1 thread", ray, ray["accuracy"]))
    rows = [{"setting": setting, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_bytes"] / gib,
             "peak_pss_gib": r["peak_pss_bytes"] / gib, "accuracy": acc, "processes": r["processes_seen"],
             "cpu_s": r["cpu_s"], "others_cpu_s": r["others_cpu_s"],
             "at_peak": r["at_peak"]}
            for setting, r, acc in sides]
    ref = rows[0]
    lines = ["| setting | wall s | x fedfm embedded | CPU s | peak RSS GiB | x fedfm embedded | accuracy (global test) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {r['setting']} | {r['wall_s']:.1f} | {r['wall_s'] / ref['wall_s']:.2f}x | {r['cpu_s']:.0f} | "
                     f"{r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x | {acc} |")
    reps = fl["replies"]
    if len(reps) != clients * rounds:
        raise SystemExit(f"Flower trained {len(reps)} client rounds, expected {clients} x {rounds}")
    emb_rounds = sum(emb["round_s"])
    t = {"client_load_s_mean": mean([r["load-s"] for r in reps]),
         "client_train_s_mean": mean([r["train-s"] for r in reps]), "client_messages": len(reps),
         "flwr_run_to_serverapp_s": fl["main-start-epoch"] - fl["start_epoch"],
         "flwr_run_to_first_client_s": min(r["start-epoch"] for r in reps) - fl["start_epoch"],
         "serverapp_s": fl["main-end-epoch"] - fl["main-start-epoch"],
         "after_serverapp_s": fl["start_epoch"] + fl["wall_s"] - fl["main-end-epoch"],
         "eval_s": fl["evaluation"].get("seconds"), "fedfm_rounds_s": emb_rounds,
         "fedfm_outside_rounds_s": emb["wall_s"] - emb_rounds}
    rows[1].update(t, stopped_after=fl["stopped_after"])
    n_steps = clients * rounds * steps
    top, rest = fl["at_peak"][:3], fl["at_peak"][3:]
    where = ", ".join(f"{x['process']} {x['rss_bytes'] / gib:.2f}" for x in top)
    lines += [
        "",
        f"- Both: {clients} owners of one exported split, every owner in each of {rounds} rounds, {steps} local steps. "
        f"fedfm: one process, one torch thread, the owners trained in turn: {emb_rounds:.1f} s in its rounds "
        f"({emb_rounds / n_steps:.2f} s per local step), {t['fedfm_outside_rounds_s']:.1f} s outside them (imports, "
        "data, model, the final global and per-owner evaluation, checkpoints and the final save).",
        f"- Flower: `flwr run` started the managed SuperLink, which started the simulation (ServerApp + Ray, 2 CPUs, "
        f"two 1-CPU actors running two clients at a time; {fl['processes_seen']} processes in all). The ServerApp "
        f"began {t['flwr_run_to_serverapp_s']:.1f} s and the first client {t['flwr_run_to_first_client_s']:.1f} s "
        f"after `flwr run` started; the ServerApp's rounds and final evaluation took {t['serverapp_s']:.1f} s; "
        f"`flwr run` exited {t['after_serverapp_s']:.1f} s after the ServerApp returned.",
        f"- Inside Flower's ClientApp each of the {len(reps)} train messages spent {t['client_load_s_mean']:.2f} s "
        "building the tokenizer and LoRA model and loading the global weights (Flower's examples rebuild the model "
        f"per message) and {t['client_train_s_mean']:.2f} s training ({t['client_train_s_mean'] / steps:.2f} s per "
        "local step: two actors sharing 2 cores). CPU s: user + system seconds of all the command's processes "
        "(fedfm trains on one core, Flower's two actors on two: on a shared machine CPU seconds move less than wall); "
        f"other processes on the machine used {rows[0]['others_cpu_s']:.0f} CPU s during the fedfm run and "
        f"{rows[1]['others_cpu_s']:.0f} during the Flower run.",
        "- Peak memory: summed RSS of every process of the command, sampled every 0.2 s; pages shared between "
        "processes (torch and transformers in each Ray worker, Ray's shared-memory object store in every process "
        "that maps it) count once per process. Summed PSS (shared pages split among their processes) peaked at "
        f"{rows[0]['peak_pss_gib']:.2f} GiB (fedfm) and {rows[1]['peak_pss_gib']:.2f} GiB (Flower). At Flower's RSS "
        f"peak, GiB: {where}, and "
        f"{len(rest)} more {sum(x['rss_bytes'] for x in rest) / gib:.2f} in all "
        f"({', '.join(sorted({x['process'] for x in rest}))}).",
        "- `flwr run` leaves the managed SuperLink running (the next `flwr run` reuses it); this script stopped what "
        f"of the run was alive when it exited: {', '.join(fl['stopped_after']) or 'nothing'}. The accuracies are "
        "of the same job, not the same numbers: the sides draw batches with different seeds (and fedfm pads every "
        "text to the full length, the Flower app each batch to its longest), so the models are not bitwise equal.",
    ]
    if ray is not None:
        lines.append(f"- fedfm Ray engine: the same job on two single-threaded Ray actors, the cores Flower's simulation "
                     f"used (a local Ray cluster on loopback; {ray['processes_seen']} processes); its accuracy "
                     f"{'equals' if ray['accuracy'] == emb['accuracy'] else 'differs from'} the embedded engine's.")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quick_args(ap, "240 articles at 32 tokens over 2 owners, 1 round of 1 local step of 8")
    args = ap.parse_args()
    out = results_dir(args)
    from fedfm import config

    t0, load_start = time.time(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    root = Path(tempfile.mkdtemp(prefix="fedfm-flower-sim-"))
    sets = [*JOB, *(QUICK if args.quick else []), f"output_dir={root / 'runs'}", "name=embedded"]
    cfg = config.load(None, sets)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        emb = run_fedfm(sets, root, env)
        print(f"fedfm: {emb['wall_s']:.1f} s, peak {emb['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        fl = run_flower(cfg, root, env, cfg.rounds, cfg.train.local_steps)
        print(f"flower: {fl['wall_s']:.1f} s, peak {fl['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        ray = None
        if not args.quick:  # fedfm on both cores, as Flower's two actors are
            ray = run_fedfm([*sets[:-1], "name=ray", "engine.name=ray", "engine.workers=2", "engine.threads=1"],
                            root, env)
            print(f"fedfm ray: {ray['wall_s']:.1f} s, peak {ray['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, table = report(emb, fl, cfg.federation.num_clients, cfg.rounds, cfg.train.local_steps, ray)
    command, info, head = result_header("Flower's simulation runtime vs fedfm's embedded engine",
                                        "benchmarks/flower_simulation.py")
    md = "\n".join(head + [f"- load average (1, 5, 15 min) at start: {load_start}, at end: "
                           f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: compare ratios)",
                           f"- Flower: flwr {_version('flwr')}, ray {_version('ray')}; `{fl['command']}`", "",
                           table]) + "\n"
    print(md)
    info["load_avg_at_start"] = load_start  # result_header reads it after the runs
    write_results(out, "flower_simulation", md, {"command": command, "machine": info, "job": sets[:-2],
                                                 "flower_command": fl["command"], "rows": rows})
    print(f"done in {time.time() - t0:.0f} s")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
