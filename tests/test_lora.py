"""Tests of fedfm.lora: exact (product) aggregation of LoRA factors, HetLoRA / FlexLoRA heterogeneous ranks.

Every expected number is worked out by hand in a comment next to it.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fedfm.lora import (
    assign_ranks,
    exact_mean,
    hetlora_mean,
    lora_pairs,
    pack_rank,
    product_gap,
    rank_gradient_mask,
    rank_of,
    truncate_rank,
    unpack_rank,
)
from fedfm.strategies import weighted_mean
from fedfm.types import ClientUpdate

Q = "base_model.model.bert.encoder.layer.0.attention.self.query"
A, B = f"{Q}.lora_A.default.weight", f"{Q}.lora_B.default.weight"
HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def M(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def upd(client: str, n: float, **delta: torch.Tensor) -> ClientUpdate:
    names = {"a": A, "b": B, "head": HEAD}
    return ClientUpdate(client, {names[k]: v for k, v in delta.items()}, n)


def product(weights, delta, a=A, b=B) -> torch.Tensor:
    return (weights[b] + delta[b]).double() @ (weights[a] + delta[a]).double()


def random_case(seed: int, clients: int, out: int = 3, inp: int = 4, r: int = 3):
    """Global weights (A r x in, B out x r, a head) and `clients` random updates with unequal num_examples."""
    g = torch.Generator().manual_seed(seed)
    weights = {A: torch.randn(r, inp, generator=g), B: torch.randn(out, r, generator=g)}
    weights[HEAD] = torch.randn(2, 3, generator=g)
    updates = [
        upd(f"c{i}", 10 * (i + 1), a=torch.randn(r, inp, generator=g), b=torch.randn(out, r, generator=g),
            head=torch.randn(2, 3, generator=g))
        for i in range(clients)
    ]
    return weights, updates


def mean_products(weights, updates) -> torch.Tensor:
    total = sum(u.num_examples for u in updates)
    return sum(u.num_examples / total * product(weights, u.delta) for u in updates)


def test_lora_pairs_names_and_errors():
    other = f"{Q}.lora_A.my_adapter.weight"
    names = [A, B, HEAD, other, other.replace("lora_A", "lora_B")]
    with pytest.raises(ValueError, match="several LoRA adapters"):
        lora_pairs(names)
    assert lora_pairs([A, B, HEAD]) == {Q: (A, B)}
    assert lora_pairs([other, other.replace("lora_A", "lora_B")]) == {Q: (other, other.replace("lora_A", "lora_B"))}
    with pytest.raises(ValueError, match="no partner"):
        lora_pairs([A, HEAD])
    with pytest.raises(ValueError, match="no partner"):
        lora_pairs([B])


def test_rank_of():
    pairs = {Q: (A, B), "v": ("v.lora_A.x", "v.lora_B.x")}
    w = {A: torch.zeros(2, 4), B: torch.zeros(3, 2), "v.lora_A.x": torch.zeros(2, 5), "v.lora_B.x": torch.zeros(5, 2)}
    assert rank_of(w, pairs) == 2
    with pytest.raises(ValueError, match="other LoRA modules have rank 2"):
        rank_of({**w, "v.lora_A.x": torch.zeros(3, 5), "v.lora_B.x": torch.zeros(5, 3)}, pairs)
    with pytest.raises(ValueError, match="has rank 2 but"):
        rank_of({**w, B: torch.zeros(3, 1)}, pairs)


def test_one_dimensional_counterexample():
    # global A = B = 0; clients end at (A, B) = (1, 1) and (3, 3), equal sizes
    weights = {A: M([0.0]), B: M([0.0])}
    updates = [upd("x", 5, a=M([1.0]), b=M([1.0])), upd("y", 5, a=M([3.0]), b=M([3.0]))]
    sep = weighted_mean(updates)
    assert (sep[B] @ sep[A]).item() == pytest.approx(4.0)  # mean(B) mean(A) = 2 * 2
    delta, info = exact_mean(weights, updates)
    assert product(weights, delta).item() == pytest.approx(5.0, abs=1e-5)  # mean(BA) = (1 + 9) / 2
    assert abs((weights[A] + delta[A]).item()) == pytest.approx(1.0, abs=1e-6)  # A' = V^T: a unit row; B' = U S = 5
    assert info == {"lora_truncation_error": pytest.approx(0.0, abs=1e-12), "lora_modules": 1}
    assert product_gap(weights, updates) == pytest.approx(0.2)  # |4 - 5| / 5


@pytest.mark.parametrize("clients", [2, 3])
def test_exact_mean_full_rank_reproduces_mean_of_products(clients):
    # r = 3 = min(out, in), so M has rank <= 3 and the rank-3 refactoring loses nothing
    weights, updates = random_case(clients, clients)
    delta, info = exact_mean(weights, updates)
    assert torch.allclose(product(weights, delta), mean_products(weights, updates), atol=1e-5)
    assert info["lora_truncation_error"] < 1e-6
    assert product_gap(weights, updates) > 0.01  # separate averaging misses it on random factors


def test_exact_mean_truncates_to_best_rank_k():
    weights, updates = random_case(7, 3, out=5, inp=6, r=4)
    m = mean_products(weights, updates)  # rank 5 = min(out, in) in general (3 clients of rank 4), > any k below
    u, s, vh = torch.linalg.svd(m)
    errors = []
    for k in (1, 2, 4):
        best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young
        delta, info = exact_mean(weights, updates, rank=k)
        assert torch.allclose(product(weights, delta), best, atol=1e-4)
        new_a, new_b = weights[A] + delta[A], weights[B] + delta[B]
        assert new_a[k:].abs().sum() < 1e-5 and new_b[:, k:].abs().sum() < 1e-5  # components >= k are zero
        err = float((m - best).norm() / m.norm())
        assert info["lora_truncation_error"] == pytest.approx(err, abs=1e-6)
        errors.append(err)
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0.01  # = sqrt(s_5^2 / sum s^2) > 0 at k = 4
    with pytest.raises(ValueError, match="outside 1..4"):
        exact_mean(weights, updates, rank=5)


def test_exact_mean_example_weights_heads_and_inputs():
    # global A = B = 0; x ends at B A = 1 * 1 = 1 with 1 example, y at 3 * 3 = 9 with 3: mean = (1 + 27) / 4 = 7
    weights = {A: M([0.0]), B: M([0.0]), HEAD: M([1.0, 2.0])}
    updates = [upd("x", 1, a=M([1.0]), b=M([1.0]), head=M([4.0, 0.0])),
               upd("y", 3, a=M([3.0]), b=M([3.0]), head=M([0.0, 8.0]))]
    copies = [{k: v.clone() for k, v in u.delta.items()} for u in updates]
    wcopy = {k: v.clone() for k, v in weights.items()}
    delta, _ = exact_mean(weights, updates)
    assert product(weights, delta).item() == pytest.approx(7.0, abs=1e-5)
    assert torch.allclose(delta[HEAD], M([1.0, 6.0]))  # (4 * 1 + 0 * 3) / 4, (0 + 8 * 3) / 4
    assert torch.equal(delta[HEAD], weighted_mean(updates)[HEAD])
    assert set(delta) == set(weights)
    for u, c in zip(updates, copies):
        assert all(torch.equal(u.delta[k], c[k]) for k in c)
    assert all(torch.equal(weights[k], wcopy[k]) for k in weights)
    # client order does not matter, bit for bit
    again, _ = exact_mean(weights, updates[::-1])
    assert all(torch.equal(delta[k], again[k]) for k in delta)


def test_exact_mean_with_ranks_ignores_extra_components():
    # global rank 2, A = B = 0. Client x has rank 1: its component 1 (garbage 100s) must not count.
    weights = {A: torch.zeros(2, 2), B: torch.zeros(2, 2)}
    x = upd("x", 1, a=M([1.0, 0.0], [100.0, 100.0]), b=M([1.0, 100.0], [0.0, 100.0]))  # B[:, :1] A[:1] = e1 e1^T
    y = upd("y", 1, a=M([0.0, 0.0], [0.0, 2.0]), b=M([0.0, 0.0], [0.0, 2.0]))  # product = 4 e2 e2^T
    delta, info = exact_mean(weights, [x, y], ranks={"x": 1, "y": 2})
    # M = (e1 e1^T + 4 e2 e2^T) / 2 = diag(0.5, 2): rank 2, exact
    assert torch.allclose(product(weights, delta), torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64)), atol=1e-6)
    assert info["lora_truncation_error"] == pytest.approx(0.0, abs=1e-9)
    # rank 1: keep the larger singular value 2; error = 0.5 / sqrt(0.25 + 4) = 0.2425
    delta, info = exact_mean(weights, [x, y], rank=1, ranks={"x": 1, "y": 2})
    assert torch.allclose(product(weights, delta), torch.diag(torch.tensor([0.0, 2.0], dtype=torch.float64)), atol=1e-6)
    assert info["lora_truncation_error"] == pytest.approx(0.5 / 4.25**0.5, abs=1e-6)
    # with x's extra component zeroed: mean A = mean B = diag(0.5, 1), separate product diag(0.25, 1) vs exact
    # diag(0.5, 2): gap = ||diag(0.25, 1)|| / ||diag(0.5, 2)|| = sqrt(1.0625 / 4.25) = 0.5
    assert product_gap(weights, [x, y], ranks={"x": 1, "y": 2}) == pytest.approx(0.5)


def test_exact_mean_conv_shapes():
    # peft Conv2d LoRA: A is r x in x kh x kw, B is out x r x 1 x 1; the update is B.flatten(1) @ A.flatten(1)
    g = torch.Generator().manual_seed(5)
    ca, cb = "conv.lora_A.default.weight", "conv.lora_B.default.weight"
    weights = {ca: torch.randn(2, 3, 2, 2, generator=g), cb: torch.randn(4, 2, 1, 1, generator=g)}
    d = {ca: torch.randn(2, 3, 2, 2, generator=g), cb: torch.randn(4, 2, 1, 1, generator=g)}
    delta, info = exact_mean(weights, [ClientUpdate("c", d, 1)])  # one client: rank 2 fits exactly
    assert info["lora_truncation_error"] < 1e-6
    assert delta[ca].shape == (2, 3, 2, 2) and delta[cb].shape == (4, 2, 1, 1)

    def flat(w):
        return (w[cb].flatten(1) @ w[ca].flatten(1)).double()

    new = {k: weights[k] + delta[k] for k in weights}
    assert torch.allclose(flat(new), flat({k: weights[k] + d[k] for k in weights}), atol=1e-5)


def test_hetlora_mean_worked_example():
    # global rank 2; a has rank 1 (3 examples), b rank 2 (1 example)
    weights = {A: torch.zeros(2, 2), B: torch.zeros(2, 2), HEAD: torch.zeros(1)}
    a = upd("a", 3, a=M([4.0, 4.0], [0.0, 0.0]), b=M([8.0, 0.0], [8.0, 0.0]), head=M([4.0]))
    b = upd("b", 1, a=M([0.0, 8.0], [2.0, 6.0]), b=M([4.0, 10.0], [0.0, 12.0]), head=M([0.0]))
    delta = hetlora_mean(weights, [a, b], {"a": 1, "b": 2})
    # component 0 over both, weights 3/4 and 1/4: A row 0 = (3, 3) + (0, 2) = (3, 5); B col 0 = (6, 6) + (1, 0)
    # component 1 from b alone: A row 1 = (2, 6); B col 1 = (10, 12)
    assert torch.allclose(delta[A], M([3.0, 5.0], [2.0, 6.0]))
    assert torch.allclose(delta[B], M([7.0, 10.0], [6.0, 12.0]))
    assert torch.allclose(delta[HEAD], M(3.0))  # (4 * 3 + 0) / 4 over all clients
    # nobody holds component 1: delta 0
    delta = hetlora_mean(weights, [a, b], {"a": 1, "b": 1})
    assert torch.equal(delta[A][1], torch.zeros(2)) and torch.equal(delta[B][:, 1], torch.zeros(2))


def test_truncate_and_mask_keep_components_at_zero_under_adamw():
    g = torch.Generator().manual_seed(0)
    weights = {A: torch.randn(3, 4, generator=g), B: torch.randn(5, 3, generator=g)}
    pairs = lora_pairs(weights)
    start = truncate_rank(weights, pairs, 1)
    assert torch.equal(start[A][0], weights[A][0]) and torch.equal(start[A][1:], torch.zeros(2, 4))
    assert torch.equal(start[B][:, 0], weights[B][:, 0]) and torch.equal(start[B][:, 1:], torch.zeros(5, 2))
    assert weights[A][1:].abs().sum() > 0  # input untouched
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 5, generator=g)

    def train(masked: bool) -> dict[str, torch.nn.Parameter]:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        handles = rank_gradient_mask(params, pairs, 1) if masked else []
        opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.01)
        for _ in range(5):
            loss = (x @ (params[B] @ params[A]).T - y).pow(2).mean()
            loss = loss + sum((params[k] - weights[k]).pow(2).sum() for k in params)  # FedProx-like pull to untruncated
            opt.zero_grad()
            loss.backward()
            opt.step()
        for h in handles:
            h.remove()
        return params

    masked = train(True)
    assert torch.equal(masked[A][1:], torch.zeros(2, 4)) and torch.equal(masked[B][:, 1:], torch.zeros(5, 2))
    assert not torch.equal(masked[A][0], start[A][0])  # component 0 did train
    free = train(False)
    assert free[A][1:].abs().sum() > 0  # without the mask the proximal pull revives them


def test_pack_unpack_round_trip_and_size():
    g = torch.Generator().manual_seed(1)
    reference = {A: torch.zeros(4, 6), B: torch.zeros(5, 4), HEAD: torch.zeros(2, 3)}
    pairs = lora_pairs(reference)
    delta = {A: torch.randn(4, 6, generator=g), B: torch.randn(5, 4, generator=g), HEAD: torch.randn(2, 3, generator=g)}
    message = pack_rank(delta, pairs, 2)
    assert message[A].shape == (2, 6) and message[B].shape == (5, 2) and message[HEAD] is delta[HEAD]
    assert message[B].is_contiguous() and message[A].untyped_storage().nbytes() == 2 * 6 * 4  # compact copies
    # 4*6 + 5*4 + 6 = 50 numbers -> 2*6 + 5*2 + 6 = 28
    assert sum(t.numel() for t in message.values()) == 28 < sum(t.numel() for t in delta.values()) == 50
    padded, r = unpack_rank(message, reference, pairs)
    assert r == 2
    assert torch.equal(padded[A], torch.cat([delta[A][:2], torch.zeros(2, 6)]))
    assert torch.equal(padded[B], torch.cat([delta[B][:, :2], torch.zeros(5, 2)], dim=1))
    assert torch.equal(padded[HEAD], delta[HEAD])
    assert unpack_rank(delta, reference, pairs)[1] == 4  # a full-rank update passes through


@pytest.mark.parametrize(
    "change, match",
    [
        ({A: torch.zeros(5, 6), B: torch.zeros(5, 5)}, "rank <= 4"),  # larger than the reference
        ({A: torch.zeros(2, 7)}, "does not fit"),  # wrong input dimension
        ({B: torch.zeros(5, 3)}, "rank-2 slice"),  # A and B disagree
        ({B: torch.zeros(6, 2)}, "rank-2 slice"),  # wrong output dimension
        ({HEAD: torch.zeros(3, 3)}, "expected \\(2, 3\\)"),
    ],
)
def test_unpack_rank_rejects_malformed(change, match):
    reference = {A: torch.zeros(4, 6), B: torch.zeros(5, 4), HEAD: torch.zeros(2, 3)}
    message = {A: torch.zeros(2, 6), B: torch.zeros(5, 2), HEAD: torch.zeros(2, 3), **change}
    with pytest.raises(ValueError, match=match):
        unpack_rank(message, reference, lora_pairs(reference))


def test_unpack_rank_rejects_mixed_ranks_and_keys():
    v = "v"
    va, vb = f"{v}.lora_A.default.weight", f"{v}.lora_B.default.weight"
    reference = {A: torch.zeros(4, 6), B: torch.zeros(5, 4), va: torch.zeros(4, 3), vb: torch.zeros(3, 4)}
    pairs = lora_pairs(reference)
    message = {A: torch.zeros(2, 6), B: torch.zeros(5, 2), va: torch.zeros(3, 3), vb: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=f"{va}.*rank 3.*rank 2"):
        unpack_rank(message, reference, pairs)
    with pytest.raises(ValueError, match="missing"):
        unpack_rank({A: torch.zeros(2, 6), B: torch.zeros(5, 2)}, reference, pairs)


def test_exact_mean_rejects_packed_updates():
    weights, updates = random_case(3, 2)
    packed = ClientUpdate("p", pack_rank(updates[0].delta, lora_pairs(weights), 1), 1)
    with pytest.raises(ValueError, match="unpack_rank"):
        exact_mean(weights, [packed, updates[1]])


def test_peft_names_pair_and_product_matches_forward():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False,
                     modules_to_save=["2"])
    model = get_peft_model(base, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pairs = lora_pairs(trainable)
    assert pairs == {"base_model.model.0": ("base_model.model.0.lora_A.default.weight",
                                            "base_model.model.0.lora_B.default.weight")}
    assert rank_of(trainable, pairs) == 2
    a, b = (trainable[k].detach() for k in pairs["base_model.model.0"])
    x = torch.randn(7, 4)
    layer = model.base_model.model[0]
    with torch.no_grad():
        with model.disable_adapter():
            plain = layer(x)
        # scaling = lora_alpha / r = 4 / 2 = 2
        assert torch.allclose(layer(x) - plain, x @ (2.0 * b @ a).T, atol=1e-6)


def test_assign_ranks_balanced_and_deterministic():
    ranks = assign_ranks(10, [2, 4, 8], seed=3)
    assert sorted(Counter(ranks).values()) == [3, 3, 4]  # 10 = 3 + 3 + 4
    assert ranks == assign_ranks(10, [2, 4, 8], seed=3)
    assert any(assign_ranks(10, [2, 4, 8], seed=s) != ranks for s in range(4, 8))
    assert assign_ranks(4, [8], seed=0) == [8, 8, 8, 8]
    with pytest.raises(ValueError):
        assign_ranks(3, [], seed=0)
    with pytest.raises(ValueError):
        assign_ranks(3, [0, 2], seed=0)
