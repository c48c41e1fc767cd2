"""Pre-training pieces: DiLoCo outer step, packing, perplexity, Algorithm 2 mixing."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.server import with_server
from fedfm.strategies import DiLoCo, FedAvg
from fedfm.server_opt.sgd import apply
from fedfm.tasks.causal_lm import IGNORE, Blocks, CausalLMTask, pack_ids
from fedfm.types import ClientUpdate, ServerState


def upd(name, value, n):
    return ClientUpdate(client=name, delta={"w": torch.tensor([value])}, num_examples=n)


def test_diloco_outer_step_by_hand():
    # w=1; clients moved +0.2 (n=1) and +0.8 (n=3): mean delta 0.65, pseudo-gradient g = -0.65.
    # Nesterov (lr 0.7, momentum 0.9): v1 = 0.65; w1 = 1 + 0.7 * (0.65 + 0.585) = 1.8645
    # round 2, mean delta 0.1: v2 = 0.9 * 0.65 + 0.1 = 0.685; w2 = w1 + 0.7 * (0.1 + 0.6165) = 2.36605
    s = DiLoCo(server_lr=0.7, momentum=0.9)
    st = ServerState(0, {"w": torch.tensor([1.0])}, s.init({"w": torch.tensor([1.0])}))
    st = s.aggregate(st, [upd("a", 0.2, 1), upd("b", 0.8, 3)])
    assert st.weights["w"].item() == pytest.approx(1.8645, abs=1e-6)
    assert st.opt["v.w"].item() == pytest.approx(0.65, abs=1e-7)
    st = s.aggregate(st, [upd("a", 0.1, 1)])
    assert st.weights["w"].item() == pytest.approx(2.36605, abs=1e-6)
    assert st.round == 2


def test_diloco_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    w0 = torch.randn(5)
    deltas = [torch.randn(5) * 0.1 for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    s = DiLoCo(0.7, 0.9)
    st = ServerState(0, {"w": w0.clone()}, s.init({"w": w0}))
    for d in deltas:
        p.grad = -d.clone()  # pseudo-gradient
        opt.step()
        st = s.aggregate(st, [ClientUpdate("c", {"w": d}, 1)])
    torch.testing.assert_close(st.weights["w"], p.detach(), rtol=0, atol=1e-6)


def test_pack_boundaries():
    # documents [1 2 3] and [4 5], EOS=0, block 3: stream 1 2 3 0 4 5 0 -> [1 2 3] [0 4 5] [0 pad pad]
    b = pack_ids([[1, 2, 3], [4, 5]], block_size=3, eos_id=0, pad_id=9)
    assert b.input_ids.tolist() == [[1, 2, 3], [0, 4, 5], [0, 9, 9]]
    assert b.lengths.tolist() == [3, 3, 1]
    assert b.num_tokens == 7
    exact = pack_ids([[1, 2], [3]], block_size=5, eos_id=0, pad_id=9)  # 5 tokens fill one block exactly
    assert exact.input_ids.tolist() == [[1, 2, 0, 3, 0]] and exact.lengths.tolist() == [5]
    assert len(pack_ids([], 4, 0, 9)) == 0
    batch = CausalLMTask.batch(b, torch.tensor([1, 2]))
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[0, 4, 5], [0, IGNORE, IGNORE]]


def test_perplexity_matches_direct_computation():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16))
    data = pack_ids([[int(t) for t in torch.randint(1, 50, (n,))] for n in (7, 12, 4)], 8, 0, 0)
    got = CausalLMTask().evaluate(model, data, batch_size=2)
    # direct: sum over blocks of -log p(x_t | x_<t) for t = 1..len-1, divided by the count of such t
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, n in zip(data.input_ids, data.lengths):
            logp = torch.log_softmax(model(ids[None, :n]).logits[0], -1)
            nll -= float(logp[torch.arange(n - 1), ids[1:n]].sum())
            count += int(n) - 1
    assert data.lengths.tolist() == [8, 8, 8, 2] and count == 22  # 23 tokens + 3 EOS = 26; one unpredicted per block
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_algorithm2_before_mixing_by_hand():
    # clients: delta 1.0 (n=30), 3.0 (n=10) -> example-weighted mean 1.5; server delta 5.0 with share 0.2:
    # 0.8 * 1.5 + 0.2 * 5.0 = 2.2
    clients = [upd("a", 1.0, 30), upd("b", 3.0, 10)]
    mixed = with_server(clients, upd("server", 5.0, 7), 0.2)
    st = FedAvg().aggregate(ServerState(0, {"w": torch.tensor([0.0])}), mixed)
    assert st.weights["w"].item() == pytest.approx(2.2, abs=1e-6)
    assert mixed[-1].num_examples == pytest.approx(10.0)  # 0.2 / 0.8 * 40
    assert with_server(clients, upd("server", 5.0, 7), 0.0) == clients
    only = FedAvg().aggregate(ServerState(0, {"w": torch.tensor([0.0])}), with_server(clients, upd("server", 5.0, 7), 1.0))
    assert only.weights["w"].item() == 5.0


def test_algorithm2_after_adds_scaled_update():
    # aggregate 2.0, server update 5.0, share 0.25 -> 2.0 + 1.25 = 3.25
    assert apply({"w": torch.tensor([2.0])}, {"w": torch.tensor([5.0])}, 0.25)["w"].item() == 3.25


def test_blocks_cat_and_subset():
    a, b = pack_ids([[1, 2, 3]], 2, 0, 9), pack_ids([[4]], 2, 0, 9)
    c = Blocks.cat([a, b])
    assert c.input_ids.tolist() == [[1, 2], [3, 0], [4, 0]]
    assert c.subset([2]).lengths.tolist() == [2]


def test_missing_smollm2_cache_says_how_to_fetch(tmp_path, monkeypatch):
    from fedfm.errors import ModelError
    from fedfm.models import resolve_model_path

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="fedfm data fetch --model smollm2"):
        resolve_model_path("smollm2")


def test_missing_corpus_says_how_to_fetch(tmp_path, monkeypatch):
    from fedfm import config as config_mod
    from fedfm.data import load_dataset
    from fedfm.errors import DataError

    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path))
    cfg = config_mod.load(None, ["task=causal_lm", "data.source=brown", "model.source=smollm2"])
    with pytest.raises(DataError, match="fedfm data fetch --corpus brown"):
        load_dataset(cfg.data, 0)
