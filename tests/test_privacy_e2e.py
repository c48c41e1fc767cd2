"""Private federated runs end to end on MiniLM + LoRA and real BBC news: DP-FedAvg with its accountant and
budget, secure aggregation inside the round loop (with dropouts and a malformed masked update), DP-SGD,
and the membership audit's attack arithmetic on a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm import config as config_mod
from fedfm import server
from fedfm.app import App
from fedfm.privacy import dp
from fedfm.privacy.aggregate import SECAGG_KEY
from fedfm.rundir import RunDir
from fedfm.store import ClientStates
from fedfm.types import ClientTask

from test_e2e import TINY, final_state

pytestmark = pytest.mark.slow

PRIVATE = ["federation.num_clients=6", "federation.min_clients=2", "compare.methods=[federated]", "train.local_steps=2"]


def cfg_of(tmp_path: Path, *extra: str):
    return config_mod.load(None, TINY + PRIVATE + [f"output_dir={tmp_path}", *extra])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dp_epsilon_every_round_and_budget_stop(tmp_path):
    overrides = ["rounds=4", "federation.sampling=poisson", "federation.fraction=0.5", "dp.mode=central",
                 "dp.noise_multiplier=1.0", "dp.clip_norm=0.05", "dp.adaptive_clip=true", "dp.clip_count_stddev=1.0"]
    # the budget admits exactly 2 rounds: epsilon(2) <= target < epsilon(3)
    sampling = dp.Sampling("poisson", 6, 3.0)
    e2, e3 = dp.epsilon(2, sampling, 1.0, 1e-5), dp.epsilon(3, sampling, 1.0, 1e-5)
    run_dir = server.run(cfg_of(tmp_path, *overrides, f"dp.target_epsilon={(e2 + e3) / 2}"))
    recs = records(run_dir)
    assert [r["round"] for r in recs] == [1, 2]
    assert [r["epsilon"] for r in recs] == pytest.approx([dp.epsilon(1, sampling, 1.0, 1e-5), e2])
    # adaptive clipping moved the clip norm, carried in the checkpointed state
    assert recs[0]["clip_norm"] == 0.05 and recs[1]["clip_norm"] != 0.05
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["client_dp"]["epsilon"] == pytest.approx(e2) and "privacy budget" in summary["stopped"]
    assert RunDir(run_dir).status()["status"] == "complete"


def test_secure_aggregation_equals_plain_fedavg_within_quantisation(tmp_path):
    plain = server.run(cfg_of(tmp_path, "name=plain"))
    secure = server.run(cfg_of(tmp_path, "name=secure", "secagg.enabled=true", "secagg.neighbours=4"))
    a, b = final_state(plain), final_state(secure)
    assert a.keys() == b.keys()
    # per element: 6 clients x (weight n_i <= 240) x 2^-25 rounding error, over 2 rounds: far below 1e-5
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    rp, rs = records(plain), records(secure)
    # the clients' mean training loss travels inside the secure sum: the same number as the plain run's
    assert [r["train_loss"] for r in rs] == pytest.approx([r["train_loss"] for r in rp], abs=1e-5)
    assert rs[-1]["secagg_time_s"] > 0 and rs[-1]["secagg_dropped"] == 0 and rs[-1]["reporters"] == 6


def test_secure_aggregation_with_dropouts_and_distributed_dp(tmp_path):
    run_dir = server.run(
        cfg_of(tmp_path, "rounds=2", "federation.num_clients=10", "federation.min_clients=3", "federation.dropout=0.3",
               "secagg.enabled=true", "secagg.threshold=0.3", "dp.mode=distributed", "dp.noise_multiplier=0.5",
               "dp.clip_norm=0.05")
    )
    recs = records(run_dir)
    assert sum(r["secagg_dropped"] for r in recs) > 0  # some clients vanished after the key exchange
    assert all(r["reporters"] == 10 - r["secagg_dropped"] for r in recs)
    assert all(torch.isfinite(t).all() for t in final_state(run_dir).values())


def test_unrecoverable_dropouts_skip_the_round_and_the_run_goes_on(tmp_path):
    # 8 clients, t = floor(0.9 * 7) + 1 = 7 shares needed: any dropout leaves a survivor's secret unrecoverable. The
    # round used to abort the run, and a resume met the same seeded dropouts again: now it is skipped like any other
    # round that cannot aggregate (the model unchanged), and the run completes.
    cfg = cfg_of(tmp_path, "rounds=2", "federation.num_clients=8", "federation.dropout=0.3", "secagg.enabled=true",
                 "secagg.threshold=0.9")
    run_dir = server.run(cfg)
    assert RunDir(run_dir).status()["status"] == "complete"
    recs = records(run_dir)
    assert all(r.get("skipped") for r in recs) and all(r["train_loss"] is None and r["examples"] == 0 for r in recs)
    assert recs[0]["eval_loss"] == recs[1]["eval_loss"]  # the initial model, evaluated again


def test_malformed_masked_update_is_dropped_and_the_round_completes(tmp_path, monkeypatch):
    from fedfm.features.private import Private

    original = Private.client_after

    def corrupt(self, c, update):
        out = original(self, c, update)
        if c.index == 1:  # one client sends a truncated masked vector
            out.delta[SECAGG_KEY] = out.delta[SECAGG_KEY][:-8].clone()
        if c.index == 2:  # one claims to be a client that was not asked
            out.metrics["client_index"] = 17
        return out

    monkeypatch.setattr(Private, "client_after", corrupt)
    run_dir = server.run(cfg_of(tmp_path, "rounds=1", "secagg.enabled=true"))
    rec = records(run_dir)[0]
    assert [r["client"] for r in rec["rejected"]] == ["client_1", "client_2"] and rec["rejected"][0]["reason"]
    assert "17 is not one of this round's clients" in rec["rejected"][1]["reason"]
    assert rec["reporters"] == 4 and RunDir(run_dir).status()["status"] == "complete"


def test_dpsgd_run_reports_example_epsilon(tmp_path):
    run_dir = server.run(cfg_of(tmp_path, "rounds=1", "dpsgd.enabled=true", "dpsgd.noise_multiplier=1.0"))
    rec = records(run_dir)[0]
    assert 0 < rec["example_epsilon"] < float("inf")
    assert json.loads((run_dir / "summary.json").read_text())["example_dp"]["example_epsilon"] == rec["example_epsilon"]


def test_membership_audit_on_a_real_run(tmp_path):
    from fedfm.privacy.audit import audit_membership, label_scores

    run_dir = server.run(cfg_of(tmp_path, "rounds=1"))
    result = audit_membership(run_dir, shadows=1, per_side=40)
    assert [a["attack"] for a in result["attacks"]] == ["loss threshold", "offline LiRA (1 shadows)"]
    assert all(0.0 <= a["auc"] <= 1.0 for a in result["attacks"]) and result["members"] == 40
    assert (run_dir / "audit" / "shadow-0" / "summary.json").is_file()
    # the shadow never saw an audited example: its population file holds none of the run's texts
    app = App(config_mod.load(run_dir / "config.yaml"))
    population = {json.loads(line)["text"] for line in (run_dir / "audit" / "population.jsonl").open()}
    assert not population & set(app.dataset.texts)
    # phi = log p_y - log(1 - p_y), checked against softmax probabilities directly
    data = app.global_test.subset(range(8))
    logp, phi = label_scores(app.model, data)
    with torch.inference_mode():
        p = torch.softmax(app.model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits.double(), -1)
    py = p[torch.arange(8), data.labels].numpy()
    assert logp == pytest.approx(np.log(py), abs=1e-6)
    assert phi == pytest.approx(np.log(py / (1 - py)), abs=1e-5)


def test_a_client_refusing_a_malformed_protocol_message_goes_silent(tmp_path):
    from fedfm.errors import ClientDropout

    app = App(cfg_of(tmp_path, "secagg.enabled=true"))
    with pytest.raises(ClientDropout):
        app.call("secagg_advertise", 0, b"too short")
    app.call("secagg_advertise", 0, bytes(32) + (10).to_bytes(8, "little") + (0).to_bytes(4, "little"))
    with pytest.raises(ClientDropout):
        app.call("secagg_share_keys", 0, b"not a roster")  # malformed bytes: the client does not answer
    with pytest.raises(ClientDropout):
        app.call("secagg_unmask", 3, b"")  # a client with no state this round


def test_too_few_masked_inputs_abort_before_unmasking(tmp_path, monkeypatch):
    from fedfm.privacy.secagg import SecAggServer

    asked = []
    original = SecAggServer.receive_unmask
    monkeypatch.setattr(SecAggServer, "receive_unmask", lambda self, cid, msg: asked.append(cid) or original(self, cid, msg))
    # 6 clients, min_clients 6, one vanishes after the key exchange: distributed DP would be under-noised
    cfg = cfg_of(tmp_path, "rounds=1", "federation.min_clients=6", "federation.dropout=0.3", "secagg.enabled=true",
                 "dp.mode=distributed", "dp.clip_norm=0.05")
    rec = records(server.run(cfg))[0]
    assert rec["skipped"] and rec["train_loss"] is None  # skipped, not aborted: the run goes on
    assert asked == []  # no unmasking share was ever requested


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_dp_noise_comes_from_secrets_kept_in_checkpoints_not_from_the_public_seed(tmp_path, monkeypatch, mode,
                                                                                  power_cut_in_round_2):
    """The config's seed is public: noise drawn from it could be regenerated and subtracted. By default the noise
    source (the server under central DP, each client under distributed DP) seeds it from a secret of its own, kept
    in its checkpointed state: a resumed run continues with the same secrets, and so bit for bit."""
    draws = iter(range(10**6))  # os.urandom, made countable: a fresh secret is a new number
    monkeypatch.setattr(dp, "urandom", lambda n: next(draws).to_bytes(n, "little"))
    extra = [f"dp.mode={mode}", "dp.noise_multiplier=0.5", "dp.clip_norm=0.05", "federation.min_clients=3",
             *(["secagg.enabled=true"] if mode == "distributed" else [])]
    cfg = cfg_of(tmp_path, "name=crash", "rounds=2", *extra)
    with pytest.raises(RuntimeError):
        server.run(cfg)  # round 1 done (its secrets drawn and checkpointed), then a power cut
    power_cut_in_round_2()
    assert next(draws) == (1 if mode == "central" else 6)  # one secret per noise source: the server, or 6 clients
    run_dir = server.default_run_dir(cfg)
    round_1 = final_state(run_dir)
    weights = [k for k in round_1 if not k.startswith("opt/")]
    assert (f"opt/{dp.SECRET_KEY}" in round_1) == (mode == "central")  # the server's secret is in its checkpoint
    # the same round with the noise drawn from the public seed (dp.seeded_noise, the old behaviour) differs
    seeded = final_state(server.run(cfg_of(tmp_path, "name=seeded", "rounds=1", *extra, "dp.seeded_noise=true")))
    assert any(not torch.equal(round_1[k], seeded[k]) for k in weights)
    draws = iter(range(100, 10**6))  # had the resumed run drawn new secrets, its noise would differ
    server.resume(App(RunDir(run_dir).load_config()), run_dir)
    draws = iter(range(10**6))  # the uninterrupted run draws the same secrets as the crashed one
    full = final_state(server.run(cfg_of(tmp_path, "name=full", "rounds=2", *extra)))
    resumed = final_state(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_dpsgd_noise_comes_from_each_clients_secret(tmp_path):
    app = App(cfg_of(tmp_path, "dpsgd.enabled=true", "dpsgd.noise_multiplier=1.0"))
    app.client_states, app.uplink = ClientStates(tmp_path / "states"), True
    task = ClientTask(1, app.initial_weights)
    fresh = [app.client_train(0, task).delta for _ in range(2)]  # no state before round 1: a new secret each time
    assert any(not torch.equal(fresh[0][k], fresh[1][k]) for k in fresh[0])
    assert dp.SECRET_KEY in app.client_states.get("client_0", 2)  # kept in the client's private state
    app.cfg = cfg_of(tmp_path, "dpsgd.enabled=true", "dpsgd.noise_multiplier=1.0", "dpsgd.seeded_noise=true")
    seeded = [app.client_train(0, task).delta for _ in range(2)]  # from the public seed: the same noise
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])


def test_a_secure_round_with_too_few_survivors_is_skipped_then_resumed_exactly(tmp_path, monkeypatch):
    # The smoke setting of the report: 6 owners, 30% dropout, distributed DP under secure aggregation. With seed 0 the
    # seeded dropout leaves 1 of 6 clients in round 2 (fedfm.features.faults.drops_out), below min_survivors = 3. The
    # round used to abort the run, and every resume met the same round again. Now it is skipped; a run interrupted
    # after it resumes past it and ends bit for bit where the uninterrupted run ends.
    smoke = str(Path(__file__).parent.parent / "configs" / "smoke.yaml")
    extra = ["rounds=3", "federation.num_clients=6", "federation.dropout=0.3", "federation.min_clients=3",
             "secagg.enabled=true", "secagg.threshold=0.3", "dp.mode=distributed", "dp.clip_norm=0.5", "dp.seeded_noise=true",
             "compare.methods=[federated]", f"output_dir={tmp_path}"]
    full = server.run(config_mod.load(smoke, [*extra, "name=full"]))
    recs = records(full)
    assert [r.get("skipped", False) for r in recs] == [False, True, False]
    assert len(recs[1]["clients"]) == 1 and recs[1]["eval_loss"] == recs[0]["eval_loss"]  # the model stayed
    # a skipped round is still counted by the accountant (an upper bound: it released nothing)
    eps = [r["epsilon"] for r in recs]
    assert eps[0] < eps[1] < eps[2]

    original = server.Runner.round

    def power_cut_in_round_3(self, states, progress):
        if states[0].round == 2:
            raise RuntimeError("simulated power cut")
        return original(self, states, progress)

    monkeypatch.setattr(server.Runner, "round", power_cut_in_round_3)
    cut = config_mod.load(smoke, [*extra, "name=cut"])
    with pytest.raises(RuntimeError, match="power cut"):
        server.run(cut)
    monkeypatch.setattr(server.Runner, "round", original)
    run_dir = server.default_run_dir(cut)
    assert RunDir(run_dir).status()["round"] == 2  # the skipped round was checkpointed
    server.resume(App(RunDir(run_dir).load_config()), run_dir)
    a, b = final_state(full), final_state(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.get("skipped", False) for r in records(run_dir)] == [False, True, False]
