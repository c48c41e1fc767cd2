"""The Ray engine and owner data directories: the same job gives the same model on every engine.

Reference: the embedded engine (itself checked by hand-worked strategy tests and bitwise determinism tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedfm import server
from fedfm.app import App
from fedfm.errors import DataError
from fedfm.owner import export_owners, load_owner

from test_e2e import final_state, tiny

pytestmark = pytest.mark.slow


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_engine_matches_embedded_bitwise(tmp_path):
    # compression with error feedback: each client's residual is written by an actor and read back next round,
    # so the shared clients/ folder and the client -> actor assignment are both exercised
    sets = ("engine.threads=1", "compression.up=[topk,int8]", "compression.topk_fraction=0.1")
    emb = server.run(tiny(tmp_path, "name=emb", *sets))
    ray_run = server.run(tiny(tmp_path, "name=ray", "engine.name=ray", "engine.workers=2", *sets))
    a, b = final_state(emb), final_state(ray_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = metrics(emb), metrics(ray_run)
    for x, y in zip(ma, mb):
        assert (x["bytes_up"], x["bytes_down"], x["accuracy"]) == (y["bytes_up"], y["bytes_down"], y["accuracy"])
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (emb, ray_run))
    assert sa["per_client"] == sb["per_client"]  # final per-client evaluation ran on the actors
    assert sb["client_states"]["clients"] == 3


def test_ray_engine_runs_the_centralized_baseline(tmp_path):
    # the pooled participant exists only after the server adds it: actors must add the same one
    emb = server.run(tiny(tmp_path, "name=emb", "rounds=1", "engine.threads=1"), method="centralized")
    ray_run = server.run(tiny(tmp_path, "name=ray", "rounds=1", "engine.name=ray", "engine.threads=1"),
                         method="centralized")
    a, b = final_state(emb), final_state(ray_run)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
