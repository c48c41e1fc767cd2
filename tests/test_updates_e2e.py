"""Cheap and robust updates end to end on MiniLM + LoRA and real BBC news: compressed updates (exact bytes, error
feedback kept on disk, resumable), SCAFFOLD, heterogeneous and exact LoRA aggregation, Byzantine clients against
robust aggregators and norm screening, a backdoor, dropouts and stragglers; and the config rules that keep these
features from being combined where their guarantees would not hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_e2e import final_state, tiny

from fedfm import codec as messages
from fedfm import config as config_mod
from fedfm import server
from fedfm.features.attack import Attack
from fedfm.features.compression import Compression
from fedfm.features.faults import round_seconds
from fedfm.features.lora_ranks import LoraRanks
from fedfm.app import App
from fedfm.compression import KEY
from fedfm.errors import ConfigError
from fedfm.rundir import RunDir

pytestmark = pytest.mark.slow


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compressed_run_sends_exact_small_messages_and_resumes_bitwise(tmp_path, power_cut_in_round_2):
    extra = ["rounds=3", "compression.up=[topk,int8]", "compression.topk_fraction=0.01"]
    cfg = tiny(tmp_path / "crash", *extra)
    with pytest.raises(RuntimeError):
        server.run(cfg)  # round 2 crashes after round 1 wrote each client's error-feedback residual
    run_dir = server.default_run_dir(cfg)
    assert len(list((run_dir / "clients").glob("*.safetensors"))) == 3
    power_cut_in_round_2()
    full = server.run(tiny(tmp_path / "full", *extra))
    server.resume(App(RunDir(run_dir).load_config()), run_dir)
    sf, sr = final_state(full), final_state(run_dir)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)  # the residuals read on resume were those of round 1

    app = App(cfg)
    n = sum(t.numel() for t in app.initial_weights.values())
    k = -(-n // 100)  # ceil(1% of the coordinates)
    msg, _ = app.feature(Compression).codec.encode(app.initial_weights, torch.Generator().manual_seed(0))
    size = len(messages.encode(msg))
    # top-k 1% + int8: k uint16 offsets + 1 int32 chunk count (n < 65,536 x 2) + k int8 codes + one scale per 256
    assert n < 2 * 65536 and size - (k * 2 + 2 * 4 + k + 4 * -(-k // 256)) < 400  # the rest is the JSON header
    for r in records(full):
        assert r["bytes_up"] == 3 * size  # 3 clients, each message exactly that long
        assert r["bytes_up"] * 50 < r["bytes_down"]  # downlink: full float32 LoRA + head to 3 clients
    summary = json.loads((full / "summary.json").read_text())
    assert summary["client_states"]["clients"] == 3
    assert not (full / "clients").exists()  # the simulated clients' private states are removed at the end


def test_error_feedback_and_kept_adamw_state_share_each_clients_file(tmp_path, monkeypatch):
    """Two kinds of private client state in one file per client and round: the error-feedback residual and the kept
    AdamW state; both are written every round, and the AdamW step count continues (round 2 = twice round 1)."""
    from fedfm.store import ClientStates

    saved = []
    put = ClientStates.put

    def spy(self, client, round_, state):
        saved.append((client, round_, dict(state)))
        put(self, client, round_, state)

    monkeypatch.setattr(ClientStates, "put", spy)
    server.run(tiny(tmp_path, "rounds=2", "compression.up=[topk,int8]", "train.keep_optimizer_state=true"))
    assert sorted((c, r) for c, r, _ in saved) == [(f"client_{i}", r) for i in range(3) for r in (1, 2)]
    for _, _, state in saved:
        assert {k.split(".")[0] for k in state} == {"ef", "adam"}
    steps = {(c, r): next(v.item() for k, v in st.items() if k.startswith("adam.step.")) for c, r, st in saved}
    assert all(steps[(f"client_{i}", 2)] == 2 * steps[(f"client_{i}", 1)] > 0 for i in range(3))


def test_non_finite_update_under_compression_is_rejected_not_fatal(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "rounds=2", "train.local_steps=1", "compression.up=[sign]")
    app = App(cfg)
    honest = App._train

    def exploding(self, c):
        update = honest(self, c)
        if c.index == 0 and c.task.round == 1:  # client_0's training blew up in round 1
            name = next(iter(update.delta))
            update.delta[name] = torch.full_like(update.delta[name], float("inf"))
        return update

    monkeypatch.setattr(App, "_train", exploding)
    server.run_method(app, "federated", tmp_path / "r")
    first, second = records(tmp_path / "r")
    assert [x["client"] for x in first["rejected"]] == ["client_0"] and "NaN or Inf" in first["rejected"][0]["reason"]
    assert second["rejected"] == [] and "client_0" in second["clients"]  # no poisoned residual was kept


def test_malformed_compressed_update_is_rejected_with_its_reason(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "rounds=1", "train.local_steps=1", "compression.up=[topk,int4]")
    app = App(cfg)
    honest = App.client_train

    def broken(self, index, task):
        update = honest(self, index, task)
        if index == 2:
            update.delta[KEY + "codes"] = update.delta[KEY + "codes"][:-3]  # truncated in transit
        return update

    monkeypatch.setattr(App, "client_train", broken)
    server.run_method(app, "federated", tmp_path / "r")
    (rec,) = records(tmp_path / "r")
    assert [x["client"] for x in rec["rejected"]] == ["client_2"]
    assert rec["rejected"][0]["reason"].startswith("malformed compressed update: int4 codes")


def test_scaffold_doubles_the_traffic_and_keeps_each_clients_control_variate(tmp_path, power_cut_in_round_2):
    cfg = tiny(tmp_path / "crash", "rounds=3", "strategy.name=scaffold")
    with pytest.raises(RuntimeError):
        server.run(cfg)
    power_cut_in_round_2()
    run_dir = server.default_run_dir(cfg)
    server.resume(App(RunDir(run_dir).load_config()), run_dir)
    full = server.run(tiny(tmp_path / "full", "rounds=3", "strategy.name=scaffold"))
    plain = server.run(tiny(tmp_path / "plain", "rounds=3"))
    sf, sr = final_state(full), final_state(run_dir)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert any(k.startswith("opt/c.") for k in sf) and any(sf[k].abs().sum() > 0 for k in sf if k.startswith("opt/c."))
    s, p = records(full)[0], records(plain)[0]
    # x and c down, dy and dc up: twice the tensors, a little under twice the bytes (one header per message)
    assert 1.9 < s["bytes_up"] / p["bytes_up"] < 2.01 and 1.9 < s["bytes_down"] / p["bytes_down"] < 2.01
    assert json.loads((full / "summary.json").read_text())["client_states"]["clients"] == 3


def test_heterogeneous_ranks_send_only_their_components(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "rounds=2", "federation.lora_ranks=[2,4,8]", "strategy.lora_aggregation=flexlora")
    app = App(cfg)
    sent = {}
    honest = App.client_train

    def spy(self, index, task):
        update = honest(self, index, task)
        a = next(k for k in update.delta if ".lora_A." in k)
        sent[update.client] = update.delta[a].shape[0]
        return update

    monkeypatch.setattr(App, "client_train", spy)
    server.run_method(app, "federated", tmp_path / "r")
    assert sorted(sent.values()) == [2, 4, 8] and sent == {app.shards[i].name: app.feature(LoraRanks).ranks[i] for i in range(3)}
    recs = records(tmp_path / "r")
    uniform = server.run(tiny(tmp_path / "u", "rounds=2"))
    assert recs[0]["bytes_up"] < 0.75 * records(uniform)[0]["bytes_up"]  # (2 + 4 + 8) / 24 of the LoRA bytes + head
    assert all(0 <= r["lora_truncation_error"] < 1 for r in recs)
    assert all(torch.isfinite(t).all() for t in final_state(tmp_path / "r").values())


def test_exact_lora_aggregation_logs_its_truncation(tmp_path):
    run = server.run(tiny(tmp_path, "rounds=1", "strategy.lora_aggregation=exact", "eval.max_clients=2"))
    (rec,) = records(run)
    assert 0 < rec["lora_truncation_error"] < 1  # 3 clients x rank 8 products re-factorised to rank 8
    per_client = json.loads((run / "summary.json").read_text())["per_client"]
    assert sum(c["own"] is None for c in per_client) == 1  # eval.max_clients: 2 of the 3 owners evaluated


def test_scaling_attacker_is_screened_out_by_its_norm(tmp_path):
    fed = "compare.methods=[federated]"
    run = server.run(tiny(tmp_path, "attack.kind=scaling", "attack.fraction=0.34", "federation.max_norm_ratio=5", fed))
    app_byz = App(tiny(tmp_path / "x", "attack.kind=scaling", "attack.fraction=0.34", fed))
    (bad,) = [app_byz.shards[i].name for i in app_byz.feature(Attack).byzantine]
    for r in records(run):
        assert [x["client"] for x in r["rejected"]] == [bad]  # 30x the honest update: far above 5x the median
        assert "median" in r["rejected"][0]["reason"] and r["byzantine_sampled"] == 1
    html = (run / "report.html").read_text()
    assert "Updates: screening, faults, attacks" in html and "Simulated attack" in html


def test_compression_composes_with_central_dp(tmp_path):
    # clients compress; the server decodes, clips each decoded update to C itself, then adds the noise
    run = server.run(tiny(tmp_path, "rounds=1", "compression.up=[topk,int8]", "compression.topk_fraction=0.05",
                          "dp.mode=central", "dp.clip_norm=0.5", "compare.methods=[federated]"))
    (rec,) = records(run)
    assert rec["epsilon"] > 0 and rec["rejected"] == [] and rec["bytes_up"] < rec["bytes_down"] / 5
    assert all(torch.isfinite(t).all() for t in final_state(run).values())


def test_backdoor_success_is_measured(tmp_path):
    run = server.run(tiny(tmp_path, "rounds=1", "attack.kind=backdoor", "attack.fraction=0.34", "strategy.name=median",
                          "compare.methods=[federated]"))
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["global"]["backdoor_success"] <= 1
    assert records(run)[0]["backdoor_success"] is not None


def test_dropouts_and_stragglers_are_excluded_logged_and_the_run_finishes(tmp_path):
    extra = ["rounds=3", "federation.num_clients=6", "federation.min_clients=1", "federation.dropout=0.3",
             "federation.slowness_spread=0.6", "federation.deadline=3.5"]
    cfg = tiny(tmp_path, *extra)
    run = server.run(cfg)
    app = App(cfg)
    assert RunDir(run).status()["status"] == "complete"
    total_late = 0
    for r in records(run):
        names = {s.name: i for i, s in enumerate(app.client_shards)}
        late = {s["client"] for s in r["stragglers"]}
        for s in r["stragglers"]:  # 3 local steps x 1 s x slowness > the 3.5 s deadline
            assert s["seconds"] > 3.5
            assert s["seconds"] == pytest.approx(round_seconds(app, names[s["client"]], r["round"], None), abs=1e-3)
        assert late.isdisjoint(r["clients"]) and set(r["dropped"]).isdisjoint(r["clients"])
        assert len(r["clients"]) + len(late) + len(r["dropped"]) == 6
        assert r["round_sim_s"] == (3.5 if late else max(round_seconds(app, names[c], r["round"], None) for c in r["clients"]))
        total_late += len(late)
    assert total_late > 0 and sum(len(r["dropped"]) for r in records(run)) > 0


@pytest.mark.parametrize("dp", [False, True])
def test_a_round_with_too_few_reports_is_skipped_not_fatal(tmp_path, dp):
    # seed 3, Poisson fraction 0.3 over 3 owners draws [1, 2], [2], [] (server.sample): round 3 has nobody. Without
    # DP this used to abort the run, and every resume failed again at the same seeded round; with central DP and
    # server data it raised UnboundLocalError. Now the round is skipped: logged, the model unchanged.
    extra = ["rounds=3", "federation.sampling=poisson", "federation.fraction=0.3", "federation.min_clients=1"]
    if dp:
        extra += ["dp.mode=central", "compare.methods=[federated]", "server_data.fraction=0.1", "server_data.steps=2",
                  "server_data.weight=0.2"]
    cfg = tiny(tmp_path, *extra)
    group = server.Group("all", [0, 1, 2], None)
    assert [server.sample(group, r, cfg) for r in (1, 2, 3)] == [[1, 2], [2], []]
    run = server.run(cfg)
    assert RunDir(run).status()["status"] == "complete"
    rec = records(run)
    assert [r.get("skipped", False) for r in rec] == [False, False, True]
    assert rec[2]["clients"] == [] and rec[2]["bytes_up"] == 0
    assert rec[2]["eval_loss"] == rec[1]["eval_loss"]  # the same model evaluated again


def test_reports_of_a_skipped_round_leave_no_client_state_behind(tmp_path, monkeypatch):
    # min_clients=3 of 3 with 30% dropout: some rounds get 1-2 reports and are skipped. Those clients already saved their
    # error-feedback residual for the round; it is dropped with their update, so their next round reads the state
    # from before the skipped round (as a resume would), not a residual of an update never applied.
    cfg = tiny(tmp_path, "rounds=4", "federation.min_clients=3", "federation.dropout=0.3",
               "compression.up=[topk,int8]", "compression.topk_fraction=0.01")
    original, on_disk = server.Runner.round, {}

    def round_and_look(self, states, progress):  # the clients' state files right after each round
        record = original(self, states, progress)
        on_disk[record["round"]] = sorted(p.name for p in (self.dir.path / "clients").glob("*.safetensors"))
        return record

    monkeypatch.setattr(server.Runner, "round", round_and_look)
    rec = records(server.run(cfg))
    partial = [r for r in rec if r.get("skipped") and r["clients"]]
    assert partial  # the seeded dropout gives rounds with some but too few reports
    for r in partial:
        assert not [n for n in on_disk[r["round"]] if n.endswith(f".{r['round']}.safetensors")], on_disk
        assert r["examples"] == 0 and r["train_loss"] is None  # the dropped reports are not counted as used
    assert any(on_disk.values())  # the rounds that were not skipped keep their residuals


def test_a_metrics_record_is_never_lost_between_checkpoint_and_log(tmp_path, monkeypatch):
    # the record is appended before the checkpoint: a crash between the two is repaired on resume (the record past
    # the checkpoint is dropped and rewritten), where the other order lost round 2's record for good
    original = RunDir.save_checkpoint

    def crash_in_round_2(self, states, meta):
        if states[0].round == 2:
            raise RuntimeError("simulated power cut")
        return original(self, states, meta)

    monkeypatch.setattr(RunDir, "save_checkpoint", crash_in_round_2)
    cfg = tiny(tmp_path, "rounds=3")
    with pytest.raises(RuntimeError):
        server.run(cfg)
    run_dir = server.default_run_dir(cfg)
    assert [r["round"] for r in records(run_dir)] == [1, 2]
    monkeypatch.setattr(RunDir, "save_checkpoint", original)
    server.resume(App(RunDir(run_dir).load_config()), run_dir)
    assert [r["round"] for r in records(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["compression.up=[int8,topk]"], "topk must come first"),
        (["compression.up=[topk,randk]"], "only one sparsifier"),
        (["compression.up=[sign,int8]"], "at most one value codec"),
        (["compression.up=[int8,fp16]"], "at most one value codec"),
        (["compression.up=[int8]", "secagg.enabled=true", "federation.min_clients=2"], "compress or mask"),
        (["strategy.name=krum", "dp.mode=central", "compare.methods=[federated]"], "needs individual client updates"),
        (["strategy.lora_aggregation=hetlora"], "needs federation.lora_ranks"),
        (["federation.lora_ranks=[2,16]", "strategy.lora_aggregation=hetlora"], "must lie in 1..8"),
        (["federation.lora_ranks=[2,4]"], "hetlora or flexlora"),
        (["strategy.lora_aggregation=exact", "strategy.name=median"], "replaces the weighted mean"),
        (["strategy.lora_aggregation=exact", "peft.method=ia3"], "needs peft.method=lora"),
        (["strategy.name=scaffold", "compression.up=[int8]"], "scaffold"),
        (["strategy.name=scaffold", "dpsgd.enabled=true", "compare.methods=[federated]"], "per-example clipping"),
        (["strategy.name=scaffold", "server_data.fraction=0.1"], "no control variate"),
        (["strategy.lora_aggregation=exact", "strategy.name=fedadam"], "new basis"),
        (["strategy.lora_aggregation=exact", "strategy.server_lr=0.5"], "new basis"),
        (["federation.max_norm_ratio=5", "dp.mode=central", "compare.methods=[federated]"], "clipping"),
        (["attack.kind=sign_flip"], "set compare.methods=\\[federated\\]"),
        (["attack.kind=backdoor", "task=causal_lm", "data.source=austen", "model.source=scratch",
          "model.tokenizer=bpe", "compare.methods=[federated]"], "needs task=classification"),
    ],
)
def test_combinations_that_cannot_hold_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_mod.load(None, overrides)


def test_frozen_lora_factor_cannot_be_combined_by_product(tmp_path):
    # FFA-LoRA (peft.freeze=[lora_A]) sends B only: there is no product B_i A_i to average
    with pytest.raises(ConfigError, match="both LoRA factors trainable"):
        App(tiny(tmp_path, "peft.freeze=[lora_A]", "strategy.lora_aggregation=exact"))
