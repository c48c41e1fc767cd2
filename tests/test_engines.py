"""The Ray engine and owner data directories: the same job gives the same model on every engine.

Reference: the embedded engine (itself checked by hand-worked strategy tests and bitwise determinism tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfm import server
from fedfm.app import App
from fedfm.errors import DataError
from fedfm.owner import export_owners, load_owner

from test_e2e import final_state, tiny

# Ray clusters one at a time: every service test runs on the same pytest-xdist worker (loadgroup)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("services")]


@pytest.fixture
def in_a_server_app(monkeypatch):
    """The task identity Flower sets in a ServerApp's process: messages can be built outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_engine_matches_embedded_bitwise(tmp_path):
    # compression with error feedback: each client's residual is written by an actor and read back next round,
    # so the shared clients/ folder and the client -> actor assignment are both exercised; the centralized
    # baseline's pooled participant exists only after the server adds it, so actors must add the same one;
    # both methods run on one set of actors (the engine is kept across a comparison's methods); the owner protocol
    # steps after the last round, CCVR's class statistics and each owner's personal model, run on the actors too
    sets = ("engine.threads=1", "compression.up=[topk,int8]", "compression.topk_fraction=0.1",
            "compare.methods=[federated,centralized]", "head.calibrate=ccvr", "head.ccvr_steps=5",
            "personal.method=finetune", "personal.finetune_steps=2")
    server.compare(tiny(tmp_path, "name=emb", *sets))
    server.compare(tiny(tmp_path, "name=ray", "engine.name=ray", "engine.workers=2", *sets))
    for method in ("federated", "centralized"):
        emb, ray_run = tmp_path / "emb" / method, tmp_path / "ray" / method
        a, b = final_state(emb), final_state(ray_run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
        assert len(metrics(emb)) == len(metrics(ray_run)) == 2
        for x, y in zip(metrics(emb), metrics(ray_run)):
            assert (x["bytes_up"], x["bytes_down"], x["accuracy"]) == (y["bytes_up"], y["bytes_down"], y["accuracy"])
        sa, sb = (json.loads((r / "summary.json").read_text()) for r in (emb, ray_run))
        assert sa["per_client"] == sb["per_client"]  # final per-client evaluation ran on the actors
    fed = json.loads((tmp_path / "ray" / "federated" / "summary.json").read_text())
    assert fed["client_states"]["clients"] == 3
    emb_fed = json.loads((tmp_path / "emb" / "federated" / "summary.json").read_text())
    assert len(fed["personal"]["per_client"]) == 3 and fed["personal"] == emb_fed["personal"]
    for c in fed["personal"]["per_client"]:  # the adapter each owner saved (peft's format) is the embedded engine's
        x, y = (load_file(tmp_path / r / "federated" / "personal" / c["client"] / "adapter_model.safetensors")
                for r in ("emb", "ray"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_owner_directories_hold_exactly_the_simulated_shards(tmp_path):
    cfg = tiny(tmp_path / "o")
    dirs = export_owners(cfg, tmp_path / "owners")
    assert [d.name for d in dirs] == ["owner-0", "owner-1", "owner-2"]
    full = App(cfg)
    for i, d in enumerate(dirs):
        ds, sp, meta = load_owner(d, cfg)
        assert meta["index"] == i and sp.client_names[i] == full.split.client_names[i]
        assert [ds.texts[j] for j in sp.client_train[i]] == [full.dataset.texts[j] for j in full.split.client_train[i]]
        assert [ds.texts[j] for j in sp.client_test[i]] == [full.dataset.texts[j] for j in full.split.client_test[i]]
        assert all(len(sp.client_train[j]) == 0 for j in range(3) if j != i)
    owner = App(cfg, dirs[1])
    assert torch.equal(owner.shards[1].train.input_ids, full.shards[1].train.input_ids)
    assert torch.equal(owner.shards[1].train.labels, full.shards[1].train.labels)
    assert all(torch.equal(owner.initial_weights[k], v) for k, v in full.initial_weights.items())
    with pytest.raises(DataError, match="not empty"):
        export_owners(cfg, tmp_path / "owners")


def test_bad_owner_directories_get_clear_errors(tmp_path):
    cfg = tiny(tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        load_owner(tmp_path / "nowhere", cfg)
    d = export_owners(cfg, tmp_path / "owners")[0]
    with pytest.raises(DataError, match="federation of 3 owners"):
        load_owner(d, tiny(tmp_path / "o", "federation.num_clients=4"))
    lines = (d / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join([lines[0], '{"text": "x", "label": "weather"}', *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 2: label 'weather' is not one of"):
        load_owner(d, cfg)
    (d / "train.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="line 1: JSONDecodeError"):
        load_owner(d, cfg)
    (d / "owner.json").write_text("{}")
    with pytest.raises(DataError, match="format"):
        load_owner(d, cfg)


# --- the Flower wire format and deployment files (no processes) -------------------------------------------


def test_flower_records_round_trip_tasks_and_updates_exactly():
    from fedfm.engines.flower_engine import (
        from_record, task_content, task_from_content, to_record, update_content, update_from_content,
    )
    from fedfm.types import ClientTask, ClientUpdate, Penalty

    g = torch.Generator().manual_seed(0)
    w = {"a.lora_A": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    mixed = {"x": w["b"].to(torch.bfloat16), "y": torch.arange(7, dtype=torch.uint8), "z": w["b"].half()}
    back = from_record(to_record(mixed))
    # bf16 has no numpy dtype: it travels as its int16 bit pattern and comes back bit for bit
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in mixed.items())
    penalty = Penalty({k: v + 1 for k, v in w.items()}, 0.5, {k: v.abs() for k, v in w.items()})
    task = ClientTask(3, w, 48, 0.01, {"batch_size": 8, "control": w, "penalty": penalty,
                                       "private": {"clip_norm": 0.1, "secagg": False}})
    index, got = task_from_content(task_content(task, 2, w, w))
    assert index == 2 and (got.round, got.num_examples, got.prox_mu) == (3, 48, 0.01)
    assert all(torch.equal(got.weights[k], w[k]) for k in w)
    assert got.config["batch_size"] == 8 and got.config["private"] == {"clip_norm": 0.1, "secagg": False}
    assert all(torch.equal(got.config["control"][k], w[k]) for k in w)
    p = got.config["penalty"]
    assert p.coefficient == 0.5 and all(torch.equal(p.anchor[k], penalty.anchor[k]) for k in w)
    assert all(torch.equal(p.precision[k], penalty.precision[k]) for k in w)
    _, none = task_from_content(task_content(ClientTask(1, w), 0, w, None))
    assert none.num_examples is None and none.config == {}
    sent = {"train_loss": 1.25, "steps": 3, "examples_seen": 24, "lr": 0.003}
    u, delta = update_from_content(update_content(ClientUpdate("client_4", {}, 33.0, sent), mixed))
    assert (u.client, u.num_examples, u.metrics) == ("client_4", 33.0, sent)
    assert all(torch.equal(delta[k], v) for k, v in mixed.items())
    # a node's reply is checked before the round record reads it: a dict of finite numbers with the public counters
    for metrics, why in [(["x"], "not a dict"), ({**sent, "lr": None}, "not finite numbers"),
                         ({**sent, "steps": 10**400}, "not finite numbers"),
                         ({**sent, "train_loss": float("nan")}, "not finite numbers"),
                         ({"train_loss": 1.0}, "missing"), ({**sent, "steps": True}, "not finite numbers")]:
        with pytest.raises(ValueError, match=why):
            update_from_content(update_content(ClientUpdate("client_4", {}, 33.0, metrics), mixed))
    u, delta = update_from_content(update_content(ClientUpdate("client_4", {}, float("nan"), sent), w))
    assert "num_examples" in server.validate(replace(u, delta=delta), w)  # a NaN count decodes; the screen rejects it


def test_flower_engine_sizes_a_natural_partition_from_its_split(in_a_server_app):
    # federation.num_clients is null for natural partitions (one owner per Austen novel): the coordinator asks for
    # as many owners as its split has, where `len(ids) < None` used to raise TypeError before the first round
    from types import SimpleNamespace

    from fedfm import config as config_mod
    from fedfm.engines.flower_engine import FlowerEngine
    from fedfm.errors import FedFMError

    cfg = config_mod.load("configs/pretrain_austen.yaml", ["engine.name=flower", "engine.connect_s=0.1",
                                                           "engine.timeout_s=0.1"])
    assert cfg.federation.num_clients is None

    class NoAnswer:  # one node connected, which never answers who it is
        def get_node_ids(self):
            return [7]

        def send_and_receive(self, messages, timeout):
            assert [m.content.config_records["hello"]["num_clients"] for m in messages] == [6]
            return []

    app = SimpleNamespace(cfg=cfg, split=SimpleNamespace(client_names=[f"novel-{i}" for i in range(6)]))
    with pytest.raises(FedFMError, match="only 0 of 6 owners are reachable.*node 7: no reply"):
        FlowerEngine(app, NoAnswer())


def test_deploy_certificates_chain_and_node_keys_load_as_flower_expects(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from fedfm.deploy import make_certificates, make_node_key
    from fedfm.errors import FedFMError

    paths = make_certificates(tmp_path / "certs", ["127.0.0.1", "coord.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())  # the first of the chain: the server's
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert oct(paths["key"].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FedFMError, match="already holds a CA"):
        make_certificates(tmp_path / "certs", ["127.0.0.1"])
    key, pub = make_node_key(tmp_path / "keys" / "node")
    # what flower-supernode and `flwr supernode register` require: OpenSSH EC keys on a NIST curve
    private = load_ssh_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == private.public_key().public_numbers()
    with pytest.raises(FedFMError, match="refusing to overwrite"):
        make_node_key(key)


def test_flower_engine_config_refuses_simulation_only_features(tmp_path):
    from fedfm.errors import ConfigError

    for key, value, why in [("federation.dropout", "0.2", "real nodes vanish"),
                            ("attack.kind", "sign_flip", "simulated"),
                            ("train.logit_adjustment", "true", "label counts"),
                            ("server_data.fraction", "0.1", "the coordinator holds no owner data")]:
        with pytest.raises(ConfigError, match=why):
            tiny(tmp_path, "engine.name=flower", f"{key}={value}")
    from fedfm.engines.flower_engine import FlowerEngine

    with pytest.raises(Exception, match="runs inside a Flower ServerApp"):
        FlowerEngine(object())


def test_flower_owner_whose_node_connects_late_joins_at_the_next_round(in_a_server_app):
    # discovery used to run once, before round 1: an owner whose node came up later counted as vanished all run
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Message, RecordDict
    from fedfm import config as config_mod
    from fedfm.engines.flower_engine import FlowerEngine

    owner_of = {7: 0, 8: 1}  # node id -> the owner index it answers with

    class Grid:
        ids, asked = [7], []

        def get_node_ids(self):
            return list(self.ids)

        def send_and_receive(self, messages, timeout):
            replies = []
            for m in messages:
                node = m.metadata.dst_node_id
                self.asked.append(node)
                m.metadata.__dict__["_message_id"] = f"hello-{node}"  # what the SuperLink assigns on sending
                info = {"index": owner_of[node], "name": f"novel-{owner_of[node]}", "n_train": 5, "n_test": 1}
                replies.append(Message(RecordDict({"owner": ConfigRecord(info)}), reply_to=m))
            return replies

    cfg = config_mod.load("configs/pretrain_austen.yaml", ["engine.name=flower", "engine.connect_s=0.1",
                                                           "federation.min_clients=1"])
    grid = Grid()
    engine = FlowerEngine(SimpleNamespace(cfg=cfg, split=SimpleNamespace(client_names=["a"] * 6)), grid)
    assert engine.nodes == {0: 7} and engine.sizes == {0: (5, 1)}
    grid.ids = [7, 8]  # owner 1's node connects after round 1 started
    engine.discover_new()
    engine.discover_new()  # nothing new: no node is asked twice
    assert engine.nodes == {0: 7, 1: 8} and grid.asked == [7, 8]
    assert [r["status"] for r in engine.roster] == ["ok", "ok"]


def test_an_owners_private_state_folder_is_for_its_account_only(tmp_path):
    # it holds the owner's distributed-DP noise secret and error-feedback residuals (0755 by the default umask)
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from fedfm.apps.owner_node import Node, use_state

    key = "ab" * 16
    app = SimpleNamespace(client_states=None)
    content = RecordDict({"fedfm": ConfigRecord({"state-key": key})})
    old_umask = os.umask(0o022)  # the usual default, under which folders were created 0755
    try:
        use_state(app, Node.from_node_config({"data-dir": str(tmp_path), "state-dir": str(tmp_path / "state")}),
                  content["fedfm"])
    finally:
        os.umask(old_umask)
    assert app.client_states.dir == tmp_path / "state" / key
    for d in (tmp_path / "state", tmp_path / "state" / key):
        assert d.stat().st_mode & 0o777 == 0o700


def test_resuming_a_baseline_on_flower_is_refused_by_its_saved_method(tmp_path):
    # --method defaults to federated, and --resume takes no config: the saved run's method decides
    from typer.testing import CliRunner

    from fedfm.cli import app as cli_app
    from fedfm.rundir import RunDir

    run = tmp_path / "central"
    RunDir(run).create(tiny(tmp_path), "centralized")
    res = CliRunner().invoke(cli_app, ["run", "--resume", str(run), "--engine", "flower", "--federation",
                                       "127.0.0.1:9092", "--root-certificates", str(tmp_path / "ca.crt")])
    assert res.exit_code == 2 and "run the centralized baseline on the embedded engine" in res.output, res.output


def test_ray_local_cluster_listens_on_loopback_only(tmp_path):
    # the brief's rule for services a run starts; Ray on its own would listen on the machine's external address
    import psutil

    from fedfm.engines import close_engine, engine_for

    app = App(tiny(tmp_path, "engine.name=ray", "engine.threads=1", "engine.workers=1"))
    engine = engine_for(app)
    try:
        ours = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in ours}
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
        # a job that never finishes (here: it needs a CPU, and the engine's actor holds the cluster's only one) stops
        # the run after engine.ray_result_timeout_s with a reason, where the engine used to wait forever, silently
        from fedfm.errors import FedFMError

        def needs_a_cpu():
            return 1

        engine.result_timeout = 1.0
        stuck = engine.ray.remote(num_cpus=1)(needs_a_cpu).remote()
        with pytest.raises(FedFMError, match="no Ray result for engine.ray_result_timeout_s=1 s"):
            engine._gather([stuck])
    finally:
        close_engine(app)

