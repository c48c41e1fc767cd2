"""Personalization (fedper, ditto, finetune): personal tensors stay at the owner, each owner's model is scored on its
own split, saved in Hugging Face format, rescored by `fedfm eval`, and shown as the comparison's 'personalized' row.
Tiny runs on real MiniLM and BBC."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedfm import config as config_mod
from fedfm import server
from fedfm.app import App
from fedfm.errors import ConfigError
from fedfm.evaluate import evaluate_run
from fedfm.features.personal import Personal
from fedfm.types import ClientUpdate

pytestmark = pytest.mark.slow

TINY = [
    "name=p", "seed=2", "rounds=2", "data.source=bbc", "data.max_examples=200", "data.partition=pathological",
    "data.classes_per_client=2", "data.max_length=32", "federation.num_clients=4", "train.local_steps=2",
    "train.batch_size=8", "train.lr=0.003", "eval.max_examples=40", "compare.methods=[federated]",
]


def tiny(tmp_path, *extra):
    return config_mod.load(None, [*TINY, f"output_dir={tmp_path}", *extra])


def test_fedper_keeps_the_head_at_the_owner_and_eval_rescores_the_saved_models(tmp_path):
    cfg = tiny(tmp_path, "personal.method=fedper")
    app = App(cfg)
    head = [n for n in app.initial_weights if "classifier" in n]
    start = {n: app.initial_weights[n].clone() for n in head}
    sent: list[set[str]] = []
    train = app.client_train
    app.client_train = lambda i, t: (u := train(i, t), sent.append(set(u.delta)))[0]  # what leaves each owner
    run_dir = tmp_path / "run"
    server.run_method(app, "federated", run_dir)
    assert sent and all(not (names & set(head)) for names in sent)  # the head never left an owner
    final = app.feature(Personal)
    summary = json.loads((run_dir / "summary.json").read_text())
    personal = summary["personal"]
    assert personal["method"] == "fedper" and len(personal["per_client"]) == 4
    # the shared head stayed as initialised (every owner's change to it stayed home)
    ck = run_dir / "checkpoints"
    state = load_file(ck / (ck / "LATEST").read_text().strip() / "state-g0.safetensors")
    for n in head:
        key = next(k for k in state if k.endswith(n))  # the checkpoint's name for the tensor
        assert torch.equal(state[key], start[n])
    assert final is not None
    rows = evaluate_run(run_dir)["rows"]
    for c in personal["per_client"]:
        mine = [r for r in rows if r["model"] == f"personal/{c['client']}"]
        assert len(mine) == 1 and mine[0]["accuracy"] == pytest.approx(c["accuracy"], abs=1e-6)  # float32 on the wire


def test_fedper_fills_a_kept_tensor_the_owner_did_not_send():
    class Stub:  # only what Personal reads at set-up
        cfg = config_mod.load(None, ["personal.method=fedper", "personal.keep=[head]"])
        initial_weights = {"body": torch.zeros(2), "head": torch.zeros(3)}

    feature = Personal(Stub())
    update = ClientUpdate(client="c", delta={"body": torch.tensor([1.0, 2.0])}, num_examples=3)
    assert feature.decode(None, update, {"body": torch.ones(2), "head": torch.ones(3)}) is None
    assert torch.equal(update.delta["head"], torch.zeros(3)) and torch.equal(update.delta["body"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="nothing would be shared"):
        Stub.cfg = config_mod.load(None, ["personal.method=fedper", "personal.keep=[head, body]"])
        Personal(Stub())


class Flat:
    """A toy owner: one trainable vector whose data loss is zero, so only Ditto's pull moves it."""

    class Task:
        @staticmethod
        def batch(data, idx):
            return idx

        @staticmethod
        def loss_terms(batch):
            return len(batch)

        @staticmethod
        def loss(model, batch):
            return (model.p * 0.0).sum()

    def __init__(self, method: str, lam: float = 0.5):
        self.model = torch.nn.Module()
        self.model.p = torch.nn.Parameter(torch.zeros(2))
        self.task = self.Task()
        self.cfg = config_mod.load(None, [f"personal.method={method}", f"personal.ditto_lambda={lam}", "train.lr=0.1",
                                          "train.schedule=constant", "train.max_grad_norm=null", "rounds=1"])
        self.initial_weights = {"p": torch.zeros(2)}


def owner_round(app, state, weights, delta):
    """One ClientRound through Personal's client hooks, the global training's update given."""
    from fedfm.features.base import ClientRound
    from fedfm.types import ClientTask

    c = ClientRound(0, "o", ClientTask(1, weights, num_examples=1), True, torch.zeros(1), lambda: state)
    feature = Personal(app)
    feature.client_before(c)
    out = feature.client_after(c, ClientUpdate(client="o", delta=delta, num_examples=1))
    return c, out


def test_ditto_pulls_the_personal_copy_toward_the_global_model_by_hand():
    # v = [1, -1], w = [0, 0], one step: the data loss has no gradient, the pull's is lam (v - w) = [0.5, -0.5];
    # AdamW's first step moves each coordinate by lr * g / (|g| + eps) = 0.1: v' = [0.9, -0.9]
    app = Flat("ditto")
    c, out = owner_round(app, {"personal.p": torch.tensor([1.0, -1.0])}, {"p": torch.zeros(2)}, {"p": torch.ones(2)})
    assert torch.allclose(c.new_state["personal.p"], torch.tensor([0.9, -0.9]), atol=1e-6)
    assert torch.equal(out.delta["p"], torch.ones(2))  # the shared update leaves unchanged
    # no personal copy yet: it starts from the global model, which the pull leaves where it is
    c, _ = owner_round(app, {}, {"p": torch.tensor([2.0, 3.0])}, {"p": torch.ones(2)})
    assert torch.allclose(c.new_state["personal.p"], torch.tensor([2.0, 3.0]), atol=1e-6)


def test_fedper_trains_from_its_own_kept_tensor_and_keeps_start_plus_change():
    class Two(Flat):
        def __init__(self):
            super().__init__("fedper")
            self.cfg = config_mod.load(None, ["personal.method=fedper", "personal.keep=[head]"])
            self.initial_weights = {"body": torch.zeros(2), "head": torch.zeros(2)}

    glob = {"body": torch.zeros(2), "head": torch.full((2,), 5.0)}
    c, out = owner_round(Two(), {"personal.head": torch.tensor([1.0, 2.0])}, glob,
                         {"body": torch.ones(2), "head": torch.tensor([0.5, 0.5])})
    assert torch.equal(c.task.weights["head"], torch.tensor([1.0, 2.0]))  # it trained from its own head
    assert torch.equal(c.new_state["personal.head"], torch.tensor([1.5, 2.5]))  # its head + the change
    assert set(out.delta) == {"body"}  # the head is not sent


@pytest.mark.parametrize("method", ["ditto", "finetune"])
def test_ditto_and_finetune_give_each_owner_a_scored_saved_model(tmp_path, method):
    cfg = tiny(tmp_path, f"personal.method={method}", "compare.methods=[federated, local]", "personal.finetune_steps=3",
               "rounds=1")  # one round: the personal model and the row are what is checked
    comparison = server.compare(cfg)
    base = tmp_path / "p"
    summary = json.loads((base / "federated" / "summary.json").read_text())
    personal = summary["personal"]
    assert [c["client"] for c in personal["per_client"]] == [s["client"] for s in summary["per_client"]]
    for c in personal["per_client"]:
        assert (base / "federated" / "personal" / c["client"] / "adapter_config.json").is_file()
    # the personal models differ from the global one: their own-split scores are not the global model's
    own_global = [s["own"]["loss"] for s in summary["per_client"]]
    assert [c["loss"] for c in personal["per_client"]] != own_global
    rows = {r["method"]: r for r in comparison["rows"]}
    assert set(rows) == {"federated", "local", "personalized"}
    assert rows["personalized"]["own_accuracy"] == pytest.approx(personal["own_mean"]["accuracy"])
    assert rows["personalized"]["own_worst_accuracy"] == pytest.approx(min(c["accuracy"] for c in personal["per_client"]))
    assert "personalized" in (base / "comparison.md").read_text()
