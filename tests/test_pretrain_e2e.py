"""End-to-end pre-training and Algorithm 2 runs on real text and real models, sized to take seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfm import config as config_mod
from fedfm import server
from fedfm.app import App
from fedfm.errors import ConfigError, FedFMError
from fedfm.rundir import RunDir
from fedfm.smollm import smollm2_path

pytestmark = pytest.mark.slow

# A 0.2M-parameter Llama on 400 Shakespeare speeches, 3 owners with plays skewed over them (Dirichlet).
LM = [
    "name=lm",
    "seed=1",
    "task=causal_lm",
    "rounds=3",
    "data.source=shakespeare",
    "data.max_examples=400",
    "data.partition=dirichlet",
    "data.alpha=1.0",
    "data.min_partition_size=1",
    "data.test_fraction=0.1",
    "data.max_length=32",
    "model.source=scratch",
    "model.tokenizer=bpe",
    "model.vocab_size=512",
    "model.arch={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}",
    "peft.method=none",
    "federation.num_clients=3",
    "train.local_steps=8",
    "train.batch_size=8",
    "train.lr=0.01",
    "strategy.name=diloco",
    "eval.batch_size=32",
]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_from_scratch_perplexity_falls(tmp_path):
    cfg = config_mod.load(None, [*LM, f"output_dir={tmp_path}"])
    app = App(cfg)
    start = app.server_evaluate(app.initial_weights)["perplexity"]
    assert 400 < start < 650  # an untrained model spreads its bets over the 512-token vocabulary
    run_dir = Path(tmp_path) / "lm"
    server.run_method(app, "federated", run_dir)
    m = metrics(run_dir)
    assert m[-1]["perplexity"] < 0.5 * start and m[-1]["perplexity"] <= m[0]["perplexity"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global"]["perplexity"] == pytest.approx(m[-1]["perplexity"], rel=1e-6)
    assert summary["own_mean"]["perplexity"] > 1
    # the final model is a plain transformers causal LM with its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.vocab_size == len(tok) <= 512


def test_pretraining_resume_is_bitwise_identical(tmp_path, power_cut_in_round_2):
    # DiLoCo momentum, the trained BPE tokenizer, Algorithm 2's server step and the owners' kept AdamW states must
    # all survive a crash
    extra = ["rounds=2", "server_data.fraction=0.1", "server_data.steps=2", "train.keep_optimizer_state=true"]
    cfg = config_mod.load(None, [*LM, *extra, f"output_dir={tmp_path}", "name=b"])
    with pytest.raises(RuntimeError):
        server.run(cfg)
    power_cut_in_round_2()  # power back on
    full = server.run(config_mod.load(None, [*LM, *extra, f"output_dir={tmp_path}", "name=a"]))
    half = server.default_run_dir(cfg)
    server.resume(App(RunDir(half).load_config()), half)

    def last(d):
        ck = d / "checkpoints"
        return load_file(ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors")

    a, b = last(full), last(half)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(k.startswith("opt/v.") for k in a) * 2 == len(a)  # DiLoCo's momentum buffer: one per weight
    summary = json.loads((half / "summary.json").read_text())
    assert summary["client_states"]["clients"] == 4  # 3 owners and the server's own participant kept their AdamW
    # and the kept state matters: the same run with a fresh AdamW each round ends elsewhere
    fresh = server.run(config_mod.load(None, [*LM, *extra[:-1], f"output_dir={tmp_path}", "name=c"]))
    c = last(fresh)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("w/"))


def test_compare_centralized_synchronous_and_local(tmp_path):
    cfg = config_mod.load(None, [*LM, "rounds=1", "compare.centralized=synchronous", f"output_dir={tmp_path}"])
    comparison = server.compare(cfg)
    rows = {r["method"]: r for r in comparison["rows"]}
    assert set(rows) == {"federated", "centralized", "local"}
    assert all(r["perplexity"] > 1 for r in rows.values())
    # synchronous: the pooled participant takes 8 steps of 3 x 8 blocks, the same tokens as 3 owners x 8 x 8
    cm = metrics(Path(tmp_path) / "lm" / "centralized")[0]
    fm = metrics(Path(tmp_path) / "lm" / "federated")[0]
    assert cm["examples"] == fm["examples"] == 3 * 8 * 8
    from fedfm.report import comparison_table

    assert [c.header for c in comparison_table(comparison).columns][:2] == ["Method", "PPL"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_algorithm2_server_data_joins_the_round(tmp_path, when):
    extra = ["server_data.fraction=0.1", "server_data.steps=2", f"server_data.when={when}", "rounds=2", f"output_dir={tmp_path}"]
    cfg = config_mod.load(None, [*LM, *extra])
    app = App(cfg)
    n_server = len(app.split.server)
    assert n_server == round(0.1 * (400 - len(app.split.global_test)))
    # server documents are nobody's training data
    clients = set().union(*map(set, app.split.client_train), *map(set, app.split.client_test))
    assert not clients & set(app.split.server.tolist())
    run_dir = Path(tmp_path) / when
    server.run_method(app, "federated", run_dir)
    m = metrics(run_dir)
    blocks = len(app.shards[app.server_index].train)
    client_blocks = sum(len(app.shards[i].train) for i in range(3))
    assert m[0]["server_share"] == pytest.approx(blocks / (blocks + client_blocks))
    assert m[0]["server_loss"] > 0 and m[-1]["perplexity"] < m[0]["perplexity"] * 1.5
    server.run_method(app, "server", Path(tmp_path) / f"{when}-server")
    assert metrics(Path(tmp_path) / f"{when}-server")[0]["examples"] == 2 * 8


def test_server_method_needs_server_data(tmp_path):
    with pytest.raises(ConfigError, match="server_data.fraction"):
        config_mod.load(None, [*LM, "compare.methods=[federated, server]"])
    app = App(config_mod.load(None, [*LM, f"output_dir={tmp_path}"]))
    with pytest.raises(FedFMError, match="server data"):
        server.run_method(app, "server", tmp_path / "s")


@pytest.mark.skipif(not (smollm2_path() / "config.json").is_file(), reason="run `fedfm data fetch` (SmolLM2)")
def test_continued_pretraining_smollm2_lora(tmp_path):
    cfg = config_mod.load(None, [
        "name=cpt", "seed=0", "task=causal_lm", "rounds=1", f"output_dir={tmp_path}",
        "data.source=shakespeare", "data.max_examples=120", "data.partition=iid", "data.max_length=24",
        "data.test_fraction=0.1", "model.source=smollm2", "peft.method=lora",
        "peft.options={r: 4, target_modules: [q_proj, v_proj]}", "federation.num_clients=2",
        "train.local_steps=1", "train.batch_size=2", "train.lr=0.001", "eval.max_examples=4", "eval.batch_size=4",
    ])
    app = App(cfg)
    assert app.total_params > 134_000_000 and app.trainable_params == 30 * 2 * 4 * (576 + 576) - 30 * 4 * (576 - 192)
    summary = server.run_method(app, "federated", Path(tmp_path) / "f")
    assert 1 < summary["global"]["perplexity"] < 1000  # a pretrained model: far below the 49,152-token vocabulary
    assert (Path(tmp_path) / "f" / "final" / "adapter_config.json").is_file()


def test_eval_reloads_the_pretrained_model(tmp_path):
    from typer.testing import CliRunner

    from fedfm.cli import app as cli_app

    run_dir = server.run(config_mod.load(None, [*LM, "rounds=1", f"output_dir={tmp_path}"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    result = CliRunner().invoke(cli_app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = json.loads((run_dir / "eval.json").read_text())["rows"]
    # reloaded from its Hugging Face files, the model scores exactly what the run measured
    assert rows[0]["perplexity"] == pytest.approx(summary["global"]["perplexity"], rel=1e-5)
