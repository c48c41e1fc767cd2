"""Aggregating LoRA adapters: why averaging the factors is not averaging the update, and what to do instead.

A LoRA module changes a frozen weight by ``scaling * B @ A`` (B: out x r, A: r x in; peft names them
``<module>.lora_B.<adapter>.weight`` and ``<module>.lora_A.<adapter>.weight``). FedAvg averages every trainable
tensor separately, so the global model gets ``mean(B_i) @ mean(A_i)``, which is not the mean of the clients'
updates ``mean(B_i @ A_i)``. The 1-D example (r = in = out = 1, two clients of equal size):

    client 1: A = 1, B = 1  ->  B A = 1
    client 2: A = 3, B = 3  ->  B A = 9
    separate averaging:  mean(B) mean(A) = 2 * 2 = 4
    exact averaging:     mean(B A)       = (1 + 9) / 2 = 5

The difference is the cross terms: ``mean(B_i) mean(A_i) = mean(B_i A_i) - sum_i w_i (B_i - mean B)(A_i - mean A)``.
``product_gap`` measures it on real updates. Wang et al. 2024 (FLoRA, "Federated Fine-Tuning Large Language Models
with Heterogeneous Low-Rank Adaptations", NeurIPS) call it aggregation noise and avoid it by stacking the clients'
factors (the global rank grows with the number of clients).

``exact_mean`` keeps the global rank fixed: it forms ``M = sum_i w_i B_i A_i`` (weights = example counts) and
refactors M by truncated SVD into rank-r factors, ``B' = U S`` and ``A' = V^T`` (A keeps orthonormal rows, the role
of LoRA's random A; a balanced sqrt(S) split stalls training near zero, see the comment in ``exact_mean``). By
Eckart-Young, ``B' A'`` is the best rank-r approximation of M; it equals M when M has rank <= r (always for one
client; in general M has rank up to ``sum_i r_i``), and the relative truncation error is reported.

Heterogeneous ranks (clients that can afford different r_i <= r), two server rules:

- HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP):
  a rank-r_i client trains the first r_i components of the global adapter (``truncate_rank``; ``rank_gradient_mask``
  keeps the rest at zero), sends only those (``pack_rank``), and the server zero-pads them back (``unpack_rank``)
  and averages each component over the clients that hold it (``hetlora_mean``). The paper additionally weighs
  clients by the norm of ``B_i A_i`` (sparsity-weighted aggregation) and lets clients prune their own rank; neither is
  done here: the weights are example counts, renormalised per component.
- FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
  Resources", NeurIPS): the server averages the clients' full-size products ``B_i A_i`` (each at its own rank) and
  redistributes by SVD: ``exact_mean(..., ranks=...)``.

Every function takes the global weights and a list of ClientUpdate whose ``delta`` is relative to them (a client's
final factors are ``A + dA_i``, ``B + dB_i``), returns new tensors and never modifies its inputs. peft's scaling
``lora_alpha / r`` must be the same for all clients (it is: a rank-r_i client runs the global rank-r adapter with its
extra components zeroed). Conv LoRA (A: r x in x k x k, B: out x r x 1 x 1) is handled by flattening.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedfm.aggregators.mean import weighted_mean
from fedfm.types import ClientUpdate, Weights

_A, _B = ".lora_A.", ".lora_B."


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key) for every ``<prefix>.lora_A.<adapter>...`` with its ``.lora_B.`` partner.

    Any adapter name matches; a factor without its partner, or two adapters on one module, raise ValueError.
    """
    names = list(names)
    present = set(names)
    pairs: dict[str, tuple[str, str]] = {}
    for name in sorted(names):
        for mine, other in ((_A, _B), (_B, _A)):
            if mine not in name:
                continue
            prefix, _, rest = name.partition(mine)
            partner = f"{prefix}{other}{rest}"
            if partner not in present:
                raise ValueError(f"LoRA factor {name!r} has no partner {partner!r}")
            if mine == _A:
                if prefix in pairs:
                    raise ValueError(f"several LoRA adapters on module {prefix!r}: {pairs[prefix][0]!r}, {name!r}")
                pairs[prefix] = (name, partner)
    return pairs


def rank_of(weights: Weights, pairs: dict[str, tuple[str, str]]) -> int:
    """The global LoRA rank r (rows of every A, columns of every B); ValueError if the modules disagree."""
    if not pairs:
        raise ValueError("no LoRA pairs")
    rank = None
    for a, b in pairs.values():
        ra, rb = weights[a].shape[0], weights[b].shape[1]
        if ra != rb:
            raise ValueError(f"{a!r} has rank {ra} but {b!r} has rank {rb}")
        if rank is not None and ra != rank:
            raise ValueError(f"{a!r} has rank {ra}, other LoRA modules have rank {rank}")
        rank = ra
    return rank


def _ordered(updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], list[float]]:
    """Updates in client-name order and their example weights w_i = n_i / sum n."""
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ordered = sorted(updates, key=lambda u: u.client)
    total = float(sum(u.num_examples for u in ordered))
    if total <= 0:
        raise ValueError("the clients' num_examples sum to zero")
    return ordered, [u.num_examples / total for u in ordered]


def _client_rank(ranks: dict[str, int] | None, client: str, full: int) -> int:
    r = full if ranks is None else ranks.get(client, full)
    if not 1 <= r <= full:
        raise ValueError(f"client {client!r}: rank {r} outside 1..{full}")
    return r


def _check_rank(r: int, full: int) -> None:
    if not 1 <= r <= full:
        raise ValueError(f"rank {r} outside 1..{full} (the global LoRA rank)")


def _check_shapes(weights: Weights, u: ClientUpdate, keys: tuple[str, ...]) -> None:
    for k in keys:
        if u.delta[k].shape != weights[k].shape:
            raise ValueError(
                f"client {u.client!r}: delta {k!r} has shape {tuple(u.delta[k].shape)}, expected "
                f"{tuple(weights[k].shape)} (unpack_rank packed updates first)"
            )


def _factors(weights: Weights, u: ClientUpdate, a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's final factors as float64 matrices: A_i (r x in*), B_i (out x r)."""
    _check_shapes(weights, u, (a, b))
    wa, wb = weights[a], weights[b]
    fa = (wa.double() + u.delta[a].double()).reshape(wa.shape[0], -1)
    fb = (wb.double() + u.delta[b].double()).reshape(wb.shape[0], wb.shape[1])  # conv B is out x r x 1 x 1
    return fa, fb


def _others_mean(weights: Weights, pairs: dict[str, tuple[str, str]], ordered: list[ClientUpdate]) -> Weights:
    """weighted_mean of the deltas of the tensors that are not LoRA factors."""
    lora = {k for pair in pairs.values() for k in pair}
    rest = [k for k in weights if k not in lora]
    if not rest:
        return {}
    return weighted_mean([ClientUpdate(u.client, {k: u.delta[k] for k in rest}, u.num_examples) for u in ordered])


def exact_mean(
    weights: Weights, updates: list[ClientUpdate], rank: int | None = None, ranks: dict[str, int] | None = None
) -> tuple[Weights, dict]:
    """Delta (apply as ``weights + delta``) whose LoRA products are the best rank-``rank`` fit of ``mean_n(B_i A_i)``.

    For each LoRA module: ``M = sum_i w_i B_i[:, :r_i] @ A_i[:r_i]`` with ``w_i = n_i / sum n`` and ``r_i =
    ranks[client]`` (clients not in ``ranks``, or ``ranks=None``: the global rank r), then truncated SVD to ``rank``
    (default r; components beyond it are zero) split as ``B' = U S``, ``A' = V^T`` (A keeps orthonormal rows), in float64.
    M is never formed: it is the product of the stacked factors, so QR of each side and an SVD of the small
    ``sum r_i``-square core give the same singular triple at O((in + out) (sum r_i)^2) cost. Non-LoRA tensors get the
    example-weighted mean of their deltas. The SVD's sign and basis choices change the factors but not ``B' A'``.

    With ``ranks`` this is FlexLoRA's server step (Bai et al. 2024): each client contributes its product at its own
    rank, and the SVD redistributes the full-size mean into global rank-r factors; next round a rank-r_i client
    receives them and keeps the first r_i components (``truncate_rank``), i.e. the top-r_i singular directions.

    Returns (delta, info) with info ``{"lora_truncation_error": max over modules of ||M - B'A'||_F / ||M||_F (0 when
    M = 0), "lora_modules": number of LoRA modules}``.
    """
    ordered, coef = _ordered(updates)
    pairs = lora_pairs(weights)
    delta = _others_mean(weights, pairs, ordered)
    worst = 0.0
    if pairs:
        full = rank_of(weights, pairs)
        k = full if rank is None else rank
        _check_rank(k, full)
        client_ranks = [_client_rank(ranks, u.client, full) for u in ordered]
        for a, b in pairs.values():
            bs, as_ = [], []
            for u, c, r in zip(ordered, coef, client_ranks):
                fa, fb = _factors(weights, u, a, b)
                bs.append(c * fb[:, :r])
                as_.append(fa[:r])
            qb, rb = torch.linalg.qr(torch.cat(bs, dim=1))  # M = qb (rb ra^T) qa^T
            qa, ra = torch.linalg.qr(torch.cat(as_, dim=0).T)
            u_, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
            m = min(k, s.numel())
            new_b = torch.zeros(qb.shape[0], full, dtype=torch.float64)
            new_a = torch.zeros(full, qa.shape[0], dtype=torch.float64)
            # A' = V^T (orthonormal rows, the role of LoRA's random A at initialisation), B' = U S. A balanced split
            # (sqrt(S) on each side) would shrink both factors to the square root of a small S early in training,
            # a near-saddle where both gradients vanish: it cost FlexLoRA 24 points in benchmarks/updates.py
            new_b[:, :m] = (qb @ u_[:, :m]) * s[:m]
            new_a[:m] = vh[:m] @ qa.T
            norm = s.norm()
            if norm > 0:
                worst = max(worst, float(s[m:].norm() / norm))
            for key, new in ((a, new_a), (b, new_b)):
                old = weights[key]
                delta[key] = new.reshape(old.shape).to(old.dtype) - old
    return {k: delta[k] for k in weights}, {"lora_truncation_error": worst, "lora_modules": len(pairs)}


def hetlora_mean(weights: Weights, updates: list[ClientUpdate], ranks: dict[str, int]) -> Weights:
    """HetLoRA-style zero-padding aggregation: component j of every LoRA pair (row j of dA, column j of dB) is the
    example-weighted mean over the clients with ``r_i > j`` only (a component nobody holds gets delta 0). Clients not
    in ``ranks`` hold the full rank. Non-LoRA tensors: the example-weighted mean over all clients."""
    ordered, _ = _ordered(updates)
    pairs = lora_pairs(weights)
    delta = _others_mean(weights, pairs, ordered)
    if pairs:
        full = rank_of(weights, pairs)
        held = torch.tensor(
            [[float(u.num_examples) if j < _client_rank(ranks, u.client, full) else 0.0 for j in range(full)]
             for u in ordered],
            dtype=torch.float64,
        )
        cols = held.sum(dim=0)
        coef = torch.where(cols > 0, held / cols.clamp_min(1e-300), torch.zeros_like(held)).float()  # clients x r
        for a, b in pairs.values():
            acc_a = torch.zeros_like(weights[a], dtype=torch.float32)
            acc_b = torch.zeros_like(weights[b], dtype=torch.float32)
            for u, c in zip(ordered, coef):
                _check_shapes(weights, u, (a, b))
                acc_a += c.view(-1, *[1] * (acc_a.dim() - 1)) * u.delta[a].float()
                acc_b += c.view(1, -1, *[1] * (acc_b.dim() - 2)) * u.delta[b].float()
            delta[a], delta[b] = acc_a, acc_b
    return {k: delta[k] for k in weights}


def product_gap(weights: Weights, updates: list[ClientUpdate], ranks: dict[str, int] | None = None) -> float:
    """How far separate averaging is from the exact product: max over LoRA modules of
    ``||mean(B_i) mean(A_i) - mean(B_i A_i)||_F / ||mean(B_i A_i)||_F`` (example-weighted means; 0 without LoRA
    modules or when both are zero, inf when only the exact mean is zero). With ``ranks``, a client's components
    >= r_i count as zero (what its truncated model held), as in exact_mean."""
    ordered, coef = _ordered(updates)
    pairs = lora_pairs(weights)
    client_ranks = [_client_rank(ranks, u.client, rank_of(weights, pairs)) for u in ordered] if pairs else []
    worst = 0.0
    for a, b in pairs.values():
        mean_a = mean_b = exact = 0.0
        for u, c, r in zip(ordered, coef, client_ranks):
            fa, fb = _factors(weights, u, a, b)
            fa, fb = _zero_from(fa, r, 0), _zero_from(fb, r, 1)
            mean_a, mean_b, exact = mean_a + c * fa, mean_b + c * fb, exact + c * (fb @ fa)
        gap, norm = float((mean_b @ mean_a - exact).norm()), float(exact.norm())
        worst = max(worst, gap / norm if norm > 0 else (0.0 if gap == 0 else float("inf")))
    return worst


def _zero_from(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Copy of t with indices >= r along dim set to zero."""
    out = t.clone()
    out.narrow(dim, r, t.shape[dim] - r).zero_()
    return out


def truncate_rank(weights: Weights, pairs: dict[str, tuple[str, str]], r_i: int) -> Weights:
    """What a rank-r_i client starts from (HetLoRA truncation): a copy with the rows >= r_i of every A and the
    columns >= r_i of every B zeroed, i.e. the first r_i components of the global adapter."""
    _check_rank(r_i, rank_of(weights, pairs))
    out = {k: v.clone() for k, v in weights.items()}
    for a, b in pairs.values():
        out[a], out[b] = _zero_from(weights[a], r_i, 0), _zero_from(weights[b], r_i, 1)
    return out


def rank_gradient_mask(
    params: dict[str, torch.nn.Parameter], pairs: dict[str, tuple[str, str]], r_i: int
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks zeroing the gradient of the components >= r_i (rows of A, columns of B); remove them after training.

    Starting from ``truncate_rank``, those components then stay exactly zero under AdamW (zero gradient keeps both
    moments at zero, and decoupled weight decay scales a zero to zero). Plain training would keep them at zero
    anyway (their gradients vanish while the partner factor's component is zero), but a loss term that touches them
    directly, such as FedProx's pull toward an untruncated anchor, would not. Opacus' DP optimiser rebuilds ``.grad``
    from per-example gradients plus noise and bypasses these hooks: there, pack_rank still drops the components, but
    they are not zero during local training.
    """
    _check_rank(r_i, rank_of({k: params[k] for pair in pairs.values() for k in pair}, pairs))
    handles = []
    for a, b in pairs.values():
        handles.append(params[a].register_hook(lambda g: _zero_from(g, r_i, 0)))
        handles.append(params[b].register_hook(lambda g: _zero_from(g, r_i, 1)))
    return handles


def pack_rank(delta: Weights, pairs: dict[str, tuple[str, str]], r_i: int) -> Weights:
    """The update a rank-r_i client sends: dA[:r_i] and dB[:, :r_i] as compact contiguous copies (so serialising
    them writes only r_i components), other tensors unchanged."""
    _check_rank(r_i, rank_of(delta, pairs))
    out = dict(delta)
    for a, b in pairs.values():
        out[a] = delta[a][:r_i].clone(memory_format=torch.contiguous_format)
        out[b] = delta[b][:, :r_i].clone(memory_format=torch.contiguous_format)
    return out


def unpack_rank(message: Weights, reference: Weights, pairs: dict[str, tuple[str, str]]) -> tuple[Weights, int]:
    """Server side of pack_rank: zero-pad every LoRA factor back to its shape in ``reference`` (the global weights)
    and return (padded delta, the client's rank read from the shapes; 0 without LoRA modules).

    ValueError, naming the tensor, on missing or unexpected keys, a factor larger than the reference or with
    mismatched dimensions, A and B of one module disagreeing, or modules disagreeing on the rank.
    """
    if set(message) != set(reference):
        missing, extra = sorted(set(reference) - set(message)), sorted(set(message) - set(reference))
        raise ValueError(f"update keys differ from the global weights: missing {missing}, unexpected {extra}")
    out: Weights = {}
    rank: int | None = None
    lora = set()
    for a, b in pairs.values():
        lora.update((a, b))
        ma, mb, ra, rb = message[a], message[b], reference[a], reference[b]
        if ma.dim() != ra.dim() or ma.shape[1:] != ra.shape[1:] or not 1 <= ma.shape[0] <= ra.shape[0]:
            raise ValueError(f"{a!r}: shape {tuple(ma.shape)} does not fit a rank <= {ra.shape[0]} slice of "
                             f"{tuple(ra.shape)}")
        r = ma.shape[0]
        if mb.dim() != rb.dim() or mb.shape[0] != rb.shape[0] or mb.shape[2:] != rb.shape[2:] or mb.shape[1] != r:
            raise ValueError(f"{b!r}: shape {tuple(mb.shape)} does not fit a rank-{r} slice of {tuple(rb.shape)}")
        if rank is not None and r != rank:
            raise ValueError(f"{a!r} has rank {r}, other LoRA modules in the update have rank {rank}")
        rank = r
        out[a] = torch.zeros(ra.shape, dtype=ma.dtype)
        out[a][:r] = ma
        out[b] = torch.zeros(rb.shape, dtype=mb.dtype)
        out[b][:, :r] = mb
    for k in message:
        if k not in lora:
            if message[k].shape != reference[k].shape:
                raise ValueError(f"{k!r}: shape {tuple(message[k].shape)}, expected {tuple(reference[k].shape)}")
            out[k] = message[k]
    return {k: out[k] for k in reference}, rank or 0


def assign_ranks(num_clients: int, choices: list[int], seed: int) -> list[int]:
    """A rank from ``choices`` for each client (index = client index): ``choices`` cycled over a seeded permutation
    of the clients, so every choice is used ``num_clients // len(choices)`` or one more times."""
    if not choices or any(int(c) != c or c < 1 for c in choices):
        raise ValueError(f"rank choices must be a non-empty list of positive integers, got {choices}")
    if num_clients < 0:
        raise ValueError(f"num_clients must be >= 0, got {num_clients}")
    perm = torch.randperm(num_clients, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * num_clients
    for k, client in enumerate(perm):
        out[client] = int(choices[k % len(choices)])
    return out
