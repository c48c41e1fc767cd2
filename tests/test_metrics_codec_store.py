"""Tests of the small pure pieces: classification metrics, the tensor codec, the spilling state store,
the run directory, and the server's update validation and client sampling."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from sklearn.metrics import accuracy_score, f1_score

from fedfm import codec
from fedfm import rundir as rundir_mod
from fedfm.config import RunConfig
from fedfm.errors import FedFMError
from fedfm.rundir import RunDir
from fedfm.store import StateStore, nbytes
from fedfm.tasks.classification import classification_metrics
from fedfm.types import ClientUpdate, ServerState

# --- classification_metrics vs scikit-learn ------------------------------------------------------


def check_against_sklearn(pred, target, num_labels):
    pred_t, target_t = torch.tensor(pred, dtype=torch.long), torch.tensor(target, dtype=torch.long)
    got = classification_metrics(pred_t, target_t, num_labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(target, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(target, pred, average="macro", zero_division=0), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_random(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    n = int(rng.integers(1, 60))
    check_against_sklearn(rng.integers(0, k, n).tolist(), rng.integers(0, k, n).tolist(), k)


def test_metrics_class_never_predicted():
    # class 2 is in the targets but never predicted: its F1 is 0 and it counts in the macro mean
    target, pred = [0, 1, 2, 2, 0, 1], [0, 1, 0, 1, 0, 1]
    check_against_sklearn(pred, target, 3)
    got = classification_metrics(torch.tensor(pred), torch.tensor(target), 3)
    # acc = 4/6; F1: class0 2*2/(2+3) = 0.8, class1 2*2/(2+3) = 0.8, class2 0 -> mean 1.6/3
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["macro_f1"] == pytest.approx(1.6 / 3)


def test_metrics_class_absent_from_targets():
    # class 3 is predicted once but never a target; class 2 appears nowhere (skipped)
    target, pred = [0, 0, 1, 1], [0, 3, 1, 1]
    check_against_sklearn(pred, target, 4)
    got = classification_metrics(torch.tensor(pred), torch.tensor(target), 4)
    # F1: class0 2*1/(2+1) = 2/3, class1 2*2/(2+2) = 1, class3 0 -> (2/3 + 1 + 0)/3 = 5/9
    assert got["macro_f1"] == pytest.approx(5 / 9)
    assert got["accuracy"] == pytest.approx(0.75)


def test_metrics_perfect_and_single_class():
    check_against_sklearn([1, 1, 1], [1, 1, 1], 3)
    assert classification_metrics(torch.tensor([2, 0]), torch.tensor([2, 0]), 3) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_metrics_empty_is_nan():
    got = classification_metrics(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 3)
    assert np.isnan(got["accuracy"]) and np.isnan(got["macro_f1"])


# --- codec ---------------------------------------------------------------------------------------


def sample_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "c": torch.randn(4, 2, generator=g).t(),  # non-contiguous
        "d": torch.tensor(7.5),  # 0-d
        "e": torch.tensor([float("inf"), -0.0, float("nan")]),
    }


def test_codec_round_trip_bit_exact():
    w = sample_weights()
    back = codec.decode(codec.encode(w))
    assert set(back) == set(w)
    for k, t in w.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        # bit-exact (also for NaN and -0.0): compare the raw bytes
        assert back[k].reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist()


def test_codec_length_is_safetensors_length():
    w = sample_weights()
    msg = codec.encode(w)
    assert isinstance(msg, bytes)
    assert len(msg) == len(st_save({k: v.contiguous() for k, v in w.items()}))
    assert len(msg) > nbytes(w)  # header on top of the raw data
    # safetensors layout: 8-byte little-endian header size, header, then exactly the raw tensor bytes
    (header_len,) = struct.unpack("<Q", msg[:8])
    assert len(msg) == 8 + header_len + nbytes(w)


@pytest.mark.parametrize("garbage", [b"", b"garbage", b"\x00" * 8, b"\xff" * 16, random.Random(0).randbytes(64)],
                         ids=["empty", "text", "zeros", "ones", "random"])  # seeded: every test worker collects the same
def test_codec_decode_garbage_raises_value_error(garbage):
    with pytest.raises(ValueError):
        codec.decode(garbage)


def test_codec_decode_truncated_raises_value_error():
    msg = codec.encode({"x": torch.ones(10)})
    with pytest.raises(ValueError):
        codec.decode(msg[:-3])


# --- StateStore ----------------------------------------------------------------------------------


def entry(v: float, n: int = 25) -> dict[str, torch.Tensor]:
    v = float(v)
    return {"w": torch.full((n,), v), "b": torch.arange(n, dtype=torch.float32) * v}  # 2 * 25 * 4 = 200 bytes


def test_store_within_budget_all_in_memory(tmp_path):
    s = StateStore(600, tmp_path / "spill")
    for i in range(3):  # 3 * 200 = 600 bytes <= 600
        s.put(f"c{i}", entry(i))
    assert nbytes(entry(0)) == 200
    assert s.spilled == 0
    assert not (tmp_path / "spill").exists()
    assert s.keys() == ["c0", "c1", "c2"]
    assert "c1" in s and "zz" not in s


def test_store_spills_least_recently_used(tmp_path):
    spill = tmp_path / "spill"
    s = StateStore(450, spill)  # room for two 200-byte entries
    s.put("a", entry(1.0))
    s.put("b", entry(2.0))
    s.get("a")  # a is now more recently used than b
    s.put("c", entry(3.0))  # 600 > 450 -> the LRU entry, b, spills
    assert s.spilled == 1
    assert sorted(p.name for p in spill.iterdir()) == ["b.safetensors"]
    s.put("d", entry(4.0))  # a is now the LRU
    assert s.spilled == 2
    assert sorted(p.name for p in spill.iterdir()) == ["a.safetensors", "b.safetensors"]
    assert s.keys() == ["a", "b", "c", "d"]
    # get() brings b back bit-exact (and spills the LRU in memory, c)
    b = s.get("b")
    assert torch.equal(b["w"], entry(2.0)["w"]) and torch.equal(b["b"], entry(2.0)["b"])
    assert "b" in s and s.spilled == 2
    a = s.get("a")
    assert torch.equal(a["w"], entry(1.0)["w"]) and torch.equal(a["b"], entry(1.0)["b"])
    with pytest.raises(KeyError):
        s.get("missing")


def test_store_keeps_most_recent_even_if_too_big(tmp_path):
    s = StateStore(100, tmp_path)
    s.put("big", entry(1.0))  # 200 bytes > 100, but it is the only entry
    assert s.spilled == 0
    s.put("big2", entry(2.0))
    assert s.spilled == 1 and "big" in s
    assert torch.equal(s.get("big")["w"], entry(1.0)["w"])


def test_store_put_replaces(tmp_path):
    s = StateStore(450, tmp_path)
    s.put("a", entry(1.0))
    s.put("a", entry(5.0))  # replacing does not double-count
    s.put("b", entry(2.0))
    assert s.spilled == 0
    assert torch.equal(s.get("a")["w"], entry(5.0)["w"])


# --- RunDir --------------------------------------------------------------------------------------


def states(round_: int, scale: float = 1.0) -> list[ServerState]:
    g0 = ServerState(round_, {"w.a": torch.arange(6.0).reshape(2, 3) * scale, "w.b": torch.tensor([scale])}, {"m.w.a": torch.ones(2, 3) * scale})
    g1 = ServerState(round_, {"w.a": -torch.arange(6.0).reshape(2, 3) * scale, "w.b": torch.tensor([-scale])}, {"m.w.a": torch.zeros(2, 3)})
    return [g0, g1]


def assert_states_equal(got: list[ServerState], want: list[ServerState]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.round == w.round
        assert g.weights.keys() == w.weights.keys() and g.opt.keys() == w.opt.keys()
        assert all(torch.equal(g.weights[k], w.weights[k]) for k in w.weights)
        assert all(torch.equal(g.opt[k], w.opt[k]) for k in w.opt)


def test_checkpoint_round_trip_two_groups(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create(RunConfig(), "local")
    assert rd.load_checkpoint() is None
    rd.save_checkpoint(states(1), {"method": "local", "seed": 3})
    loaded, meta = rd.load_checkpoint()
    assert_states_equal(loaded, states(1))
    assert meta == {"method": "local", "seed": 3, "round": 1, "groups": 2}


def test_checkpoint_only_newest_kept_and_latest_pointer(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run")
    rd.create(RunConfig(), "federated")
    rd.save_checkpoint(states(1), {})
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(rundir_mod.os, "replace", recording_replace)
    rd.save_checkpoint(states(2, scale=2.0), {})
    assert sorted(p.name for p in rd.ckpt_dir.iterdir()) == ["LATEST", "round-0002"]
    assert (rd.ckpt_dir / "LATEST").read_text().strip() == "round-0002"
    # LATEST was replaced atomically: written to a temp file in the same directory, then os.replace'd
    latest = [(src, dst) for src, dst in replaced if dst == rd.ckpt_dir / "LATEST"]
    assert len(latest) == 1
    src = latest[0][0]
    assert src.parent == rd.ckpt_dir and src.name.startswith(".LATEST.") and not src.exists()
    loaded, meta = rd.load_checkpoint()
    assert meta["round"] == 2
    assert_states_equal(loaded, states(2, scale=2.0))


def test_crash_while_renaming_checkpoint_keeps_previous(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run")
    rd.create(RunConfig(), "federated")
    rd.save_checkpoint(states(1), {})

    def crash(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(rundir_mod.os, "rename", crash)
    with pytest.raises(OSError):
        rd.save_checkpoint(states(2, scale=2.0), {})
    loaded, meta = rd.load_checkpoint()
    assert meta["round"] == 1
    assert_states_equal(loaded, states(1))


def test_half_written_temp_checkpoint_is_ignored(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create(RunConfig(), "federated")
    rd.save_checkpoint(states(4), {})
    tmp = rd.ckpt_dir / ".round-0005.abcd1234"
    tmp.mkdir()
    (tmp / "state.safetensors").write_bytes(b"\x00\x01half")
    loaded, meta = rd.load_checkpoint()
    assert meta["round"] == 4
    assert_states_equal(loaded, states(4))
    rd.save_checkpoint(states(5), {})  # the next save clears the leftover
    assert sorted(p.name for p in rd.ckpt_dir.iterdir()) == ["LATEST", "round-0005"]


def test_create_refuses_non_empty_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "something").write_text("x")
    with pytest.raises(FedFMError, match="already exists"):
        RunDir(d).create(RunConfig(), "federated")
    assert sorted(p.name for p in d.iterdir()) == ["something"]


def test_create_accepts_empty_dir_and_writes_files(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rd = RunDir(d)
    rd.create(RunConfig(name="x"), "centralized")
    assert rd.load_config() == RunConfig(name="x")
    assert rd.status() == {"status": "running", "reason": None, "round": 0, "method": "centralized"}
    assert rd.metrics() == []


def test_truncate_metrics(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create(RunConfig(), "federated")
    for r in range(1, 5):
        rd.append_metrics({"round": r, "loss": 1.0 / r})
    kept = rd.truncate_metrics(2)
    assert kept == [{"round": 1, "loss": 1.0}, {"round": 2, "loss": 0.5}]
    assert rd.metrics() == kept
    assert len((rd.path / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_tolerates_truncated_last_line(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create(RunConfig(), "federated")
    rd.append_metrics({"round": 1})
    rd.append_metrics({"round": 2})
    with open(rd.path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "lo')  # crash mid-write
    assert rd.metrics() == [{"round": 1}, {"round": 2}]
    assert rd.truncate_metrics(5) == [{"round": 1}, {"round": 2}]
    assert json.loads((rd.path / "metrics.jsonl").read_text().splitlines()[-1]) == {"round": 2}


# --- server.validate and server.sample ------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    from fedfm import server as server_mod

    return server_mod


REF = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}


def update(n: int = 5, **delta) -> ClientUpdate:
    d = {"x": torch.ones(2, 3), "y": torch.ones(4)}
    d.update(delta)
    return ClientUpdate("c", {k: v for k, v in d.items() if v is not None}, n)


def test_validate_accepts_good_update(server):
    assert server.validate(update(), REF) is None


def test_validate_rejects_bad_updates(server):
    nan = torch.ones(4)
    nan[2] = float("nan")
    inf = torch.ones(4)
    inf[0] = float("inf")
    assert "NaN" in server.validate(update(y=nan), REF)
    assert "Inf" in server.validate(update(y=inf), REF)
    assert "shape" in server.validate(update(x=torch.ones(3, 2)), REF)
    assert "names" in server.validate(update(y=None), REF)  # missing tensor
    assert "names" in server.validate(update(z=torch.ones(1)), REF)  # extra tensor
    assert "dtype" in server.validate(update(y=torch.ones(4, dtype=torch.int64)), REF)
    assert "num_examples" in server.validate(update(n=0), REF)
    assert "num_examples" in server.validate(update(n=-3), REF)
    # a remote node's count arrives as a float: NaN fails "<= 0" too, and either would poison the weighted mean
    assert "num_examples" in server.validate(update(n=float("nan")), REF)
    assert "num_examples" in server.validate(update(n=float("inf")), REF)


def cfg_sampling(fraction: float, min_clients: int = 1, seed: int = 0) -> RunConfig:
    return RunConfig(seed=seed, federation={"num_clients": 10, "fraction": fraction, "min_clients": min_clients})


@pytest.mark.parametrize(
    ("n", "fraction", "min_clients", "k"),
    [
        (10, 0.3, 1, 3),  # max(1, round(3.0)) = 3
        (10, 0.3, 5, 5),  # max(5, 3) = 5
        (10, 1.0, 1, 10),  # everyone
        (10, 0.04, 1, 1),  # round(0.4) = 0 -> min_clients 1
        (7, 0.6, 1, 4),  # round(4.2) = 4
        (4, 0.5, 9, 4),  # min_clients above n is capped at n
    ],
)
def test_sample_size_and_members(server, n, fraction, min_clients, k):
    members = [3 * i + 1 for i in range(n)]  # not 0..n-1
    group = server.Group("g", members)
    picked = server.sample(group, 1, cfg_sampling(fraction, min_clients))
    assert len(picked) == k
    assert picked == sorted(picked) and len(set(picked)) == k
    assert set(picked) <= set(members)


def test_sample_is_seeded(server):
    group = server.Group("g", list(range(20)))
    cfg = cfg_sampling(0.25)
    assert server.sample(group, 3, cfg) == server.sample(group, 3, cfg)
    per_round = {tuple(server.sample(group, r, cfg)) for r in range(1, 9)}
    assert len(per_round) > 1  # rounds draw different clients
    other_seed = {tuple(server.sample(group, r, cfg_sampling(0.25, seed=1))) for r in range(1, 9)}
    assert other_seed != per_round


def test_sample_single_member(server):
    assert server.sample(server.Group("solo", [7]), 5, cfg_sampling(0.1)) == [7]
