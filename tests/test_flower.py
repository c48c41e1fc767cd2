"""The Flower engine on a real deployment: a SuperLink and SuperNodes on loopback with TLS and node
authentication, each node training on its own owner directory (real MiniLM, real BBC articles).

Reference numbers: the embedded engine on the same config and seed (same shards, exported by
``fedfm.owner.export_owners``); every process is started here and stopped here by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from typer.testing import CliRunner

from fedfm import config as config_mod
from fedfm import server
from fedfm.cli import app as cli_app
from fedfm.deploy import LocalFederation, make_node_key, online_nodes
from fedfm.owner import export_owners

from test_e2e import final_state, tiny

# one local federation at a time: every service test runs on the same pytest-xdist worker (loadgroup)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("services")]

FLOWER = ("engine.name=flower", "engine.threads=1", "engine.timeout_s=120", "engine.connect_s=20")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(what, condition, timeout: float = 240.0, every: float = 0.5):
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def clientapps(pgid: int) -> list[psutil.Process]:
    """The ClientApp processes a SuperNode (process group ``pgid``) is running right now."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "flwr-clientapp" in " ".join(p.info["cmdline"] or []) and os.getpgid(p.pid) == pgid:
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three owners' SuperNodes and a SuperLink (TLS, node authentication), plus a 4th node whose owner directory
    is gone by the time runs start (its error must reach the server); shared by this module's tests, in order."""
    root = tmp_path_factory.mktemp("flower")
    cfg = tiny(root / "runs", *FLOWER)
    owners = export_owners(cfg, root / "owners")
    lost = root / "lost-owner"
    shutil.copytree(owners[0], lost)  # present when its node starts (fedfm deploy supernode checks it)
    fed = LocalFederation(root / "fed", [*owners, lost])
    try:
        fed.start()
        shutil.rmtree(lost)
        fed.lost = lost
        yield fed
    finally:
        fed.close()  # every process this module started, by PID


def test_flower_run_equals_embedded_and_refuses_unknown_nodes(federation, tmp_path):
    fed = federation
    # an unknown node (its key was never registered) is refused and exits
    make_node_key(tmp_path / "intruder")
    intruder = fed.start_node(0, key=tmp_path / "intruder", name="intruder")
    assert intruder.wait(120) != 0
    log = (fed.root / "logs" / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert online_nodes(fed.home) == 4

    # the user's command: fedfm run CONFIG --engine flower --federation ADDRESS --root-certificates CA
    cfg = tiny(tmp_path, *FLOWER)
    config_mod.save(cfg, tmp_path / "job.yaml")
    run = tmp_path / "run"
    result = CliRunner().invoke(cli_app, ["run", str(tmp_path / "job.yaml"), "--out", str(run), "--engine", "flower",
                                          "--federation", fed.address, "--root-certificates", str(fed.ca)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "run directory" in result.output
    emb = server.run(tiny(tmp_path, "name=emb", "engine.threads=1"))
    a, b = final_state(emb), final_state(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: same shards, same seeds, same thread count
    assert [(m["bytes_up"], m["bytes_down"]) for m in metrics(run)] == [(m["bytes_up"], m["bytes_down"]) for m in metrics(emb)]
    assert len(metrics(run)) == 2
    assert (run / "flower.json").is_file()  # the owners' state key, for a resume
    nodes = json.loads((run / "nodes.json").read_text())["owners"]
    assert sorted(n["index"] for n in nodes if n["status"] == "ok") == [0, 1, 2]
    errors = [n["error"] for n in nodes if n["status"] == "error"]
    assert len(errors) == 1 and "does not exist" in errors[0] and str(fed.lost) in errors[0]
    summary = json.loads((run / "summary.json").read_text())
    assert all(c["own"] is not None for c in summary["per_client"])  # final evaluation ran at the owners
    # the coordinator held no owner data and no test set: the owners evaluated, the mean weighted by their test sizes
    coord = json.loads((run / "nodes.json").read_text())["coordinator"]
    assert coord == {"test_file": None, "examples": 0, "evaluation": "owners"}
    assert all(m["eval_owners"] == 3 for m in metrics(run))
    own = [(c["n_test"], c["own"]["accuracy"]) for c in summary["per_client"]]
    assert summary["global"]["accuracy"] == pytest.approx(sum(n * a for n, a in own) / sum(n for n, _ in own))


def test_flower_node_killed_mid_round_and_superlink_restarted(federation, tmp_path):
    fed = federation
    # the coordinator's own test file (one owner's test split, copied to the coordinator's machine)
    shutil.copyfile(fed.owners[0] / "test.jsonl", tmp_path / "server-test.jsonl")
    cfg = tiny(tmp_path, *FLOWER, "federation.min_clients=2", f"engine.server_test={tmp_path / 'server-test.jsonl'}")
    run = tmp_path / "run"
    outcome: dict = {}

    def submit(resume: bool = False):
        try:
            outcome["result"] = fed.submit(cfg.model_dump(mode="json"), run, resume=resume, echo=lambda line: None)
        except Exception as exc:  # noqa: BLE001 - the SuperLink going away ends the log stream with an error
            outcome["error"] = exc

    worker = threading.Thread(target=submit)
    worker.start()
    # round 1 is under way once the run directory exists (owners answered) and owner 2 is training
    wait_for("the run directory", lambda: (run / "config.yaml").is_file())
    node2 = fed.procs["node2"].pid
    wait_for("owner 2's ClientApp", lambda: clientapps(node2), every=0.1)
    fed.stop("node2", signal.SIGKILL)  # the owner's machine dies mid-round
    wait_for("round 1's checkpoint", lambda: (run / "metrics.jsonl").is_file() and metrics(run))
    first = metrics(run)[0]
    assert first["dropped"] == ["client_2"] and len(first["clients"]) == 2  # completed with the rest
    fed.stop("superlink", signal.SIGKILL)  # the SuperLink's machine restarts; its ServerApp dies with it
    worker.join(180)
    assert not worker.is_alive()
    assert "result" not in outcome or not outcome["result"]["status"].startswith("finished:completed")
    assert json.loads((run / "status.json").read_text())["status"] != "complete"
    fed.start_superlink()
    fed.wait_online(3)  # the surviving nodes (owners 0, 1 and the one without data) reconnect by themselves
    submit(resume=True)
    assert outcome["result"]["status"].startswith("finished:completed"), outcome
    m = metrics(run)
    assert [x["round"] for x in m] == [1, 2]
    assert m[0] == first  # round 1 was kept, not redone
    assert m[1]["dropped"] == ["client_2"] and len(m[1]["clients"]) == 2
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    coord = json.loads((run / "nodes.json").read_text())["coordinator"]
    n_test = sum(1 for _ in open(tmp_path / "server-test.jsonl"))
    assert coord["evaluation"] == "coordinator test file" and coord["examples"] == n_test and "eval_owners" not in m[1]
