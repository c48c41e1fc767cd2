"""End-to-end runs on the real MiniLM model and the real BBC corpus, sized to take seconds each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedfm import config as config_mod
from fedfm import server
from fedfm.app import App
from fedfm.cli import app as cli_app
from fedfm.rundir import RunDir

pytestmark = pytest.mark.slow

TINY = [
    "name=t",
    "seed=3",
    "rounds=2",
    "data.source=bbc",
    "data.max_examples=240",
    "data.partition=dirichlet",
    "data.alpha=1.0",
    "data.max_length=32",
    "federation.num_clients=3",
    "train.local_steps=3",
    "train.batch_size=8",
    "train.lr=0.003",
    "eval.max_examples=48",
]


def tiny(tmp_path: Path, *extra: str) -> config_mod.RunConfig:
    return config_mod.load(None, TINY + [f"output_dir={tmp_path}", *extra])


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = run_dir / "checkpoints"
    return load_file(ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors")


def test_federated_accuracy_rises_above_chance(tmp_path):
    # 5 BBC classes: chance is 20%. Learning signal must lift the global accuracy well above it.
    cfg = tiny(tmp_path, "rounds=4", "train.local_steps=6", "data.max_examples=400", "eval.max_examples=80")
    run_dir = server.run(cfg)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["accuracy"] > 0.35
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global"]["accuracy"] > 0.35
    assert RunDir(run_dir).status()["status"] == "complete"
    assert (run_dir / "report.html").is_file() and (run_dir / "final" / "adapter_config.json").is_file()


def test_seeded_runs_are_bitwise_identical(tmp_path):
    a = server.run(tiny(tmp_path / "a"))
    b = server.run(tiny(tmp_path / "b"))
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = server.run(tiny(tmp_path / "c", "seed=4"))
    sc = final_state(c)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k in sc)


def test_resume_after_crash_equals_uninterrupted(tmp_path, power_cut_in_round_2):
    cfg = tiny(tmp_path / "crash", "rounds=3")
    with pytest.raises(RuntimeError):
        server.run(cfg)
    run_dir = server.default_run_dir(cfg)
    status = RunDir(run_dir).status()
    assert status["status"] == "incomplete" and "power cut" in status["reason"] and status["round"] == 1
    assert not (run_dir / "summary.json").exists()
    power_cut_in_round_2()  # power back on
    full = server.run(tiny(tmp_path / "full", "rounds=3"))

    server.resume(App(RunDir(run_dir).load_config()), run_dir)
    sf, sr = final_state(full), final_state(run_dir)
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert RunDir(run_dir).status()["status"] == "complete"


# prefix_tuning on MiniLM: transformers 5.23 and later 5.x (5.24+ through models.pass_prefix_as_cache; see
# test_prefix_tuning.py)
@pytest.mark.parametrize("method", ["ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "none"])
def test_peft_methods_train_and_only_trainable_tensors_travel(tmp_path, method):
    cfg = tiny(tmp_path, "rounds=1", f"peft.method={method}", "train.local_steps=1")
    app = App(cfg)
    run_dir = tmp_path / "r"
    summary = server.run_method(app, "federated", run_dir)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    trainable_bytes = 4 * summary["trainable_params"]  # float32
    # each of the 3 clients sends one safetensors message: the raw tensors plus a small JSON header
    per_client = record["bytes_up"] / 3
    assert trainable_bytes < per_client < trainable_bytes + 64 * 1024
    if method != "none":
        assert summary["trainable_params"] < 0.05 * summary["total_params"]
    result = CliRunner().invoke(cli_app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = json.loads((run_dir / "eval.json").read_text())["rows"]
    # the model reloaded from its Hugging Face files scores what the run measured
    assert rows[0]["accuracy"] == pytest.approx(summary["global"]["accuracy"], abs=1e-6)


def test_compare_writes_all_three_methods(tmp_path):
    cfg = tiny(tmp_path, "rounds=1")
    comparison = server.compare(cfg)
    assert {r["method"] for r in comparison["rows"]} == {"federated", "centralized", "local"}
    out = server.default_run_dir(cfg)
    local = json.loads((out / "local" / "summary.json").read_text())
    assert len(local["per_client"]) == 3 and (out / "local" / "final" / "client_0").is_dir()
    cent = [json.loads(x) for x in (out / "centralized" / "metrics.jsonl").read_text().splitlines()]
    fed = [json.loads(x) for x in (out / "federated" / "metrics.jsonl").read_text().splitlines()]
    # same budget of examples seen per round: 3 clients x 3 steps x 8
    assert cent[0]["examples"] == fed[0]["examples"] == 72
    assert (out / "report.html").is_file()


# --- bad input: one clear line, exit code 2, nothing half-written --------------------------------


def run_cli(tmp_path, *sets: str):
    args = ["run", str(Path(__file__).parent.parent / "configs" / "smoke.yaml"), "--set", f"output_dir={tmp_path}"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(cli_app, args)


def test_missing_model_path(tmp_path):
    res = run_cli(tmp_path, "model.source=/nonexistent/model")
    assert res.exit_code == 2 and "model not found" in res.output
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_dataset_with_missing_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,sentiment\nhello,pos\nbye,neg\n")
    res = run_cli(tmp_path / "out", "data.source=csv", f"data.path={bad}", "data.max_examples=null")
    assert res.exit_code == 2 and "label" in res.output
    assert not (tmp_path / "out").exists()


def test_client_without_data(tmp_path):
    res = run_cli(tmp_path, "federation.num_clients=200", "data.partition=iid", "data.max_examples=100")
    assert res.exit_code == 2 and "no training examples" in res.output


def test_nan_loss_mid_run_leaves_resumable_incomplete_run(tmp_path, monkeypatch):
    from fedfm.tasks.classification import ClassificationTask

    original = ClassificationTask.loss

    def nan_in_round_2(model, batch):
        loss = original(model, batch)
        return loss * float("nan") if nan_in_round_2.calls > 3 else loss

    def counting(model, batch):
        nan_in_round_2.calls += 1
        return nan_in_round_2(model, batch)

    nan_in_round_2.calls = 0
    monkeypatch.setattr(ClassificationTask, "loss", staticmethod(counting))
    cfg = tiny(tmp_path, "train.local_steps=1")  # round 1: 3 clients x 1 step; round 2 hits NaN
    res = run_cli(tmp_path, *TINY, "train.local_steps=1")
    assert res.exit_code == 2 and "loss is nan" in res.output.lower()
    run_dir = server.default_run_dir(cfg)
    status = RunDir(run_dir).status()
    assert status["status"] == "incomplete" and status["round"] == 1
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "round-0001"
    assert not (run_dir / "summary.json").exists()


def test_local_baseline_spilling_client_states_to_disk_gives_identical_models(tmp_path):
    # with a zero memory budget every client's model but the newest lives on disk between uses
    app = App(tiny(tmp_path, "engine.state_memory_mb=0"))
    server.run_method(app, "local", tmp_path / "disk")
    app.cfg = tiny(tmp_path, "engine.state_memory_mb=1024")
    server.run_method(app, "local", tmp_path / "mem")
    for g in range(3):
        a = load_file(tmp_path / "disk" / "checkpoints" / "round-0002" / f"state-g{g}.safetensors")
        b = load_file(tmp_path / "mem" / "checkpoints" / "round-0002" / f"state-g{g}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "disk" / "client_states").exists()  # spill files are removed at the end


def test_poisoned_update_is_rejected_and_never_reaches_the_global_model(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, "rounds=1", "train.local_steps=1")
    app = App(cfg)
    honest = App.client_train

    def poisoned(self, index, task):
        update = honest(self, index, task)
        if index == 1:  # client_1 sends NaN in one tensor
            name = next(iter(update.delta))
            update.delta[name] = torch.full_like(update.delta[name], float("nan"))
        return update

    monkeypatch.setattr(App, "client_train", poisoned)
    server.run_method(app, "federated", tmp_path / "r")
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    assert record["rejected"] == [{"client": "client_1", "reason": record["rejected"][0]["reason"]}]
    assert "NaN" in record["rejected"][0]["reason"]
    state = final_state(tmp_path / "r")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_ffa_lora_freezes_a_and_sends_only_b_and_head(tmp_path):
    cfg = tiny(tmp_path, "rounds=1", "train.local_steps=1", "peft.freeze=[lora_A]")
    app = App(cfg)
    names = set(app.initial_weights)
    assert names and not any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    # MiniLM: 6 layers x (query, value) -> 12 B matrices travel; no A matrix does
    assert sum("lora_B" in n for n in names) == 12
    run_dir = tmp_path / "r"
    summary = server.run_method(app, "federated", run_dir)
    result = CliRunner().invoke(cli_app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = json.loads((run_dir / "eval.json").read_text())["rows"]
    assert rows[0]["accuracy"] == pytest.approx(summary["global"]["accuracy"], abs=1e-6)


def test_freeze_pattern_that_matches_nothing_is_an_error(tmp_path):
    from fedfm.errors import ModelError

    with pytest.raises(ModelError, match="matches no trainable tensor"):
        App(tiny(tmp_path, "peft.freeze=[no_such_tensor]"))
