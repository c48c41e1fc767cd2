"""A user's own files, as a new user brings them: text with an owner column for language modelling, owners by key.

Real text: speeches of the cached Shakespeare corpus, written out as the user's jsonl / csv file.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedfm import config, server
from fedfm.data import load_dataset, split
from fedfm.data.corpora import load_corpus
from fedfm.errors import DataError


@pytest.fixture(scope="module")
def speeches():
    corpus = load_corpus("shakespeare", "play")
    plays = sorted(set(corpus.owners))[:3]
    rows = [{"text": d, "play": o} for d, o in zip(corpus.documents, corpus.owners) if o in plays]
    return [r for p in plays for r in [x for x in rows if x["play"] == p][:40]]  # 40 speeches of each of 3 plays


def lm_sets(path, *more):
    return ["task=causal_lm", f"data.source={path.suffix[1:]}", f"data.path={path}", "model.source=scratch",
            "model.tokenizer=bpe", "model.vocab_size=300",
            "model.arch={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
            "data.max_length=32", "train.local_steps=1", "train.batch_size=4", "rounds=1", "eval.max_examples=8",
            "data.test_fraction=0.2", *more]


def test_language_modelling_on_own_jsonl_needs_no_label_and_natural_owners_need_no_count(tmp_path, speeches, monkeypatch):
    """Text plus an owner key is enough for task=causal_lm, and partition=natural makes one client per owner
    without federation.num_clients (its default of 10 would not match the 3 plays)."""
    path = tmp_path / "speeches.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in speeches))
    cfg = config.load(None, lm_sets(path, "data.key_column=play", "data.partition=natural", f"output_dir={tmp_path}",
                                    "peft.method=none"))
    assert cfg.federation.num_clients is None
    ds = load_dataset(cfg.data, cfg.seed, cfg.task)
    assert len(ds) == 120 and len(ds.label_names) == 3 and ds.passages is None
    run_dir = server.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["per_client"]) == 3 and summary["global"]["perplexity"] > 1
    # the model card says what the model is, who trained it, its (absent) privacy guarantee, and how to load it
    card = (run_dir / "final" / "README.md").read_text()
    assert "data owners: 3 (" in card and "federated, 1 rounds, strategy fedavg" in card
    assert "none: no differential-privacy guarantee" in card and "- perplexity: " in card
    assert "tuning: full fine-tuning" in card
    # and its lines load the model, as written, from the run directory
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(run_dir)
    scope: dict = {}
    exec(snippet, scope)
    assert type(scope["model"]).__name__ == "LlamaForCausalLM"
    # a count the user gives is still checked against the owners found
    four = config.load(None, lm_sets(path, "data.key_column=play", "data.partition=natural", "federation.num_clients=4"))
    with pytest.raises(DataError, match="found 3 keys but federation.num_clients=4"):
        split(ds, four.data, four.federation.num_clients, four.seed, 0.0)


def test_own_csv_without_owner_column_and_an_explicit_count(tmp_path, speeches):
    """No owner column: one dataset split over the clients the config asks for; a label column is still required
    for classification, and the message says which columns exist."""
    path = tmp_path / "speeches.csv"
    pd.DataFrame([{"text": r["text"]} for r in speeches]).to_csv(path, index=False)
    cfg = config.load(None, lm_sets(path, "data.partition=iid", "federation.num_clients=2"))
    ds = load_dataset(cfg.data, cfg.seed, cfg.task)
    assert len(ds) == 120 and ds.label_names == ["all"] and ds.keys is None
    with pytest.raises(DataError, match="missing column\\(s\\) 'label'; available: 'text'"):
        load_dataset(config.load(None, ["data.source=csv", f"data.path={path}"]).data, 0, "classification")


def test_privacy_lines_of_the_model_card_by_hand():
    from fedfm.card import privacy_lines

    assert privacy_lines({}) == ["- none: no differential-privacy guarantee; the server saw each owner's update"]
    dp = {"mode": "central", "epsilon": 2.345678, "delta": 1e-5, "rounds": 10, "noise_multiplier": 1.1,
          "accountant": "rdp"}
    lines = privacy_lines({"client_dp": dp, "secure_aggregation": {"graph": "complete"}})
    assert lines[0] == ("- client-level differential privacy (central DP-FedAvg): ε = 2.35, δ = 1e-05 over 10 rounds "
                        "(noise multiplier 1.1, rdp accountant)")
    assert lines[1].startswith("- secure aggregation (complete)")
