"""Federated continual learning: the transfer metrics on a hand-made matrix, the replay bound, the penalty and the
Fisher, bad stage specs, and a tiny end-to-end run of each method (with resume) on MiniLM and BBC."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfm import config as config_mod
from fedfm import server
from fedfm.app import App
from fedfm.client import train
from fedfm.config import TrainConfig
from fedfm.continual import (
    ANCHOR,
    PRECISION,
    MERGED,
    MERGED_COUNT,
    ContinualRun,
    Curriculum,
    diagonal_fisher,
    merge_task_vector,
    reservoir,
    stage_ends,
    stage_of,
    transfer_metrics,
)
from fedfm.errors import ConfigError
from fedfm.rundir import RunDir
from fedfm.types import ClientTask, Penalty

# --------------------------------------------------------------------------- pure functions


def test_transfer_metrics_on_a_hand_made_matrix():
    r = [[0.90, 0.10, 0.20],
         [0.60, 0.80, 0.30],
         [0.50, 0.70, 0.85]]
    b = [0.20, 0.25, 0.20]
    m = transfer_metrics(r, b)
    assert m["acc"] == pytest.approx((0.50 + 0.70 + 0.85) / 3)  # 0.6833
    assert m["bwt"] == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)  # -0.25: forgetting
    assert m["fwt"] == pytest.approx(((0.10 - 0.25) + (0.30 - 0.20)) / 2)  # -0.025
    # no forgetting and no transfer: an identity-like matrix
    assert transfer_metrics([[1, 0], [1, 1]], [0, 0]) == {"acc": 1.0, "bwt": 0.0, "fwt": 0.0}
    with pytest.raises(ValueError):
        transfer_metrics([[1.0]], [0.0])


def test_stage_is_a_pure_function_of_the_round():
    ends = stage_ends([3, 2, 4])
    assert ends == [3, 5, 9]
    assert [stage_of(r, ends) for r in range(1, 10)] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        stage_of(10, ends)


def test_merge_task_vector_mean_and_magmax_by_hand():
    t1 = {"w": torch.tensor([1.0, -4.0, 0.5])}
    t2 = {"w": torch.tensor([-3.0, 2.0, 0.5])}
    t3 = {"w": torch.tensor([2.0, 1.0, -6.0])}
    mean = merge_task_vector(None, 0, t1, "mean")
    mean = merge_task_vector(mean, 1, t2, "mean")
    mean = merge_task_vector(mean, 2, t3, "mean")
    # (1 - 3 + 2) / 3 = 0, (-4 + 2 + 1) / 3 = -1/3, (0.5 + 0.5 - 6) / 3 = -5/3
    assert torch.allclose(mean["w"], torch.tensor([0.0, -1 / 3, -5 / 3]))
    mag = merge_task_vector(None, 0, t1, "magmax")
    mag = merge_task_vector(mag, 1, t2, "magmax")
    mag = merge_task_vector(mag, 2, t3, "magmax")
    # per entry the largest |value|: -3 (stage 2), -4 (stage 1), -6 (stage 3)
    assert torch.equal(mag["w"], torch.tensor([-3.0, -4.0, -6.0]))
    assert torch.equal(merge_task_vector(None, 0, t1, "magmax")["w"], t1["w"])  # the first stage is its own merge
    with pytest.raises(ValueError):
        merge_task_vector(t1, 1, t2, "max")


def test_reservoir_never_exceeds_its_bound_and_samples_uniformly():
    chunks = [np.arange(0, 7), np.arange(7, 12), np.arange(12, 20)]
    for size in (1, 5, 19, 20, 50):
        for seed in range(20):
            for s in range(len(chunks) + 1):
                buf = reservoir(chunks[:s], size, np.random.default_rng(seed))
                assert len(buf) == min(size, sum(map(len, chunks[:s])))
                assert len(set(buf.tolist())) == len(buf) and set(buf.tolist()) <= set(range(20))
    # each of the 20 streamed items is kept with probability 5/20
    counts = np.zeros(20)
    for seed in range(2000):
        counts[reservoir(chunks, 5, np.random.default_rng(seed))] += 1
    assert np.abs(counts / 2000 - 0.25).max() < 0.05


# --------------------------------------------------------------------------- client side: penalty and Fisher


class _Data:
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)


class _Task:
    @staticmethod
    def batch(data, idx):
        return data.x[idx], data.y[idx]

    @staticmethod
    def loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _delta(model, start, penalty=None):
    cfg = TrainConfig(lr=0.05, batch_size=8, local_steps=5, schedule="constant", max_grad_norm=None)
    ctask = ClientTask(1, start, config={"penalty": penalty} if penalty else {})
    return train(model, _Data(), _Task(), ctask, cfg, rounds=1, seed=0, client_index=0, client_name="a").delta


def test_penalty_pulls_toward_the_anchor_weighted_by_precision():
    model = _model()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    plain = _delta(model, start)
    zero = _delta(model, start, Penalty(start, 1e6, {k: torch.zeros_like(v) for k, v in start.items()}))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # precision 0: no pull at all
    strong = _delta(model, start, Penalty(start, 1e3))  # L2 toward the start with precision 1
    def norm(d):
        return sum(float(v.pow(2).sum()) for v in d.values()) ** 0.5

    assert norm(strong) < 0.5 * norm(plain)


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient():
    model, data = _model(), _Data(12)
    fisher = diagonal_fisher(model, _Task(), data, batch_size=5)
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(len(data)):
        model.zero_grad()
        _Task.loss(model, _Task.batch(data, torch.tensor([i]))).backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad.pow(2) / len(data)
    assert all(torch.allclose(fisher[k], expected[k], rtol=1e-4, atol=1e-8) for k in expected)
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in model.modules())  # Opacus hooks removed


# --------------------------------------------------------------------------- end to end (MiniLM, BBC)

TINY = [
    "name=t", "seed=3", "data.source=bbc", "data.max_examples=240", "data.partition=dirichlet", "data.alpha=1.0",
    "data.max_length=32", "federation.num_clients=3", "train.local_steps=3", "train.batch_size=8", "train.lr=0.003",
    "eval.max_examples=48", "eval.every=3", "continual.replay_size=6", "continual.fisher_examples=16", "continual.penalty=10",
    # stage 2: client_2 joins; stage 3: client_0 leaves
    (
        "continual.stages=[{rounds: 1, labels: [business, entertainment], clients: [0, 1]}, "
        "{rounds: 1, labels: [politics, sports]}, {rounds: 1, labels: [tech], clients: [client_1, client_2]}]"
    ),
]


def tiny(tmp_path: Path, *extra: str) -> config_mod.RunConfig:
    return config_mod.load(None, TINY + [f"output_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One App for every run (methods differ only in app.cfg, which the curriculum reads at each call)."""
    return App(tiny(tmp_path_factory.mktemp("app")))


def run(app, tmp_path: Path, method: str, run_method: str = "federated", *extra: str) -> tuple[dict, Path]:
    app.cfg = tiny(tmp_path, f"continual.method={method}", *extra)
    out = tmp_path / f"{run_method}-{method}"
    return server.run_method(app, run_method, out), out


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ck = run_dir / "checkpoints"
    return load_file(ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors")


def check_run(summary: dict, out: Path, method: str) -> list[dict]:
    """What every continual run must show; returns the metrics records."""
    cl = summary["continual"]
    assert cl["method"] == method and summary["rounds"] == 3
    assert np.shape(cl["matrix"]) == (3, 3) and len(cl["initial"]) == 3
    assert {k: cl[k] for k in ("acc", "bwt", "fwt")} == pytest.approx(transfer_metrics(cl["matrix"], cl["initial"]))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert all(r["stage_accuracy"] == row for r, row in zip(records, cl["matrix"]))
    assert "client_2" not in records[0]["clients"] and "client_0" not in records[2]["clients"]  # joins, leaves
    opt = final_state(out)
    anchors = [k for k in opt if k.startswith("opt/" + ANCHOR)]
    precisions = [k for k in opt if k.startswith("opt/" + PRECISION)]
    assert bool(anchors) == (method in ("ewc", "l2sp")) and bool(precisions) == (method == "ewc")
    assert (cl["bytes_down"] + cl["bytes_up"] > 0) == (method in ("ewc", "l2sp"))
    assert "Continual learning" in (out / "report.html").read_text() and (out / "plots" / "continual_matrix.png").is_file()
    return records


@pytest.mark.slow
@pytest.mark.parametrize("method", ["naive", "replay", "l2sp"])  # ewc: in the resume test below
def test_each_method_runs_end_to_end(app, tmp_path, method):
    summary, out = run(app, tmp_path, method)
    records = check_run(summary, out, method)
    if method == "l2sp":  # the anchor goes once to each owner of a new stage: 3 owners at stage 2, 2 at stage 3
        assert records[0].get("cl_bytes_down") is None and records[1]["cl_bytes_down"] * 2 == records[2]["cl_bytes_down"] * 3
    if method == "replay":
        mem = summary["continual"]["replay"]
        assert 0 < mem["examples_max_per_owner"] <= 6 and mem["examples_total"] <= 3 * 6


@pytest.mark.slow
@pytest.mark.parametrize("how,start", [("mean", "fresh"), ("magmax", "merged")])
def test_merge_serves_the_merge_of_the_stages_adapters(app, tmp_path, monkeypatch, how, start):
    """An adapter per stage, merged at each stage end: the run's final model is the initial tensors plus the merge of
    the three stages' task vectors (trained minus initial tensors), computed here directly: their mean, or per entry
    the value of largest magnitude (torch.argmax keeps the first, i.e. earliest, of ties, as fedfm does)."""
    seen = []
    merge_stage = ContinualRun.merge_stage

    def spy(self, s, st, trained=True):
        seen.append((s, {k: v.clone() for k, v in st.weights.items()}))
        out = merge_stage(self, s, st, trained)
        init = self.app.initial_weights
        if s < 2 and start == "fresh":  # the next stage starts from the initial adapter
            assert all(torch.equal(out.weights[k], v) for k, v in init.items())
        if start == "merged":  # ... or from the merged model
            assert all(torch.equal(out.weights[k], init[k] + out.opt[MERGED + k]) for k in init)
        return out

    monkeypatch.setattr(ContinualRun, "merge_stage", spy)
    summary, out = run(app, tmp_path, "merge", "federated", f"continual.merge={how}", f"continual.stage_start={start}")
    check_run(summary, out, "merge")
    assert [s for s, _ in seen] == [0, 1, 2]
    init = app.initial_weights
    expected = {}
    for k in init:
        taus = torch.stack([w[k] - init[k] for _, w in seen])
        if how == "mean":
            expected[k] = init[k] + taus.mean(0)
        else:
            expected[k] = init[k] + taus.gather(0, taus.abs().argmax(0, keepdim=True))[0]
    state = final_state(out)
    assert int(state["opt/" + MERGED_COUNT].item()) == 3
    for k, v in expected.items():
        assert torch.allclose(state["w/" + k], v, atol=1e-6)
        assert torch.allclose(state["opt/" + MERGED + k], v - init[k], atol=1e-6)
    assert summary["continual"]["merge"] == how and summary["continual"]["stage_start"] == start


@pytest.mark.slow
def test_ewc_run_and_its_resume_equals_the_uninterrupted_run(app, tmp_path, power_cut_in_round_2):
    with pytest.raises(RuntimeError):
        run(app, tmp_path / "crash", "ewc")  # the crash comes after stage 1's Fisher and anchor were checkpointed
    power_cut_in_round_2()
    crashed = tmp_path / "crash" / "federated-ewc"
    server.resume(app, crashed)
    summary, full = run(app, tmp_path / "full", "ewc")
    records = check_run(summary, full, "ewc")
    # the Fisher exchange at the first stage end: the model down and a Fisher up, per owner of stage 1
    assert 0 < records[0]["cl_bytes_up"] < records[0]["bytes_up"]
    a, b = final_state(full), final_state(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((crashed / "summary.json").read_text())["continual"]
    assert resumed == summary["continual"] and RunDir(crashed).status()["status"] == "complete"


@pytest.mark.slow
def test_owner_buffers_stay_within_bound_and_hold_only_earlier_stages(app, tmp_path):
    app.cfg = tiny(tmp_path, "continual.method=replay", "continual.replay_size=4")
    cur: Curriculum = app.continual
    for i in range(3):
        for s in range(4):
            buf = cur.buffer(i, s)
            assert len(buf) <= 4
            earlier = set().union(*(cur.stage_rows(i, t).tolist() for t in range(s))) if s else set()
            assert set(buf.tolist()) <= earlier
        # stage 3's training data (tech) = its stage rows plus the buffer of stages 1-2, nothing else
        if i in cur.present[2]:
            assert set(cur.train_rows(i, 2).tolist()) == set(cur.stage_rows(i, 2).tolist()) | set(cur.buffer(i, 2).tolist())


@pytest.mark.slow
def test_baselines_follow_the_stage_schedule(app, tmp_path):
    app.cfg = tiny(tmp_path, "continual.method=replay")
    rd = RunDir(tmp_path / "r")
    local = server.Runner(app, "local", rd)
    assert [g.members for g in local.rounds.groups_at(1)] == [[0], [1], []]  # client_2 joins at stage 2
    assert [g.members for g in local.rounds.groups_at(3)] == [[], [1], [2]]  # client_0 has left
    central = server.Runner(app, "centralized", rd)
    pooled = central.groups[0].members[0]
    # the pooled participant holds the present owners' stage data and buffers, with their budget of examples
    assert central.rounds.groups_at(1)[0].num_examples == 2 * 3 * 8 and central.rounds.groups_at(2)[0].num_examples == 3 * 3 * 8
    cur = app.continual
    sizes = [len(cur.train_rows(i, 2)) for i in (1, 2)]
    assert len(cur.train_rows(pooled, 2)) == sum(sizes) and len(cur.stage_rows(pooled, 0)) == sum(
        len(cur.stage_rows(i, 0)) for i in (0, 1)
    )


@pytest.mark.slow
def test_local_owners_merge_only_the_stages_they_trained(app, tmp_path):
    """The local baseline under merge: client_2 sits stage 1 out and client_0 stage 3, so each folds 2 stage adapters
    into its merge, client_1 all 3; an owner's final model is the initial tensors plus its own merge."""
    summary, out = run(app, tmp_path, "merge", "local")
    assert np.shape(summary["continual"]["matrix"]) == (3, 3)
    from safetensors.torch import load_file

    ck = out / "checkpoints"
    last = ck / (ck / "LATEST").read_text().strip()
    init = app.initial_weights
    counts = []
    for g in range(3):
        state = load_file(last / f"state-g{g}.safetensors")
        counts.append(int(state["opt/" + MERGED_COUNT].item()))
        assert all(torch.allclose(state["w/" + k], init[k] + state["opt/" + MERGED + k], atol=1e-6) for k in init)
    assert counts == [2, 3, 2]


# --------------------------------------------------------------------------- bad stage specs


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rounds=7"], "rounds=7 but continual.stages take 3 rounds"),
        (["continual.stages=[{rounds: 1, labels: [a]}]"], "at least 2 stages"),
        (["continual.stages=[{rounds: 1, labels: [a]}, {rounds: 1, lables: [b]}]"], "continual.stages.1.lables"),
        (["continual.stages=[{rounds: 0, labels: [a]}, {rounds: 1, labels: [b]}]"], "continual.stages.0.rounds"),
        (["continual.stages=[{rounds: 1, labels: [a]}, {rounds: 1, keys: [b]}]"], "labels in every stage"),
        (["continual.method=ewc", "dp.mode=central", "compare.methods=[federated]", "federation.sampling=poisson"],
         "continual.method=ewc with dp"),
        # fixed-size sampling among a stage's owners is a higher rate than the accountant's; stages shrink DP-SGD's shard
        (["dp.mode=central", "compare.methods=[federated]"], "needs federation.sampling=poisson"),
        (["dpsgd.enabled=true", "compare.methods=[federated]"], "dpsgd with continual.stages"),
        (["continual.stages=[]", "continual.method=replay"], "continual.method=replay needs continual.stages"),
    ],
)
def test_bad_stage_specs_are_config_errors_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(tmp_path, *overrides)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stages, message",
    [
        ("[{rounds: 1, labels: [business]}, {rounds: 1, labels: [sport]}]",
         "continual.stages[1].labels: unknown name 'sport'; valid: business, entertainment, politics, sports, tech"),
        ("[{rounds: 1, labels: [business]}, {rounds: 1, labels: [tech], clients: [client_7]}]",
         "continual.stages[1].clients: unknown client 'client_7'"),
        ("[{rounds: 1, keys: [airline]}, {rounds: 1, keys: [apple]}]", "continual.stages[0].keys needs natural owner keys"),
    ],
)
def test_stage_names_are_checked_against_the_data(app, tmp_path, stages, message):
    app.cfg = tiny(tmp_path, f"continual.stages={stages}", "rounds=2")
    with pytest.raises(ConfigError, match=re.escape(message)):
        Curriculum(app)
